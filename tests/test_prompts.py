from __future__ import annotations

from pathlib import Path

import pytest

from datagen.errors import TemplateError
from datagen.prompts import ChatPrompt, PromptTemplate


def tpl(text: str) -> PromptTemplate:
    return PromptTemplate.from_string(text, "user.txt")


def test_renders_variables() -> None:
    assert tpl("About {{ topic }}.").render({"topic": "ML"}, "item 0") == "About ML."


def test_missing_variable_names_file_variable_and_item() -> None:
    with pytest.raises(TemplateError) as err:
        tpl("About {{ topic }} in {{ word_count }}.").render({"topic": "ML"}, "item 7")
    text = str(err.value)
    assert "user.txt" in text and "'word_count'" in text and "item 7" in text


def test_check_fast_path_and_guarded_variables() -> None:
    t = tpl("{% if tone is defined %}Tone: {{ tone }}. {% endif %}About {{ topic }}.")
    t.check({"topic": "x"}, "item 0")  # guarded: fine without 'tone'
    with pytest.raises(TemplateError, match="'topic'"):
        t.check({"tone": "x"}, "item 1")


def test_missing_attribute_is_an_error_not_empty_text() -> None:
    with pytest.raises(TemplateError, match="item 2"):
        tpl("{{ doc.title }}").render({"doc": {}}, "item 2")


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("line one\nline two {{ oops \n")
    with pytest.raises(TemplateError, match=r"bad\.txt, line 2: template syntax error"):
        PromptTemplate.from_file(path, "user")


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(TemplateError):
        tpl("{{ x.__class__.__mro__[1].__subclasses__() }}").render({"x": 1}, "item 0")


def test_missing_prompt_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="user prompt file not found.*user_prompt_path"):
        PromptTemplate.from_file(tmp_path / "nope.txt", "user")


def test_chat_prompt_without_system(tmp_path: Path) -> None:
    (tmp_path / "u.txt").write_text("Hi {{ name }}")
    prompt = ChatPrompt.from_files(tmp_path / "u.txt", None)
    assert prompt.messages({"name": "Ann"}, {}, "item 0") == [
        {"role": "user", "content": "Hi Ann"}
    ]


def test_chat_prompt_with_system_uses_its_own_kwargs(tmp_path: Path) -> None:
    (tmp_path / "u.txt").write_text("Hi {{ name }}")
    (tmp_path / "s.txt").write_text("Tone: {{ tone }}")
    prompt = ChatPrompt.from_files(tmp_path / "u.txt", tmp_path / "s.txt")
    assert prompt.messages({"name": "Ann"}, {"tone": "dry"}, "item 0") == [
        {"role": "system", "content": "Tone: dry"},
        {"role": "user", "content": "Hi Ann"},
    ]
    with pytest.raises(TemplateError, match=r"s\.txt.*'tone'.*item 3 \(system_prompt_kwargs\)"):
        prompt.check({"name": "Ann"}, {}, "item 3")


def test_no_user_prompt_configured() -> None:
    with pytest.raises(TemplateError, match="user_prompt_path"):
        ChatPrompt.from_files(None, None)
