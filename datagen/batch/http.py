"""The HTTP side of the batch clients: one aiohttp session, JSON calls retried when a
retry is safe, streamed downloads, and :class:`BatchAPIError` for every failure (kind as
the online transports classify it). A call that creates something at the provider (an
upload, a batch) is never retried blindly here: the batch flow first looks for what a
lost answer may have created (see ``datagen.batch.flow``)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import DatagenError
from datagen.llm.errors import FATAL, RETRYABLE, kind_for_status
from datagen.redact import get_logger, redact

log = get_logger("datagen.batch")
CHUNK = 1 << 20


class BatchAPIError(DatagenError):
    """A call to a batch API failed. ``status`` is None when no answer came (a timeout,
    a refused or reset connection): then the call may or may not have taken effect."""

    def __init__(self, what: str, message: str, status: int | None = None,
                 kind: str | None = None) -> None:
        self.what, self.status = what, status
        if kind is None:
            kind = kind_for_status(status) if status is not None else "connection"
        self.kind = kind
        self.message = redact(f"{what}: {f'{status}: ' if status else ''}{message}")
        super().__init__(self.message)

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL

    @property
    def refused(self) -> bool:
        """The provider answered no: nothing was created."""
        return self.status is not None and not self.retryable


def _message(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:300].decode("utf-8", "replace") or "(empty body)"
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def backoff(attempt: int) -> float:
    ceiling = min(30.0, 0.5 * 2**attempt)
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


class Http:
    """One session for one batch API (its headers carry the key)."""

    def __init__(self, headers: dict[str, str], timeout: float = 300.0) -> None:
        self.headers = headers
        self.timeout = timeout
        self._session: Any = None

    def session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self.headers)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def call(self, what: str, method: str, url: str, *, retries: int = 4,
                   json: Any = None, data: Callable[[], Any] | None = None,
                   params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        """The JSON answer of one call; transient failures retried ``retries`` times
        (``data`` is a factory: a body made anew for each attempt)."""
        attempt = 0
        while True:
            try:
                return await self._once(what, method, url, json, data() if data else None,
                                        params, headers)
            except BatchAPIError as err:
                if not err.retryable or attempt >= retries:
                    raise
                attempt += 1
                delay = backoff(attempt)
                log.info("%s; retry %d/%d in %.1f s", err.message[:200], attempt, retries,
                         delay)
                await asyncio.sleep(delay)

    async def _once(self, what: str, method: str, url: str, json: Any, data: Any,
                    params: dict[str, str] | None, headers: dict[str, str] | None) -> Any:
        import aiohttp

        body = orjson.dumps(json) if json is not None else data
        extra = {"Content-Type": "application/json"} if json is not None else {}
        try:
            async with self.session().request(
                    method, url, data=body, params=params, headers={**extra, **(headers or {})},
                    timeout=aiohttp.ClientTimeout(  # an upload of 200 MB may take a while
                        total=None, sock_connect=60, sock_read=self.timeout)) as response:
                raw = await response.read()
                if response.status >= 300:
                    raise BatchAPIError(what, _message(raw), response.status)
        except asyncio.TimeoutError:
            raise BatchAPIError(what, f"no answer within {self.timeout:g} s",
                                kind="timeout") from None
        except aiohttp.ClientError as exc:
            raise BatchAPIError(what, f"{type(exc).__name__}: {exc}") from None
        try:
            return orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise BatchAPIError(what, f"the answer is not JSON: {raw[:200]!r}",
                                kind="server_error") from None

    async def download(self, what: str, url: str, dest: Path, retries: int = 4) -> int:
        """Stream ``url`` into ``dest`` (never held whole); its size in bytes."""
        attempt = 0
        while True:
            try:
                return await self._download(what, url, dest)
            except BatchAPIError as err:
                if not err.retryable or attempt >= retries:
                    raise
                attempt += 1
                await asyncio.sleep(backoff(attempt))

    async def _download(self, what: str, url: str, dest: Path) -> int:
        import aiohttp

        size = 0
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=self.timeout)
        try:
            async with self.session().get(url, timeout=timeout) as response:
                if response.status >= 300:
                    raise BatchAPIError(what, _message(await response.read()),
                                        response.status)
                with open(dest, "wb") as fh:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        fh.write(chunk)
                        size += len(chunk)
        except asyncio.TimeoutError:
            raise BatchAPIError(what, "the download stalled", kind="timeout") from None
        except aiohttp.ClientError as exc:
            raise BatchAPIError(what, f"{type(exc).__name__}: {exc}") from None
        return size


async def file_chunks(path: Path, prefix: bytes = b"", suffix: bytes = b"",
                      join: bytes | None = None) -> AsyncIterator[bytes]:
    """A file's bytes in chunks (``join``: its newlines but the last one replaced), with a
    prefix and suffix: a request body streamed from disk."""
    yield prefix
    with open(path, "rb") as fh:
        if join is None:
            while chunk := fh.read(CHUNK):
                yield chunk
        else:
            buffer, first = bytearray(), True
            for line in fh:
                if not first:
                    buffer += join
                buffer += line.rstrip(b"\n")
                first = False
                if len(buffer) >= CHUNK:
                    yield bytes(buffer)
                    buffer.clear()
            yield bytes(buffer)
    yield suffix
