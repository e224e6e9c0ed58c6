"""A run through a storm of faults: 429s with Retry-After, 500s and hangs.

    python -m benchmarks.fault_storm --items 500 --rate 25

Checks that every item ends in results or failures (once), that the set requests per
second was never exceeded in any 1-second window at the server, and that the run
completes. Prints the numbers; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._project import draft_reply, make_pool, make_project, read_lines
from datagen import DataGenerationPipeline, extract
from datagen.testing import FakeOpenAIServer, FaultPlan


@dataclass
class StormResult:
    items: int
    succeeded: int
    failed: int
    accounted_once: bool
    max_in_window: int
    rate: float
    injected: dict[str, int]
    requests: int
    seconds: float
    status: str

    @property
    def ok(self) -> bool:
        return self.accounted_once and self.max_in_window <= self.rate and (
            self.status == "completed")


async def storm(items: int = 500, rate: float = 25, concurrency: int = 16,
                rate_429: float = 0.25, rate_500: float = 0.05, rate_hang: float = 0.02,
                seed: int = 7, workdir: Path | None = None) -> StormResult:
    plan = FaultPlan(rate_429=rate_429, retry_after="1", rate_500=rate_500,
                     rate_hang=rate_hang, hang_seconds=10, seed=seed)
    root = workdir or Path(tempfile.mkdtemp(prefix="datagen-storm-"))
    with FakeOpenAIServer(responder=draft_reply, faults=plan) as server:
        config = make_project(root, server.base_url, rate_limit=rate, max_retries=8,
                              timeout=2.0)
        pipeline = DataGenerationPipeline(config=config, cache=False)
        started = time.monotonic()
        results = await pipeline.run(make_pool(items), concurrency_limit=concurrency,
                                     extract_function=extract.tag("draft"))
        seconds = time.monotonic() - started
        files = results.files
        failures, _ = read_lines(files.failures)
        import orjson

        status = orjson.loads(files.manifest.read_bytes())["status"]
        indexes = sorted([r["index"] for r in results] + [f["index"] for f in failures])
        return StormResult(items, len(results), len(failures), indexes == list(range(items)),
                           server.max_in_window(1.0), rate, dict(plan.injected),
                           server.request_count, seconds, status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--rate", type=float, default=25, help="requests per second cap")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    r = asyncio.run(storm(args.items, args.rate, args.concurrency))
    print(f"items {r.items}: {r.succeeded} succeeded, {r.failed} failed, every item accounted "
          f"for once: {r.accounted_once}")
    print(f"faults injected: {r.injected}; requests at the server: {r.requests}")
    print(f"max requests in any 1 s window: {r.max_in_window} (cap {r.rate:g}); "
          f"status {r.status}; {r.seconds:.1f} s")
    print("OK" if r.ok else "FAILED")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
