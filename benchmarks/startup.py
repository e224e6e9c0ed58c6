"""Start-up costs: import time, time to the first request, resume of a large run.

    python -m benchmarks.startup --items 200000 --done 199000

Prints: `import datagen` wall time (median of 5 fresh interpreters); the time from
``run()`` to the first request reaching the server (fast transport); and for a run of
``--items`` items of which ``--done`` are already in the results file, the time from
``run(resume=True)`` to its first new request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks._project import draft_reply, make_project, write_pool
from datagen.testing import FakeOpenAIServer


def import_time(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import datagen"], check=True)
        times.append(time.perf_counter() - started)
    base = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        base.append(time.perf_counter() - started)
    return statistics.median(times) - statistics.median(base)


async def first_request(root: Path, items: int, done: int) -> tuple[float, float]:
    """(seconds to the first request of a new run, seconds to the first new request of a
    resumed run with ``done`` of ``items`` finished)."""
    from datagen import DataGenerationPipeline, extract
    from datagen.pool import to_item

    with FakeOpenAIServer(responder=draft_reply) as server:
        config = make_project(root, server.base_url)
        small = write_pool(root / "small.jsonl", 10)
        pipeline = DataGenerationPipeline(config=config, cache=False)
        started = time.monotonic()
        await pipeline.run(small, extract_function=extract.tag("draft"))
        fresh = min(server.arrivals) - started

        pool = write_pool(root / "big.jsonl", items)
        pipeline = DataGenerationPipeline(config=config, cache=False, experiment_name="big")
        files = pipeline.settings.output_data
        out = Path(files.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # a run with `done` items finished: their records, as datagen writes them
        lines = []
        with open(pool, "rb") as fh:
            for index, line in enumerate(fh):
                if index >= done:
                    break
                item = to_item(index, orjson.loads(line))
                lines.append(orjson.dumps({"index": index, "key": item.key, "output": "x"}))
        (out / "big_20260101_000000.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        server.reset()
        started = time.monotonic()
        task = asyncio.ensure_future(pipeline.run(pool, resume=True, concurrency_limit=32,
                                                  collect=False,
                                                  extract_function=extract.tag("draft")))
        while server.request_count == 0 and not task.done():
            await asyncio.sleep(0.005)
        resumed = time.monotonic() - started
        await task
        assert server.request_count == items - done
        return fresh, resumed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--done", type=int, default=199_000)
    args = parser.parse_args(argv)
    print(f"import datagen: {import_time() * 1000:.0f} ms (over a bare interpreter)")
    fresh, resumed = asyncio.run(first_request(Path(tempfile.mkdtemp()), args.items, args.done))
    print(f"run() to first request (fast transport): {fresh * 1000:.0f} ms")
    print(f"resume of {args.items} items with {args.done} done, run() to first new request: "
          f"{resumed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
