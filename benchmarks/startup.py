"""Start-up costs: import time, time to the first request, resume of a large run.

    python -m benchmarks.startup --items 1001000 --done 1000000

Prints: `import datagen` wall time (median of 5 fresh interpreters); the time from
``run()`` to the first request reaching the server (fast transport); and for a run of
``--items`` items (a JSONL pool file) of which ``--done`` are already in the results
file, the time from ``run(resume=True)`` to its first new request and the resuming
process's peak RSS (measured in a fresh interpreter of its own, the server outside it).
"""

from __future__ import annotations

import argparse
import asyncio
import re
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


async def first_request(root: Path) -> tuple[Path, float]:
    """(the project's config, seconds from ``run()`` to the first request of a new run)."""
    from datagen import DataGenerationPipeline, extract

    with FakeOpenAIServer(responder=draft_reply) as server:
        config = make_project(root, server.base_url)
        small = write_pool(root / "small.jsonl", 10)
        pipeline = DataGenerationPipeline(config=config, cache=False)
        started = time.monotonic()
        await pipeline.run(small, extract_function=extract.tag("draft"))
        return config, min(server.arrivals) - started


def finished_run(root: Path, config: Path, pool: Path, done: int) -> Path:
    """A run of which the pool's first ``done`` items are finished, written as datagen
    writes one (no requests: a million would take the benchmark an hour): the pool
    checked and its index written by the pre-check, the records appended through the
    run's sink, each with its done-index entry. Returns the results file."""
    from datagen import DataGenerationPipeline, extract
    from datagen.engine.recorder import indexed_sinks
    from datagen.pool import open_pool
    from datagen.prepare import fingerprint_digest, precheck
    from datagen.runindex import write_positions
    from datagen.store import RunFiles, dumps_line

    pipeline = DataGenerationPipeline(config=config, cache=False, experiment_name="big")
    plan = pipeline._plan(extract.tag("draft"))  # as the resuming run's
    positions = precheck(open_pool(pool), plan, 1)
    assert positions is not None
    out = root / "output"
    out.mkdir(parents=True, exist_ok=True)
    files = RunFiles.for_stem(out, "big_20260101_000000")
    write_positions(files.results, pool, positions, fingerprint_digest(plan))
    log, sink, _ = indexed_sinks(files, 60.0)
    from datagen.pool import to_item

    with open(pool, "rb") as fh:
        for index, line in enumerate(fh):
            if index >= done:
                break
            item = to_item(index, orjson.loads(line), fresh=True)
            sink.write_line(dumps_line({"index": index, "key": item.key, "output": "x",
                                        "kwargs": item.user_kwargs}), item.key)
    sink.close()
    log.close()
    return files.results


RESUMER = """
import resource, sys, time
from datagen import DataGenerationPipeline, extract
pipeline = DataGenerationPipeline(config=sys.argv[1], cache=False, experiment_name="big")
print(time.monotonic(), flush=True)
result = pipeline.run_sync(sys.argv[2], resume=True, concurrency_limit=32, collect=False,
                           extract_function=extract.tag("draft"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, result.counts["succeeded"])
"""


def resume(root: Path, config: Path, items: int, done: int, keep_index: bool = True
           ) -> tuple[float, float]:
    """(seconds from ``run(resume=True)`` to its first new request, peak RSS in MB of the
    resuming process), with ``done`` of ``items`` finished. ``keep_index=False``: the
    run's index files removed first (a run written by an older datagen): read whole."""
    pool = root / "big.jsonl"
    if not pool.exists():
        write_pool(pool, items)
    for old in (root / "output").glob("big_*"):
        old.unlink()
    with FakeOpenAIServer(responder=draft_reply, keep_bodies=False) as server:
        config.write_text(re.sub(r"base_url: \S+", f"base_url: {server.base_url}",
                                 config.read_text()))
        results = finished_run(root, config, pool, done)  # its endpoint: this server
        if not keep_index:
            for index in results.parent.glob(results.stem + "_*.idx"):
                index.unlink()
        child = subprocess.run([sys.executable, "-c", RESUMER, str(config), str(pool)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"the resuming process failed:\n{child.stderr[-3000:]}")
        started, tail = child.stdout.split("\n")[0], child.stdout.split("\n")[-2]
        assert server.request_count == items - done, (server.request_count, child.stderr)
        first = min(server.arrivals) - float(started)
    peak, records = tail.split()
    assert int(records) == items - done, tail
    return first, float(peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_001_000)
    parser.add_argument("--done", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    print(f"import datagen: {import_time() * 1000:.0f} ms (over a bare interpreter)")
    root = Path(tempfile.mkdtemp())
    config, fresh = asyncio.run(first_request(root))
    print(f"run() to first request (fast transport): {fresh * 1000:.0f} ms")
    for keep, how in ((True, "from its index"), (False, "read whole (no index files)")):
        resumed, peak = resume(root, config, args.items, args.done, keep)
        print(f"resume of {args.items} items with {args.done} done, {how}: run() to first "
              f"new request {resumed:.2f} s; peak RSS of the resuming process {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
