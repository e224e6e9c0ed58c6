"""A fake OpenAI-compatible server on 127.0.0.1, for tests, benchmarks and recording.

It answers ``POST /v1/chat/completions`` (and ``/v1/completions``) with a scripted or
rule-based reply, optionally after a delay, and counts what it received: every request
body, per body hash (to prove nothing was paid twice), and per second of arrival (to
prove a rate limit held at the server). It runs in a thread with its own event loop, so
sync and async tests can use it alike::

    with FakeOpenAIServer(responder=lambda body: "<draft>hi</draft>") as server:
        pipeline = DataGenerationPipeline(base_url=server.base_url, ...)

Run it alone: ``python -m datagen.testing.fake_server --port 8000 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class FakeReply:
    """A full reply: use it from a responder to send an error status or custom headers."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Responder = Callable[[dict[str, Any]], "str | FakeReply"]


@dataclass
class FaultPlan:
    """Faults injected before the responder is asked, each with its probability.

    ``retry_after``: the Retry-After header sent with a 429 (None: no header). A hang
    sleeps ``hang_seconds`` before answering, longer than any sane client timeout. The
    draw is seeded, so a plan replays the same faults for the same order of requests.
    """

    rate_429: float = 0.0
    retry_after: str | None = "1"
    rate_500: float = 0.0
    rate_hang: float = 0.0
    hang_seconds: float = 30.0
    rate_malformed: float = 0.0
    rate_empty: float = 0.0
    rate_length: float = 0.0
    seed: int = 0
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        import random

        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, body: dict[str, Any], text: Callable[[], str]) -> FakeReply | None:
        with self._lock:
            roll = self._rng.random()
        for kind, rate in (("429", self.rate_429), ("500", self.rate_500),
                           ("hang", self.rate_hang), ("malformed", self.rate_malformed),
                           ("empty", self.rate_empty), ("length", self.rate_length)):
            if roll < rate:
                with self._lock:
                    self.injected[kind] += 1
                return self._reply(kind, body, text)
            roll -= rate
        return None

    def _reply(self, kind: str, body: dict[str, Any], text: Callable[[], str]) -> FakeReply:
        if kind == "429":
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return FakeReply(status=429, headers=headers)
        if kind == "500":
            return FakeReply(status=500)
        if kind == "hang":
            return FakeReply(body=completion_body(body, text()), delay=self.hang_seconds)
        if kind == "malformed":
            return FakeReply(body=b'{"id": "chatcmpl-fake", "choices": [{"mess')
        if kind == "empty":
            reply = completion_body(body, "")
            reply["choices"] = []
            return FakeReply(body=reply)
        full = text()
        return FakeReply(body=completion_body(body, full[: max(1, len(full) // 2)], "length"))


def last_user_message(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else orjson.dumps(content).decode()
    return str(body.get("prompt", ""))


def echo_draft(body: dict[str, Any]) -> str:
    """The default reply: the user message, wrapped in <draft> tags."""
    return f"<draft>{last_user_message(body)}</draft>"


def error_body(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 429: "rate_limit_error"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"),
                      "code": status}}


def completion_body(body: dict[str, Any], text: str, finish_reason: str = "stop"
                    ) -> dict[str, Any]:
    prompt_tokens = sum(len(str(m.get("content", "")).split())
                        for m in body.get("messages") or []) or 1
    completion_tokens = max(1, len(text.split()))
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body.get("model", "fake-model"),
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


class FakeOpenAIServer:
    """See the module docstring. ``port=0`` picks a free port."""

    client_max_size = 64 * 1024 * 1024  # the largest request body accepted, in bytes

    def __init__(self, responder: Responder | None = None, latency: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 faults: FaultPlan | None = None, jitter: float = 0.0,
                 keep_bodies: bool = True) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the fake server listens on 127.0.0.1 only")
        self.responder: Responder = responder or echo_draft
        self.latency = latency
        self.host = host
        self.port = port
        self.api_key = api_key  # when set, other keys get a 401
        self.faults = faults
        self.jitter = jitter  # latency varies uniformly by +- jitter seconds
        self.keep_bodies = keep_bodies  # off for long benchmarks: counts only
        self._count = 0
        self._lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self.per_body: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ---- counters --------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        with self._lock:
            return self._count

    def max_in_window(self, window: float = 1.0) -> int:
        """The most requests that arrived within any ``window`` seconds."""
        with self._lock:
            times = sorted(self.arrivals)
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def reset(self) -> None:
        with self._lock:
            self.bodies.clear()
            self.headers.clear()
            self.arrivals.clear()
            self.per_body.clear()
            self.max_in_flight = 0
            self._count = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # ---- serving ---------------------------------------------------------------------

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        arrived = time.monotonic()
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.json_response(error_body(400, "body is not JSON"), status=400)
        with self._lock:
            self._count += 1
            self.arrivals.append(arrived)
            if self.keep_bodies:
                self.bodies.append(body)
                self.headers.append(dict(request.headers))
                self.per_body[body_hash(body)] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            auth = request.headers.get("Authorization", "")
            if self.api_key is not None and auth != f"Bearer {self.api_key}":
                return web.json_response(error_body(401, "Incorrect API key provided"),
                                         status=401)
            fault = self.faults.draw(body, lambda: str(self.responder(body))) if (
                self.faults) else None
            answer = fault if fault is not None else self.responder(body)
            reply = answer if isinstance(answer, FakeReply) else FakeReply(
                body=completion_body(body, str(answer)))
            if "prompt" in body and isinstance(reply.body, dict) and reply.body.get("choices"):
                for choice in reply.body["choices"]:  # /v1/completions answers with text
                    choice["text"] = choice.pop("message", {}).get("content", "")
                reply.body["object"] = "text_completion"
            if reply.body is None:
                reply.body = error_body(reply.status, f"fake error {reply.status}")
            delay = self.latency + reply.delay
            if self.jitter:
                import random

                delay = max(0.0, delay + random.uniform(-self.jitter, self.jitter))
            if delay > 0:
                await asyncio.sleep(delay)
            if isinstance(reply.body, (bytes, str)):
                return web.Response(body=reply.body, status=reply.status, headers=reply.headers,
                                    content_type="application/json")
            return web.Response(body=orjson.dumps(reply.body), status=reply.status,
                                headers=reply.headers, content_type="application/json")
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _stats(self, request: Any) -> Any:
        from aiohttp import web

        window = float(request.query.get("window", "1.0"))
        return web.json_response({"requests": self.request_count,
                                  "max_in_window": self.max_in_window(window),
                                  "max_in_flight": self.max_in_flight})

    async def _reset(self, request: Any) -> Any:
        from aiohttp import web

        self.reset()
        return web.json_response({"ok": True})

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": "fake-model",
                                                              "object": "model"}]})

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)  # for benchmarks in other processes
        app.router.add_post("/reset", self._reset)
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        server: Any = site._server  # aiohttp keeps the listening sockets there
        sockets = server.sockets if server is not None else []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def _add_routes(self, app: Any) -> None:
        """A hook for subclasses (the batch server): more routes on the same app and port."""

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() in the calling thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._thread_main, name="fake-openai",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake OpenAI server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the fake OpenAI server failed to start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    parser.add_argument("--jitter", type=float, default=0.0, help="+- seconds of latency")
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of 429 replies")
    parser.add_argument("--rate-500", type=float, default=0.0, help="share of 500 replies")
    parser.add_argument("--no-bodies", action="store_true", help="count requests only")
    args = parser.parse_args(argv)
    faults = FaultPlan(rate_429=args.rate_429, rate_500=args.rate_500) if (
        args.rate_429 or args.rate_500) else None
    server = FakeOpenAIServer(port=args.port, latency=args.latency, jitter=args.jitter,
                              faults=faults, keep_bodies=not args.no_bodies).start()
    print(f"fake OpenAI server at {server.base_url} (Ctrl+C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
