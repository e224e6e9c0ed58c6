"""Anthropic's side of the fake batch server: :class:`AnthropicBatchRoutes`, the Message
Batches routes (``/v1/messages/batches``: create, list, get, cancel, results, delete) and
the online ``/v1/messages``, with Anthropic's refusals and error bodies. The responder sees
an OpenAI-style body (converted from ``system`` + ``messages``). A mixin:
:class:`~datagen.testing.fake_batch_server.FakeBatchServer` combines it with the OpenAI
routes and owns the book it reads (see that module for the knobs).
"""

from __future__ import annotations

import time
from typing import Any

from datagen.testing import fake_batch_checks as checks
from datagen.testing import fake_batch_http as http
from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_batch_jobs import BatchBook, Job, Task
from datagen.testing.fake_replies import FakeReply
from datagen.testing.fake_server import FakeOpenAIServer

MB = shapes.MB


class AnthropicBatchRoutes(FakeOpenAIServer):
    """Anthropic's Message Batches and online Messages routes (a mixin of FakeBatchServer,
    not used alone)."""

    book: BatchBook
    anthropic_max_requests = 100_000
    anthropic_max_bytes = 256 * MB

    def _anthropic_routes(self) -> list[http.Route]:
        return [("POST", "/v1/messages/batches", self._create_message_batch),
                ("GET", "/v1/messages/batches", self._list_message_batches),
                ("GET", "/v1/messages/batches/{id}", self._get_message_batch),
                ("POST", "/v1/messages/batches/{id}/cancel", self._cancel_message_batch),
                ("GET", "/v1/messages/batches/{id}/results", self._message_batch_results),
                ("DELETE", "/v1/messages/batches/{id}", self._delete_message_batch)]

    # ---- message batches ---------------------------------------------------------------

    async def _create_message_batch(self, request: Any) -> Any:
        raw = await request.read()
        if len(raw) > self.anthropic_max_bytes:
            return self._refuse_message_batch(413, f"Request too large: at most "
                                                   f"{self.anthropic_max_bytes // MB} MB")
        body = http.loads(raw)
        problem = checks.anthropic_requests_problem(body, self.anthropic_max_requests)
        if problem is None and self.book.take_failure():
            problem = "requests: the batch was refused (FakeBatchServer.fail_batches)"
        if problem is not None:
            return self._refuse_message_batch(400, problem)
        tasks = [_task(item) for item in body["requests"]]
        job = self.book.new_job("anthropic", "/v1/messages", tasks)
        return self._anthropic_answer(request, job)

    def _refuse_message_batch(self, status: int, problem: str) -> Any:
        self.book.note("batches_rejected")
        return _error(status, problem)

    async def _get_message_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic", poll=True)
        return self._anthropic_answer(request, job)

    async def _cancel_message_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic")
        if job is not None and not self.book.cancel(job):
            return _error(400, f"Message batch {job.id} has ended; it can no longer be "
                          "canceled.")
        return self._anthropic_answer(request, job)

    async def _message_batch_results(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic")
        if job is None or job.results is None:
            return self._anthropic_answer(request, job, "has not ended yet: results are "
                                          "available once processing_status is 'ended'")
        self.book.note("downloads", job.id)
        return http.raw_response(job.results, "application/x-jsonl")

    async def _delete_message_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "anthropic")
        if job is None or not job.ended:
            return self._anthropic_answer(request, job, "is still processing: cancel it and "
                                          "wait until it has ended before deleting it")
        self.book.delete_job(job)
        return http.json_response({"id": job.id, "type": "message_batch_deleted"})

    def _anthropic_answer(self, request: Any, job: Job | None, refusal: str = "") -> Any:
        if job is None:
            return _error(404, f"Message batch {request.match_info.get('id', '')} not found.")
        if refusal:
            return _error(400, f"Message batch {job.id} {refusal}.")
        with self.book.lock:
            return http.json_response(shapes.anthropic_batch(job, self.base_url))

    async def _list_message_batches(self, request: Any) -> Any:
        with self.book.lock:
            views = [shapes.anthropic_batch(job, self.base_url)
                     for job in self.book.listing("anthropic")]
        return http.page(request, "anthropic", views, default=20, most=1000)

    # ---- online messages ---------------------------------------------------------------

    async def _message(self, request: Any) -> Any:
        arrived = time.monotonic()
        body = http.loads(await request.read())
        if not isinstance(body, dict):
            return _error(400, "The body is not a JSON object.")
        self._arrived(arrived, body, request.headers)
        try:
            denied = http.denied(request, "anthropic", self.api_key)
            problem = checks.anthropic_params_problem(body)
            if denied is not None or problem is not None:
                return denied or _error(400, problem or "")
            chat = shapes.chat_from_anthropic(body)
            answer = self._online_answer(chat)
            reply = answer if isinstance(answer, FakeReply) else FakeReply()
            await self._pause(reply.delay)
            if isinstance(reply.body, (bytes, str)) and reply.status < 300:
                return http.raw_response(reply.body, "application/json", reply.status,
                                         reply.headers)
            status, sent = shapes.anthropic_reply(chat, answer)
            return http.json_response(sent, status, reply.headers)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _online_answer(self, chat: dict[str, Any]) -> str | FakeReply:
        fault = self.faults.draw(chat, lambda: str(self.responder(chat))) if (
            self.faults) else None
        return fault if fault is not None else self.responder(chat)


def _task(item: dict[str, Any]) -> Task:
    """One request of a message batch, as a Task (the responder sees it OpenAI-style)."""
    params = item.get("params")
    sent = params if isinstance(params, dict) else {}
    return Task(item["custom_id"], sent, shapes.chat_from_anthropic(sent),
                checks.anthropic_params_problem(params))


def _error(status: int, message: str) -> Any:
    return http.error_response("anthropic", status, message)
