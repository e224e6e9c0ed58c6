"""Unit tests of the small modules: sink, run files, pool keys, Retry-After, throttle, CLI."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import orjson
import pytest

from datagen.config import parse_overrides
from datagen.errors import ConfigError, OutputError
from datagen.llm.errors import kind_for_status, parse_retry_after
from datagen.llm.throttle import Throttle
from datagen.pool import to_item
from datagen.redact import redact, register
from datagen.store import JsonlSink, RunFiles, dumps_line


def test_run_files_timestamped_names(tmp_path: Path) -> None:
    files = RunFiles.create(tmp_path, "demo", True, now=datetime(2026, 11, 22, 10, 15, 0))
    assert files.results.name == "demo_20261122_101500.jsonl"
    assert files.failures.name == "demo_20261122_101500_failures.jsonl"
    assert files.manifest.name == "demo_20261122_101500_manifest.json"
    assert files.log.name == "demo_20261122_101500.log"


def test_run_files_without_timestamp(tmp_path: Path) -> None:
    assert RunFiles.create(tmp_path, "demo", False).results == tmp_path / "demo.jsonl"


def test_experiment_name_must_not_be_a_path(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="plain name"):
        RunFiles.create(tmp_path, "a/b", True)


def test_sink_appends_complete_lines(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "r.jsonl")
    for i in range(3):
        sink.write_line(dumps_line({"i": i, "text": "line\nbreak"}))
    sink.close()
    lines = (tmp_path / "r.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["i"] for x in lines] == [0, 1, 2]
    assert sink.lines == 3


def test_dumps_line_handles_pydantic_sets_and_paths() -> None:
    from pydantic import BaseModel

    class M(BaseModel):
        a: int

    line = dumps_line({"m": M(a=1), "s": {3}, "p": Path("/x")})
    assert orjson.loads(line) == {"m": {"a": 1}, "s": [3], "p": "/x"}
    with pytest.raises(TypeError):
        dumps_line({"o": object()})


def test_item_key_is_content_based() -> None:
    a = to_item(0, {"user_prompt_kwargs": {"x": 1, "y": 2}})
    b = to_item(9, {"user_prompt_kwargs": {"y": 2, "x": 1}})
    c = to_item(0, {"user_prompt_kwargs": {"x": 1, "y": 3}})
    assert a.key == b.key != c.key


def test_item_extra_keys_are_kept_as_meta() -> None:
    item = to_item(0, {"user_prompt_kwargs": {}, "id": "doc-1"})
    assert item.meta == {"id": "doc-1"}


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Retry-After": "2"}, 2.0),
    ({"retry-after": "0.5"}, 0.5),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After": "soon"}, None),
    ({}, None),
    (None, None),
])
def test_parse_retry_after(headers: dict[str, str] | None, expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    seconds = parse_retry_after({"Retry-After": format_datetime(when, usegmt=True)})
    assert seconds is not None and 27 <= seconds <= 31


@pytest.mark.parametrize(("status", "kind"), [
    (429, "rate_limit"), (401, "auth"), (403, "auth"), (404, "not_found"), (500, "server_error"),
    (503, "server_error"), (400, "bad_request"), (422, "bad_request"), (None, "error"),
])
def test_kind_for_status(status: int | None, kind: str) -> None:
    assert kind_for_status(status) == kind


async def test_throttle_spaces_requests_evenly() -> None:
    throttle = Throttle(50)
    stamps = []
    for _ in range(26):
        await throttle.wait_turn()
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # one request per 1/(50 x margin) s: no burst of a whole bucket at the start
    assert min(gaps[1:]) > 0.012
    assert stamps[-1] - stamps[0] >= 25 / 50 * 0.9


async def test_throttle_pause_holds_every_worker() -> None:
    throttle = Throttle(None)
    throttle.pause(0.2)
    start = time.monotonic()
    await asyncio.gather(*(throttle.wait_turn() for _ in range(5)))
    assert time.monotonic() - start >= 0.19


def test_redact() -> None:
    register("sk-redact-me-0123456")
    assert redact("key=sk-redact-me-0123456!") == "key=<redacted>!"
    register("abc")  # too short to be a key; would mangle ordinary text
    assert redact("abc") == "abc"


def test_parse_overrides() -> None:
    assert parse_overrides(["temperature=0.2", "model.model=gpt-x", "need_time_stamp=false",
                            "base_url=http://127.0.0.1:1/v1", "stop=null"]) == {
        "temperature": 0.2, "model.model": "gpt-x", "need_time_stamp": False,
        "base_url": "http://127.0.0.1:1/v1", "stop": None}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["temperature"])


def test_import_datagen_is_light() -> None:
    code = ("import sys, datagen; heavy = [m for m in ('litellm', 'aiohttp', 'jinja2', 'openai')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_cli_check(tmp_path: Path) -> None:
    from conftest import write_project

    cfg = write_project(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "datagen.cli", "check", str(cfg)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    cfg.write_text(cfg.read_text().replace("max_tokens", "max_tokenz"))
    bad = subprocess.run([sys.executable, "-m", "datagen.cli", "check", str(cfg)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "model.max_tokenz" in bad.stderr


def test_cli_version() -> None:
    out = subprocess.run([sys.executable, "-m", "datagen.cli", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("datagen ")


def test_seen_set_grows_and_remembers() -> None:
    from datagen.seen import SeenSet

    seen = SeenSet(capacity=4)
    values = [i * 7919 + 2 for i in range(5000)] + [2**64 - 1]
    assert [seen.add(v) for v in values] == [False] * len(values)
    assert all(seen.add(v) for v in values)
    assert len(seen) == len(values)
    assert seen.add(0) is False and seen.add(0) is True  # 0 is stored as 1


def test_rich_display_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from datagen.progress import RichDisplay

    out = io.StringIO()
    display = RichDisplay("demo", console=Console(file=out, force_terminal=True, width=120))
    display.start(10)
    display.update(7, 1)
    display.close(9, 1, "9 succeeded, 1 failed")
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without the colours
    assert "10/10" in text and "1 failed" in text and "9 succeeded, 1 failed" in text


async def test_adaptive_concurrency_halves_on_429_and_recovers() -> None:
    from datagen.llm.throttle import AdaptiveConcurrency

    gate = AdaptiveConcurrency(8)
    for _ in range(8):
        await gate.acquire()
    waiter = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()  # the ninth waits
    gate.rate_limited()
    assert gate.limit == 4
    for _ in range(5):
        gate.release()
    await asyncio.sleep(0)
    assert waiter.done() and gate.in_flight == 4  # handed over only once under the limit
    for _ in range(4):
        gate.succeeded()
    assert gate.limit == 5  # one slot back per `limit` successes


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    from datagen.llm.throttle import AdaptiveConcurrency

    gate = AdaptiveConcurrency(1)
    await gate.acquire()
    waiter = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    gate.release()
    assert gate.in_flight == 0
    await asyncio.wait_for(gate.acquire(), 1)


def test_displays_show_each_step() -> None:
    import io
    import re

    from rich.console import Console

    from datagen.progress import PlainDisplay, RichDisplay

    out = io.StringIO()
    rich = RichDisplay("qa", console=Console(file=out, force_terminal=True, width=120),
                       steps=["question", "answer"])
    rich.start(2)
    rich.step("question", 2)
    rich.step("answer", 3)
    rich.usage(900, 0.25)
    rich.calls(4, 1, 1, 0)
    rich.kinds({"timeout": 1}, {})
    rich.close(3, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "step question" in text and "2/2" in text and "step answer" in text
    assert "1 retries, 1 x 429, 0 cache hits, $0.2500" in text
    assert "failed: timeout 1" in text
    plain_out = io.StringIO()
    plain = PlainDisplay("qa", stream=plain_out, steps=["question", "answer"])
    plain.start(2)
    plain.step("question", 2)
    plain.step("answer", 3)
    plain.usage(1200, 0.5)
    plain.calls(7, 2, 1, 3)
    plain.kinds({"extraction": 2}, {"rate_limit": 1})
    plain.close(3, 0)
    line = plain_out.getvalue()
    assert "steps question 2, answer 3" in line
    assert "7 requests (2 retries, 1 429s, 3 cache hits), 1200 tokens, $0.5000" in line
    assert "failed: extraction 2; errors retried or not: rate_limit 1" in line


def test_seeded_sample_keeps_pool_order() -> None:
    from datagen.pool import seeded_sample as sample

    chosen, n = sample(iter(range(1000)), 10, seed=4)
    assert n == 1000 and len(chosen) == 10 and chosen == sorted(chosen)
    assert chosen == sample(iter(range(1000)), 10, seed=4)[0]
    assert chosen != sample(iter(range(1000)), 10, seed=5)[0]


def test_seen_set_bulk_add_and_missing_agree_with_one_at_a_time() -> None:
    import random
    from array import array

    from datagen.seen import SeenSet

    rng = random.Random(7)
    values = array("Q", [rng.getrandbits(64) for _ in range(5000)] + [0, 1, 0, 2**64 - 1])
    values.extend(values[:300])  # repeats
    one, bulk = SeenSet(capacity=8), SeenSet(capacity=8)
    for v in values:
        one.add(v)
    bulk.add_many(values)
    assert len(one) == len(bulk)
    probes = array("Q", [*values[::7], *(rng.getrandbits(64) for _ in range(3000))])
    assert bulk.missing(probes) == bytearray(int(p not in one) for p in probes)
    pairs = bulk.missing(array("Q", [values[0], values[1], values[2], 12345]), group=2)
    assert pairs == bytearray([0, int(12345 not in one)])


def test_a_user_code_thread_outlives_a_closed_loop() -> None:
    """A sync user function that finishes after its run's event loop closed (it timed
    out, the run ended) must not kill its worker thread: the next call is still served
    (the thread raised "Event loop is closed" and died, and the pool still counted it)."""
    import threading
    import time

    from datagen import usercode

    release = threading.Event()
    errors: list[BaseException] = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(
        args.exc_value)  # type: ignore[assignment]
    try:
        async def late() -> None:
            with pytest.raises(usercode.UserCodeError):
                await usercode.call_user(lambda _: release.wait(5), 1, kind="validation",
                                         timeout=0.05)

        asyncio.run(late())  # the loop is closed; the function is still running
        release.set()
        time.sleep(0.2)  # it returns now, to a closed loop
        assert not errors

        async def again() -> object:
            return await usercode.call_user(lambda x: x + 1, 1, kind="validation",
                                            timeout=2)

        assert asyncio.run(again()) == 2
    finally:
        threading.excepthook = hook
