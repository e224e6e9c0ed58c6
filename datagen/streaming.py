"""``pipeline.stream(pool)``: records as they are written, with memory flat for any pool.

The run is prepared when the stream is created (every check made before anything is
sent, so a bad pool raises at once, and ``stream.files`` names the run's files); it starts
when the first record is asked for. A consumer slower than the model holds the workers
back (a small queue), and leaving the loop stops the run, as leaving any async generator
does (when it is collected; ``await stream.aclose()`` to be sure when you keep a
reference): its manifest says ``interrupted`` and resume continues it. After the last
record, ``stream.result`` holds the :class:`~datagen.result.RunResult` (its counts; no
records: nothing is collected).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from datagen.engine.job import Job
from datagen.result import RunResult
from datagen.store import RunFiles

Execute = Callable[[Job], Awaitable[RunResult]]


class _Box:
    result: RunResult | None = None


async def _records(job: Job, execute: Execute, box: _Box) -> AsyncGenerator[dict[str, Any]]:
    """The stream proper: an async generator, so that leaving the loop finalizes it (and
    stops the run). It holds no reference to the RecordStream (no cycle to wait for)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * job.options.concurrency)
    end = object()
    job.options.on_record, job.options.collect = queue.put, False

    async def produce() -> None:
        try:
            box.result = await execute(job)
        except asyncio.CancelledError:
            raise  # the consumer left: nobody is waiting for the end marker
        except BaseException:
            await queue.put(end)
            raise
        await queue.put(end)

    task = asyncio.ensure_future(produce())
    try:
        while (record := await queue.get()) is not end:
            yield record
        await task  # re-raise what stopped the run, if anything did
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class RecordStream:
    def __init__(self, job: Job, execute: Execute) -> None:
        self.job = job
        self.files: RunFiles = job.files
        self._box = _Box()
        self._gen: AsyncGenerator[dict[str, Any]] | None = None
        self._execute = execute

    @property
    def result(self) -> RunResult | None:
        return self._box.result

    def __aiter__(self) -> AsyncGenerator[dict[str, Any]]:
        if self._gen is None:
            self._gen = _records(self.job, self._execute, self._box)
        return self._gen

    async def __anext__(self) -> dict[str, Any]:
        return await self.__aiter__().__anext__()

    async def aclose(self) -> None:
        """Stop the run and release its files."""
        if self._gen is None:
            from datagen.executors.local import close_job

            await close_job(self.job)  # prepared but never started
            return
        await self._gen.aclose()
