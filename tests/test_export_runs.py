"""Issue 13, point 10: exporting multi-step runs. `datagen export` uses the pipeline
folder's own mapper when it has one, takes --step or --mapper otherwise, refuses rather
than guess, never overwrites a file it did not write in this call, and says so when
there is nothing to export."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from datagen.cli import main
from datagen.export import ExportError, results_file, to_openai, to_sharegpt
from datagen.testing import FakeOpenAIServer
from datagen.testing.fake_server import last_user_message

QA = Path(__file__).resolve().parent / "pipelines" / "qa"
PIPELINE = '''
from datagen import extract, to_sharegpt


def build(pipeline):
    return (pipeline
            .step("question", prompt="question.yaml", extract=extract.json(list[str]),
                  one_to_many=True)
            .step("answer", prompt="answer.yaml", extract=extract.tag("answer"))
            .step("judge", prompt="judge.txt",
                  extract=extract.choice("PASS", "FAIL", marker="VERDICT:")))


def data_pool(pipeline):
    return [{"text": "Bees make honey."}]


def mapper(record):
    steps = record["steps"]
    return [{"role": "user", "content": steps["question"]["output"]},
            {"role": "assistant", "content": steps["answer"]["output"]}]


def export(results):
    out = results.with_name(results.stem + "_sharegpt.jsonl")
    to_sharegpt(results, out, mapper=mapper)
    return out
'''


def reply(body: dict[str, Any]) -> str:
    text = last_user_message(body)
    if text.startswith("Text:"):
        return '["Why do bees make honey?", "Where?"]'
    if "Answer from the text" in text:
        return "<answer>To eat in winter.</answer>"
    return "It says so.\nVERDICT: PASS"


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A pipeline folder (pipeline.py with a mapper and an export()) after one run."""
    root = tmp_path / "qa"
    shutil.copytree(QA / "prompts", root / "prompts")
    config = (QA / "config.yaml").read_text() + \
        f"output_data:\n  output_dir: {tmp_path / 'out'}\n  experiment_name: qa\n"
    (root / "config.yaml").write_text(config)
    (root / "pipeline.py").write_text(PIPELINE)
    with FakeOpenAIServer(responder=reply) as server:
        assert main(["run", str(root), "--set", f"base_url={server.base_url}",
                     "--no-progress"]) == 0
    return tmp_path / "out"


def the_results(out: Path) -> Path:
    return results_file(out)


def test_the_folder_mapper_is_used_and_the_pipelines_own_export_is_never_overwritten(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = the_results(folder)
    own = results.with_name(results.stem + "_sharegpt.jsonl")  # written by export()
    before = own.read_bytes()
    assert [c["conversations"][1]["value"] for c in lines(own)] == ["To eat in winter."] * 2
    capsys.readouterr()
    assert main(["export", str(results)]) == 2  # the default name is export()'s file
    err = capsys.readouterr().err
    assert f"{own} already exists and was not written by this export" in err
    assert own.read_bytes() == before
    out = tmp_path / "train.jsonl"
    assert main(["export", str(folder), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"2 conversations written to {out} (the mapper of " in said
    assert said.rstrip().endswith("pipeline.py)")
    assert out.read_bytes() == before  # the folder's mapper: question -> answer, not "PASS"
    assert main(["export", str(results), "--out", str(out)]) == 2  # not twice either
    assert "already exists" in capsys.readouterr().err


def test_a_multi_step_run_without_a_mapper_is_refused_listing_its_steps(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = the_results(folder)
    manifest = results.with_name(results.stem + "_manifest.json")
    data = orjson.loads(manifest.read_bytes())
    data["config_file"] = None  # a run from a pipeline made in code: no folder to ask
    manifest.write_bytes(orjson.dumps(data))
    out = tmp_path / "judge.jsonl"
    assert main(["export", str(results), "--out", str(out), "--format", "openai"]) == 2
    err = capsys.readouterr().err
    assert "comes from a multi-step run (steps: question, answer, judge)" in err
    assert "--step NAME" in err and "mapper(record)" in err
    assert not out.exists()
    assert main(["export", str(results), "--out", str(out), "--step", "answer",
                 "--format", "openai"]) == 0
    first, _ = lines(out)
    assert first["messages"][-1] == {"role": "assistant", "content": "To eat in winter."}
    assert "Answer from the text" in first["messages"][0]["content"]
    assert main(["export", str(results), "--out", str(tmp_path / "x.jsonl"), "--step",
                 "verdict"]) == 2
    assert "has no step 'verdict' (its steps: question, answer, judge)" in \
        capsys.readouterr().err


def test_a_mapper_named_on_the_command_line(folder: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "maps.py").write_text(
        "def judge_only(record):\n"
        "    return [{'role': 'user', 'content': record['item']['text']},\n"
        "            {'role': 'assistant', 'content': record['output']}]\n"
        "def nothing(record):\n    return None\n")
    out = tmp_path / "j.jsonl"
    assert main(["export", str(folder), "--out", str(out), "--mapper",
                 f"{tmp_path / 'maps.py'}:judge_only"]) == 0
    assert {c["conversations"][1]["value"] for c in lines(out)} == {"PASS"}
    capsys.readouterr()
    empty = tmp_path / "none.jsonl"
    assert main(["export", str(folder), "--out", str(empty), "--mapper",
                 f"{tmp_path / 'maps.py'}:nothing"]) == 1
    err = capsys.readouterr().err
    assert "0 of the 2 records of" in err and "returned None for every one" in err
    assert not empty.exists()
    assert main(["export", str(folder), "--mapper", f"{tmp_path / 'maps.py'}:gone"]) == 2
    assert "has no function gone" in capsys.readouterr().err


def test_zero_records_says_so_and_writes_nothing(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "demo_20261122_101500.jsonl"
    results.write_bytes(b"")
    failures = tmp_path / "demo_20261122_101500_failures.jsonl"
    failures.write_bytes(b'{"index": 0, "error": {"kind": "extraction"}}\n' * 3)
    assert main(["export", str(results)]) == 1
    err = capsys.readouterr().err
    assert f"{results} holds 0 records: nothing to export; its 3 failed items are in " \
           f"{failures}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([failures.name, results.name])


def test_the_library_refuses_to_guess_and_takes_a_step(folder: Path, tmp_path: Path) -> None:
    results = the_results(folder)
    with pytest.raises(ExportError, match=r"steps: question, answer, judge"):
        to_openai(results, tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()
    assert to_sharegpt(results, tmp_path / "a.jsonl", step="question") == 2
    questions = [c["conversations"][-1]["value"] for c in lines(tmp_path / "a.jsonl")]
    assert questions == ["Why do bees make honey?", "Where?"]
    with pytest.raises(ExportError, match="already exists"):
        to_sharegpt(results, tmp_path / "a.jsonl", step="answer", overwrite=False)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_folder_never_yields_an_export_as_its_results(folder: Path) -> None:
    results = the_results(folder)
    export = results.with_name(results.stem + "_sharegpt.jsonl")
    export.touch()  # newer than the results
    assert results_file(folder) == results
