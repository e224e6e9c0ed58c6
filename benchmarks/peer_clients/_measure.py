"""What every peer client shares: arguments, the pool, the prompts, the measurement.

Standard library only: this file runs under each peer's own venv (see benchmarks/peers.py),
which has neither datagen nor its dependencies. A client script does::

    args = parse_args()
    report(lambda: run(args), args)   # prints one JSON line: results, wall, cpu, rss_mb

CPU time is user+sys of this process and of its waited-for children (peers that fork
worker processes), measured around the run only: imports come first and are not counted.
Peak RSS is the largest sum of VmRSS over this process and all its descendants, sampled
every 50 ms (pages shared after a fork count once per process; a process counts once it
has lived through two samples), and never less than this process's own high-water mark;
``processes`` is the most that were alive at once. While the run lasts, the numbers so far
are written to ``--progress`` every second, so a client that the harness cuts off still
tells how far it got.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SYSTEM = "You write in a {tone} tone. Use <draft> tags."
USER = "Write about {topic} in about {word_count} words."


def parse_args(variants: tuple[str, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="the fake server's /v1 URL")
    parser.add_argument("--pool", required=True, type=Path, help="JSONL: topic, tone, word_count")
    parser.add_argument("--items", required=True, type=int)
    parser.add_argument("--concurrency", required=True, type=int)
    parser.add_argument("--rate", type=float, help="requests per second, if the peer can cap it")
    parser.add_argument("--workdir", required=True, type=Path, help="scratch space for the run")
    parser.add_argument("--progress", type=Path, help="numbers so far, rewritten every second")
    if variants:
        parser.add_argument("--variant", choices=variants, default=variants[0])
    return parser.parse_args()


def read_pool(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The same two messages as benchmarks/throughput.py's ``messages(i)``."""
    return [{"role": "system", "content": SYSTEM.format(**row)},
            {"role": "user", "content": USER.format(**row)}]


# ---- memory of a process tree ----------------------------------------------------------

def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> set[int]:
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += _children(pid)
    return found


def tree_rss_mb(pids: set[int]) -> float:
    return sum(_rss_kb(pid) for pid in pids) / 1024


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def live_children_cpu() -> float:
    """CPU seconds of descendants still running (getrusage counts only reaped ones)."""
    me = os.getpid()
    ticks = sum(_cpu_ticks(pid) for pid in process_tree(me) - {me})
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def own_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Sampler(threading.Thread):
    """Peak RSS over the process tree; the numbers so far to a file every second."""

    def __init__(self, started: float, cpu0: float, progress: Path | None,
                 extra: dict[str, Any]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.started, self.cpu0, self.progress, self.extra = started, cpu0, progress, extra
        self.peak_mb = 0.0
        self.processes = 1
        self.stopped = threading.Event()

    def run(self) -> None:
        last_write, before = 0.0, {os.getpid()}
        while not self.stopped.wait(0.05):
            now_alive = process_tree(os.getpid())
            # a process counts from its second sample on: a child caught between fork and
            # exec would otherwise count its parent's pages twice
            stable = now_alive & before
            before = now_alive
            self.peak_mb = max(self.peak_mb, tree_rss_mb(stable))
            self.processes = max(self.processes, len(stable))
            now = time.perf_counter()
            if self.progress is not None and now - last_write >= 1.0:
                last_write = now
                self.write(now)

    def write(self, now: float) -> None:
        assert self.progress is not None
        cpu = cpu_seconds() - self.cpu0 + live_children_cpu()
        partial = {"wall": now - self.started, "cpu": cpu,
                   "rss_mb": max(self.peak_mb, own_peak_mb()), "processes": self.processes,
                   **self.extra}
        tmp = self.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps(partial))
        tmp.replace(self.progress)


def report(run: Callable[[], int], args: argparse.Namespace, **extra: Any) -> None:
    """Time ``run`` (it returns how many results it got) and print one JSON line."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.perf_counter(), cpu_seconds()
    sampler = Sampler(started, cpu0, args.progress, extra)
    sampler.start()
    results = run()
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu0
    sampler.stopped.set()
    sampler.join()
    rss = max(sampler.peak_mb, own_peak_mb())
    print(json.dumps({"results": results, "wall": wall, "cpu": cpu, "rss_mb": rss,
                      "processes": sampler.processes, **extra}), flush=True)
