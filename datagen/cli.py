"""The ``datagen`` command. Every import of weight happens inside a command, so that
``datagen --help`` answers at once.

Exit codes: 0 all done; 1 the run finished with failures above --max-failure-rate;
2 a usage, configuration or pipeline-code error; 3 a file could not be written (disk
full); 130 interrupted (Ctrl+C); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_WRITE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

RUN_EXAMPLES = """examples:
  datagen run                                  the pipeline folder you are in
  datagen run examples/factual_qa --limit 20   a seeded subset of 20 items
  datagen run . --set model.temperature=0.2 --set provider=openai --set model=gpt-4o-mini
  datagen run . --resume                       continue the newest run of this experiment
  datagen run . --dry-run                      tokens, cost and time; nothing is sent
  datagen run config.yaml --pool items.jsonl   the single-step form, no pipeline.py
"""


def _error(message: object, code: int = 2) -> int:
    from datagen.redact import redact

    print(f"datagen: error: {redact(str(message))}", file=sys.stderr)
    return code


def exit_code(exc: Exception) -> int:
    """2 for what the user must fix (config, code, data); 3 when a file could not be
    written (a full disk): fix the disk, then --resume."""
    from datagen.errors import OutputError

    return EXIT_WRITE if isinstance(exc, OutputError) and getattr(
        exc, "kind", "") == "write_error" else EXIT_USAGE


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from datagen.config import parse_overrides

    overrides = parse_overrides(args.set or [])
    if getattr(args, "output", None):
        overrides["output_dir"] = args.output
    return overrides


def _pool(folder: Any, args: argparse.Namespace) -> Any:
    pool = args.pool if args.pool else folder.data_pool()
    if getattr(args, "limit", None) is not None:
        from datagen.pool import seeded_sample

        items = pool if not isinstance(pool, (str, Path)) else _jsonl(pool)
        chosen, _ = seeded_sample(iter(items), args.limit, args.seed)
        return chosen
    return pool


def _jsonl(path: str | Path) -> Any:
    from datagen.pool import open_pool

    return open_pool(path).raw_items()


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from datagen.engine import RunInterrupted
    from datagen.errors import DatagenError
    from datagen.folder import load_folder

    try:
        folder = load_folder(args.path, **_overrides(args))
        pipeline = folder.pipeline
        pool = _pool(folder, args)
        if args.dry_run:
            print(_dry_run_report(folder, pool, args))
            return EXIT_OK
        extractor = None if pipeline.step_names else folder.extract_function
        result = asyncio.run(pipeline.run(pool, concurrency_limit=args.concurrency,
                                          extract_function=extractor, resume=args.resume,
                                          progress=not args.no_progress, collect=False))
    except RunInterrupted as stop:
        _interrupted(stop.result, args)
        return stop.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except DatagenError as exc:
        return _error(exc, exit_code(exc))
    counts = result.counts
    print(f"results: {result.files.results} ({counts['results_in_file']} records)")
    if counts["failed"]:
        print(f"failures: {result.files.failures} ({counts['failed']} this run)")
    if counts.get("dropped"):
        print(f"dropped: {result.files.dropped} ({counts['dropped']} this run, by filters)")
    try:
        exported = folder.export(result.files.results)
    except DatagenError as exc:
        return _error(exc)
    if exported is not None:
        print(f"exported: {exported}")
    if result.failure_rate() > args.max_failure_rate:
        finished = counts["succeeded"] + counts["failed"]
        print(f"datagen: {counts['failed']} of {finished} items failed, above "
              f"--max-failure-rate {args.max_failure_rate:g}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def _interrupted(result: Any, args: argparse.Namespace) -> None:
    """After Ctrl+C or SIGTERM: where the records are and how to continue."""
    print(f"datagen: interrupted; {result.counts['results_in_file']} records in "
          f"{result.files.results}", file=sys.stderr)
    path = "" if args.path == "." else f" {args.path}"
    print(f"datagen: continue with: datagen run{path} --resume", file=sys.stderr)


def _dry_run_report(folder: Any, pool: Any, args: argparse.Namespace) -> str:
    """`run --dry-run` and `estimate`: the same estimate of the same pool."""
    pipeline = folder.pipeline
    return str(pipeline.estimate(
        pool, sample_size=args.sample, seed=args.seed,
        extract_function=None if pipeline.step_names else folder.extract_function).report())


def _estimate(args: argparse.Namespace) -> int:
    from datagen.errors import DatagenError
    from datagen.folder import load_folder

    try:
        folder = load_folder(args.path, **_overrides(args))
        report = _dry_run_report(folder, _pool(folder, args), args)
    except DatagenError as exc:
        return _error(exc)
    print(report)
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
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
        return _error(exc)
    print(f"{n} conversations written to {out}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from datagen.errors import DatagenError
    from datagen.report import write_report

    try:
        out = write_report(args.results, args.out)
    except DatagenError as exc:
        return _error(exc)
    print(f"report: {out}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from datagen.errors import DatagenError
    from datagen.folder import load_folder

    try:
        folder = load_folder(args.path, **_overrides(args))
    except DatagenError as exc:
        return _error(exc)
    steps = ", ".join(folder.pipeline.step_names) or "single step"
    print(f"{args.path}: OK (model {folder.pipeline.settings.model.model_string()}; {steps})")
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    from datagen.scaffold import create

    try:
        target = create(Path(args.name))
    except FileExistsError as exc:
        return _error(f"{exc}: choose another name or remove it")
    print(f"created {target}: cd {args.name} && datagen run")
    return EXIT_OK


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default=".",
                   help="a pipeline folder (pipeline.py + config.yaml) or a config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, as a constructor keyword would")
    p.add_argument("--pool", help="a JSONL data pool instead of the pipeline's data_pool()")
    p.add_argument("--seed", type=int, default=0, help="seed of --limit / --sample")


def build_parser() -> argparse.ArgumentParser:
    from datagen import __version__

    parser = argparse.ArgumentParser(
        prog="datagen", description="Generate synthetic training data with LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  datagen init demo && cd demo && datagen run\n"
               "  datagen run examples/poems --dry-run\n"
               "  datagen export output/poems_20261122_101500.jsonl --format sharegpt")
    parser.add_argument("--version", action="version", version=f"datagen {__version__}")
    sub = parser.add_subparsers(dest="command")
    fmt = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser("run", help="run a pipeline", formatter_class=fmt,
                         description="Run a pipeline folder (or a config file).",
                         epilog=RUN_EXAMPLES)
    _add_common(run)
    run.add_argument("--resume", action="store_true", help="continue the newest run")
    run.add_argument("--dry-run", action="store_true", help="estimate only; send nothing")
    run.add_argument("--sample", type=_count, help="with --dry-run: render a seeded sample")
    run.add_argument("--limit", type=_count, help="run a seeded subset of N items")
    run.add_argument("--concurrency", type=_count, help="requests in flight")
    run.add_argument("--output", help="output directory")
    run.add_argument("--max-failure-rate", type=_share, default=0.1,
                     help="exit 1 when more than this share of items failed (default 0.1)")
    run.add_argument("--no-progress", action="store_true", help="no progress display")
    run.set_defaults(func=_run)

    est = sub.add_parser("estimate", help="tokens, cost and time of a run, sending nothing",
                         formatter_class=fmt, description="The dry run of a pipeline.",
                         epilog="examples:\n  datagen estimate examples/factual_qa\n"
                                "  datagen estimate . --sample 100 --seed 1")
    _add_common(est)
    est.add_argument("--sample", type=_count, help="render a seeded sample, extrapolated")
    est.set_defaults(func=_estimate)

    exp = sub.add_parser("export", help="ShareGPT / OpenAI / Hugging Face from results",
                         formatter_class=fmt, description="Export a results file.",
                         epilog="examples:\n  datagen export output/qa_20261122_101500.jsonl "
                                "--format sharegpt\n  datagen export output/ --format hf "
                                "--out train.parquet")
    exp.add_argument("results", help="a results file, or a run folder (its newest)")
    exp.add_argument("--format", choices=("sharegpt", "openai", "hf"), default="sharegpt")
    exp.add_argument("--out", help="output path (hf: a folder, or a .parquet file)")
    exp.set_defaults(func=_export)

    rep = sub.add_parser("report", help="one self-contained HTML file to read a run",
                         formatter_class=fmt,
                         description="Write an HTML report of a run (no network needed to "
                                     "open it): totals, histograms, searchable records, "
                                     "failures by reason.",
                         epilog="examples:\n  datagen report output/poems_20261122_101500.jsonl"
                                "\n  datagen report output/ --out report.html")
    rep.add_argument("results", help="a results file, or a run folder (its newest)")
    rep.add_argument("--out", help="the HTML file (default: beside the results)")
    rep.set_defaults(func=_report)

    check = sub.add_parser("check", help="validate a pipeline's config and prompts",
                           formatter_class=fmt,
                           description="Load a pipeline folder or config file and report "
                                       "every problem, sending nothing.",
                           epilog="examples:\n  datagen check examples/five_topics\n"
                                  "  datagen check config.yaml")
    _add_common(check)
    check.set_defaults(func=_check)

    init = sub.add_parser("init", help="create a pipeline folder", formatter_class=fmt,
                          description="Create a pipeline folder (pipeline.py, config.yaml, "
                                      "prompts/, input/, a test) that runs as created on "
                                      "the embedded model.",
                          epilog="examples:\n  datagen init demo && cd demo && datagen run")
    init.add_argument("name")
    init.set_defaults(func=_init)

    cfg = sub.add_parser("config", help="print every config key, its default and meaning",
                         formatter_class=fmt,
                         description="Print the whole config.yaml, annotated: every section "
                                     "and key, its default and a line on what it does (from "
                                     "the schema that loads it).",
                         epilog="examples:\n  datagen config > config.yaml")
    cfg.set_defaults(func=_config)
    return parser


def _config(args: argparse.Namespace) -> int:
    from datagen.config.explain import annotated_config

    print(annotated_config(), end="")
    return EXIT_OK


def _share(text: str) -> float:
    """--max-failure-rate: a share of items, 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share of items between 0 and 1 "
                                         "(0.1 = 10%)")
    return value


def _count(text: str) -> int:
    """--limit, --sample, --concurrency: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
