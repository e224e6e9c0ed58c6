"""What ``run()`` returns: the records, plus the run's files, counts, status, manifest."""

from __future__ import annotations

from typing import Any

from datagen.store import RunFiles


class RunResult(list[dict[str, Any]]):
    """The successful records in input order (a list: the template's ``results = await
    pipeline.run(...)`` works as before; empty with ``collect=False``), with:

    - ``files``: the run's paths (``.results``, ``.failures``, ``.dropped``,
      ``.manifest``, ``.log``);
    - ``counts``: the manifest's counts (succeeded, failed, dropped, ...);
    - ``status``: "completed", "interrupted" or "failed";
    - ``manifest``: the whole manifest, as written.
    """

    def __init__(self, records: list[dict[str, Any]], files: RunFiles,
                 manifest: dict[str, Any]) -> None:
        super().__init__(records)
        self.files = files
        self.manifest = manifest

    @property
    def counts(self) -> dict[str, Any]:
        """The manifest's counts, with ``dropped`` (items a filter dropped) beside them."""
        dropped = self.manifest.get("dropped") or {}
        return {**self.manifest["counts"], "dropped": dropped.get("total", 0)}

    @property
    def status(self) -> str:
        return str(self.manifest["status"])

    def failure_rate(self) -> float:
        """Failed / finished items of this run (dropped items are not failures)."""
        finished = self.counts["succeeded"] + self.counts["failed"]
        return self.counts["failed"] / finished if finished else 0.0
