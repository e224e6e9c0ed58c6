"""One round of batch mode, as the engine sees it: :class:`BatchCollector` answers a batch
step's request from what earlier rounds collected (the ledger, then the shared response
cache), raises the error a batch failed it with for good, or takes it into this round's
request files and raises :class:`~datagen.engine.job.Deferred` (the item waits for the
next round). :class:`Finished` keeps the engine's index of finished items up to date
between rounds, so no item is written twice."""

from __future__ import annotations

from pathlib import Path

import orjson

from datagen.batch.api import BatchAPI
from datagen.batch.ledger import BatchLedger
from datagen.batch.requests import RequestFiles
from datagen.batch.target import BatchTarget
from datagen.engine.job import Deferred, Job
from datagen.llm.types import ChatRequest, Completion
from datagen.plan import StepRuntime
from datagen.seen import KeyIndex
from datagen.store import read_keys


class BatchCollector:
    """The job's :class:`~datagen.engine.job.BatchRound` (see the module docstring)."""

    def __init__(self, job: Job, ledger: BatchLedger, apis: dict[str, BatchAPI],
                 targets: dict[str, BatchTarget], folder: Path) -> None:
        self.ledger, self.apis, self.targets, self.folder = ledger, apis, targets, folder
        self.steps: dict[str, StepRuntime] = {step.name: step for step in job.steps}
        self.files = RequestFiles(ledger, folder)
        self.waiting = False  # some batch of an earlier round is still open

    def new_round(self, waiting: bool) -> None:
        self.files = RequestFiles(self.ledger, self.folder)
        self.waiting = waiting

    async def answer(self, step: str, request: ChatRequest, key: str, item: str
                     ) -> Completion:
        found = self.ledger.answer(key)
        if isinstance(found, Completion):
            return found
        if found is not None:
            raise found  # the batch failed this request for good: as online, it fails
        caller = self.steps[step].caller
        if caller.cache is not None:
            hit = caller.cache.get(key)
            if hit is not None:  # answered before (online, or an earlier run): free
                if caller.seen is None or not caller.seen.add(key):
                    caller.stats.cache_hits += 1
                return hit
        if self.files.has(key) or (self.waiting and self.ledger.waiting(key)):
            raise Deferred  # asked already: its batch answers it
        self.files.add(step, self.apis[step], self.targets[step], request, key, item)
        raise Deferred

    def finish_round(self) -> list[int]:
        """This round's request files closed: the batches it prepared."""
        return self.files.finish()


class Finished:
    """Adds to the job's index the keys each round wrote (records, failures, drops):
    the next round skips them, as a resume would."""

    def __init__(self, job: Job) -> None:
        self.job = job
        files = job.files
        self.offsets = {path: path.stat().st_size if path.exists() else 0
                        for path in (files.results, files.failures, files.dropped)}

    def absorb(self) -> None:
        for path, offset in self.offsets.items():
            self.offsets[path] = read_keys(path, offset, self.job.done)


def failures_on_file(path: Path) -> KeyIndex:
    """Each failure already in a run's failures file, as "key|kind|message": resumed, a
    batch run replays the same answers, and an item failing again the same way is not
    written twice."""
    index = KeyIndex()
    if path.exists():
        with open(path, "rb") as fh:
            for line in fh:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                error = record.get("error") if isinstance(record, dict) else None
                if isinstance(error, dict):
                    index.add(f"{record.get('key')}|{error.get('kind')}|{error.get('message')}")
    return index
