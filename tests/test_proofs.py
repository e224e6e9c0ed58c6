"""The proofs of issue 4 at a small size (the full-size runs: benchmarks/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fault_storm import storm
from benchmarks.kill_resume import kill_resume
from datagen.llm import caller


async def test_fault_storm_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.05)
    result = await storm(items=40, rate=25, concurrency=16, workdir=tmp_path)
    assert result.accounted_once, result
    assert result.max_in_window <= 25, result
    assert result.status == "completed"
    assert result.injected.get("429", 0) > 3


def test_kill_resume_small(tmp_path: Path) -> None:
    result = kill_resume(items=150, kills=3, concurrency=8, latency=0.1, workdir=tmp_path)
    assert result.kills_done >= 1, result
    assert result.unique_keys == 150 and result.duplicates == 0, result
    assert result.unparseable == 0 and result.final_exit == 0, result
    assert result.requests <= result.request_budget, result
