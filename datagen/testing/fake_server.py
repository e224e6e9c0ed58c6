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
    rate_529: float = 0.0  # Anthropic's "overloaded"
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

    def pick(self) -> str | None:
        """The fault for the next request ("429", "500", "529", "hang", "malformed",
        "empty", "length"), counted in ``injected``; None for no fault."""
        with self._lock:
            roll = self._rng.random()
        for kind, rate in (("429", self.rate_429), ("500", self.rate_500),
                           ("529", self.rate_529), ("hang", self.rate_hang),
                           ("malformed", self.rate_malformed), ("empty", self.rate_empty),
                           ("length", self.rate_length)):
            if roll < rate:
                with self._lock:
                    self.injected[kind] += 1
                return kind
            roll -= rate
        return None

    def draw(self, body: dict[str, Any], text: Callable[[], str]) -> FakeReply | None:
        """The next fault as an OpenAI-shaped reply, or None."""
        kind = self.pick()
        return None if kind is None else self._reply(kind, body, text)

    def _reply(self, kind: str, body: dict[str, Any], text: Callable[[], str]) -> FakeReply:
        if kind == "429":
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return FakeReply(status=429, headers=headers)
        if kind in ("500", "529"):
            return FakeReply(status=int(kind))
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

    # ---- what a subclass for another API changes -----------------------------------

    label = "OpenAI"  # in messages and the thread's name

    def authorized(self, headers: Any) -> bool:
        return self.api_key is None or headers.get("Authorization", "") == (
            f"Bearer {self.api_key}")

    def error_body(self, status: int, message: str) -> Any:
        return error_body(status, message)

    def gate(self, body: dict[str, Any], headers: Any) -> FakeReply | None:
        """A reply that stops an authorized request before faults and the responder
        (a request the API would reject, a limit used up), or None."""
        return None

    def responder_view(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body as the responder sees it (OpenAI chat shape)."""
        return body

    def reply_body(self, body: dict[str, Any], text: str) -> Any:
        """The body of a successful reply with ``text``."""
        return completion_body(body, text)

    def fault_reply(self, kind: str, body: dict[str, Any], text: Callable[[], str]
                    ) -> FakeReply:
        assert self.faults is not None
        return self.faults._reply(kind, body, text)

    def finish_reply(self, body: dict[str, Any], reply: FakeReply
                     ) -> tuple[FakeReply, dict[str, str]]:
        """The reply to send and headers to add (``reply`` may be shared: not changed)."""
        if "prompt" in body and isinstance(reply.body, dict) and reply.body.get("choices"):
            for choice in reply.body["choices"]:  # /v1/completions answers with text
                choice["text"] = choice.pop("message", {}).get("content", "")
            reply.body["object"] = "text_completion"
        return reply, {}

    # ---- serving ---------------------------------------------------------------------

    def _arrived(self, arrived: float, body: dict[str, Any], headers: Any) -> None:
        with self._lock:
            self._count += 1
            self.arrivals.append(arrived)
            if self.keep_bodies:
                self.bodies.append(body)
                self.headers.append(dict(headers))
                self.per_body[body_hash(body)] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _answer(self, body: dict[str, Any]) -> FakeReply:
        """A fault when the plan draws one, else the responder's reply."""
        view = self.responder_view(body)
        kind = self.faults.pick() if self.faults else None
        if kind is not None:
            return self.fault_reply(kind, body, lambda: str(self.responder(view)))
        answer = self.responder(view)
        return answer if isinstance(answer, FakeReply) else FakeReply(
            body=self.reply_body(body, str(answer)))

    def _reply_for(self, body: dict[str, Any], headers: Any
                   ) -> tuple[FakeReply, dict[str, str]]:
        if not self.authorized(headers):
            return FakeReply(status=401, body=self.error_body(
                401, "Incorrect API key provided")), {}
        reply, extra = self.finish_reply(body, self.gate(body, headers) or self._answer(body))
        if reply.body is None:
            reply = FakeReply(reply.status, self.error_body(reply.status,
                                                            f"fake error {reply.status}"),
                              reply.headers, reply.delay)
        return reply, extra

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        arrived = time.monotonic()
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.json_response(self.error_body(400, "body is not JSON"), status=400)
        self._arrived(arrived, body, request.headers)
        try:
            reply, extra = self._reply_for(body, request.headers)
            delay = self.latency + reply.delay
            if self.jitter:
                import random

                delay = max(0.0, delay + random.uniform(-self.jitter, self.jitter))
            if delay > 0:
                await asyncio.sleep(delay)
            data = reply.body if isinstance(reply.body, (bytes, str)) else orjson.dumps(
                reply.body)
            return web.Response(body=data, status=reply.status,
                                headers={**reply.headers, **extra},
                                content_type="application/json")
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

    def routes(self, app: Any) -> None:
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_get("/v1/models", self._models)

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=self.client_max_size)
        self.routes(app)
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
        self._thread = threading.Thread(target=self._thread_main,
                                        name=f"fake-{self.label.lower()}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the fake {self.label} server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the fake {self.label} server failed to start: {self._error}")
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
