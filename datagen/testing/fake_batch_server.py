"""A fake batch API server on 127.0.0.1: OpenAI's Files + Batch API and Anthropic's Message
Batches, with the online endpoints, on one port.

It is a :class:`~datagen.testing.fake_server.FakeOpenAIServer`, so the same instance also
answers ``/v1/chat/completions`` and ``/v1/completions``, and it adds Anthropic's online
``/v1/messages``: a pipeline that mixes online and batch steps needs one server. Every
answer, online or inside a batch, comes from the one ``responder(body) -> str | FakeReply``;
it always gets an OpenAI-style body (Anthropic's ``system`` + ``messages`` are converted,
so ``last_user_message(body)`` works). A FakeReply with a status >= 300 inside a batch is
that request's error (its ``delay`` and ``headers`` matter online only). Everything is
counted at the server, so a test can prove that a client killed at any moment and resumed
submitted, and was answered, nothing twice::

    with FakeBatchServer(completion_delay=3600) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        file = client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, completion_window="24h",
                                      endpoint="/v1/chat/completions")
        server.advance(3600)  # the fake clock: nobody sleeps
        batch = client.batches.retrieve(batch.id)  # status "completed"
        lines = client.files.content(batch.output_file_id).text.splitlines()
        assert server.stats()["succeeded_twice"] == []

Time. A batch moves along its timeline only when it is looked at (retrieve, list, cancel,
results), at the moments its delays give, so results do not depend on when you poll.
The create (and cancel) answer shows the state before any move: with every delay at 0,
the first retrieve after the create shows the batch ended. ``stats()`` never moves a batch.
Requests are answered in order as time passes (a poll half-way through a batch sees half
of them answered); once a batch has ended its results are written once and every download
returns the same bytes. Lists are newest first.

Knobs (keywords of the constructor, and attributes you may change between batches; a
batch's own delays are fixed when it is created):

- ``completion_delay`` (0): seconds from creation until every request is answered.
- ``validation_delay`` (0): seconds a batch stays "validating" (Anthropic shows
  "in_progress"); a bad OpenAI input file turns "failed" when it ends.
- ``finalize_delay`` (0): seconds in "finalizing" before "completed".
- ``cancel_delay`` (0): seconds in "cancelling" / "canceling" before it ends.
- ``error_rate`` (0.0): the share of requests inside batches that fail with a 500
  (Anthropic: an "api_error" result), drawn per request from ``seed``.
- ``error_for(custom_id, body) -> FakeReply | None``: choose requests to fail inside a
  batch (asked before ``error_rate`` and the responder; None: answer normally).
- ``expire_after`` (None = 24 h): seconds after creation at which a batch still running
  expires: ``expire_done_fraction`` (0.5) of its requests answered (at least; answers
  already given stay), the rest expired.
- ``fail_batches`` (0): the next N batches created fail whole: OpenAI's goes "failed" with
  a ``token_limit_exceeded`` error; Anthropic's create is refused with a 400.
- ``seed`` (0): the seed of the ``error_rate`` draws.
- Limits, class attributes a test may lower on an instance: ``openai_max_requests``
  (50,000), ``openai_max_bytes`` (200 MB), ``anthropic_max_requests`` (100,000),
  ``anthropic_max_bytes`` (256 MB).
- Every FakeOpenAIServer keyword too (``latency``, ``faults``, ``api_key``, ``port``...):
  latency and faults apply to the online endpoints; ``api_key`` to every route (batch
  routes and ``/v1/messages`` take it as ``Authorization: Bearer`` or ``x-api-key``).

Manual control from a test: ``finish(batch_id)`` (end it now, as if every delay had
passed), ``expire(batch_id)``, ``advance(seconds)`` (the fake clock), ``now()``.
Counters: ``stats()`` and ``GET /stats`` (for a client in another process): files
uploaded / bytes / deleted, batches created / rejected / deleted, cancels, polls,
downloads, requests submitted / answered / succeeded / errored / expired / canceled, per
custom_id and per body hash (``body_hash``) how often each was submitted and succeeded, and
the lists ``submitted_twice`` / ``succeeded_twice`` (empty when nothing was paid twice).
``POST /reset`` clears the counters (not the files and batches).

The routes live in two mixins, :mod:`datagen.testing.fake_batch_openai` (Files + Batch
API) and :mod:`datagen.testing.fake_batch_anthropic` (Message Batches and ``/v1/messages``);
the state in :mod:`datagen.testing.fake_batch_jobs` (the book, its timeline and counters).

Run it alone: ``python -m datagen.testing.fake_batch_server --port 8000 --completion-delay 5``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from datagen.testing import fake_batch_http as http
from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_batch_anthropic import AnthropicBatchRoutes
from datagen.testing.fake_batch_http import Handler
from datagen.testing.fake_batch_jobs import BatchBook, ErrorFor, Job, Provider, Task
from datagen.testing.fake_batch_openai import PURPOSES, OpenAIBatchRoutes
from datagen.testing.fake_replies import FakeReply, Responder, body_hash
from datagen.testing.fake_server import FakeOpenAIServer

__all__ = ["MB", "PURPOSES", "BatchBook", "ErrorFor", "FakeBatchServer", "FakeOpenAIServer",
           "FakeReply", "Handler", "Job", "Provider", "Responder", "Task", "body_hash", "main"]

MB = shapes.MB


class FakeBatchServer(AnthropicBatchRoutes, OpenAIBatchRoutes):
    """See the module docstring. ``port=0`` picks a free port."""

    client_max_size = 520 * MB  # OpenAI takes files up to 512 MB

    def __init__(self, responder: Responder | None = None, *, completion_delay: float = 0.0,
                 validation_delay: float = 0.0, finalize_delay: float = 0.0,
                 cancel_delay: float = 0.0, error_rate: float = 0.0,
                 error_for: ErrorFor | None = None, expire_after: float | None = None,
                 expire_done_fraction: float = 0.5, fail_batches: int = 0, seed: int = 0,
                 **server_options: Any) -> None:
        super().__init__(responder, **server_options)
        self.completion_delay = completion_delay
        self.validation_delay = validation_delay
        self.finalize_delay = finalize_delay
        self.cancel_delay = cancel_delay
        self.error_rate = error_rate
        self.error_for = error_for
        self.expire_after = expire_after
        self.expire_done_fraction = expire_done_fraction
        self.fail_batches = fail_batches
        self.book = BatchBook(self, seed)

    # ---- control and counters ----------------------------------------------------------

    def finish(self, batch_id: str) -> str:
        """End the batch now, as if every delay had passed; returns its final status."""
        return self.book.finish(batch_id)

    def expire(self, batch_id: str) -> str:
        """Expire a running batch now (``expire_done_fraction`` answered); its status."""
        return self.book.expire(batch_id)

    def advance(self, seconds: float) -> None:
        """Move the fake clock on (every timestamp the server shows moves with it)."""
        self.book.advance(seconds)

    def now(self) -> float:
        return self.book.now()

    def stats(self, window: float = 1.0) -> dict[str, Any]:
        """Every counter (see the module docstring), JSON-ready."""
        return {**self.book.stats(), "requests": self.request_count,
                "max_in_window": self.max_in_window(window),
                "max_in_flight": self.max_in_flight}

    def reset(self) -> None:
        super().reset()
        self.book.reset_counters()

    # ---- routes ------------------------------------------------------------------------

    def _add_routes(self, app: Any) -> None:
        add = app.router.add_route
        add("POST", "/v1/messages", self._message)
        for method, path, handler in self._openai_routes():
            add(method, path, self._guarded("openai", handler))
        for method, path, handler in self._anthropic_routes():
            add(method, path, self._guarded("anthropic", handler))

    def _guarded(self, provider: Provider, handler: Handler) -> Handler:
        async def guarded(request: Any) -> Any:
            denied = http.denied(request, provider, self.api_key)
            return denied if denied is not None else await handler(request)
        return guarded

    async def _stats(self, request: Any) -> Any:
        return http.json_response(self.stats(float(request.query.get("window", "1.0"))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--completion-delay", type=float, default=0.0,
                        help="seconds from creation until a batch ends")
    parser.add_argument("--validation-delay", type=float, default=0.0,
                        help="seconds a batch stays validating")
    parser.add_argument("--error-rate", type=float, default=0.0,
                        help="share of requests inside batches that fail")
    parser.add_argument("--expire-after", type=float, default=None,
                        help="seconds after which a running batch expires")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds per online reply")
    args = parser.parse_args(argv)
    server = FakeBatchServer(port=args.port, completion_delay=args.completion_delay,
                             validation_delay=args.validation_delay,
                             error_rate=args.error_rate, expire_after=args.expire_after,
                             latency=args.latency).start()
    print(f"fake batch server at {server.base_url} (Ctrl+C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
