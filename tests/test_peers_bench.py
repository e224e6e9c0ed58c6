"""benchmarks/peers.py at a tiny size: real client processes against the fake server.

No timing is asserted: only that every client's texts are counted, that a peer which is
not installed is reported with the reason instead of being skipped, and what Data
Designer's install recipe asks pip for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import _peer_venvs as venvs
from benchmarks import peers


@pytest.fixture
def no_peer_venvs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATAGEN_PEER_VENVS", str(tmp_path / "venvs"))
    return tmp_path


def test_a_run_counts_texts_and_reports_a_missing_peer(no_peer_venvs: Path) -> None:
    scenario = peers.Scenario("tiny", 0.0, 4, 12)
    clients = [peers.CLIENTS["aiohttp"], peers.CLIENTS["distilabel"]]
    scratch = no_peer_venvs / "scratch"
    scratch.mkdir()

    results = peers.run_scenario(scenario, clients, runs=2, timeout=60, scratch=scratch,
                                 keep=False)

    assert [(r.ok, r.results, r.requests) for r in results["aiohttp"]] == [(True, 12, 12)] * 2
    assert results["distilabel"] == []
    assert not list(scratch.iterdir())  # pools and scratch folders cleaned up
    missing = {c.name: why for c in clients if (why := peers.unavailable(c))}
    report = peers.Report([], ["date", "machine", "python"], [scenario],
                          [c.name for c in clients], missing, {"tiny": results})
    text = report.text(markdown=True)
    distilabel_row = next(line for line in text.splitlines() if line.startswith("| distilabel"))
    assert "failed" in distilabel_row and "not installed" in distilabel_row
    report.save(no_peer_venvs / "runs.json")
    assert peers.Report.load(no_peer_venvs / "runs.json").text(markdown=True) == text


def test_a_short_pool_is_a_failure_not_a_result(no_peer_venvs: Path) -> None:
    run = peers.Run("x", ok=False, results=7, wall=1.0, error="7 of 12 texts")
    row = peers.row(peers.CLIENTS["aiohttp"], [run], peers.Scenario("tiny", 0.0, 4, 12), None)
    assert row[1] == "failed" and "7 of 12 texts" in row[-1]


def test_data_designer_recipe_installs_its_deps_with_any_certifi() -> None:
    deps = ["certifi>=2026.10.19", "data-designer-config==0.9.7", "httpx<1,>=0.27.2",
            "Data_Designer_Engine==0.9.7"]
    own = venvs.PEERS["data-designer"].requirements
    assert venvs.recipe_requirements(deps, own) == ["certifi", "httpx<1,>=0.27.2"]
