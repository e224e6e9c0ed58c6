"""Issue 13, point 6: custom extractors keep the output constraint (``.then``), and
``extract.choice`` reads a judge's verdict where judges put it, with a grammar that lets
the model reason first."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project

from datagen import DROP, DataGenerationPipeline, extract
from datagen.errors import ExtractionError
from datagen.testing import FakeOpenAIServer
from datagen.testing.fake_server import last_user_message
from datagen.usercode import is_trusted

QA = Path(__file__).resolve().parent / "pipelines" / "qa"


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


# ---- .then(fn) ----------------------------------------------------------------------------

def shout(text: str) -> str:
    return text.upper()


def test_then_keeps_the_constraint_and_names_both() -> None:
    tag = extract.tag("poem")
    composed = tag.then(shout)
    assert composed.name == "tag(poem).then(shout)"
    assert composed.constraint(100) == tag.constraint(100)  # the same grammar is sent
    assert composed.tag_name == "poem"
    assert composed("Sure: <poem>roses</poem>") == "ROSES"
    schema = extract.json(list[str]).then(len)
    assert schema.constraint() == extract.json(list[str]).constraint()
    assert schema.json_schema == {"items": {"type": "string"}, "type": "array"}
    assert schema('["a", "b"]') == 2
    assert extract.tag("a").then(shout).then(len)("<a>xy</a>") == 2  # chains
    with pytest.raises(ExtractionError, match="no complete <poem>"):
        composed("no tags")
    with pytest.raises(TypeError, match="takes a function"):
        tag.then("not callable")  # type: ignore[arg-type]


def test_a_composed_extractor_is_not_trusted_but_the_builtin_is() -> None:
    assert is_trusted(extract.tag("poem"))
    assert not is_trusted(extract.tag("poem").then(shout))  # user code: off the loop


def test_an_async_function_after_a_builtin() -> None:
    async def parse(text: str) -> dict[str, str]:
        await asyncio.sleep(0)
        return {"poem": text}

    composed = extract.tag("poem").then(parse).then(lambda d: d["poem"] + "!")
    assert asyncio.run(composed("<poem>hi</poem>")) == "hi!"


def constrained_project(tmp_path: Path) -> Path:
    return write_project(tmp_path, extra_yaml="")


def test_then_sends_the_grammar_and_its_function_runs_in_the_run(tmp_path: Path) -> None:
    seen: list[str] = []

    def parse(draft: str) -> dict[str, Any]:
        seen.append(draft)
        if "topic 1" in draft.lower():
            return DROP("off topic")  # type: ignore[return-value]
        if "topic 2" in draft.lower():
            raise ExtractionError("the draft names no animal")
        return {"draft": draft, "words": len(draft.split())}

    with FakeOpenAIServer(responder=topic_draft) as server:
        p = DataGenerationPipeline(config=constrained_project(tmp_path),
                                   base_url=server.base_url, constrain_output=True)
        result = p.run_sync(make_pool(3), extract_function=extract.tag("draft").then(parse))
        bodies = list(server.bodies)
    assert [r["output"]["draft"] for r in result] == ["Topic 0 is a subject worth study."]
    # the tag's grammar went out with every request, as for extract.tag alone
    assert all(b["grammar"].startswith('root ::= "<draft>"') for b in bodies)
    failures = lines(result.files.failures)
    assert [f["error"]["message"] for f in failures] == ["the draft names no animal"]
    dropped = lines(result.files.dropped)
    assert [d["reason"] for d in dropped] == ["off topic"]
    manifest = orjson.loads(result.files.manifest.read_bytes())
    assert manifest["extractor"] == "tag(draft).then(test_then_sends_the_grammar_and_its_" \
                                    "function_runs_in_the_run.<locals>.parse)"


def test_an_extraction_error_from_the_function_is_retried_with_its_reason(tmp_path: Path
                                                                           ) -> None:
    answers = iter(["<answer>no</answer>", "<answer>yes, 42</answer>"])

    def reply(body: dict[str, Any]) -> str:
        text = last_user_message(body)
        if text.startswith("Text:"):
            return '["Q?"]'
        if "Answer from the text" in text:
            return next(answers)
        return "VERDICT: PASS"

    def needs_number(answer: str) -> str:
        if not any(ch.isdigit() for ch in answer):
            raise ExtractionError("the answer has no number")
        return answer

    with FakeOpenAIServer(responder=reply) as server:
        p = (DataGenerationPipeline(config=QA / "config.yaml", base_url=server.base_url,
                                    output_dir=str(tmp_path), constrain_output=True)
             .step("question", prompt="question.yaml", extract=extract.json(list[str]),
                   one_to_many=True)
             .step("answer", prompt="answer.yaml",
                   extract=extract.tag("answer").then(needs_number))
             .step("judge", prompt="judge.txt",
                   extract=extract.choice("PASS", "FAIL", marker="VERDICT:")))
        result = p.run_sync([{"text": "Bees make honey."}])
        answer_bodies = [b for b in server.bodies if "Answer from the text" in str(b)]
    assert [r["steps"]["answer"]["output"] for r in result] == ["yes, 42"]
    assert result[0]["steps"]["answer"]["validation_retries"] == 1
    assert len(answer_bodies) == 2  # asked again after the function said "wrong"
    assert all("<answer>" in b["grammar"] for b in answer_bodies)


def test_a_blocking_function_after_a_builtin_times_out_off_the_loop(tmp_path: Path) -> None:
    def stuck(draft: str) -> str:
        time.sleep(3)
        return draft

    with FakeOpenAIServer(responder=topic_draft) as server:
        p = DataGenerationPipeline(config=constrained_project(tmp_path),
                                   base_url=server.base_url, user_code_timeout=0.2)
        started = time.monotonic()
        result = p.run_sync(make_pool(1), extract_function=extract.tag("draft").then(stuck))
    assert time.monotonic() - started < 2.5  # the loop was never blocked by it
    (failure,) = lines(result.files.failures)
    assert "did not return within 0.2 s" in failure["error"]["message"]


# ---- extract.choice: where judges put the verdict ----------------------------------------

@pytest.mark.parametrize(("options", "text", "verdict"), [
    (("Suitable", "Not suitable"), "Suitable? No. Not suitable", "Not suitable"),
    (("suitable", "unsuitable"), "It looks suitable at first.\nFinal Judgment: unsuitable",
     "unsuitable"),
    (("suitable", "unsuitable"), "**Final Judgment:** Unsuitable (a table of contents)",
     "unsuitable"),
    (("relevant", "irrelevant"), "The paragraph is not relevant to the question.",
     "irrelevant"),
    (("relevant", "irrelevant"), "Final judgment: relevant; it is not irrelevant at all",
     "relevant"),
    (("PASS", "FAIL"), "It would PASS if the date were right, but it is wrong. FAIL",
     "FAIL"),
    (("PASS", "FAIL"), "VERDICT: FAIL\n\nAnswer: the answer says Paris.", "FAIL"),
    (("PASS", "FAIL"), "Verdict: pass, clearly.", "PASS"),
    (("Yes", "No"), "Answer: yes. No further comment", "Yes"),
])
def test_choice_reads_the_verdict_where_judges_put_it(options: tuple[str, ...], text: str,
                                                      verdict: str) -> None:
    assert extract.choice(*options)(text) == verdict


def test_choice_with_its_own_marker() -> None:
    judge = extract.choice("PASS", "FAIL", marker="VERDICT:")
    assert judge("PASS looks likely... but no. verdict: fail") == "FAIL"
    assert judge("no marker, so the last mention: FAIL then PASS") == "PASS"
    assert judge.name == "choice(PASS|FAIL)@VERDICT:"
    with pytest.raises(ExtractionError, match="none of PASS, FAIL"):
        judge("VERDICT: unclear")
    with pytest.raises(ValueError, match="differ"):
        extract.choice("yes", "YES")


def test_choice_grammar_allows_reasoning_then_exactly_one_option() -> None:
    grammar = extract.choice("PASS", "FAIL", marker="VERDICT:").constraint(64)["grammar"]
    assert grammar == ('root ::= think? "VERDICT:" " "? verdict\n'
                       'think ::= .{0,144} [ \\t\\n]\n'
                       'verdict ::= "PASS" | "FAIL"\n')
    free = extract.choice("suitable", "unsuitable").gbnf()
    assert "think ::= .* [ \\t\\n]" in free and free.startswith("root ::= think? verdict")
    one_word = extract.choice("PASS", "FAIL", reasoning=False).constraint(64)["grammar"]
    assert one_word == 'root ::= verdict\nverdict ::= "PASS" | "FAIL"\n'
    llama_cpp = pytest.importorskip("llama_cpp")  # the real parser accepts them all
    for text in (grammar, free, one_word):
        assert llama_cpp.LlamaGrammar.from_string(text, verbose=False) is not None


def test_a_reasoning_judge_on_the_fake_server(tmp_path: Path) -> None:
    """A judge that reasons, mentions both options, and ends with the marker: the verdict
    it gives is the one kept; the grammar it was sent allows the reasoning."""
    def reply(body: dict[str, Any]) -> str:
        text = last_user_message(body)
        if text.startswith("Text:"):
            return '["Q?"]'
        if "Answer from the text" in text:
            return "<answer>Bees make honey.</answer>"
        return ("Step by step: the text says bees make honey, so FAIL would be wrong.\n"
                "VERDICT: PASS")

    with FakeOpenAIServer(responder=reply) as server:
        p = (DataGenerationPipeline(config=QA / "config.yaml", base_url=server.base_url,
                                    output_dir=str(tmp_path), constrain_output=True)
             .step("question", prompt="question.yaml", extract=extract.json(list[str]),
                   one_to_many=True)
             .step("answer", prompt="answer.yaml", extract=extract.tag("answer"))
             .step("judge", prompt="judge.txt", extract=extract.choice("PASS", "FAIL"),
                   validate=lambda v, item: v == "PASS" or "unsupported"))
        result = p.run_sync([{"text": "Bees make honey."}])
        judge_body = next(b for b in server.bodies if "Judge the answer" in str(b))
    assert [r["steps"]["judge"]["output"] for r in result] == ["PASS"]
    assert judge_body["grammar"].startswith("root ::= think? verdict")
