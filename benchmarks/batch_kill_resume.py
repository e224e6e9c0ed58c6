"""Batch mode under random kill -9s: nothing submitted, paid or written twice, and the
manifest's counts equal the server's.

    python -m benchmarks.batch_kill_resume --items 200 --kills 8 --seeds 3

For each seed and provider (OpenAI-shaped, Anthropic-shaped), a child process runs a
batch pipeline over a JSONL pool with ``resume=True`` against the fake batch server (in
this process: it lives across the kills), with a real completion delay, 10% of requests
erroring and, for a while, batches expiring half done; the parent SIGKILLs the child at a
random moment ``--kills`` times, then lets a last run finish. Checks: one record per item
at most, every item either a record or a failure, no custom_id submitted twice, no
request answered twice, every answer the server gave became a record, and the final
manifest's batch totals equal the server's counters (submitted, answered, errored,
expired). Prints a line per run; exits 1 if a check fails.
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
from pathlib import Path
from typing import Any

import orjson

from benchmarks._project import draft_reply, read_lines

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import sys
from datagen import DataGenerationPipeline, extract
p = DataGenerationPipeline(config=sys.argv[1])
p.run_sync(sys.argv[2], concurrency_limit=4, resume=True, collect=False,
           extract_function=extract.tag("draft"))
"""


def project(root: Path, base_url: str, provider: str, items: int) -> tuple[Path, Path]:
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "user.txt").write_text("Write about {{ topic }} in about "
                                               "{{ word_count }}.\n")
    model = "gpt-4o-mini" if provider == "openai" else "claude-sonnet-4-5"
    (root / "config.yaml").write_text(
        f"model:\n  provider: {provider}\n  model: {model}\n  base_url: {base_url}\n"
        "  max_tokens: 32\n  max_retries: 3\n"
        "prompts:\n  user_prompt_path: prompts/user.txt\n"
        f"output_data:\n  output_dir: {root / 'output'}\n  experiment_name: k\n"
        "run:\n  progress: false\n  batch: true\n  batch_poll_interval: 0.05\n"
        "  batch_poll_max: 0.2\n")
    pool = root / "pool.jsonl"
    pool.write_bytes(b"".join(orjson.dumps({"user_prompt_kwargs": {
        "topic": f"topic {i}", "word_count": "9 words"}}) + b"\n" for i in range(items)))
    return root / "config.yaml", pool


def one(seed: int, provider: str, items: int, kills: int) -> tuple[bool, str]:
    from datagen.testing import FakeBatchServer

    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    with tempfile.TemporaryDirectory() as tmp, FakeBatchServer(
            responder=draft_reply, completion_delay=0.5, error_rate=0.1,
            seed=seed) as server:
        root = Path(tmp)
        config, pool = project(root, server.base_url, provider, items)
        runs = 0
        for k in range(kills + 1):
            server.expire_after = 0.3 if 1 <= k <= 2 else None  # a spell of expiries
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(config), str(pool)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            runs += 1
            if k < kills:
                time.sleep(rng.uniform(0.1, 1.5))
                child.send_signal(signal.SIGKILL)
                child.communicate(timeout=60)
                continue
            _, err = child.communicate(timeout=300)
            if child.returncode != 0:
                return False, f"final run exited {child.returncode}: {err.decode()[-500:]}"
        stats = server.stats()
        output = root / "output"
        (results,) = [p for p in output.glob("k_*.jsonl")
                      if not p.stem.endswith(("_failures", "_dropped", "_pool"))]
        records, torn = read_lines(results)
        failures, _ = read_lines(results.with_name(results.stem + "_failures.jsonl"))
        manifest = orjson.loads(results.with_name(results.stem + "_manifest.json")
                                .read_bytes())
    keys = [r["key"] for r in records]
    failed = {f["key"] for f in failures} - set(keys)
    totals = manifest["batches"]["totals"]
    checks = {
        "one record per item": len(keys) == len(set(keys)) and not torn,
        "every item ends somewhere": len(set(keys)) + len(failed) == items,
        "no custom_id submitted twice": stats["submitted_twice"] == [],
        "nothing answered twice": stats["succeeded_twice"] == []
        and stats["bodies_succeeded_twice"] == [],
        "every answer became a record": stats["requests_succeeded"] == len(keys),
        "manifest = server: submitted": totals["requests"] == stats["requests_submitted"],
        "manifest = server: answered": totals["completed"] == stats["requests_succeeded"],
        "manifest = server: errored": totals["failed"] == stats["requests_errored"],
        "manifest = server: expired": totals["expired"] == stats["requests_expired"],
    }
    bad = [name for name, ok in checks.items() if not ok]
    line = (f"seed {seed} {provider:<9} {runs} runs ({kills} killed): {len(keys)} records, "
            f"{len(failed)} failed; server: {stats['batches_created']} batches, "
            f"{stats['requests_submitted']} submitted, {stats['requests_succeeded']} "
            f"answered, {stats['requests_errored']} errored, {stats['requests_expired']} "
            f"expired; {'OK' if not bad else 'FAILED: ' + ', '.join(bad)}")
    return not bad, line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    results: list[Any] = []
    for seed in range(args.seeds):
        for provider in ("openai", "anthropic"):
            ok, line = one(seed, provider, args.items, args.kills)
            print(line, flush=True)
            results.append(ok)
    print("OK" if all(results) else "FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
