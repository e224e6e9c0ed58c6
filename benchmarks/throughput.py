"""Throughput against one fake OpenAI-compatible server, all clients in the same run.

    python -m benchmarks.throughput                 # the three scenarios of issue 7
    python -m benchmarks.throughput --scenario 200ms --items 2000 --concurrency 64

The server (datagen.testing.fake_server) runs in its own process on 127.0.0.1. Each
client runs in its own process too, so its CPU time and peak RSS are its own:

- plain aiohttp: POSTs with orjson, the floor of what Python can do;
- bare litellm.acompletion (its own retries off);
- datagen, fast transport: the full pipeline (render, call, extract, append JSONL);
- datagen, litellm transport: the same pipeline through litellm.

Columns: req/s; ratio to the best possible (items / (ceil(items/concurrency) x latency));
ratio to plain aiohttp; CPU ms per call (user+sys of the client process / calls); peak
RSS; the most requests the server saw in any 1-second window (with the set rate, if any).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ("aiohttp", "litellm", "datagen-fast", "datagen-litellm")
SCENARIOS = {  # name: (latency s, concurrency, items, rate limit req/s)
    "200ms": (0.2, 64, 2000, None),
    "0ms": (0.0, 128, 3000, None),
    "rate": (0.05, 64, 1500, 100.0),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You write in a plain tone. Use <draft> tags."},
            {"role": "user", "content": f"Write about topic {i} in about 20 words."}]


# ---- the clients (each runs in a child process) ----------------------------------------

async def client_aiohttp(base: str, items: int, concurrency: int, rate: float | None) -> None:
    import aiohttp
    import orjson

    queue = iter(range(items))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            for i in queue:
                body = orjson.dumps({"model": "bench", "messages": messages(i), "max_tokens": 32})
                async with session.post(f"{base}/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    orjson.loads(await r.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def client_litellm(base: str, items: int, concurrency: int, rate: float | None) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    queue = iter(range(items))

    async def worker() -> None:
        for i in queue:
            await litellm.acompletion(model="openai/bench", messages=messages(i), api_base=base,
                                      api_key="EMPTY", max_tokens=32, num_retries=0,
                                      max_retries=0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def client_datagen(base: str, items: int, concurrency: int, rate: float | None,
                         transport: str) -> None:
    from benchmarks._project import make_project
    from datagen import DataGenerationPipeline, extract

    root = Path(tempfile.mkdtemp(prefix="datagen-bench-"))
    config = make_project(root, base, transport=transport, rate_limit=rate)
    pool = Path(os.environ["DATAGEN_BENCH_POOL"])  # written by the parent, not counted here
    pipeline = DataGenerationPipeline(config=config, cache=False)
    await pipeline.run(pool, concurrency_limit=concurrency, collect=False,
                       extract_function=extract.tag("draft"))


def _preload(name: str) -> None:
    """Import what the client uses before the clock starts: import time is measured on
    its own (python -c "import datagen"), throughput here."""
    import aiohttp  # noqa: F401
    import orjson  # noqa: F401

    if name in ("litellm", "datagen-litellm"):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm  # noqa: F401
    if name.startswith("datagen"):
        import jinja2.sandbox  # noqa: F401

        import datagen.pipeline  # noqa: F401
        from datagen.llm import openai_transport  # noqa: F401
        if name == "datagen-litellm":
            from datagen.llm.litellm_transport import import_litellm

            import_litellm()


def child(name: str, base: str, items: int, concurrency: int, rate: float | None) -> None:
    _preload(name)
    if name == "aiohttp":
        coro = client_aiohttp(base, items, concurrency, rate)
    elif name == "litellm":
        coro = client_litellm(base, items, concurrency, rate)
    else:
        coro = client_datagen(base, items, concurrency, rate,
                              "openai" if name == "datagen-fast" else "litellm")
    # time from here: imports done, event loop about to start
    started = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    asyncio.run(coro)
    wall = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": cpu1.ru_maxrss / 1024}))


# ---- the harness -----------------------------------------------------------------------

def run_client(name: str, base: str, items: int, concurrency: int, rate: float | None,
               stats_url: str) -> dict[str, Any]:
    http_json(f"{stats_url}/reset", "POST")
    from benchmarks._project import write_pool

    pool = write_pool(Path(tempfile.mkdtemp(prefix="datagen-pool-")) / "pool.jsonl", items)
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--child", name, "--base", base,
           "--items", str(items), "--concurrency", str(concurrency)]
    if rate:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "DATAGEN_BENCH_POOL": str(pool)}, timeout=1800)
    pool.unlink()
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stats = http_json(f"{stats_url}/stats")
    result.update(name=name, requests=stats["requests"], max_window=stats["max_in_window"])
    return result


def scenario(name: str, latency: float, concurrency: int, items: int, rate: float | None,
             clients: tuple[str, ...]) -> list[dict[str, Any]]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "datagen.testing.fake_server", "--port", str(port),
         "--latency", str(latency), "--no-bodies"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "fake OpenAI server at ..."
        base, stats_url = f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}"
        rows = [run_client(c, base, items, concurrency, rate, stats_url) for c in clients]
    finally:
        server.terminate()
        server.wait(10)
    # with a rate limit the best possible is the rate itself
    best = rate if rate else (items / (math.ceil(items / concurrency) * latency)
                              if latency > 0 else None)
    plain = next((r for r in rows if r["name"] == "aiohttp"), None)
    print(f"\n## {name}: latency {latency * 1000:.0f} ms, {concurrency} in flight, {items} "
          f"calls{f', rate limit {rate:g} req/s' if rate else ''}"
          f"{f' (best possible {best:.0f} req/s)' if best else ''}\n")
    print("| client | req/s | / best | / aiohttp | CPU ms/call | peak RSS MB | max req in 1 s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rps = r["requests"] / r["wall"]
        r["rps"] = rps
        vs_best = f"{rps / best:.2f}" if best else "-"
        vs_plain = f"{rps / (plain['requests'] / plain['wall']):.2f}" if plain else "-"
        cap = f" (cap {rate:g})" if rate else ""
        print(f"| {r['name']} | {rps:.0f} | {vs_best} | {vs_plain} | "
              f"{r['cpu'] * 1000 / max(1, r['requests']):.2f} | {r['rss_mb']:.0f} | "
              f"{r['max_window']}{cap} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--items", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--latency", type=float)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.base, args.items, args.concurrency, args.rate)
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    clients = tuple(c for c in args.clients.split(",") if c)
    for name in names:
        latency, concurrency, items, rate = SCENARIOS[name]
        scenario(name, args.latency if args.latency is not None else latency,
                 args.concurrency or concurrency, args.items or items,
                 args.rate if args.rate is not None else rate, clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
