"""The three example pipelines of examples/, replayed from cassettes of real SmolLM2
output (recorded with `make cassettes`). Assertions are about structure, not wording."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  ROOT / "examples" / name / "pipeline.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, base_url: str, tmp_path: Path) -> tuple[ModuleType, Any, list[Any]]:
    example = load(name)
    pipeline = example.build(base_url=base_url, constrain_output=True, temperature=0.0,
                             max_retries=0, output_dir=str(tmp_path), progress=False)
    results = pipeline.run_sync(example.data_pool(pipeline))
    return example, pipeline, results


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_poems_example(base_url: str, datagen_cassette: Any, tmp_path: Path) -> None:
    example, pipeline, results = run("poems", base_url, tmp_path)
    n_chunks = len(list(example.data_pool(pipeline)))
    assert n_chunks >= 2 and len(results) == n_chunks
    assert all(r["output"].strip() and r["item"]["source"] for r in results)
    exported = lines(example.export(pipeline.last_run_files.results))
    assert len(exported) == n_chunks
    # the file (and so the export) is in the order items finished, run() in input order
    assert sorted(e["conversations"][-1]["value"] for e in exported) == sorted(
        r["output"] for r in results)


def test_style_clone_example(base_url: str, datagen_cassette: Any, tmp_path: Path) -> None:
    example, pipeline, results = run("style_clone", base_url, tmp_path)
    assert results and all(set(r["steps"]) == {"repair", "generic"} for r in results)
    exported = lines(example.export(pipeline.last_run_files.results))
    assert len(exported) == len(results)
    pairs = {(e["conversations"][0]["value"], e["conversations"][1]["value"]) for e in exported}
    assert pairs == {(r["steps"]["generic"]["output"], r["steps"]["repair"]["output"])
                     for r in results}
    assert all(e["conversations"][0]["from"] == "human" for e in exported)


def test_factual_qa_example(base_url: str, datagen_cassette: Any, tmp_path: Path) -> None:
    example, pipeline, results = run("factual_qa", base_url, tmp_path)
    failures = lines(pipeline.last_run_files.failures)
    assert results, failures
    for record in results:  # only judged answers reach the results
        assert record["steps"]["judge"]["output"] == "PASS"
        assert record["key"].count("/") == 1  # a child of the questions fan-out
    for failure in failures:
        assert failure["step"] in ("questions", "answer", "judge")
    exported = lines(example.export(pipeline.last_run_files.results))
    assert len(exported) == len(results)
    assert {e["conversations"][0]["value"] for e in exported} == {
        r["steps"]["questions"]["output"] for r in results}
    datasets = pytest.importorskip("datasets")
    out = example.export(pipeline.last_run_files.results)
    assert datasets.load_dataset("json", data_files=str(out), split="train").num_rows == len(
        results)
