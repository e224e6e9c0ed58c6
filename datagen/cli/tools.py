"""``datagen export``, ``report``, ``init`` and ``config``: the tools around a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from datagen.cli.common import EXIT_OK, error


def export(args: argparse.Namespace) -> int:
    from datagen import export
    from datagen.errors import DatagenError

    try:
        source = export.results_file(args.results)
        out = Path(args.out) if args.out else source.with_name(
            f"{source.stem}_{args.format}" + ("" if args.format == "hf" else ".jsonl"))
        if args.format == "sharegpt":
            n = export.to_sharegpt(source, out)
        elif args.format == "openai":
            n = export.to_openai(source, out)
        else:
            dataset = export.to_hf(source)
            if out.suffix == ".parquet":
                dataset.to_parquet(str(out))
            else:
                dataset.save_to_disk(str(out))
            n = dataset.num_rows
    except DatagenError as exc:
        return error(exc)
    print(f"{n} conversations written to {out}")
    return EXIT_OK


def report(args: argparse.Namespace) -> int:
    from datagen.errors import DatagenError
    from datagen.report import write_report

    try:
        out = write_report(args.results, args.out)
    except DatagenError as exc:
        return error(exc)
    print(f"report: {out}")
    return EXIT_OK


def init(args: argparse.Namespace) -> int:
    from datagen.scaffold import create

    try:
        target = create(Path(args.name))
    except FileExistsError as exc:
        return error(f"{exc}: choose another name or remove it")
    print(f"created {target}: cd {args.name} && datagen run")
    return EXIT_OK


def config(args: argparse.Namespace) -> int:
    from datagen.config.explain import annotated_config

    print(annotated_config(), end="")
    return EXIT_OK
