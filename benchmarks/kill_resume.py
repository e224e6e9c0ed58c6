"""kill -9 at random moments, resume after each: nothing lost, duplicated, torn or repaid.

    python -m benchmarks.kill_resume --items 2000 --kills 20

A child process runs a pipeline over a JSONL pool with ``resume=True``; the parent
SIGKILLs it at a random moment once it has written something, ``--kills`` times, then
lets a last run finish. Checks: exactly ``items`` unique keys in the results, no
duplicate, no unparseable line, and the server received at most
``items + kills x concurrency`` requests. Prints the numbers; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks._project import draft_reply, make_project, read_lines, write_pool
from datagen.testing import FakeOpenAIServer

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class KillResult:
    items: int
    kills_done: int
    unique_keys: int
    duplicates: int
    unparseable: int
    requests: int
    request_budget: int
    final_exit: int
    seconds: float

    @property
    def ok(self) -> bool:
        return (self.unique_keys == self.items and self.duplicates == 0
                and self.unparseable == 0 and self.requests <= self.request_budget
                and self.final_exit == 0)


def child(config: str, pool: str, concurrency: int) -> None:
    from datagen import DataGenerationPipeline, extract

    pipeline = DataGenerationPipeline(config=config, progress=False)
    pipeline.run_sync(pool, concurrency_limit=concurrency, resume=True, collect=False,
                      extract_function=extract.tag("draft"))


def _results_size(output: Path) -> int:
    return sum(p.stat().st_size for p in output.glob("bench*.jsonl")
               if not p.name.endswith("_failures.jsonl"))


def kill_resume(items: int = 2000, kills: int = 20, concurrency: int = 8,
                latency: float = 0.2, seed: int = 1, workdir: Path | None = None) -> KillResult:
    rng = random.Random(seed)
    root = workdir or Path(tempfile.mkdtemp(prefix="datagen-kill-"))
    started = time.monotonic()
    with FakeOpenAIServer(responder=draft_reply, latency=latency, jitter=latency / 4) as server:
        config = make_project(root, server.base_url, max_retries=3)
        pool = write_pool(root / "pool.jsonl", items)
        cmd = [sys.executable, "-m", "benchmarks.kill_resume", "--child", str(config),
               str(pool), "--concurrency", str(concurrency)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        output, kills_done = root / "output", 0
        for _ in range(kills):
            before = _results_size(output) if output.exists() else 0
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if output.exists() and _results_size(output) > before:
                    break  # it is writing: now kill it somewhere in the next stretch
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills_done += 1
            proc.wait()
        final_exit = subprocess.call(cmd, env=env, cwd=ROOT)
        records, bad = [], 0
        for path in output.glob("bench*.jsonl"):
            if not path.name.endswith("_failures.jsonl"):
                got, torn = read_lines(path)
                records += got
                bad += torn
        counts = Counter(r["key"] for r in records)
        return KillResult(
            items=items, kills_done=kills_done, unique_keys=len(counts),
            duplicates=sum(n - 1 for n in counts.values()), unparseable=bad,
            requests=server.request_count, request_budget=items + kills * concurrency,
            final_exit=final_exit, seconds=time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "POOL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.concurrency)
        return 0
    r = kill_resume(args.items, args.kills, args.concurrency, args.latency)
    print(f"{r.items} items, {r.kills_done} kill -9s, {r.seconds:.0f} s")
    print(f"unique keys {r.unique_keys}, duplicates {r.duplicates}, unparseable lines "
          f"{r.unparseable}, final run exit {r.final_exit}")
    print(f"requests at the server {r.requests} (budget {r.request_budget} = items + "
          f"kills x concurrency)")
    print("OK" if r.ok else "FAILED")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
