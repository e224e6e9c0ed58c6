"""Anthropic's Message Batches: create a batch with every request in the create's body
(streamed from the request file, never held whole), poll, download the results, cancel.
Each request's ``params`` are the fast transport's body (``anthropic_transport.build_body``)
and each answer is read by its parser (``message_of``).

A Message Batch carries no metadata, so a create whose answer was lost (a crash between
sending it and recording the id) is found by its time and its number of requests, among
batches the ledger does not know; when its results come back, only custom_ids of this
batch are taken (any other line is ignored and its request sent again)."""

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
from datagen.batch.http import BatchAPIError, Http, file_chunks
from datagen.batch.target import BatchTarget
from datagen.llm.anthropic_transport import (
    ANTHROPIC_VERSION,
    PROMPT_UNSUPPORTED,
    build_body,
    message_of,
    messages_url,
)  # fmt: skip
from datagen.llm.errors import CallError, kind_for_error_type
from datagen.llm.types import ChatRequest

LIST_PAGES = 50
CLOCK_SLACK_S = 600.0  # the provider's clock against ours, when matching a lost create


class AnthropicBatches:
    api = "anthropic"
    has_files = False

    def __init__(self, target: BatchTarget) -> None:
        self.batches_url = messages_url(target.base_url) + "/batches"
        headers = {"anthropic-version": ANTHROPIC_VERSION, **target.headers}
        key = target.key()
        if key:
            headers["x-api-key"] = key
        self.http = Http(headers)

    def endpoint(self, request: ChatRequest) -> str:
        return "/v1/messages"

    def line(self, custom_id: str, endpoint: str, request: ChatRequest) -> bytes:
        if request.prompt is not None:
            raise CallError("bad_request", PROMPT_UNSUPPORTED)
        return (b'{"custom_id":' + orjson.dumps(custom_id) + b',"params":'
                + orjson.dumps(build_body(request)) + b"}\n")

    async def upload(self, path: Path, name: str) -> str:
        raise NotImplementedError("Message Batches take their requests in the create")

    async def find_file(self, name: str, size: int) -> list[str]:
        return []

    async def delete_file(self, file_id: str) -> None:
        return None

    async def create(self, path: Path, file_id: str | None, endpoint: str,
                     metadata: dict[str, str]) -> BatchView:
        prefix, suffix = b'{"requests":[', b"]}"
        # every line's newline goes, a comma joins each pair: one byte fewer in all
        length = len(prefix) + path.stat().st_size - 1 + len(suffix)
        raw = await self.http.call(
            "create message batch", "POST", self.batches_url, retries=0,
            data=lambda: file_chunks(path, prefix, suffix, join=b","),
            headers={"Content-Type": "application/json", "Content-Length": str(length)})
        return view_of(raw)

    async def find_batch(self, tag: str, file_id: str | None, requests: int, since: float,
                         known: set[str]) -> BatchView | None:
        """The batch of ``requests`` requests created since ``since`` (newest first) that
        the ledger does not know; the one created first after ``since`` when several fit."""
        after: str | None = None
        fits: list[BatchView] = []
        for _ in range(LIST_PAGES):
            params = {"limit": "100", **({"after_id": after} if after else {})}
            page = await self.http.call("list message batches", "GET", self.batches_url,
                                        params=params)
            data = page.get("data") or []
            views = [view_of(raw) for raw in data]
            fits += [v for v in views if v.id not in known and v.counts["total"] == requests
                     and (v.created_at or 0) >= since - CLOCK_SLACK_S]
            oldest = views[-1].created_at if views else None
            if not page.get("has_more") or not data or (
                    oldest is not None and oldest < since - CLOCK_SLACK_S):
                break
            after = page.get("last_id") or data[-1]["id"]
        if not fits:
            return None
        return min(fits, key=lambda v: abs((v.created_at or since) - since))

    async def retrieve(self, batch_id: str) -> BatchView:
        return view_of(await self.http.call(f"retrieve message batch {batch_id}", "GET",
                                            f"{self.batches_url}/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchView:
        try:
            return view_of(await self.http.call(
                f"cancel message batch {batch_id}", "POST",
                f"{self.batches_url}/{batch_id}/cancel"))
        except BatchAPIError as err:
            if err.status in (400, 409):  # it has ended: nothing to cancel
                return await self.retrieve(batch_id)
            raise

    async def results(self, view: BatchView, folder: Path, stem: str) -> list[Path]:
        url = view.results_url or f"{self.batches_url}/{view.id}/results"
        path = folder / f"{stem}_results.jsonl"
        await self.http.download(f"download results of {view.id}", url, path)
        return [path]

    def read_line(self, raw: bytes, latency: float) -> Result:
        line = orjson.loads(raw)
        custom_id = str(line.get("custom_id"))
        result = line.get("result") or {}
        kind = result.get("type")
        if kind == "succeeded":
            try:
                message = result.get("message")
                if not isinstance(message, dict):
                    raise CallError("malformed_response", "a succeeded result with no message")
                return Result(custom_id, SUCCEEDED, completion=message_of(message, latency))
            except CallError as err:
                return Result(custom_id, ERRORED, error=err)
        if kind == "expired":
            return Result(custom_id, EXPIRED)
        if kind == "canceled":
            return Result(custom_id, CANCELLED)
        return Result(custom_id, ERRORED, error=_error_of(result.get("error")))

    async def aclose(self) -> None:
        await self.http.aclose()


def _error_of(error: Any) -> CallError:
    """An errored result's error response, classified as online."""
    inner = error.get("error", error) if isinstance(error, dict) else {}
    inner = inner if isinstance(inner, dict) else {}
    error_type = inner.get("type")
    kind = kind_for_error_type(error_type) or "server_error"
    if kind == "bad_request" and "prompt is too long" in str(inner.get("message", "")).lower():
        kind = "context_window"
    return CallError(kind, f"{error_type or 'error'}: {inner.get('message', error)}")


def view_of(raw: dict[str, Any]) -> BatchView:
    status = str(raw.get("processing_status") or "")
    counts = raw.get("request_counts") or {}
    parts = {name: int(counts.get(name) or 0)
             for name in ("processing", "succeeded", "errored", "canceled", "expired")}
    return BatchView(
        id=str(raw["id"]), status=status, ended=status == "ended",
        counts={"total": sum(parts.values()), "completed": parts["succeeded"],
                "failed": parts["errored"], "expired": parts["expired"],
                "cancelled": parts["canceled"]},
        created_at=epoch(raw.get("created_at")), results_url=raw.get("results_url"))
