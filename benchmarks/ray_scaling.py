"""The same 2,000-item pipeline on 1, 2 and 4 cluster workers, beside the single-process
engine: throughput, throughput per worker (scaling efficiency) and the highest count in
any one-second window at the server.

    python -m benchmarks.ray_scaling                 # the whole table, ~2 minutes
    python -m benchmarks.ray_scaling --items 500

The server is the fake OpenAI server in a process of its own (first in line for a CPU:
nice -15 when allowed), answering in 200 ms with a capacity per endpoint: at most
``--capacity`` answers in the works at once, the others wait their turn (a vLLM server's
batch). A worker is one shard on a 3-node Ray cluster on loopback
(datagen.testing.ray_cluster), each with ``--per-worker`` requests in flight; the
single-process engine runs with as many in flight as one worker, then as four. The last
row puts a rate limit on the endpoint, below what four workers would send: one budget for
the cluster, and no window over it. "wall" counts everything from run() to its return
(the cluster's: spilling the pool, checking the folder from every node, starting workers,
merging); "at server" is the rate between the first and the last request the server saw.
On one 2-core machine every node shares the same two cores: the numbers show the
mechanism's overhead and the cap, not what more machines buy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.throughput import free_port, http_json

ROOT = Path(__file__).resolve().parent.parent


def serve(port: int, latency: float, capacity: int) -> None:
    """The server process: the fake OpenAI server with a capacity."""
    from datagen.testing import FakeOpenAIServer

    class CapacityServer(FakeOpenAIServer):
        slots: asyncio.Semaphore | None = None

        async def _pause(self, extra: float) -> None:
            if self.slots is None:
                self.slots = asyncio.Semaphore(capacity)
            async with self.slots:
                await super()._pause(extra)

    with contextlib.suppress(OSError):
        os.nice(-15)
    server = CapacityServer(port=port, latency=latency, keep_bodies=False).start()
    print(f"serving {server.base_url}", flush=True)
    while True:
        time.sleep(3600)


def run_row(label: str, base: str, items: int, concurrency: int, executor: Any,
            workers: int, **model: Any) -> dict[str, Any]:
    from benchmarks._project import make_pool, make_project
    from datagen import DataGenerationPipeline

    root = Path(tempfile.mkdtemp(prefix="datagen-ray-bench-"))
    config = make_project(root, base + "/v1", **model)
    pipeline = DataGenerationPipeline(config=config, cache=False)
    http_json(base + "/reset", "POST")
    t0 = time.monotonic()
    result = pipeline.run_sync(make_pool(items), concurrency_limit=concurrency,
                               executor=executor, collect=False)
    wall = time.monotonic() - t0
    stats = http_json(base + "/stats?window=1.0")
    assert result.counts["results_in_file"] == items, result.counts
    at_server = (stats["requests"] - 1) / stats["span_s"] if stats["span_s"] else 0.0
    return {"label": label, "workers": workers, "wall": wall, "rate": items / wall,
            "at_server": at_server, "window": stats["max_in_window"],
            "requests": stats["requests"], "cap": model.get("rate_limit")}


def table(rows: list[dict[str, Any]]) -> str:
    one = next(r for r in rows if r["label"].startswith("cluster") and r["workers"] == 1)
    lines = [f"{'':30} {'wall s':>7} {'items/s':>8} {'at server':>10} {'per worker':>11} "
             f"{'efficiency':>10} {'max 1-s window':>15} {'cap':>5}"]
    for r in rows:
        per = r["rate"] / r["workers"]
        efficiency = f"{per / one['rate']:.2f}" if r["label"].startswith("cluster") else "-"
        lines.append(
            f"{r['label']:30} {r['wall']:7.1f} {r['rate']:8.1f} {r['at_server']:10.1f} "
            f"{per:11.1f} {efficiency:>10} {r['window']:15d} "
            f"{format(r['cap'], 'g') if r['cap'] else '-':>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--capacity", type=int, default=64)
    parser.add_argument("--per-worker", type=int, default=16)
    parser.add_argument("--cap", type=float, default=150.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.latency, args.capacity)
        return

    import ray

    from datagen.executors.ray import RayExecutor
    from datagen.testing.ray_cluster import LocalRayCluster

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.ray_scaling", "--serve", str(port), "--latency",
         str(args.latency), "--capacity", str(args.capacity)],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert server.stdout is not None and b"serving" in server.stdout.readline()
    base, n, per = f"http://127.0.0.1:{port}", args.items, args.per_worker
    rows = []
    try:
        print(f"{n} items, {args.latency * 1000:.0f} ms per answer, server capacity "
              f"{args.capacity} at once, {per} in flight per worker", flush=True)
        rows.append(run_row(f"one process, {per} in flight", base, n, per, "local", 1))
        rows.append(run_row(f"one process, {4 * per} in flight", base, n, 4 * per, "local",
                            4))
        with LocalRayCluster(n_nodes=3, num_cpus=2) as cluster:
            ray.init(address=cluster.address, _node_ip_address=cluster.head_ip,
                     log_to_driver=False)
            for workers in (1, 2, 4):
                rows.append(run_row(f"cluster, {workers} worker(s)", base, n, per,
                                    RayExecutor(shards=workers), workers))
            rows.append(run_row(f"cluster, 4 workers, cap {args.cap:g}/s", base, n, per,
                                RayExecutor(shards=4), 4, rate_limit=args.cap))
            ray.shutdown()
    finally:
        server.kill()
        server.wait()
    print(table(rows))


if __name__ == "__main__":
    main()
