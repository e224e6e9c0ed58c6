"""Where a fast-path call's CPU goes, at 0 ms latency (issue 16's question).

    python -m benchmarks.hotpath --items 20000

Four measurements, each in its own process, CPU time per call (user + sys):

1. plain aiohttp against the fake server (the yardstick of issue 16's target: 0.7 of its
   rate at 0 ms);
2. datagen's OpenAI transport alone against the same server (its own HTTP/1.1 client,
   datagen.llm.http1: pooled connections, body, parsing);
3. the whole pipeline (render, cache journal, call, extract, record, done index) with
   an in-process transport that answers at once: datagen's own work per item, split into
   prepare (the pool's check and index) and execute; then its top functions by own time
   (cProfile, in a separate run: the profiler slows everything about 2x, so only the
   shares are meaningful);
4. the whole pipeline against the server: a full call. What it costs beyond (2) + (3) is
   the two together: more objects alive per call for the garbage collector, more
   callbacks per event-loop turn.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 128


def _messages(i: int) -> list[dict[str, str]]:
    from benchmarks.throughput import messages

    return messages(i)


async def plain(base: str, items: int) -> None:
    import aiohttp
    import orjson

    queue = iter(range(items))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            for i in queue:
                body = orjson.dumps({"model": "bench", "messages": _messages(i),
                                     "max_tokens": 32})
                async with session.post(f"{base}/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    orjson.loads(await r.read())

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def transport(base: str, items: int) -> None:
    from datagen.llm.openai_transport import OpenAITransport
    from datagen.llm.types import ChatRequest

    client = OpenAITransport("openai", base, "EMPTY", pool_size=CONCURRENCY)
    queue = iter(range(items))

    async def worker() -> None:
        for i in queue:
            await client.complete(ChatRequest(
                model="openai/bench", messages=_messages(i), params={"max_tokens": 32},
                provider="openai", base_url=base))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await client.aclose()


class Instant:
    """A transport that answers at once, in process: what is left is datagen's work."""

    name = "instant"

    async def complete(self, request: Any) -> Any:
        from datagen.llm.types import Completion, Usage

        return Completion("<draft>It matters.</draft>", "stop", Usage(20, 10), "bench", 0.0)

    async def aclose(self) -> None:
        return None


def engine(items: int, profile: bool) -> str:
    from benchmarks._project import make_project, write_pool
    from datagen import DataGenerationPipeline, extract
    from datagen.llm.providers import register_provider

    register_provider("instant", lambda m, c: Instant())
    root = Path(tempfile.mkdtemp(prefix="datagen-hotpath-"))
    config = make_project(root, "http://127.0.0.1:9/v1")
    config.write_text(config.read_text().replace("provider: openai", "provider: instant")
                      .replace("  base_url: http://127.0.0.1:9/v1\n", ""))
    pool = write_pool(root / "pool.jsonl", items)
    pipeline = DataGenerationPipeline(config=config, cache=False)

    async def go() -> str:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        cpu0 = time.process_time()
        job = pipeline.prepare(pool, concurrency_limit=CONCURRENCY, collect=False,
                               extract_function=extract.tag("draft"))
        cpu1 = time.process_time()
        await pipeline.execute(job)
        cpu2 = time.process_time()
        if profiler is None:
            return (f"{(cpu1 - cpu0) / items * 1e6:.1f} {(cpu2 - cpu1) / items * 1e6:.1f}")
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        total = sum(row[2] for row in stats.stats.values())  # type: ignore[attr-defined]
        rows = sorted(((row[2], func) for func, row in stats.stats.items()  # type: ignore[attr-defined]
                       if "/datagen/" in func[0]), reverse=True)[:15]
        return "\n".join(f"  {own / total * 100:4.1f}%  {Path(f[0]).relative_to(ROOT)}:{f[2]}"
                         for own, f in rows)

    return asyncio.run(go())


async def full(base: str, items: int) -> None:
    from benchmarks._project import make_project, write_pool
    from datagen import DataGenerationPipeline, extract

    root = Path(tempfile.mkdtemp(prefix="datagen-hotpath-"))
    pool = write_pool(root / "pool.jsonl", items)
    pipeline = DataGenerationPipeline(config=make_project(root, base), cache=False)
    await pipeline.run(pool, concurrency_limit=CONCURRENCY, collect=False,
                       extract_function=extract.tag("draft"))


def child(kind: str, base: str, items: int) -> None:
    if kind == "engine":
        print(engine(items, profile=False))
        return
    if kind == "profile":
        print(engine(items, profile=True))
        return
    cpu0 = time.process_time()
    calls = {"plain": plain, "transport": transport, "full": full}
    asyncio.run(calls[kind](base, items))
    print(f"{(time.process_time() - cpu0) / items * 1e6:.1f}")


def run_child(kind: str, base: str, items: int) -> str:
    out = subprocess.run([sys.executable, "-m", "benchmarks.hotpath", "--child", kind,
                          "--base", base, "--items", str(items)],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-2000:]}")
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.base, args.items)
        return 0
    from benchmarks.throughput import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "datagen.testing.fake_server", "--port", str(port),
         "--latency", "0", "--no-bodies"], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert server.stdout is not None
        server.stdout.readline()
        base = f"http://127.0.0.1:{port}/v1"
        floor = float(run_child("plain", base, args.items))
        http = float(run_child("transport", base, args.items))
        whole = float(run_child("full", base, args.items))
    finally:
        server.terminate()
        server.wait(10)
    prepare_us, execute_us = map(float, run_child("engine", "", args.items).split())
    print(f"CPU per call at 0 ms, {args.items} calls, {CONCURRENCY} in flight (us):")
    print(f"  plain aiohttp (the peers' yardstick)       {floor:7.1f}")
    print(f"  datagen's OpenAI transport alone           {http:7.1f}  (its own HTTP client)")
    print(f"  datagen's own work, prepare (per item)     {prepare_us:7.1f}")
    print(f"  datagen's own work, execute (per item)     {execute_us:7.1f}")
    parts = http + prepare_us + execute_us
    print(f"  the parts together                         {parts:7.1f}")
    print(f"  a full call (the pipeline against the server) {whole:4.1f}  "
          f"({floor / whole:.2f} of plain aiohttp's rate when CPU-bound; "
          f"{whole - parts:+.1f} beyond its parts)")
    print("datagen's own work, top functions by own time (cProfile):")
    print("  " + run_child("profile", "", args.items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
