"""The ``datagen`` command. Every import of weight happens inside a command, so that
``datagen --help`` answers at once.

Exit codes: 0 all done; 1 the run finished with failures above --max-failure-rate;
2 a usage, configuration or pipeline-code error; 3 a file could not be written (disk
full); 130 interrupted (Ctrl+C); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse

from datagen.cli import batch as batch_commands
from datagen.cli import run as commands
from datagen.cli import tools
from datagen.cli.common import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WRITE,
    add_common,
    count,
    share,
)  # fmt: skip

__all__ = ["EXIT_FAILURES", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "EXIT_WRITE",
           "build_parser", "main"]


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
                         epilog=commands.RUN_EXAMPLES)
    add_common(run)
    run.add_argument("--resume", action="store_true", help="continue the newest run")
    run.add_argument("--dry-run", action="store_true", help="estimate only; send nothing")
    run.add_argument("--sample", type=count, help="with --dry-run: render a seeded sample")
    run.add_argument("--limit", type=count, help="run a seeded subset of N items")
    run.add_argument("--concurrency", type=count, help="requests in flight")
    run.add_argument("--output", help="output directory")
    run.add_argument("--max-failure-rate", type=share, default=0.1,
                     help="exit 1 when more than this share of items failed (default 0.1)")
    run.add_argument("--no-progress", action="store_true", help="no progress display")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="where to run: this process (default) or a Ray cluster")
    run.add_argument("--address", help="with --executor ray: the cluster (auto, host:port, "
                                       "ray://host:10001; default: Ray's own default)")
    run.add_argument("--shards", type=count, help="with --executor ray: how many shards "
                                                  "(default: the cluster's CPUs)")
    run.add_argument("--batch", action="store_true",
                     help="every step through the provider's batch API (about half price; "
                          "answers within 24 h; --resume picks the batches up)")
    run.set_defaults(func=commands.run)
    batch_commands.add_commands(sub, fmt)

    est = sub.add_parser("estimate", help="tokens, cost and time of a run, sending nothing",
                         formatter_class=fmt, description="The dry run of a pipeline.",
                         epilog="examples:\n  datagen estimate examples/factual_qa\n"
                                "  datagen estimate . --sample 100 --seed 1")
    add_common(est)
    est.add_argument("--sample", type=count, help="render a seeded sample, extrapolated")
    est.set_defaults(func=commands.estimate)

    exp = sub.add_parser(
        "export", help="ShareGPT / OpenAI / Hugging Face from results", formatter_class=fmt,
        description="Export a results file. A record becomes the prompt that produced its "
                    "output plus the output; for a multi-step run, the pipeline's own "
                    "mapper(record) (in its pipeline.py) builds the conversation, else "
                    "--step or --mapper says how. An existing file is never overwritten.",
        epilog="examples:\n  datagen export output/qa_20261122_101500.jsonl "
               "--format sharegpt\n  datagen export output/ --format hf --out train.parquet"
               "\n  datagen export output/ --step answer --out answers.jsonl\n"
               "  datagen export output/ --mapper examples/style_clone/pipeline.py:pair")
    exp.add_argument("results", help="a results file, or a run folder (its newest)")
    exp.add_argument("--format", choices=("sharegpt", "openai", "hf"), default="sharegpt")
    exp.add_argument("--out", help="output path (hf: a folder, or a .parquet file); it must "
                     "not exist yet")
    exp.add_argument("--step", help="multi-step runs: the step whose prompt and output are "
                     "exported")
    exp.add_argument("--mapper", metavar="FILE.py:NAME", help="a function record -> "
                     "conversation: FILE.py:NAME, a pipeline folder or its pipeline.py "
                     "(its mapper), or module:NAME")
    exp.set_defaults(func=tools.export)

    rep = sub.add_parser("report", help="one self-contained HTML file to read a run",
                         formatter_class=fmt,
                         description="Write an HTML report of a run (no network needed to "
                                     "open it): totals, histograms, searchable records, "
                                     "failures by reason.",
                         epilog="examples:\n  datagen report output/poems_20261122_101500.jsonl"
                                "\n  datagen report output/ --out report.html")
    rep.add_argument("results", help="a results file, or a run folder (its newest)")
    rep.add_argument("--out", help="the HTML file (default: beside the results)")
    rep.set_defaults(func=tools.report)

    check = sub.add_parser("check", help="validate a pipeline's config and prompts",
                           formatter_class=fmt,
                           description="Load a pipeline folder or config file and report "
                                       "every problem, sending nothing.",
                           epilog="examples:\n  datagen check examples/five_topics\n"
                                  "  datagen check config.yaml")
    add_common(check)
    check.set_defaults(func=commands.check)

    init = sub.add_parser("init", help="create a pipeline folder", formatter_class=fmt,
                          description="Create a pipeline folder (pipeline.py, config.yaml, "
                                      "prompts/, input/, a test) that runs as created on "
                                      "the embedded model.",
                          epilog="examples:\n  datagen init demo && cd demo && datagen run")
    init.add_argument("name")
    init.set_defaults(func=tools.init)

    cfg = sub.add_parser("config", help="print every config key, its default and meaning",
                         formatter_class=fmt,
                         description="Print the whole config.yaml, annotated: every section "
                                     "and key, its default and a line on what it does (from "
                                     "the schema that loads it).",
                         epilog="examples:\n  datagen config > config.yaml")
    cfg.set_defaults(func=tools.config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args))
