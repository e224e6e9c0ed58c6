from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from datagen import extract
from datagen.errors import ExtractionError
from datagen.pipeline import DataGenerationPipeline

# text that cannot itself contain a tag
plain = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=200)
nonblank = plain.filter(lambda s: s.strip() != "")


def test_default_extractor_is_a_draft_tag() -> None:
    ex = DataGenerationPipeline.make_default_extractor(pattern_name="draft")
    assert ex("Sure!\n<draft>\n  Hello world.\n</draft>\nBye") == "Hello world."


@given(before=plain, body=nonblank, after=plain)
def test_tag_returns_the_stripped_body(before: str, body: str, after: str) -> None:
    assert extract.tag("draft")(f"{before}<draft>{body}</draft>{after}") == body.strip()


@given(first=nonblank, second=nonblank)
def test_tag_returns_the_first_complete_block(first: str, second: str) -> None:
    text = f"<draft>{first}</draft> and <draft>{second}</draft>"
    assert extract.tag("draft")(text) == first.strip()


def test_tag_skips_a_stray_opening_tag() -> None:
    assert extract.tag("draft")("<draft> unfinished... <draft>real</draft>") == "real"


@pytest.mark.parametrize("text", ["no tags", "<draft>never closed", "</draft><draft>",
                                  "<drafts>x</drafts>"])
def test_tag_without_complete_block_fails(text: str) -> None:
    with pytest.raises(ExtractionError, match="no complete <draft>"):
        extract.tag("draft")(text)


def test_tag_empty_block_fails() -> None:
    with pytest.raises(ExtractionError, match="empty"):
        extract.tag("draft")("<draft>  \n </draft>")


def test_tag_allows_attributes() -> None:
    assert extract.tag("answer")('<answer id="1">42</answer>') == "42"


def test_invalid_tag_name() -> None:
    with pytest.raises(ValueError):
        extract.tag("a b")


def test_regex_named_group() -> None:
    assert extract.regex(r"VERDICT: (?P<v>PASS|FAIL)")("...\nVERDICT: PASS\n") == "PASS"


def test_regex_several_named_groups_give_a_dict() -> None:
    ex = extract.regex(r"(?P<a>\d+)-(?P<b>\d+)")
    assert ex("range 3-9") == {"a": "3", "b": "9"}
    assert extract.regex(r"(?P<a>\d+)-(?P<b>\d+)", group="b")("3-9") == "9"


def test_regex_plain_groups() -> None:
    assert extract.regex(r"score=(\d+)")("score=7") == "7"
    assert extract.regex(r"\d+")("a 12 b") == "12"


def test_regex_no_match() -> None:
    with pytest.raises(ExtractionError, match="not found"):
        extract.regex(r"VERDICT: (?P<v>PASS|FAIL)")("nothing here")


def test_regex_unknown_group() -> None:
    with pytest.raises(ValueError, match="no group named"):
        extract.regex(r"(?P<a>x)", group="b")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12))
def test_json_round_trips_inside_prose_and_fences(value: object) -> None:
    import json

    dumped = json.dumps(value)
    if isinstance(value, (dict, list)):
        assert extract.json()(f"Here you go:\n{dumped}\nHope it helps") == value
    assert extract.json()(f"```json\n{dumped}\n```") == value


def test_json_finds_object_after_braces_in_prose() -> None:
    assert extract.json()('use {curly} braces: {"a": 1} done') == {"a": 1}


def test_json_none_found() -> None:
    with pytest.raises(ExtractionError, match="no JSON value"):
        extract.json()("just words {not json")


class Question(BaseModel):
    question: str
    difficulty: int


def test_pydantic_model_validates() -> None:
    q = extract.pydantic(Question)('```json\n{"question": "Why?", "difficulty": 2}\n```')
    assert q == Question(question="Why?", difficulty=2)


def test_pydantic_model_mismatch_names_the_field() -> None:
    with pytest.raises(ExtractionError, match="difficulty"):
        extract.json(Question)('{"question": "Why?", "difficulty": "hard"}')


def test_json_list_of_models() -> None:
    out = extract.json(list[Question])('[{"question": "a", "difficulty": 1}]')
    assert out == [Question(question="a", difficulty=1)]
    assert extract.json(list[Question]).json_schema is not None


def test_code_block_by_language() -> None:
    text = "x\n```text\nnope\n```\n```python\nprint('hi')\n```\n"
    assert extract.code("python")(text) == "print('hi')"
    assert extract.code()(text) == "nope"
    with pytest.raises(ExtractionError, match="```rust"):
        extract.code("rust")(text)


def test_extractor_rejects_non_text() -> None:
    with pytest.raises(ExtractionError, match="expected text"):
        extract.tag("draft")(None)  # type: ignore[arg-type]


def test_choice_extractor_and_its_grammar() -> None:
    ex = extract.choice("PASS", "FAIL")
    assert ex("Verdict: pass, clearly.") == "PASS"
    assert ex("It would PASS otherwise, so: FAIL.") == "FAIL"  # the last mention
    assert ex.constraint() == {"grammar": 'root ::= think? verdict\nthink ::= .* [ \\t\\n]\n'
                                          'verdict ::= "PASS" | "FAIL"\n'}
    with pytest.raises(ExtractionError, match="none of PASS, FAIL"):
        ex("PASSED with FAILURES")  # whole words only
    with pytest.raises(ValueError):
        extract.choice("only one")
