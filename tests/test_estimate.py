"""Cost from the price map or config, and the dry run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_pool, write_project

from datagen import DataGenerationPipeline, extract
from datagen.config import load_settings
from datagen.costs import prices_for
from datagen.testing import FakeOpenAIServer


def test_prices_from_the_local_map_and_overrides() -> None:
    s = load_settings(None, {"provider": "openai", "model": "gpt-4o-mini"})
    assert prices_for(s.model) == (1.5e-07, 6e-07)
    s = load_settings(None, {"provider": "anthropic", "model": "claude-sonnet-4-5"})
    assert prices_for(s.model) == (3e-06, 1.5e-05)
    s = load_settings(None, {"model": "my-model", "base_url": "http://127.0.0.1:1/v1"})
    assert prices_for(s.model) is None  # self-hosted: unknown unless configured
    s = load_settings(None, {"model": "gpt-4o-mini", "base_url": "http://127.0.0.1:1/v1"})
    assert prices_for(s.model) == (1.5e-07, 6e-07)  # a gateway to a known model
    s = load_settings(None, {"model": "my-model", "input_cost_per_million": 2,
                             "output_cost_per_million": 8})
    assert prices_for(s.model) == (2e-06, 8e-06)
    assert prices_for(load_settings(None, {"provider": "local", "model": "smollm2"}).model) \
        == (0.0, 0.0)


def test_run_cost_in_manifest_and_summary(project: Path, server: FakeOpenAIServer) -> None:
    p = DataGenerationPipeline(config=project, base_url=server.base_url,
                               input_cost_per_million=1000, output_cost_per_million=2000)
    results = p.run_sync(make_pool(3))
    manifest = json.loads(results.files.manifest.read_text())
    expected = sum(r["usage"]["prompt_tokens"] * 1e-3 + r["usage"]["completion_tokens"] * 2e-3
                   for r in results)
    assert manifest["cost_usd"] == pytest.approx(expected)
    assert f"${expected:.4f}" in results.files.log.read_text()


def test_dry_run_sends_nothing_and_counts_every_prompt(project: Path,
                                                       server: FakeOpenAIServer) -> None:
    p = DataGenerationPipeline(config=project, base_url=server.base_url, provider="openai",
                               model="gpt-4o-mini", rate_limit=2, max_tokens=100)
    est = p.estimate(make_pool(40))
    assert server.request_count == 0
    assert est.items == 40 and est.sampled == 40 and est.requests == 40
    assert 1200 < est.prompt_tokens < 2400  # ~40 tokens per item: two messages + overhead
    assert est.cost("max") == pytest.approx(est.prompt_tokens * 1.5e-07 + 40 * 100 * 6e-07)
    assert est.seconds_by_rate == pytest.approx(20)
    report = est.report()
    assert "40 requests" in report and "at least 20 s at the request rate limit" in report
    sampled = p.estimate(make_pool(40), sample_size=10, seed=3)
    assert sampled.sampled == 10 and sampled.requests == 40
    assert abs(sampled.prompt_tokens - est.prompt_tokens) / est.prompt_tokens < 0.05


def test_dry_run_of_a_multi_step_pipeline(tmp_path: Path) -> None:
    qa = Path(__file__).resolve().parent / "pipelines" / "qa"
    p = (DataGenerationPipeline(config=qa / "config.yaml")
         .step("question", prompt="question.yaml", extract=extract.json(list[str]),
               one_to_many=True)
         .step("answer", prompt="answer.yaml", model="large"))
    est = p.estimate([{"text": "Bees make honey."}] * 4, fanout=3)
    assert [s.requests for s in est.steps] == [4, 12]
    assert est.steps[1].approximate and "depends on earlier outputs" in est.report()
    assert est.cost() is None  # a self-hosted-looking model without prices


@pytest.mark.skipif(os.environ.get("DATAGEN_REQUIRE_LOCAL") != "1" and not
                    __import__("importlib").util.find_spec("llama_cpp"),
                    reason="local model not installed")
def test_dry_run_matches_the_real_prompt_tokens_on_the_local_model(tmp_path: Path) -> None:
    cfg = write_project(tmp_path, system="Write inside <draft></draft> tags, {{ tone }}.\n")
    p = DataGenerationPipeline(config=cfg, provider="local", model="smollm2", max_tokens=60)
    pool = make_pool(4)
    est = p.estimate(pool)
    results = p.run_sync(pool, extract_function=extract.tag("draft"))
    real = sum(r["usage"]["prompt_tokens"] for r in results)
    assert len(results) == 4
    assert abs(est.prompt_tokens - real) / real < 0.05, (est.prompt_tokens, real)
