"""A fake OpenAI-compatible server on 127.0.0.1, for tests, benchmarks and recording.

It answers ``POST /v1/chat/completions`` (and ``/v1/completions``) with a scripted or
rule-based reply, optionally after a delay, and counts what it received: every request
body, per body hash (to prove nothing was paid twice), and per second of arrival (to
prove a rate limit held at the server). It runs in a thread with its own event loop
(:class:`~datagen.testing.fake_http.ThreadedServer`), so sync and async tests can use it
alike::

    with FakeOpenAIServer(responder=lambda body: "<draft>hi</draft>") as server:
        pipeline = DataGenerationPipeline(base_url=server.base_url, ...)

A request with ``n`` > 1 is answered with n choices, as OpenAI answers it: the responder
is asked once per choice, its body view carrying ``choice_index`` (0, 1, ...), and the
usage counts the prompt once. ``max_choices`` caps the choices returned, as servers that
ignore ``n`` (llama.cpp's: ``max_choices=1``) or return fewer do.

The replies, the fault plan and the body helpers live in
:mod:`datagen.testing.fake_replies` and are importable from here too.

Run it alone: ``python -m datagen.testing.fake_server --port 8000 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from datagen.testing.fake_http import ThreadedServer
from datagen.testing.fake_replies import (
    FakeReply,
    FaultPlan,
    Responder,
    body_hash,
    choices_asked,
    choices_body,
    completion_body,
    echo_draft,
    error_body,
    last_user_message,
)  # fmt: skip

__all__ = ["FakeOpenAIServer", "FakeReply", "FaultPlan", "Responder", "body_hash",
           "choices_body", "completion_body", "echo_draft", "error_body",
           "last_user_message", "main"]


class FakeOpenAIServer(ThreadedServer):
    """See the module docstring. ``port=0`` picks a free port."""

    def __init__(self, responder: Responder | None = None, latency: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 faults: FaultPlan | None = None, jitter: float = 0.0,
                 keep_bodies: bool = True, max_choices: int | None = None) -> None:
        super().__init__(host, port)
        self.max_choices = max_choices  # at most this many choices per reply (None: n)
        self.responder: Responder = responder or echo_draft
        self.latency = latency
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

    def routes(self, app: Any) -> None:
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_get("/v1/models", self._models)

    def _add_routes(self, app: Any) -> None:
        """A hook for subclasses (the batch server): more routes on the same app and port."""

    # ---- serving ---------------------------------------------------------------------

    def install(self, app: Any) -> None:
        self.routes(app)
        app.router.add_get("/stats", self._stats)  # for benchmarks in other processes
        app.router.add_post("/reset", self._reset)
        self._add_routes(app)

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
        n = min(choices_asked(body), self.max_choices or choices_asked(body))
        if choices_asked(body) > 1:
            answers = [self.responder({**view, "choice_index": i}) for i in range(n)]
            failed = next((a for a in answers if isinstance(a, FakeReply)), None)
            return failed or FakeReply(body=choices_body(body, [str(a) for a in answers]))
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

    async def _pause(self, extra: float) -> None:
        """Wait ``latency + extra`` seconds, varied by ``jitter``."""
        delay = self.latency + extra
        if self.jitter:
            delay = max(0.0, delay + random.uniform(-self.jitter, self.jitter))
        if delay > 0:
            await asyncio.sleep(delay)

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
            await self._pause(reply.delay)
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
        with self._lock:
            span = (max(self.arrivals) - min(self.arrivals)) if self.arrivals else 0.0
        return web.json_response({"requests": self.request_count,
                                  "max_in_window": self.max_in_window(window),
                                  "max_in_flight": self.max_in_flight,
                                  "span_s": span})

    async def _reset(self, request: Any) -> Any:
        from aiohttp import web

        self.reset()
        return web.json_response({"ok": True})

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": "fake-model",
                                                              "object": "model"}]})


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
