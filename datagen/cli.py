"""The ``datagen`` command. Imports stay inside the commands so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_USAGE = 0, 2


def _check(args: argparse.Namespace) -> int:
    from datagen.config import load_settings
    from datagen.errors import DatagenError
    from datagen.prompts import ChatPrompt

    try:
        settings = load_settings(args.config)
        prompts = settings.prompts
        if prompts.user_prompt_path:
            ChatPrompt.from_files(prompts.user_prompt_path, prompts.system_prompt_path)
    except DatagenError as exc:
        print(f"datagen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.config}: OK (model {settings.model.model_string()})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from datagen import __version__

    parser = argparse.ArgumentParser(
        prog="datagen",
        description="Generate synthetic training data with LLMs.",
        epilog="example: datagen check config.yaml",
    )
    parser.add_argument("--version", action="version", version=f"datagen {__version__}")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser(
        "check", help="validate a config file and its prompt templates",
        description="Load a config.yaml and its prompt files and report every problem.",
        epilog="example: datagen check examples/five_topics/config.yaml",
    )
    check.add_argument("config", nargs="?", default="config.yaml")
    check.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
