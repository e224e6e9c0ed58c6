"""distilabel: one prompt per item, keep the text. Runs in distilabel's own venv.

A pipeline of two steps, each in its own process (distilabel's local runner): load the
JSONL pool (``LoadDataFromFileSystem``), then ``TextGeneration`` with the same system
prompt and a Jinja2 copy of the user template, through ``OpenAILLM`` at the fake server.
Concurrency: a step sends one batch at a time, all its rows at once (asyncio.gather), so
``input_batch_size`` (and the loader's ``batch_size``) is set to the concurrency. It has no
rate-limit setting. Its cache is off (``use_cache=False``) and its files go to the run's
scratch folder.
"""

from __future__ import annotations

import argparse

from _measure import SYSTEM, USER, parse_args, read_pool, report


def run(args: argparse.Namespace) -> int:
    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromFileSystem
    from distilabel.steps.tasks import TextGeneration

    tone = next(read_pool(args.pool))["tone"]  # one tone for the whole pool
    llm = OpenAILLM(model="bench", base_url=args.base, api_key="sk-fake",  # type: ignore[arg-type]
                    generation_kwargs={"max_new_tokens": 32})
    with Pipeline(name="peers-bench", cache_dir=str(args.workdir / "distilabel")) as pipeline:
        load = LoadDataFromFileSystem(data_files=str(args.pool), filetype="json",
                                      batch_size=args.concurrency)
        generate = TextGeneration(llm=llm, input_batch_size=args.concurrency,
                                  system_prompt=SYSTEM.format(tone=tone),
                                  template=jinja(USER), columns=["topic", "word_count"])
        load >> generate
    distiset = pipeline.run(use_cache=False)
    texts = distiset["default"]["train"]["generation"]
    return sum(1 for text in texts if text)


def jinja(template: str) -> str:
    """``Write about {topic}`` -> ``Write about {{ topic }}``."""
    return template.replace("{", "{{ ").replace("}", " }}")


def main() -> None:
    args = parse_args()
    from importlib.metadata import version

    import distilabel.pipeline  # noqa: F401  (imported before the clock starts)

    report(lambda: run(args), args, version=f"distilabel {version('distilabel')}")


if __name__ == "__main__":
    main()
