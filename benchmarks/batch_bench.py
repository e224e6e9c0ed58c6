"""Batch mode at scale: 10,000 items through the fake batch server, in this process's
memory budget, and datagen's own time beside the provider's.

    python -m benchmarks.batch_bench --items 10000 --delay 20

The fake batch server runs in a process of its own (its memory is not ours) with a
completion delay of ``--delay`` seconds; this process runs a single-step pipeline over a
JSONL pool in batch mode (``collect=False``: records go to disk only). Printed: the
rounds and batches, the wall time, the time spent waiting for the provider (the
completion delay, as polling with backoff sees it), datagen's own overhead (the rest:
rendering, request files, upload, download, collecting, records), its peak RSS, and the
server's counters. Exits 1 if a check fails: every item written once, nothing submitted
twice, peak RSS under ``--max-rss-mb``.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from benchmarks._project import make_project, write_pool

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, delay: float) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "datagen.testing.fake_batch_server", "--port", str(port),
         "--completion-delay", str(delay)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    assert server.stdout is not None
    line = server.stdout.readline().decode()
    if "fake batch server at" not in line:
        raise RuntimeError(f"the fake batch server did not start: {line!r}")
    return server


def server_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/stats", timeout=30) as answer:
        stats: dict[str, Any] = orjson.loads(answer.read())
        return stats


def run(items: int, delay: float, poll_max: float) -> dict[str, Any]:
    from datagen import DataGenerationPipeline, extract

    port = free_port()
    server = start_server(port, delay)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            config = make_project(root, base_url)
            with open(config, "a") as fh:
                fh.write(f"  batch: true\n  batch_poll_interval: 0.5\n"
                         f"  batch_poll_max: {poll_max}\n")
            pool = write_pool(root / "pool.jsonl", items)
            pipeline = DataGenerationPipeline(config=config, model="gpt-4o-mini")
            started = time.perf_counter()
            result = pipeline.run_sync(pool, concurrency_limit=64, collect=False,
                                       extract_function=extract.tag("draft"))
            wall = time.perf_counter() - started
            keys = [orjson.loads(line)["key"] for line in
                    result.files.results.read_bytes().splitlines()]
            manifest = result.manifest
        stats = server_stats(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(30)
    section = manifest["batches"]
    return {"items": items, "records": len(keys), "unique": len(set(keys)),
            "batches": len(section["batches"]), "wall_s": wall,
            "waited_s": section["waited_s"], "delay_s": delay,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cost": section["cost"], "server": {
                k: stats[k] for k in ("files_uploaded", "bytes_uploaded", "batches_created",
                                      "requests_submitted", "requests_succeeded",
                                      "polls", "downloads")},
            "twice": stats["submitted_twice"] + stats["succeeded_twice"]
            + stats["bodies_succeeded_twice"]}


def report(r: dict[str, Any], max_rss: float) -> bool:
    overhead = r["wall_s"] - r["waited_s"]
    print(f"{r['items']} items through the fake batch server (completion delay "
          f"{r['delay_s']:g} s), {r['batches']} batch(es)")
    print(f"wall {r['wall_s']:.1f} s = waiting for the provider {r['waited_s']:.1f} s "
          f"+ datagen's own work {overhead:.1f} s ({overhead / r['items'] * 1000:.2f} ms "
          "per item: render, request file, upload, download, collect, record)")
    print(f"peak RSS {r['peak_rss_mb']:.1f} MB (limit {max_rss:g} MB)")
    print(f"records {r['records']}, unique keys {r['unique']}; server: {r['server']}")
    cost = r["cost"]
    if cost["batch_usd"] is not None:
        print(f"cost ${cost['batch_usd']:.4f} through batches, ${cost['online_usd']:.4f} "
              "online")
    ok = (r["records"] == r["unique"] == r["items"] and not r["twice"]
          and r["peak_rss_mb"] < max_rss)
    print("OK" if ok else f"FAILED (submitted or answered twice: {r['twice'][:5]})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=20.0,
                        help="the server's completion delay, seconds")
    parser.add_argument("--poll-max", type=float, default=2.0,
                        help="run.batch_poll_max, seconds")
    parser.add_argument("--max-rss-mb", type=float, default=100.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return 0 if report(run(args.items, args.delay, args.poll_max), args.max_rss_mb) else 1


if __name__ == "__main__":
    sys.exit(main())
