"""``datagen run``, ``estimate`` and ``check``: a pipeline folder, run or looked at."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from datagen.cli.common import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    error,
    exit_code,
    overrides,
    pool_of,
)  # fmt: skip

RUN_EXAMPLES = """examples:
  datagen run                                  the pipeline folder you are in
  datagen run examples/factual_qa --limit 20   a seeded subset of 20 items
  datagen run . --set model.temperature=0.2 --set provider=openai --set model=gpt-4o-mini
  datagen run . --resume                       continue the newest run of this experiment
  datagen run . --batch                        through the provider's batch API, half price
  datagen run . --dry-run                      tokens, cost and time; nothing is sent
  datagen run config.yaml --pool items.jsonl   the single-step form, no pipeline.py
  datagen run . --executor ray --address auto  on a Ray cluster, in shards
"""


def run(args: argparse.Namespace) -> int:
    import asyncio

    from datagen.engine import RunInterrupted
    from datagen.errors import DatagenError
    from datagen.folder import load_folder

    try:
        executor = executor_of(args)  # Ray missing: said before anything is loaded
        folder = load_folder(args.path, **overrides(args))
        pipeline = folder.pipeline
        pool = pool_of(folder, args)
        if args.dry_run:
            print(dry_run_report(folder, pool, args))
            return EXIT_OK
        extractor = None if pipeline.step_names else folder.extract_function
        result = asyncio.run(pipeline.run(pool, concurrency_limit=args.concurrency,
                                          extract_function=extractor, resume=args.resume,
                                          progress=not args.no_progress, collect=False,
                                          executor=executor))
    except RunInterrupted as stop:
        interrupted(stop.result, args)
        return stop.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except DatagenError as exc:
        return error(exc, exit_code(exc))
    counts = result.counts
    print(f"results: {result.files.results} ({counts['results_in_file']} records)")
    if counts["failed"]:
        print(f"failures: {result.files.failures} ({counts['failed']} this run)")
    if counts.get("dropped"):
        print(f"dropped: {result.files.dropped} ({counts['dropped']} this run, by filters)")
    if args.no_progress:  # else the display's summary said it
        for hint in result.manifest.get("hints") or ():
            print(f"datagen: hint: {hint}", file=sys.stderr)
    try:
        exported = folder.export(result.files.results)
    except DatagenError as exc:
        return error(exc)
    if exported is not None:
        print(f"exported: {exported}")
    if result.failure_rate() > args.max_failure_rate:
        finished = counts["succeeded"] + counts["failed"]
        print(f"datagen: {counts['failed']} of {finished} items failed, above "
              f"--max-failure-rate {args.max_failure_rate:g}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def executor_of(args: argparse.Namespace) -> Any:
    """--executor, --address, --shards: "local", or the ray executor (a clear error when
    Ray is not installed)."""
    if args.executor == "local":
        if args.address or args.shards:
            from datagen.errors import ConfigError

            raise ConfigError("--address and --shards need --executor ray")
        return "local"
    from datagen.executors.ray import RayExecutor

    return RayExecutor(address=args.address, shards=args.shards)


def interrupted(result: Any, args: argparse.Namespace) -> None:
    """After Ctrl+C or SIGTERM: where the records are and how to continue."""
    print(f"datagen: interrupted; {result.counts['results_in_file']} records in "
          f"{result.files.results}", file=sys.stderr)
    path = "" if args.path == "." else f" {args.path}"
    batch = " --batch" if getattr(args, "batch", False) else ""
    print(f"datagen: continue with: datagen run{path} --resume{batch}", file=sys.stderr)


def dry_run_report(folder: Any, pool: Any, args: argparse.Namespace) -> str:
    """`run --dry-run` and `estimate`: the same estimate of the same pool."""
    pipeline = folder.pipeline
    return str(pipeline.estimate(
        pool, sample_size=args.sample, seed=args.seed,
        extract_function=None if pipeline.step_names else folder.extract_function).report())


def estimate(args: argparse.Namespace) -> int:
    from datagen.errors import DatagenError
    from datagen.folder import load_folder

    try:
        folder = load_folder(args.path, **overrides(args))
        report = dry_run_report(folder, pool_of(folder, args), args)
    except DatagenError as exc:
        return error(exc)
    print(report)
    return EXIT_OK


def check(args: argparse.Namespace) -> int:
    from datagen.errors import DatagenError
    from datagen.folder import load_folder

    try:
        folder = load_folder(args.path, **overrides(args))
        pipeline = folder.pipeline
        items = None
        if args.pool or folder.has_data_pool:  # every item checked as a run checks it
            extractor = None if pipeline.step_names else folder.extract_function
            items = pipeline.check(pool_of(folder, args), extract_function=extractor)
        else:
            pipeline.check(None)
    except DatagenError as exc:
        return error(exc)
    steps = ", ".join(pipeline.step_names) or "single step"
    checked = f"; {items} items checked" if items is not None else "; no data pool to check"
    print(f"{args.path}: OK (model {pipeline.settings.model.model_string()}; {steps}{checked})")
    return EXIT_OK
