"""What every command shares: exit codes, errors, overrides, the pool, argument types."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_WRITE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def error(message: object, code: int = 2) -> int:
    from datagen.redact import redact

    print(f"datagen: error: {redact(str(message))}", file=sys.stderr)
    return code


def exit_code(exc: Exception) -> int:
    """2 for what the user must fix (config, code, data); 3 when a file could not be
    written (a full disk): fix the disk, then --resume."""
    from datagen.errors import OutputError

    return EXIT_WRITE if isinstance(exc, OutputError) and getattr(
        exc, "kind", "") == "write_error" else EXIT_USAGE


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    from datagen.config import parse_overrides

    overrides = parse_overrides(args.set or [])
    if getattr(args, "output", None):
        overrides["output_dir"] = args.output
    if getattr(args, "batch", False):
        overrides["run.batch"] = True
    return overrides


def pool_of(folder: Any, args: argparse.Namespace) -> Any:
    pool = args.pool if args.pool else folder.data_pool()
    if getattr(args, "limit", None) is not None:
        from datagen.pool import seeded_sample

        items = pool if not isinstance(pool, (str, Path)) else jsonl(pool)
        chosen, _ = seeded_sample(iter(items), args.limit, args.seed)
        return chosen
    return pool


def jsonl(path: str | Path) -> Any:
    from datagen.pool import open_pool

    return open_pool(path).raw_items()


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default=".",
                   help="a pipeline folder (pipeline.py + config.yaml) or a config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, as a constructor keyword would")
    p.add_argument("--pool", help="a JSONL data pool instead of the pipeline's data_pool()")
    p.add_argument("--seed", type=int, default=0, help="seed of --limit / --sample")


def share(text: str) -> float:
    """--max-failure-rate: a share of items, 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share of items between 0 and 1 "
                                         "(0.1 = 10%)")
    return value


def count(text: str) -> int:
    """--limit, --sample, --concurrency: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value
