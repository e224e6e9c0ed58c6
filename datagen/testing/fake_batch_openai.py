"""OpenAI's Files and Batch API for the fake batch server: :class:`OpenAIBatchRoutes`, the
``/v1/files`` and ``/v1/batches`` routes (upload, list, get, download and delete a file;
create, list, get and cancel a batch), with OpenAI's refusals and error bodies. A mixin:
:class:`~datagen.testing.fake_batch_server.FakeBatchServer` combines it with the Anthropic
routes and owns the book it reads (see that module for the knobs).
"""

from __future__ import annotations

from typing import Any

from datagen.testing import fake_batch_checks as checks
from datagen.testing import fake_batch_http as http
from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_batch_jobs import BatchBook, Job, Task
from datagen.testing.fake_server import FakeOpenAIServer

MB = shapes.MB
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


class OpenAIBatchRoutes(FakeOpenAIServer):
    """OpenAI's Files + Batch API routes (a mixin of FakeBatchServer, not used alone)."""

    book: BatchBook
    openai_max_requests = 50_000
    openai_max_bytes = 200 * MB

    def _openai_routes(self) -> list[http.Route]:
        return [("POST", "/v1/files", self._upload),
                ("GET", "/v1/files", self._list_files),
                ("GET", "/v1/files/{id}", self._get_file),
                ("GET", "/v1/files/{id}/content", self._file_content),
                ("DELETE", "/v1/files/{id}", self._delete_file),
                ("POST", "/v1/batches", self._create_batch),
                ("GET", "/v1/batches", self._list_batches),
                ("GET", "/v1/batches/{id}", self._get_batch),
                ("POST", "/v1/batches/{id}/cancel", self._cancel_batch)]

    # ---- files -------------------------------------------------------------------------

    async def _upload(self, request: Any) -> Any:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not hasattr(upload, "file"):
            return _error(400, "Missing required parameter: 'file'.", "file")
        if purpose not in PURPOSES:
            return _error(400, f"Invalid value for 'purpose': {purpose!r}.", "purpose")
        data = upload.file.read()
        if len(data) > 512 * MB:
            return _error(400, "Files may be at most 512 MB.", "file")
        stored = self.book.add_file(str(upload.filename or "upload"), str(purpose), data)
        return http.json_response(stored.to_openai())

    async def _list_files(self, request: Any) -> Any:
        purpose = request.query.get("purpose")
        with self.book.lock:
            files = [f.to_openai() for f in self.book.files.values()
                     if purpose is None or f.purpose == purpose]
        if request.query.get("order", "desc") == "desc":
            files.reverse()
        return http.page(request, "openai", files, default=10_000, most=10_000)

    async def _get_file(self, request: Any) -> Any:
        stored = self.book.files.get(request.match_info["id"])
        if stored is None:
            return _no_file(request)
        return http.json_response(stored.to_openai())

    async def _file_content(self, request: Any) -> Any:
        data = self.book.read_file(request.match_info["id"])
        if data is None:
            return _no_file(request)
        return http.raw_response(data, "application/octet-stream")

    async def _delete_file(self, request: Any) -> Any:
        file_id = request.match_info["id"]
        if not self.book.delete_file(file_id):
            return _no_file(request)
        return http.json_response({"id": file_id, "object": "file", "deleted": True})

    # ---- batches -----------------------------------------------------------------------

    async def _create_batch(self, request: Any) -> Any:
        body = await http.read_json(request)
        with self.book.lock:
            refusal = self._batch_refusal(body)
            if refusal is not None:
                self.book.note("batches_rejected")
                return refusal
            endpoint = body["endpoint"]
            read = checks.read_openai_input(self.book.files[body["input_file_id"]].data,
                                            endpoint, self.openai_max_requests,
                                            self.openai_max_bytes)
            if self.book.take_failure():
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
            return http.json_response(shapes.openai_batch(job))

    def _batch_refusal(self, body: Any) -> Any:
        """The 4xx OpenAI answers a create with before any validation, or None."""
        if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
            return _error(400, "Missing required parameter: 'input_file_id'.",
                          "input_file_id")
        if body.get("endpoint") not in shapes.ENDPOINTS:
            return _error(400, f"Invalid value for 'endpoint': {body.get('endpoint')!r}; "
                          f"this fake serves {' and '.join(shapes.ENDPOINTS)}.", "endpoint")
        if body.get("completion_window") != "24h":
            return _error(400, "Invalid value for 'completion_window': only '24h' is "
                          "supported.", "completion_window")
        if not checks.metadata_ok(body.get("metadata")):
            return _error(400, "Invalid 'metadata': at most 16 pairs, string keys up to 64 "
                          "and values up to 512 characters.", "metadata")
        stored = self.book.files.get(body["input_file_id"])
        if stored is None:
            return _error(404, f"No such File object: {body['input_file_id']}",
                          "input_file_id")
        if stored.purpose != "batch":
            return _error(400, f"The input file must have purpose 'batch', not "
                          f"'{stored.purpose}'.", "input_file_id")
        return None

    async def _get_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "openai", poll=True)
        return self._openai_answer(request, job)

    async def _cancel_batch(self, request: Any) -> Any:
        job = self.book.job(request.match_info["id"], "openai")
        if job is not None and not self.book.cancel(job):
            return _error(409, f"Cannot cancel a batch with status '{job.status}'.")
        return self._openai_answer(request, job)

    def _openai_answer(self, request: Any, job: Job | None) -> Any:
        if job is None:
            return _error(404, f"No batch found with id '{request.match_info['id']}'.")
        with self.book.lock:
            return http.json_response(shapes.openai_batch(job))

    async def _list_batches(self, request: Any) -> Any:
        with self.book.lock:
            views = [shapes.openai_batch(job) for job in self.book.listing("openai")]
        return http.page(request, "openai", views, default=20, most=100)


def _error(status: int, message: str, param: str | None = None) -> Any:
    return http.error_response("openai", status, message, param)


def _no_file(request: Any) -> Any:
    return _error(404, f"No such File object: {request.match_info['id']}", "id")
