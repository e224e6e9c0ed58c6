"""Exports: OpenAI messages JSONL, ShareGPT JSONL, Hugging Face datasets; meta-datagen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import make_pool, topic_draft

from datagen import DataGenerationPipeline, extract
from datagen.export import ExportError, to_hf, to_openai, to_sharegpt
from datagen.testing import FakeOpenAIServer

QA = Path(__file__).resolve().parent / "pipelines" / "qa"


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@pytest.fixture
def single_run(project: Path, server: FakeOpenAIServer) -> Path:
    p = DataGenerationPipeline(config=project, base_url=server.base_url)
    result = p.run_sync(make_pool(3), extract_function=extract.tag("draft"))
    assert result.files is not None
    return result.files.results


def test_openai_export_of_a_single_step_run(single_run: Path, tmp_path: Path) -> None:
    assert to_openai(single_run, tmp_path / "train.jsonl") == 3
    first = read(tmp_path / "train.jsonl")[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[1]["content"] == "Write about topic 0 in about 10 words."
    assert first[2]["content"] == "Topic 0 is a subject worth study."  # the parsed output


def test_sharegpt_export_and_a_custom_mapper(single_run: Path, tmp_path: Path) -> None:
    assert to_sharegpt(single_run.parent, tmp_path / "sg.jsonl") == 3  # a run folder works
    turns = read(tmp_path / "sg.jsonl")[0]["conversations"]
    assert [t["from"] for t in turns] == ["system", "human", "gpt"]

    def only_even(record: dict[str, Any]) -> list[dict[str, str]] | None:
        if record["index"] % 2:
            return None
        return [{"role": "user", "content": record["user_prompt_kwargs"]["topic"]},
                {"role": "assistant", "content": record["output"]}]

    assert to_sharegpt(single_run, tmp_path / "even.jsonl", mapper=only_even) == 2
    with pytest.raises(ExportError, match="each turn must be"):
        to_openai(single_run, tmp_path / "bad.jsonl",
                  mapper=lambda r: [{"role": "narrator", "content": "x"}])
    assert not (tmp_path / "bad.jsonl").exists()  # nothing half-written


def test_multi_step_export_takes_the_step_asked_for(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=lambda body: "<answer>A.</answer>"
                          if "Answer from the text" in str(body) else '["Q1?", "Q2?"]') as server:
        p = (DataGenerationPipeline(config=QA / "config.yaml", base_url=server.base_url,
                                    output_dir=str(tmp_path / "o"), meta_datagen=True)
             .step("question", prompt="question.yaml", extract=extract.json(list[str]),
                   one_to_many=True)
             .step("answer", prompt="answer.yaml", extract=extract.tag("answer")))
        result = p.run_sync([{"text": "Bees make honey."}])
    with pytest.raises(ExportError, match=r"multi-step run \(steps: question, answer\)"):
        to_openai(result.files.results, tmp_path / "qa.jsonl")  # which pair? not guessed
    assert to_openai(result.files.results, tmp_path / "qa.jsonl", step="answer") == 2
    messages = read(tmp_path / "qa.jsonl")[0]["messages"]
    assert "Question: Q1?" in messages[0]["content"] and messages[-1]["content"] == "A."
    meta = read(result.files.results.with_name(result.files.results.stem
                                               + "_meta.jsonl"))
    assert [m["step"] for m in meta] == ["question", "answer", "answer"]
    assert meta[0]["messages"][-1] == {"role": "assistant", "content": '["Q1?", "Q2?"]'}


def test_hf_export_loads_with_datasets(single_run: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = to_hf(single_run)
    assert ds.num_rows == 3 and ds[0]["messages"][2]["role"] == "assistant"
    ds.to_parquet(tmp_path / "train.parquet")
    assert datasets.Dataset.from_parquet(str(tmp_path / "train.parquet")).num_rows == 3
    to_sharegpt(single_run, tmp_path / "sg.jsonl")
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "sg.jsonl"),
                                   split="train")
    assert loaded[0]["conversations"][1]["from"] == "human"


def test_missing_results(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="results file not found"):
        to_openai(tmp_path / "nope.jsonl", tmp_path / "o.jsonl")
    topic_draft  # noqa: B018 - keeps the conftest import used
