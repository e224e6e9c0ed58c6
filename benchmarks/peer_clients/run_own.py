"""The project's own clients, in the project's venv (PYTHONPATH: the checkout).

- ``aiohttp``: plain POSTs with orjson, the floor of what Python can do; no rate limiter;
- ``litellm``: bare ``litellm.acompletion`` (its own retries off, as in throughput.py);
  no rate limiter;
- ``datagen-fast`` / ``datagen-litellm``: the full pipeline (render both templates, call,
  extract ``<draft>``, append to JSONL) on each transport, ``rate_limit`` in req/s.

aiohttp and litellm read the flat pool line by line; datagen gets its own pool shape
(``user_prompt_kwargs`` / ``system_prompt_kwargs``, same values) and reads the file itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from _measure import SYSTEM, USER, messages, parse_args, read_pool, report

VARIANTS = ("aiohttp", "litellm", "datagen-fast", "datagen-litellm")


async def workers(rows: Iterator[dict[str, Any]], concurrency: int,
                  call: Callable[[dict[str, Any]], Awaitable[str]]) -> int:
    """``concurrency`` workers pull rows and call; how many calls returned text."""
    done = 0

    async def worker() -> None:
        nonlocal done
        for row in rows:
            if await call(row):
                done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def run_aiohttp(args: argparse.Namespace) -> int:
    import aiohttp
    import orjson

    url = f"{args.base}/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-fake"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def call(row: dict[str, Any]) -> str:
            body = orjson.dumps({"model": "bench", "messages": messages(row), "max_tokens": 32})
            async with session.post(url, data=body, headers=headers) as response:
                reply = orjson.loads(await response.read())
            return str(reply["choices"][0]["message"]["content"])

        return await workers(read_pool(args.pool), args.concurrency, call)


async def run_litellm(args: argparse.Namespace) -> int:
    import litellm

    litellm.suppress_debug_info = True

    async def call(row: dict[str, Any]) -> str:
        reply = await litellm.acompletion(model="openai/bench", messages=messages(row),
                                          api_base=args.base, api_key="sk-fake", max_tokens=32,
                                          num_retries=0, max_retries=0)
        return str(reply.choices[0].message.content)

    return await workers(read_pool(args.pool), args.concurrency, call)


def jinja(template: str) -> str:
    return template.replace("{", "{{ ").replace("}", " }}") + "\n"


async def run_datagen(args: argparse.Namespace) -> int:
    from benchmarks._project import make_project
    from datagen import DataGenerationPipeline, extract

    root = Path(tempfile.mkdtemp(prefix="datagen-", dir=args.workdir))
    transport = "openai" if args.variant == "datagen-fast" else "litellm"
    config = make_project(root, args.base, prompts=(jinja(SYSTEM), jinja(USER)),
                          transport=transport, rate_limit=args.rate)
    pipeline = DataGenerationPipeline(config=config, cache=False)
    result = await pipeline.run(args.pool, concurrency_limit=args.concurrency, collect=False,
                                extract_function=extract.tag("draft"))
    return count_lines(result.files.results)


def count_lines(path: Path) -> int:
    """Lines of a file, read 1 MB at a time (read whole, 200,000 records are ~120 MB:
    the count would be the run's peak memory)."""
    lines = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines


def preload(variant: str) -> str:
    """Import what the client uses before the clock starts; its version, for the table."""
    from importlib.metadata import version

    import aiohttp  # noqa: F401
    import orjson  # noqa: F401

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if variant == "aiohttp":
        return f"aiohttp {version('aiohttp')}"
    if variant == "litellm":
        import litellm  # noqa: F401

        return f"litellm {version('litellm')}"
    import jinja2.sandbox  # noqa: F401

    import datagen.pipeline  # noqa: F401
    from datagen.llm import openai_transport  # noqa: F401
    if variant == "datagen-litellm":
        from datagen.llm.litellm_transport import import_litellm

        import_litellm()
        return f"datagen {version('datagen')}, litellm {version('litellm')}"
    return f"datagen {version('datagen')}"


def main() -> None:
    args = parse_args(VARIANTS)
    label = preload(args.variant)
    run = {"aiohttp": run_aiohttp, "litellm": run_litellm}.get(args.variant, run_datagen)
    report(lambda: asyncio.run(run(args)), args, version=label)


if __name__ == "__main__":
    main()
