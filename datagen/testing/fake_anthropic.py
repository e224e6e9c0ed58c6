"""A fake Anthropic Messages API on 127.0.0.1, for tests, benchmarks and recording.

It answers ``POST /v1/messages`` as the real API does, in shape: message bodies, error
bodies (``{"type": "error", "error": {"type": ..., "message": ...}}``), 529 overloaded,
``anthropic-ratelimit-*`` headers whose ``remaining`` counts down within each 60 s
window. It checks what the real API would reject (no ``x-api-key`` when one is set, no
``anthropic-version``, no ``max_tokens``, a parameter it does not take, a final assistant
message ending in whitespace) and answers those with a 400 or 401.

It is :class:`~datagen.testing.fake_server.FakeOpenAIServer` underneath, so the counting
is the same (``bodies`` as received, ``per_body``, ``arrivals``, ``max_in_window``,
``max_in_flight``, ``/stats``) and so is the responder: it gets an OpenAI-style body
(``system`` and the messages as chat messages, text blocks joined) and returns text or a
:class:`FakeReply`::

    with FakeAnthropicServer(responder=lambda body: "<draft>hi</draft>") as server:
        transport = AnthropicTransport(base_url=server.base_url, api_key="k")

Run it alone: ``python -m datagen.testing.fake_anthropic --port 8001 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from datagen.testing.fake_server import FakeOpenAIServer, FakeReply, FaultPlan, Responder

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               402: "billing_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               504: "timeout_error", 529: "overloaded_error"}
# The Messages API's top-level fields: anything else is "Extra inputs are not permitted".
BODY_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
    "container", "mcp_servers", "context_management", "output_config", "output_format",
    "inference_geo",
})  # fmt: skip
WINDOW_S = 60.0


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status) or ("api_error" if status >= 500
                                       else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": "req_fake"}


def block_text(content: Any) -> str:
    """A content (a string, or a list of blocks) as text: text blocks joined by a blank
    line, the way merged turns read."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(str(b.get("text", "")) for b in content
                           if isinstance(b, dict) and b.get("type") == "text")
    return ""


def openai_view(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages body as an OpenAI chat body: what a responder reads."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": block_text(body["system"])}] if body.get("system") else []
    messages += [{"role": m.get("role"), "content": block_text(m.get("content"))}
                 for m in body.get("messages") or [] if isinstance(m, dict)]
    view = {k: v for k, v in body.items() if k not in ("system", "messages", "stop_sequences")}
    view["messages"] = messages
    if "stop_sequences" in body:
        view["stop"] = body["stop_sequences"]
    return view


def message_body(body: dict[str, Any], text: str | None, stop_reason: str = "end_turn"
                 ) -> dict[str, Any]:
    """A Messages API answer with ``text`` (None: no content block at all)."""
    words = sum(len(m["content"].split()) for m in openai_view(body)["messages"]) or 1
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake-model"),
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": words,
                  "output_tokens": max(1, len(text.split())) if text else 1},
    }


def _ends_in_whitespace(content: Any) -> bool:
    if isinstance(content, str):
        return content != content.rstrip()
    if isinstance(content, list) and content and isinstance(content[-1], dict):
        text = content[-1].get("text")
        return isinstance(text, str) and text != text.rstrip()
    return False


def invalid(body: dict[str, Any]) -> str | None:
    """What the Messages API would reject in ``body`` (its message), or None."""
    extra = sorted(set(body) - BODY_FIELDS)
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return "max_tokens: Field required (an integer >= 1)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if not isinstance(m.get("content"), (str, list)):
            return f"messages.{i}.content: Input should be a string or a list of blocks"
    if messages[-1]["role"] == "assistant" and _ends_in_whitespace(messages[-1]["content"]):
        return "messages: final assistant content cannot end with trailing whitespace"
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list)
                             or not all(isinstance(s, str) for s in stop)):
        return "stop_sequences: Input should be a list of strings"
    return None


@dataclass(frozen=True)
class Limits:
    """The limits the fake states in its ``anthropic-ratelimit-*`` headers, per minute.
    ``enforce``: answer 429 rate_limit_error once the window's requests are used up."""

    requests: int = 4000
    input_tokens: int = 400_000
    output_tokens: int = 80_000
    enforce: bool = False


class _Window:
    """What was used in the current 60 s window (windows start at the first request)."""

    def __init__(self) -> None:
        self.start = -math.inf
        self.requests = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def roll(self, now: float) -> None:
        if now - self.start >= WINDOW_S:
            self.start = now if now - self.start >= 2 * WINDOW_S else self.start + WINDOW_S
            self.requests = self.input_tokens = self.output_tokens = 0

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.start + WINDOW_S - now)


