"""What the batch flow asks of a provider's batch API (:class:`BatchAPI`), the batch as
every API is read (:class:`BatchView`), one request's result (:class:`Result`), and
:func:`make_api`, which picks the client for a target.

Why clients of datagen's own, on aiohttp, rather than litellm's batch functions: litellm
(1.106) creates batches for OpenAI-compatible providers but not Anthropic's Message
Batches (it only retrieves them); its file download returns a whole file in memory
(batch mode streams request files and results, never holding them whole); it goes through
the openai SDK and httpx, whose hidden retries would make an upload or a create happen
twice without anyone knowing; and importing it costs seconds. The clients here reuse the
fast transports' request bodies and answer parsers (``openai_transport.build_body`` and
``completion_of``, ``anthropic_transport.build_body`` and ``message_of``), so an answer
from a batch is sent and read exactly as online.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from datagen.batch.target import BatchTarget
from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest, Completion

# the outcome of one request, as every API's results are read
SUCCEEDED, ERRORED, EXPIRED, CANCELLED, MISSING = ("succeeded", "errored", "expired",
                                                   "cancelled", "missing")


@dataclass
class BatchView:
    """A batch as the provider shows it. ``counts``: total, completed, failed, expired,
    cancelled (what the provider says so far)."""

    id: str
    status: str
    ended: bool
    counts: dict[str, int]
    created_at: float | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # why a whole batch failed


@dataclass
class Result:
    """One line of a batch's results: its outcome, and the answer or the error."""

    custom_id: str
    outcome: str
    completion: Completion | None = None
    error: CallError | None = None


class BatchAPI(Protocol):
    """One provider's batch API (OpenAI Files + Batches, or Anthropic Message Batches)."""

    api: str
    has_files: bool  # requests go up as a file first (OpenAI), or in the create (Anthropic)

    def endpoint(self, request: ChatRequest) -> str: ...

    def line(self, custom_id: str, endpoint: str, request: ChatRequest) -> bytes: ...

    async def upload(self, path: Path, name: str) -> str: ...

    async def find_file(self, name: str, size: int) -> list[str]: ...

    async def create(self, path: Path, file_id: str | None, endpoint: str,
                     metadata: dict[str, str]) -> BatchView: ...

    async def find_batch(self, tag: str, file_id: str | None, requests: int, since: float,
                         known: set[str]) -> BatchView | None: ...

    async def retrieve(self, batch_id: str) -> BatchView: ...

    async def cancel(self, batch_id: str) -> BatchView: ...

    async def results(self, view: BatchView, folder: Path, stem: str) -> list[Path]: ...

    async def delete_file(self, file_id: str) -> None: ...

    def read_line(self, raw: bytes, latency: float) -> Result: ...

    async def aclose(self) -> None: ...


def make_api(target: BatchTarget) -> BatchAPI:
    if target.api == "anthropic":
        from datagen.batch.anthropic_api import AnthropicBatches

        return AnthropicBatches(target)
    from datagen.batch.openai_api import OpenAIBatches

    return OpenAIBatches(target)


def epoch(value: Any) -> float | None:
    """A time as the APIs write it (seconds, or RFC 3339 text) in seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None
