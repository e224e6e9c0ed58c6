"""Bespoke Curator: one prompt per item, keep the text. Runs in Curator's own venv.

``--variant openai``: its own aiohttp backend; ``--variant litellm``: its litellm backend.
Concurrency: ``max_concurrent_requests``. A rate: ``max_requests_per_minute`` (rate x 60);
without one it is set far above what the run can reach, and so is ``max_tokens_per_minute``
(otherwise Curator's defaults for an unknown model, 200 req/min and 100,000 tokens/min with
4,096 output tokens assumed per call, would be what is measured). Its cache is off
(CURATOR_DISABLE_CACHE) and its working files go to the run's scratch folder.
"""

from __future__ import annotations

import argparse
from typing import Any

from _measure import messages, parse_args, report

UNCAPPED = 10_000_000


def backend_params(args: argparse.Namespace) -> dict[str, Any]:
    rpm = int(args.rate * 60) if args.rate else UNCAPPED
    return {"base_url": args.base, "api_key": "sk-fake",
            "max_concurrent_requests": args.concurrency, "max_requests_per_minute": rpm,
            "max_tokens_per_minute": UNCAPPED * 100}


def run(args: argparse.Namespace) -> int:
    from bespokelabs import curator
    from datasets import Dataset

    class Writer(curator.LLM):  # type: ignore[misc]
        def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
            return messages(row)

        def parse(self, row: dict[str, Any], response: str) -> dict[str, Any]:
            return {"topic": row["topic"], "text": response}

    model = "bench" if args.variant == "openai" else "openai/bench"
    pool = Dataset.from_json(str(args.pool), cache_dir=str(args.workdir / "hf"))
    llm = Writer(model_name=model, backend=args.variant, generation_params={"max_tokens": 32},
                 backend_params=backend_params(args))  # type: ignore[arg-type]
    out = llm(pool, working_dir=str(args.workdir / "curator"))
    dataset = out.dataset if hasattr(out, "dataset") else out
    return sum(1 for text in dataset["text"] if text)


def main() -> None:
    args = parse_args(("openai", "litellm"))
    from importlib.metadata import version

    import bespokelabs.curator  # noqa: F401  (imported before the clock starts)
    import datasets  # noqa: F401

    report(lambda: run(args), args, version=f"bespokelabs-curator {version('bespokelabs-curator')}")


if __name__ == "__main__":
    main()
