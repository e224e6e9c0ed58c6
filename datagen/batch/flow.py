"""The batch flow between two rounds: every prepared batch taken to the provider, every
open batch polled (with backoff) until it ends, every ended batch collected. Each step
is written to the ledger before the next provider call, so a run killed at any moment
resumes where it was (``recover`` and the same calls, run again):

========================== ==========================================================
killed while / after       on resume
========================== ==========================================================
writing request files      the batch (``preparing``) never reached the provider: it is
                           discarded, its requests go into the next round's batch
uploading (OpenAI)         the provider's files are searched for this batch's file
                           name and size: found, it is used; else uploaded again
upload, before create      the file id is in the ledger: the batch is created
creating                   the provider's batches are searched (OpenAI: the metadata
                           tag or the input file; Anthropic: the time and the number
                           of requests): found, it is adopted; else created
create, while polling      the batch id is in the ledger: polling goes on
downloading, collecting    the results are downloaded and read again (every write to
                           the ledger is keyed: nothing counts twice)
writing records            the answers are in the ledger: the round replays them
========================== ==========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from datagen.batch.api import BatchAPI, BatchView
from datagen.batch.collect import Collector
from datagen.batch.http import BatchAPIError, backoff
from datagen.batch.ledger import BatchLedger, BatchRow
from datagen.batch.requests import file_name, tag
from datagen.batch.target import BatchSettings
from datagen.errors import DatagenError, RunAbortedError
from datagen.redact import get_logger

log = get_logger("datagen.batch")
ATTEMPTS = 4  # an upload or a create whose answer was lost: tried this often at most
T = TypeVar("T")


class BatchWaitError(DatagenError):
    """Open batches did not end within ``run.batch_max_wait_hours``."""

    kind = "batch_wait"


def fatal(err: BatchAPIError) -> RunAbortedError:
    hint = ("Check model.api_key (or the provider's environment variable)."
            if err.kind == "auth" else "Check model.provider, model.base_url and that it "
            "serves /v1/files and /v1/batches (OpenAI) or /v1/messages/batches (Anthropic).")
    return RunAbortedError(f"the batch API refused: {err.message}. {hint}", err.kind)


class BatchFlow:
    """Takes a run's batches from ``prepared`` to ``collected`` (module docstring)."""

    def __init__(self, ledger: BatchLedger, api_for: Callable[[BatchRow], BatchAPI],
                 collector: Collector, settings: BatchSettings, folder: Path,
                 notify: Callable[[str], None], cancelled: Callable[[], bool]) -> None:
        self.ledger, self.api_for, self.collector = ledger, api_for, collector
        self.settings, self.folder = settings, folder
        self.notify, self.cancelled = notify, cancelled
        self.token = ledger.token()
        self.waited_s = 0.0  # time spent waiting for the provider (the benchmark's split)

    # ---- recovery and submission ---------------------------------------------------------

    def recover(self) -> None:
        """Batches a crash left while their request file was written never reached the
        provider: discarded (their requests are deferred again)."""
        for row in self.ledger.batches("preparing"):
            if row.path:
                Path(row.path).unlink(missing_ok=True)
            self.ledger.discard(row.seq)
            log.info("batch #%d was being written when the run stopped: discarded, its "
                     "requests go into the next batch", row.seq)

    def open_batches(self) -> list[BatchRow]:
        return self.ledger.batches("prepared", "uploading", "uploaded", "creating",
                                   "submitted", "ended")

    async def submit(self) -> None:
        """Every batch not yet at the provider, created there (or adopted)."""
        for row in self.ledger.batches("prepared", "uploading", "uploaded", "creating"):
            await self._submit(row)

    async def _submit(self, row: BatchRow) -> None:
        api = self.api_for(row)
        try:
            if api.has_files and row.state in ("prepared", "uploading"):
                row.file_id = await self._upload(row, api)
                self.ledger.update(row.seq, state="uploaded", file_id=row.file_id)
                row.state = "uploaded"
            view = await self._create(row, api)
        except BatchAPIError as err:
            if err.fatal:
                raise fatal(err) from None
            log.warning("batch #%d could not be created: %s; its requests go into the next "
                        "round", row.seq, err.message)
            self.ledger.update(row.seq, state="ended", status="failed", error=err.message,
                               ended_at=time.time())
            return
        self.ledger.update(row.seq, state="submitted", batch_id=view.id, status=view.status,
                           counts=view.counts, created_at=view.created_at or time.time())
        log.info("batch %s (#%d, step %s): %d requests submitted", view.id, row.seq, row.step,
                 row.requests)

    async def _upload(self, row: BatchRow, api: BatchAPI) -> str:
        name = file_name(self.token, row.seq)
        path = Path(row.path or self.folder / name)
        for attempt in range(ATTEMPTS):
            if row.state == "uploading" or attempt:  # an upload whose answer may be lost
                found = await self._search(api.find_file(name, row.bytes), [])
                for extra in found[1:]:
                    await api.delete_file(extra)
                if found:
                    log.info("batch #%d: its file was uploaded before the run stopped (%s)",
                             row.seq, found[0])
                    return found[0]
            self.ledger.update(row.seq, state="uploading", intent_at=time.time())
            row.state = "uploading"
            try:
                return await api.upload(path, name)
            except BatchAPIError as err:
                if err.refused or attempt == ATTEMPTS - 1:
                    raise
                log.info("batch #%d: upload failed (%s); looking for it, then again", row.seq,
                         err.message[:200])
                await asyncio.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    async def _create(self, row: BatchRow, api: BatchAPI) -> BatchView:
        metadata = {"datagen": tag(self.token, row.seq), "datagen_step": row.step[:500]}
        for attempt in range(ATTEMPTS):
            if row.state == "creating":  # a create whose answer may be lost
                found = await self._search(api.find_batch(
                    tag(self.token, row.seq), row.file_id, row.requests,
                    row.intent_at or time.time(), self.ledger.known_batch_ids()), None)
                if found is not None:
                    log.info("batch #%d: created before the run stopped, adopted: %s",
                             row.seq, found.id)
                    return found
            row.intent_at = time.time()
            self.ledger.update(row.seq, state="creating", intent_at=row.intent_at)
            row.state = "creating"
            try:
                return await api.create(Path(row.path or ""), row.file_id, row.endpoint,
                                        metadata)
            except BatchAPIError as err:
                if err.refused or attempt == ATTEMPTS - 1:
                    raise
                log.info("batch #%d: create failed (%s); looking for it, then again", row.seq,
                         err.message[:200])
                await asyncio.sleep(backoff(attempt))
        raise AssertionError("unreachable")

    @staticmethod
    async def _search(search: Awaitable[T], nothing: T) -> T:
        """A search for what a lost answer created; a provider that cannot list finds
        nothing (said in the log)."""
        try:
            return await search
        except BatchAPIError as err:
            if err.fatal:
                raise
            log.warning("could not look for what a lost answer created: %s", err.message)
            return nothing

    # ---- waiting and collecting ----------------------------------------------------------

    async def wait(self, stop: asyncio.Event) -> bool:
        """Poll every open batch until each has ended and is collected (True), or until
        ``stop`` is set or the run's batches are cancelled (False)."""
        interval = self.settings.poll_interval
        deadline = time.monotonic() + self.settings.max_wait_s
        while True:
            for row in self.ledger.batches("ended"):
                await self._collect(row, None)
            rows = self.ledger.batches("submitted")
            for row in rows:
                await self._poll(row)
            self.notify(self.status_line())
            if self.cancelled() or stop.is_set():
                return False
            if not self.ledger.batches("submitted", "ended"):
                return True
            if time.monotonic() > deadline:
                raise BatchWaitError(
                    f"{len(rows)} batch(es) still open after {self.settings.max_wait_s / 3600:g} "
                    "hours (run.batch_max_wait_hours); they keep running at the provider: "
                    "datagen run --resume picks them up")
            started = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            self.waited_s += time.monotonic() - started
            interval = min(self.settings.poll_max, interval * 2)

    async def _poll(self, row: BatchRow) -> None:
        api = self.api_for(row)
        try:
            view = await api.retrieve(row.batch_id or "")
        except BatchAPIError as err:
            if err.fatal:
                raise fatal(err) from None
            log.warning("polling batch %s failed: %s (polling goes on)", row.batch_id,
                        err.message)
            return
        values: dict[str, object] = {"status": view.status, "counts": view.counts,
                                     "polled_at": time.time()}
        if view.ended:
            values.update(state="ended", ended_at=time.time(),
                          error="; ".join(view.errors) or None,
                          output_file_id=view.output_file_id,
                          error_file_id=view.error_file_id, results_url=view.results_url)
        self.ledger.update(row.seq, **values)
        if view.ended:
            await self._collect(self.ledger.batch(row.seq), view)

    async def _collect(self, row: BatchRow, view: BatchView | None) -> None:
        api = self.api_for(row)
        if view is None and row.batch_id:  # collected again after a crash: look again
            view = await api.retrieve(row.batch_id)
        await self.collector.collect(row, api, view)
        await self.clean(self.ledger.batch(row.seq))

    async def tidy(self) -> None:
        """Batches collected before a crash that left their files behind: cleaned."""
        for row in self.ledger.batches("collected"):
            if not row.cleaned:
                await self.clean(row)

    async def clean(self, row: BatchRow) -> None:
        """The files no longer needed, at the provider and here."""
        api = self.api_for(row)
        for file_id in (row.file_id, row.output_file_id, row.error_file_id):
            if not file_id:
                continue
            try:
                await api.delete_file(file_id)
            except BatchAPIError as err:
                log.warning("could not delete file %s at the provider: %s", file_id,
                            err.message)
        if row.path:
            Path(row.path).unlink(missing_ok=True)
        self.ledger.update(row.seq, cleaned=1)

    async def cancel_open(self) -> None:
        """Cancel every batch of the run still open at the provider (``datagen cancel``
        asked while this run was creating some)."""
        for row in self.ledger.batches("submitted"):
            if row.status in ("cancelling", "canceling", "cancelled"):
                continue
            try:
                view = await self.api_for(row).cancel(row.batch_id or "")
                self.ledger.update(row.seq, status=view.status, counts=view.counts)
            except BatchAPIError as err:
                log.warning("could not cancel batch %s: %s", row.batch_id, err.message)

    def status_line(self) -> str:
        """What the open batches are doing, for the live display."""
        parts = []
        for row in self.ledger.batches("submitted", "ended"):
            counts = row.counts or {}
            done = counts.get("completed", 0) + counts.get("failed", 0)
            failed = f", {counts['failed']} failed" if counts.get("failed") else ""
            parts.append(f"{row.batch_id} ({row.step}) {row.status}: "
                         f"{done}/{row.requests}{failed}")
        if not parts:
            return ""
        return f"waiting for {len(parts)} batch(es): " + "; ".join(parts[:4]) + (
            f"; +{len(parts) - 4} more" if len(parts) > 4 else "")
