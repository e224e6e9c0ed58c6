"""OpenAI's Files + Batch API (and any OpenAI-compatible base_url that implements
``/v1/files`` and ``/v1/batches``): upload a request file, create a batch over it, poll,
download its output and error files, delete what is no longer needed. Each request line's
body is the fast transport's (``openai_transport.build_body``), each answer is read by its
parser (``completion_of``) and each error classified as online (``classify``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from datagen.batch.api import (
    CANCELLED,
    ERRORED,
    EXPIRED,
    SUCCEEDED,
    BatchView,
    Result,
    epoch,
)  # fmt: skip
from datagen.batch.http import BatchAPIError, Http
from datagen.batch.target import BatchTarget
from datagen.llm.errors import CallError
from datagen.llm.openai_transport import build_body, classify, completion_of
from datagen.llm.types import ChatRequest
from datagen.llm.wire import join_url

ENDED = ("completed", "failed", "expired", "cancelled")
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
LIST_PAGES = 50  # pages of 100 batches looked through for one lost create, at most


class OpenAIBatches:
    api = "openai"
    has_files = True

    def __init__(self, target: BatchTarget) -> None:
        self.files_url = join_url(target.base_url, "/files")
        self.batches_url = join_url(target.base_url, "/batches")
        headers = dict(target.headers)
        key = target.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.http = Http(headers)

    def endpoint(self, request: ChatRequest) -> str:
        return TEXT if request.prompt is not None else CHAT

    def line(self, custom_id: str, endpoint: str, request: ChatRequest) -> bytes:
        return (b'{"custom_id":' + orjson.dumps(custom_id) + b',"method":"POST","url":'
                + orjson.dumps(endpoint) + b',"body":' + build_body(request) + b"}\n")

    # ---- files ---------------------------------------------------------------------------

    async def upload(self, path: Path, name: str) -> str:
        import aiohttp

        with open(path, "rb") as fh:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", fh, filename=name, content_type="application/jsonl")
            answer = await self.http.call(f"upload {name}", "POST", self.files_url,
                                          data=lambda: form, retries=0)
        return str(answer["id"])

    async def find_file(self, name: str, size: int) -> list[str]:
        """Ids of uploaded batch files of this name and size (a lost upload's answer)."""
        found: list[str] = []
        after: str | None = None
        for _ in range(LIST_PAGES):
            params = {"purpose": "batch", "limit": "10000", **({"after": after} if after
                                                                else {})}
            page = await self.http.call("list files", "GET", self.files_url, params=params)
            data = page.get("data") or []
            found += [f["id"] for f in data if f.get("filename") == name
                      and int(f.get("bytes") or -1) == size]
            if not page.get("has_more") or not data:
                break
            after = data[-1]["id"]
        return found

    async def delete_file(self, file_id: str) -> None:
        try:
            await self.http.call(f"delete file {file_id}", "DELETE",
                                 f"{self.files_url}/{file_id}")
        except BatchAPIError as err:
            if err.status != 404:  # already gone is what we wanted
                raise

    # ---- batches -------------------------------------------------------------------------

    async def create(self, path: Path, file_id: str | None, endpoint: str,
                     metadata: dict[str, str]) -> BatchView:
        body = {"input_file_id": file_id, "endpoint": endpoint,
                "completion_window": "24h", "metadata": metadata}
        return view_of(await self.http.call("create batch", "POST", self.batches_url,
                                            json=body, retries=0))

    async def find_batch(self, tag: str, file_id: str | None, requests: int, since: float,
                         known: set[str]) -> BatchView | None:
        """The batch a lost create made: its metadata carries ``tag``, or it reads the
        file uploaded for it. Newest first, back to a little before ``since``."""
        after: str | None = None
        for _ in range(LIST_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            page = await self.http.call("list batches", "GET", self.batches_url,
                                        params=params)
            data = page.get("data") or []
            for raw in data:
                view = view_of(raw)
                if view.id not in known and (view.metadata.get("datagen") == tag or (
                        file_id is not None and view.input_file_id == file_id)):
                    return view
            oldest = epoch(data[-1].get("created_at")) if data else None
            if not page.get("has_more") or not data or (
                    oldest is not None and oldest < since - 3600):
                return None
            after = data[-1]["id"]
        return None

    async def retrieve(self, batch_id: str) -> BatchView:
        return view_of(await self.http.call(f"retrieve batch {batch_id}", "GET",
                                            f"{self.batches_url}/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchView:
        try:
            return view_of(await self.http.call(f"cancel batch {batch_id}", "POST",
                                                f"{self.batches_url}/{batch_id}/cancel"))
        except BatchAPIError as err:
            if err.status == 409:  # it has ended (or is finalizing): nothing to cancel
                return await self.retrieve(batch_id)
            raise

    async def results(self, view: BatchView, folder: Path, stem: str) -> list[Path]:
        paths = []
        for kind, file_id in (("output", view.output_file_id), ("error", view.error_file_id)):
            if file_id:
                path = folder / f"{stem}_{kind}.jsonl"
                await self.http.download(f"download {file_id}",
                                         f"{self.files_url}/{file_id}/content", path)
                paths.append(path)
        return paths

    def read_line(self, raw: bytes, latency: float) -> Result:
        line = orjson.loads(raw)
        custom_id = str(line.get("custom_id"))
        response, error = line.get("response"), line.get("error")
        if isinstance(error, dict) and not response:
            code = str(error.get("code") or "")
            if code == "batch_expired":
                return Result(custom_id, EXPIRED)
            if code == "batch_cancelled":
                return Result(custom_id, CANCELLED)
            return Result(custom_id, ERRORED, error=CallError(
                "server_error", f"{code or 'error'}: {error.get('message', '')}"))
        if not isinstance(response, dict):
            return Result(custom_id, ERRORED, error=CallError(
                "malformed_response", "a result line with no response"))
        status, body = int(response.get("status_code") or 0), response.get("body")
        raw_body = orjson.dumps(body)
        if status != 200:
            return Result(custom_id, ERRORED, error=classify(status, raw_body, {}))
        try:
            if not isinstance(body, dict):
                raise CallError("malformed_response", f"the body is {type(body).__name__}")
            return Result(custom_id, SUCCEEDED, completion=completion_of(body, latency))
        except CallError as err:
            return Result(custom_id, ERRORED, error=err)

    async def aclose(self) -> None:
        await self.http.aclose()


def view_of(raw: dict[str, Any]) -> BatchView:
    status = str(raw.get("status") or "")
    counts = raw.get("request_counts") or {}
    total = int(counts.get("total") or 0)
    done, failed = int(counts.get("completed") or 0), int(counts.get("failed") or 0)
    rest = max(0, total - done - failed) if status in ("expired", "cancelled") else 0
    errors = [str(e.get("message", e)) for e in ((raw.get("errors") or {}).get("data") or [])
              if isinstance(e, dict)]
    return BatchView(
        id=str(raw["id"]), status=status, ended=status in ENDED,
        counts={"total": total, "completed": done, "failed": failed,
                "expired": rest if status == "expired" else 0,
                "cancelled": rest if status == "cancelled" else 0},
        created_at=epoch(raw.get("created_at")), input_file_id=raw.get("input_file_id"),
        output_file_id=raw.get("output_file_id"), error_file_id=raw.get("error_file_id"),
        metadata=dict(raw.get("metadata") or {}), errors=errors)
