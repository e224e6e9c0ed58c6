"""Throughput against one fake Anthropic Messages API: plain aiohttp, the fast transport,
bare litellm.

    python -m benchmarks.anthropic_throughput                  # 200 ms, 64 in flight, 2000
    python -m benchmarks.anthropic_throughput --latency 0 --items 3000 --clients aiohttp,fast

The server (datagen.testing.fake_anthropic) runs in its own process on 127.0.0.1, and so
does each client, so its CPU time and peak RSS are its own:

- aiohttp: plain POSTs to /v1/messages with orjson, the floor of what Python can do;
- fast: ``AnthropicTransport.complete`` (body mapping, rate-limit headers, parsing);
- litellm: bare ``litellm.acompletion(model="anthropic/...")``, its own retries off.

Columns: req/s; ratio to plain aiohttp; CPU ms per call (``time.process_time`` of the
client / calls, imports excluded); peak RSS (VmHWM); requests the server counted.
Targets for the fast transport: >= 0.9 of plain aiohttp, < 0.5 ms CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.throughput import free_port, http_json

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ("aiohttp", "fast", "litellm")
KEY = "sk-ant-bench-0000"
MODEL = "claude-bench"


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You write in a plain tone. Use <draft> tags."},
            {"role": "user", "content": f"Write about topic {i} in about 20 words."}]


# ---- the clients (each runs in a child process) ----------------------------------------

async def client_aiohttp(base: str, items: int, concurrency: int) -> None:
    import aiohttp
    import orjson

    queue = iter(range(items))
    headers = {"Content-Type": "application/json", "x-api-key": KEY,
               "anthropic-version": "2023-06-01"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        async def worker() -> None:
            for i in queue:
                chat = messages(i)
                body = orjson.dumps({"model": MODEL, "max_tokens": 32,
                                     "system": chat[0]["content"], "messages": chat[1:]})
                async with session.post(f"{base}/v1/messages", data=body) as r:
                    orjson.loads(await r.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def client_fast(base: str, items: int, concurrency: int) -> None:
    from datagen.llm.anthropic_transport import AnthropicTransport
    from datagen.llm.types import ChatRequest

    queue = iter(range(items))
    transport = AnthropicTransport(base_url=base, api_key=KEY, pool_size=concurrency)

    async def worker() -> None:
        for i in queue:
            await transport.complete(ChatRequest(model=f"anthropic/{MODEL}",
                                                 messages=messages(i),
                                                 params={"max_tokens": 32}))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await transport.aclose()


async def client_litellm(base: str, items: int, concurrency: int) -> None:
    import litellm

    queue = iter(range(items))

    async def worker() -> None:
        for i in queue:
            await litellm.acompletion(model=f"anthropic/{MODEL}", messages=messages(i),
                                      api_base=base, api_key=KEY, max_tokens=32,
                                      num_retries=0, max_retries=0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _preload(name: str) -> None:
    """Import what the client uses before the clock starts."""
    import aiohttp  # noqa: F401
    import orjson  # noqa: F401

    if name == "fast":
        from datagen.llm import anthropic_transport  # noqa: F401
    if name == "litellm":
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, base: str, items: int, concurrency: int) -> None:
    _preload(name)
    run = {"aiohttp": client_aiohttp, "fast": client_fast, "litellm": client_litellm}[name]
    started, cpu0 = time.perf_counter(), time.process_time()
    asyncio.run(run(base, items, concurrency))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": peak_rss_mb()}))


# ---- the harness -----------------------------------------------------------------------

def run_client(name: str, base: str, items: int, concurrency: int) -> dict[str, Any] | None:
    http_json(f"{base}/reset", "POST")
    cmd = [sys.executable, "-m", "benchmarks.anthropic_throughput", "--child", name,
           "--base", base, "--items", str(items), "--concurrency", str(concurrency)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
        print(f"{name} failed: {tail[0][:300]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(name=name, requests=http_json(f"{base}/stats")["requests"])
    return result


def report(rows: list[dict[str, Any]], latency: float, concurrency: int, items: int) -> None:
    plain = next((r for r in rows if r["name"] == "aiohttp"), None)
    print(f"\n## Anthropic Messages API: latency {latency * 1000:.0f} ms, {concurrency} in "
          f"flight, {items} calls\n")
    print("| client | req/s | / aiohttp | CPU ms/call | peak RSS MB | server requests |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rps = r["requests"] / r["wall"]
        ratio = f"{rps / (plain['requests'] / plain['wall']):.2f}" if plain else "-"
        print(f"| {r['name']} | {rps:.0f} | {ratio} | {r['cpu'] * 1000 / max(1, r['requests']):.2f}"
              f" | {r['rss_mb']:.0f} | {r['requests']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--child", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.base, args.items, args.concurrency)
        return 0
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "datagen.testing.fake_anthropic", "--port", str(port),
         "--latency", str(args.latency), "--api-key", KEY, "--no-bodies", "--rpm", "1000000",
         "--hours", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "fake Anthropic server at ..."
        base = f"http://127.0.0.1:{port}"
        rows = [r for c in args.clients.split(",") if c
                if (r := run_client(c, base, args.items, args.concurrency)) is not None]
    finally:
        server.terminate()
        server.wait(10)
    report(rows, args.latency, args.concurrency, args.items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
