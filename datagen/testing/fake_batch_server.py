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

Run it alone: ``python -m datagen.testing.fake_batch_server --port 8000 --completion-delay 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from datagen.testing import fake_batch_checks as checks
from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_batch_jobs import BatchBook, ErrorFor, Job, Provider, Task
from datagen.testing.fake_server import (
    FakeOpenAIServer,
    FakeReply,
    Responder,
    body_hash,
)  # fmt: skip

MB = shapes.MB
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
Handler = Callable[[Any], Awaitable[Any]]


class FakeBatchServer(FakeOpenAIServer):
    """See the module docstring. ``port=0`` picks a free port."""

    client_max_size = 520 * MB  # OpenAI takes files up to 512 MB
    openai_max_requests = 50_000
    openai_max_bytes = 200 * MB
    anthropic_max_requests = 100_000
    anthropic_max_bytes = 256 * MB

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
        self._failures_lock = threading.Lock()

    def start(self) -> FakeBatchServer:
        super().start()
        return self

    def __enter__(self) -> FakeBatchServer:
        return self.start()

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

    def _take_failure(self) -> bool:
        with self._failures_lock:
            if self.fail_batches <= 0:
                return False
            self.fail_batches -= 1
            return True

    # ---- routes ------------------------------------------------------------------------

    def _add_routes(self, app: Any) -> None:
        add = app.router.add_route
        add("POST", "/v1/messages", self._message)
        for method, path, handler in (
            ("POST", "/v1/files", self._upload),
            ("GET", "/v1/files", self._list_files),
            ("GET", "/v1/files/{id}", self._get_file),
            ("GET", "/v1/files/{id}/content", self._file_content),
            ("DELETE", "/v1/files/{id}", self._delete_file),
            ("POST", "/v1/batches", self._create_batch),
            ("GET", "/v1/batches", self._list_batches),
            ("GET", "/v1/batches/{id}", self._get_batch),
            ("POST", "/v1/batches/{id}/cancel", self._cancel_batch),
        ):
            add(method, path, self._guarded("openai", handler))
        for method, path, handler in (
            ("POST", "/v1/messages/batches", self._create_message_batch),
            ("GET", "/v1/messages/batches", self._list_message_batches),
            ("GET", "/v1/messages/batches/{id}", self._get_message_batch),
            ("POST", "/v1/messages/batches/{id}/cancel", self._cancel_message_batch),
            ("GET", "/v1/messages/batches/{id}/results", self._message_batch_results),
            ("DELETE", "/v1/messages/batches/{id}", self._delete_message_batch),
        ):
            add(method, path, self._guarded("anthropic", handler))

    def _guarded(self, provider: Provider, handler: Handler) -> Handler:
        async def guarded(request: Any) -> Any:
            denied = self._denied(request, provider)
            return denied if denied is not None else await handler(request)
        return guarded

    def _denied(self, request: Any, provider: Provider) -> Any:
        if self.api_key is None or self.api_key in (
                request.headers.get("x-api-key"),
                request.headers.get("Authorization", "").removeprefix("Bearer ")):
            return None
        return _error(provider, 401, "Incorrect API key provided.")

    async def _stats(self, request: Any) -> Any:
        return _json(self.stats(float(request.query.get("window", "1.0"))))

    # ---- OpenAI files ------------------------------------------------------------------

    async def _upload(self, request: Any) -> Any:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not hasattr(upload, "file"):
            return _error("openai", 400, "Missing required parameter: 'file'.", "file")
        if purpose not in PURPOSES:
            return _error("openai", 400, f"Invalid value for 'purpose': {purpose!r}.",
                          "purpose")
        data = upload.file.read()
        if len(data) > 512 * MB:
            return _error("openai", 400, "Files may be at most 512 MB.", "file")
        stored = self.book.add_file(str(upload.filename or "upload"), str(purpose), data)
        return _json(stored.to_openai())

    async def _list_files(self, request: Any) -> Any:
        purpose = request.query.get("purpose")
        with self.book.lock:
            files = [f.to_openai() for f in self.book.files.values()
                     if purpose is None or f.purpose == purpose]
        if request.query.get("order", "desc") == "desc":
            files.reverse()
        return _page(request, "openai", files, default=10_000, most=10_000)

    async def _get_file(self, request: Any) -> Any:
        stored = self.book.files.get(request.match_info["id"])
        if stored is None:
            return _no_file(request)
        return _json(stored.to_openai())

    async def _file_content(self, request: Any) -> Any:
        data = self.book.read_file(request.match_info["id"])
        if data is None:
            return _no_file(request)
        return _raw(data, "application/octet-stream")

    async def _delete_file(self, request: Any) -> Any:
        file_id = request.match_info["id"]
        if not self.book.delete_file(file_id):
            return _no_file(request)
        return _json({"id": file_id, "object": "file", "deleted": True})

    # ---- OpenAI batches ----------------------------------------------------------------

    async def _create_batch(self, request: Any) -> Any:
        body = await _body(request)
        with self.book.lock:
            refusal = self._batch_refusal(body)
            if refusal is not None:
                self.book.note("batches_rejected")
                return refusal
            endpoint = body["endpoint"]
            read = checks.read_openai_input(self.book.files[body["input_file_id"]].data,
                                            endpoint, self.openai_max_requests,
                                            self.openai_max_bytes)
            if self._take_failure():
                read.errors = [shapes.batch_error("token_limit_exceeded", (
                    f"Enqueued token limit reached for {read.model} in organization "
                    "org-fake. Please try again once some in_progress batches have been "
                    "completed."))]
            tasks = [Task(custom_id, request_body, request_body,
                          checks.openai_body_problem(endpoint, request_body))
                     for custom_id, request_body in read.requests]
            job = self.book.new_job("openai", endpoint, tasks,
                                    input_file_id=body["input_file_id"],
                                    metadata=body.get("metadata"), model=read.model,
                                    errors=read.errors)
            return _json(shapes.openai_batch(job))

    def _batch_refusal(self, body: Any) -> Any:
        """The 4xx OpenAI answers a create with before any validation, or None."""
        if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
            return _error("openai", 400, "Missing required parameter: 'input_file_id'.",
                          "input_file_id")
        if body.get("endpoint") not in shapes.ENDPOINTS:
            return _error("openai", 400, f"Invalid value for 'endpoint': "
                          f"{body.get('endpoint')!r}; this fake serves "
                          f"{' and '.join(shapes.ENDPOINTS)}.", "endpoint")
        if body.get("completion_window") != "24h":
            return _error("openai", 400, "Invalid value for 'completion_window': only "
                          "'24h' is supported.", "completion_window")
        if not checks.metadata_ok(body.get("metadata")):
            return _error("openai", 400, "Invalid 'metadata': at most 16 pairs, string "
                          "keys up to 64 and values up to 512 characters.", "metadata")
        stored = self.book.files.get(body["input_file_id"])
        if stored is None:
            return _error("openai", 404, f"No such File object: {body['input_file_id']}",
                          "input_file_id")
        if stored.purpose != "batch":
            return _error("openai", 400, f"The input file must have purpose 'batch', not "
                          f"'{stored.purpose}'.", "input_file_id")
        return None

    async def _get_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "openai", poll=True)
        return self._openai_answer(request, job)

    async def _cancel_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "openai")
        if job is not None and not self.book.cancel(job):
            return _error("openai", 409, f"Cannot cancel a batch with status "
                          f"'{job.status}'.")
        return self._openai_answer(request, job)

    def _openai_answer(self, request: Any, job: Job | None) -> Any:
        if job is None:
            return _error("openai", 404, f"No batch found with id "
                          f"'{request.match_info['id']}'.")
        with self.book.lock:
            return _json(shapes.openai_batch(job))

    async def _list_batches(self, request: Any) -> Any:
        with self.book.lock:
            views = [shapes.openai_batch(job) for job in self.book.listing("openai")]
        return _page(request, "openai", views, default=20, most=100)

    # ---- Anthropic message batches -----------------------------------------------------

    async def _create_message_batch(self, request: Any) -> Any:
        raw = await request.read()
        if len(raw) > self.anthropic_max_bytes:
            return self._refuse_message_batch(413, f"Request too large: at most "
                                                   f"{self.anthropic_max_bytes // MB} MB")
        body = _loads(raw)
        problem = checks.anthropic_requests_problem(body, self.anthropic_max_requests)
        if problem is None and self._take_failure():
            problem = "requests: the batch was refused (FakeBatchServer.fail_batches)"
        if problem is not None:
            return self._refuse_message_batch(400, problem)
        tasks = [_anthropic_task(item) for item in body["requests"]]
        job = self.book.new_job("anthropic", "/v1/messages", tasks)
        return self._anthropic_answer(request, job)

    def _refuse_message_batch(self, status: int, problem: str) -> Any:
        self.book.note("batches_rejected")
        return _error("anthropic", status, problem)

    async def _get_message_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic", poll=True)
        return self._anthropic_answer(request, job)

    async def _cancel_message_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic")
        if job is not None and not self.book.cancel(job):
            return _error("anthropic", 400, f"Message batch {job.id} has ended; it can no "
                          "longer be canceled.")
        return self._anthropic_answer(request, job)

    async def _message_batch_results(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic")
        if job is None or job.results is None:
            return self._anthropic_answer(request, job, "has not ended yet: results are "
                                          "available once processing_status is 'ended'")
        self.book.note("downloads", job.id)
        return _raw(job.results, "application/x-jsonl")

    async def _delete_message_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic")
        if job is None or not job.ended:
            return self._anthropic_answer(request, job, "is still processing: cancel it and "
                                          "wait until it has ended before deleting it")
        self.book.delete_job(job)
        return _json({"id": job.id, "type": "message_batch_deleted"})

    def _anthropic_answer(self, request: Any, job: Job | None, refusal: str = "") -> Any:
        if job is None:
            return _error("anthropic", 404, f"Message batch "
                          f"{request.match_info.get('id', '')} not found.")
        if refusal:
            return _error("anthropic", 400, f"Message batch {job.id} {refusal}.")
        with self.book.lock:
            return _json(shapes.anthropic_batch(job, self.base_url))

    async def _list_message_batches(self, request: Any) -> Any:
        with self.book.lock:
            views = [shapes.anthropic_batch(job, self.base_url)
                     for job in self.book.listing("anthropic")]
        return _page(request, "anthropic", views, default=20, most=1000)

    # ---- Anthropic online --------------------------------------------------------------

    async def _message(self, request: Any) -> Any:
        arrived = time.monotonic()
        body = _loads(await request.read())
        if not isinstance(body, dict):
            return _error("anthropic", 400, "The body is not a JSON object.")
        self._arrive(body, request, arrived)
        try:
            denied = self._denied(request, "anthropic")
            problem = checks.anthropic_params_problem(body)
            if denied is not None or problem is not None:
                return denied or _error("anthropic", 400, problem or "")
            chat = shapes.chat_from_anthropic(body)
            answer = self._online_answer(chat)
            reply = answer if isinstance(answer, FakeReply) else FakeReply()
            await self._online_delay(reply.delay)
            if isinstance(reply.body, (bytes, str)) and reply.status < 300:
                return _raw(reply.body, "application/json", reply.status, reply.headers)
            status, sent = shapes.anthropic_reply(chat, answer)
            return _json(sent, status, reply.headers)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _arrive(self, body: dict[str, Any], request: Any, arrived: float) -> None:
        """Count an online request the way FakeOpenAIServer counts its own."""
        with self._lock:
            self._count += 1
            self.arrivals.append(arrived)
            if self.keep_bodies:
                self.bodies.append(body)
                self.headers.append(dict(request.headers))
                self.per_body[body_hash(body)] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _online_answer(self, chat: dict[str, Any]) -> str | FakeReply:
        fault = self.faults.draw(chat, lambda: str(self.responder(chat))) if (
            self.faults) else None
        return fault if fault is not None else self.responder(chat)

    async def _online_delay(self, extra: float) -> None:
        delay = self.latency + extra
        if self.jitter:
            delay = max(0.0, delay + random.uniform(-self.jitter, self.jitter))
        if delay > 0:
            await asyncio.sleep(delay)


# ---- helpers -----------------------------------------------------------------------------


def _anthropic_task(item: dict[str, Any]) -> Task:
    params = item.get("params")
    sent = params if isinstance(params, dict) else {}
    return Task(item["custom_id"], sent, shapes.chat_from_anthropic(sent),
                checks.anthropic_params_problem(params))


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _body(request: Any) -> Any:
    return _loads(await request.read())


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    return _raw(orjson.dumps(data), "application/json", status, headers)


def _raw(data: bytes | str, content_type: str, status: int = 200,
         headers: dict[str, str] | None = None) -> Any:
    from aiohttp import web

    return web.Response(body=data, status=status, headers=headers,
                        content_type=content_type)


def _error(provider: Provider, status: int, message: str, param: str | None = None) -> Any:
    if provider == "openai":
        return _json(shapes.openai_error(status, message, param), status)
    return _json(shapes.anthropic_error(status, message), status)


def _no_file(request: Any) -> Any:
    return _error("openai", 404, f"No such File object: {request.match_info['id']}", "id")


def _page(request: Any, provider: Provider, views: list[dict[str, Any]], default: int,
          most: int) -> Any:
    """One page of a list answer, with the provider's cursor names and envelope."""
    query, anthropic = request.query, provider == "anthropic"
    limit = query.get("limit", str(default))
    if not limit.isdigit() or not 1 <= int(limit) <= most:
        return _error(provider, 400, f"limit must be an integer from 1 to {most}", "limit")
    try:
        return _json(shapes.list_body(
            not anthropic, views, int(limit), query.get("after_id" if anthropic else "after"),
            query.get("before_id") if anthropic else None))
    except KeyError as exc:
        return _error(provider, 400, f"No object with id {exc} to page from.")


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