def _rfc3339(seconds_from_now: float) -> str:
    moment = datetime.fromtimestamp(time.time() + seconds_from_now, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _tokens(reply: FakeReply) -> tuple[int, int]:
    """The input and output tokens a successful reply states it used."""
    usage = reply.body.get("usage") if isinstance(reply.body, dict) else None
    if reply.status != 200 or not isinstance(usage, dict):
        return 0, 0
    used_in, used_out = usage.get("input_tokens"), usage.get("output_tokens")
    return (used_in if isinstance(used_in, int) else 0,
            used_out if isinstance(used_out, int) else 0)


class FakeAnthropicServer(FakeOpenAIServer):
    """See the module docstring. ``port=0`` picks a free port; ``limits``: what the
    rate-limit headers state (and, with ``enforce``, what a 429 follows)."""

    label = "Anthropic"

    def __init__(self, responder: Responder | None = None, latency: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 faults: FaultPlan | None = None, jitter: float = 0.0,
                 keep_bodies: bool = True, limits: Limits | None = None) -> None:
        super().__init__(responder, latency, host, port, api_key, faults, jitter, keep_bodies)
        self.limits = limits or Limits()
        self._window = _Window()
        self._window_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """The root, as Anthropic's SDK takes it (the transport also takes ``.../v1``)."""
        return f"http://{self.host}:{self.port}"

    def routes(self, app: Any) -> None:
        app.router.add_post("/v1/messages", self._handle)

    def authorized(self, headers: Any) -> bool:
        return self.api_key is None or headers.get("x-api-key") == self.api_key

    def error_body(self, status: int, message: str) -> Any:
        if status == 401:
            message = "invalid x-api-key"
        return anthropic_error(status, message)

    def gate(self, body: dict[str, Any], headers: Any) -> FakeReply | None:
        if not headers.get("anthropic-version"):
            return FakeReply(400, anthropic_error(400, "anthropic-version: header is required"))
        problem = invalid(body)
        if problem is not None:
            return FakeReply(400, anthropic_error(400, problem))
        with self._window_lock:
            now = time.monotonic()
            self._window.roll(now)
            if self.limits.enforce and self._window.requests >= self.limits.requests:
                wait = math.ceil(self._window.seconds_left(now))
                return FakeReply(429, anthropic_error(
                    429, "This request would exceed the rate limit for your organization "
                         "of requests per minute."), {"retry-after": str(wait)})
            self._window.requests += 1
        return None

    def responder_view(self, body: dict[str, Any]) -> dict[str, Any]:
        return openai_view(body)

    def reply_body(self, body: dict[str, Any], text: str) -> Any:
        return message_body(body, text)

    def fault_reply(self, kind: str, body: dict[str, Any], text: Callable[[], str]
                    ) -> FakeReply:
        plan = self.faults
        assert plan is not None
        if kind == "429":
            headers = {"retry-after": plan.retry_after} if plan.retry_after is not None else {}
            return FakeReply(429, anthropic_error(429, "rate limit exceeded"), headers)
        if kind in ("500", "529"):
            status = int(kind)
            return FakeReply(status, anthropic_error(
                status, "Overloaded" if status == 529 else "Internal server error"))
        if kind == "hang":
            return FakeReply(body=message_body(body, text()), delay=plan.hang_seconds)
        if kind == "malformed":
            return FakeReply(body=b'{"id": "msg_fake", "type": "message", "content": [{"ty')
        if kind == "empty":
            return FakeReply(body=message_body(body, None))
        full = text()
        return FakeReply(body=message_body(body, full[: max(1, len(full) // 2)], "max_tokens"))

    def finish_reply(self, body: dict[str, Any], reply: FakeReply
                     ) -> tuple[FakeReply, dict[str, str]]:
        used_in, used_out = _tokens(reply)
        with self._window_lock:
            window, now = self._window, time.monotonic()
            window.roll(now)
            window.input_tokens += used_in
            window.output_tokens += used_out
            reset = _rfc3339(window.seconds_left(now))
            used = {"requests": window.requests, "input-tokens": window.input_tokens,
                    "output-tokens": window.output_tokens,
                    "tokens": window.input_tokens + window.output_tokens}
            count = self._count
        limits = {"requests": self.limits.requests, "input-tokens": self.limits.input_tokens,
                  "output-tokens": self.limits.output_tokens,
                  "tokens": self.limits.input_tokens + self.limits.output_tokens}
        headers = {"request-id": f"req_fake_{count}"}
        for name, limit in limits.items():
            headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(max(0, limit - used[name]))
            headers[f"anthropic-ratelimit-{name}-reset"] = reset
        return reply, headers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    parser.add_argument("--jitter", type=float, default=0.0, help="+- seconds of latency")
    parser.add_argument("--api-key", help="answer 401 to any other x-api-key")
    parser.add_argument("--rpm", type=int, default=Limits.requests,
                        help="requests per minute stated in the rate-limit headers")
    parser.add_argument("--enforce", action="store_true", help="429 once --rpm is used up")
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of 429 replies")
    parser.add_argument("--rate-529", type=float, default=0.0, help="share of 529 replies")
    parser.add_argument("--no-bodies", action="store_true", help="count requests only")
    parser.add_argument("--hours", type=float, default=24.0, help="stop after this long")
    args = parser.parse_args(argv)
    faults = FaultPlan(rate_429=args.rate_429, rate_529=args.rate_529) if (
        args.rate_429 or args.rate_529) else None
    server = FakeAnthropicServer(port=args.port, latency=args.latency, jitter=args.jitter,
                                 api_key=args.api_key, faults=faults,
                                 keep_bodies=not args.no_bodies,
                                 limits=Limits(requests=args.rpm, enforce=args.enforce)).start()
    print(f"fake Anthropic server at {server.base_url} (Ctrl+C to stop)", flush=True)
    deadline = time.monotonic() + args.hours * 3600
    try:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 60.0))
    except KeyboardInterrupt:
        pass
    server.stop()


if __name__ == "__main__":
    main()
