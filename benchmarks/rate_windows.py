"""Rate caps measured at the server: the highest count in any one-second window (starting
anywhere), beside the rate achieved, on both transports.

    python -m benchmarks.rate_windows                       # every case, both transports
    python -m benchmarks.rate_windows --cases cap5,cap200 --transports openai

Cases: caps of 5, 50, 100 and 200 req/s; ``requests_per_minute: 600``; 20 runs back to back on
one pipeline at a cap of 20; two runs overlapping in one process at a cap of 20 (one
budget per endpoint). The server (datagen.testing.fake_server) runs in its own process on
127.0.0.1 with 20 ms latency, and each case's client in its own process. "achieved" is
(requests - 1) / (last arrival - first arrival) over the cap: the promise is that the max
window never exceeds the cap, and achieved is at least 0.95 of it (a cap a transport's CPU
cannot reach is marked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks.throughput import free_port, http_json

ROOT = Path(__file__).resolve().parent.parent
# name: (cap req/s, pool size, config keys, runs, overlapping)
CASES: dict[str, tuple[float, int, dict[str, Any], int, bool]] = {
    "cap5": (5, 40, {"rate_limit": 5}, 1, False),
    "cap50": (50, 400, {"rate_limit": 50}, 1, False),
    "cap100": (100, 1500, {"rate_limit": 100}, 1, False),  # issue 16's case
    "cap200": (200, 1600, {"rate_limit": 200}, 1, False),
    "rpm600": (10, 80, {"requests_per_minute": 600}, 1, False),
    "back-to-back": (20, 10, {"rate_limit": 20}, 20, False),
    "overlapping": (20, 100, {"rate_limit": 20}, 2, True),
}


def child(base: str, case: str, transport: str) -> None:
    """One case's client: runs in its own process, prints nothing but errors."""
    from benchmarks._project import make_pool, make_project
    from datagen import DataGenerationPipeline

    _, items, keys, runs, overlapping = CASES[case]
    root = Path(tempfile.mkdtemp(prefix="datagen-rate-"))
    config = make_project(root, base, transport=transport, **keys)

    def pipeline(n: int) -> DataGenerationPipeline:
        return DataGenerationPipeline(config=config, cache=False, experiment_name=f"r{n}")

    def pool(n: int) -> list[dict[str, Any]]:
        return [{**item, "user_prompt_kwargs": {**item["user_prompt_kwargs"], "run": n}}
                for item in make_pool(items)]

    if overlapping:  # two event loops in two threads of one process, at once
        threads = [threading.Thread(target=lambda n=n: pipeline(n).run_sync(
            pool(n), concurrency_limit=32)) for n in range(runs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return
    one = pipeline(0)
    for n in range(runs):  # back to back on one pipeline: each run its own event loop
        asyncio.run(one.run(pool(n), concurrency_limit=32))


def measure(case: str, transport: str) -> dict[str, Any]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "datagen.testing.fake_server", "--port", str(port),
         "--latency", "0.02", "--no-bodies"], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert server.stdout is not None
        server.stdout.readline()
        base = f"http://127.0.0.1:{port}/v1"
        done = subprocess.run([sys.executable, "-m", "benchmarks.rate_windows", "--child",
                               case, "--transport", transport, "--base", base],
                              capture_output=True, text=True, cwd=ROOT, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            raise SystemExit(f"{case}/{transport} failed:\n{done.stderr[-2000:]}")
        stats = http_json(f"http://127.0.0.1:{port}/stats")
    finally:
        server.terminate()
        server.wait(10)
    cap = CASES[case][0]
    rate = (stats["requests"] - 1) / stats["span_s"] if stats["span_s"] else 0.0
    return {"case": case, "transport": transport, "cap": cap, "requests": stats["requests"],
            "max_window": stats["max_in_window"], "rate": rate, "achieved": rate / cap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--transports", default="openai,litellm")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--transport", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.base, args.child, args.transport)
        return 0
    rows = []
    print("| case | transport | cap req/s | requests | max in any 1 s | achieved req/s | "
          "/ cap |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        for transport in args.transports.split(","):
            row = measure(case, transport)
            rows.append(row)
            flag = "" if row["max_window"] <= row["cap"] else " OVER"
            print(f"| {case} | {transport} | {row['cap']:g} | {row['requests']} | "
                  f"{row['max_window']}{flag} | {row['rate']:.1f} | {row['achieved']:.3f} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
