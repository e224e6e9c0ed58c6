"""``datagen export``, ``report``, ``init`` and ``config``: the tools around a run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datagen.cli.common import EXIT_FAILURES, EXIT_OK, error


def export(args: argparse.Namespace) -> int:
    from datagen import export
    from datagen.errors import DatagenError

    try:
        source = export.results_file(args.results)
        out = Path(args.out) if args.out else source.with_name(
            f"{source.stem}_{args.format}" + ("" if args.format == "hf" else ".jsonl"))
        mapper, how = _mapper(args, source)
        if out.exists():  # never overwrite a file this call did not write
            raise export.exists_error(out)
        total = sum(1 for _ in export.records(source))
        if total == 0:
            return error(_nothing(source), EXIT_FAILURES)
        n = _write(args.format, source, out, mapper, args.step)
    except DatagenError as exc:
        return error(exc)
    if n == 0:
        _remove(out)  # written by this call, and empty: nothing to keep
        return error(f"0 of the {total} records of {source} became a conversation ({how} "
                     "returned None for every one): nothing exported", EXIT_FAILURES)
    print(f"{n} conversations written to {out}" + (f" ({how})" if how else ""))
    return EXIT_OK


def _mapper(args: argparse.Namespace, source: Path) -> tuple[Any, str]:
    """--mapper, else the mapper of the pipeline the run came from, else none (the
    default conversation, of --step for a multi-step run)."""
    from datagen.export import manifest_of
    from datagen.folder import load_mapper, mapper_of_run
    from datagen.manifest import read_manifest

    if args.mapper:
        return load_mapper(args.mapper), f"mapper {args.mapper}"
    if args.step:
        return None, ""
    manifest = read_manifest(manifest_of(source)) or {}
    found = mapper_of_run(manifest.get("config_file"))
    if found is None:
        return None, ""
    return found[0], f"the mapper of {found[1]}"


def _write(fmt: str, source: Path, out: Path, mapper: Any, step: str | None) -> int:
    from datagen import export

    if fmt == "sharegpt":
        return export.to_sharegpt(source, out, mapper, step, overwrite=False)
    if fmt == "openai":
        return export.to_openai(source, out, mapper, step, overwrite=False)
    dataset = export.to_hf(source, mapper, step=step)
    if dataset.num_rows == 0:
        return 0
    if out.suffix == ".parquet":
        dataset.to_parquet(str(out))
    else:
        dataset.save_to_disk(str(out))
    return int(dataset.num_rows)


def _nothing(source: Path) -> str:
    from datagen.export import failures_of

    failures = failures_of(source)
    failed = len(failures.read_bytes().splitlines()) if failures.exists() else 0
    why = f"; its {failed} failed items are in {failures}" if failed else ""
    return f"{source} holds 0 records: nothing to export{why}"


def _remove(out: Path) -> None:
    import shutil

    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)


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
