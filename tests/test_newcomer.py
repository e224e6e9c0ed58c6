"""Issue 13, point 11: the small things a newcomer hits. (A cassette miss that says how to
re-record: tests/test_replay.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import make_pool, topic_draft, write_project
from test_report import chromium, needs_chromium

from datagen import DROP, DataGenerationPipeline, extract
from datagen.cli import main
from datagen.errors import ConfigError, ExtractionError
from datagen.report import report_data, write_report
from datagen.testing import FakeOpenAIServer

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


# ---- Ctrl+C with --no-progress ------------------------------------------------------------

def test_ctrl_c_with_no_progress_says_where_the_records_are_and_how_to_resume(
        tmp_path: Path) -> None:
    config = write_project(tmp_path)
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in make_pool(40)))
    with FakeOpenAIServer(responder=topic_draft, latency=0.3) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "datagen.cli", "run", str(config), "--pool", str(pool),
             "--set", f"base_url={server.base_url}", "--no-progress", "--concurrency", "2"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while server.request_count < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 130, err
    (results,) = [p for p in (tmp_path / "output").glob("demo_*.jsonl")
                  if not p.stem.endswith(("_failures", "_dropped"))]
    written = len(results.read_bytes().splitlines())
    assert 0 < written < 40
    assert f"datagen: interrupted; {written} records in {results}" in err
    assert f"datagen: continue with: datagen run {config} --resume" in err


# ---- --set n_items=1 ----------------------------------------------------------------------

def test_a_pipeline_setting_set_as_a_config_key_suggests_params(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_project(tmp_path, extra_yaml="params:\n  n_items: 5\n")
    (tmp_path / "pipeline.py").write_text(
        "def build(pipeline, n_items=5):\n    return pipeline\n"
        "def data_pool(pipeline, n_items=5):\n    return []\n")
    assert main(["run", str(tmp_path), "--set", "n_items=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'n_items' in keyword argument. Did you mean 'params.n_items'?" in err
    assert "--set params.n_items=..." in err
    with pytest.raises(ConfigError, match=r"Did you mean 'params.chunk_words'\?"):
        DataGenerationPipeline(config=None, chunk_words=3)  # close to no config key
    with pytest.raises(ConfigError, match=r"Did you mean 'temperature'\?"):
        DataGenerationPipeline(config=None, temprature=0.3)  # a typo stays a typo


# ---- an empty prompt file ----------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "  \n\n", "\t"])
def test_an_empty_prompt_file_says_it_is_empty(tmp_path: Path, content: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = write_project(tmp_path, user=content)
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(orjson.dumps(make_pool(1)[0]) + b"\n")
    with FakeOpenAIServer(responder=topic_draft) as server:
        code = main(["run", str(config), "--pool", str(pool), "--set",
                     f"base_url={server.base_url}", "--no-progress"])
        assert server.request_count == 0
    assert code == 2
    assert f"{tmp_path / 'prompts' / 'user.txt'}: the prompt file is empty; write the prompt " \
           "in it" in capsys.readouterr().err


def test_an_empty_chat_prompt_of_a_step_says_it_is_empty(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "ask.yaml").write_text("")
    (tmp_path / "config.yaml").write_text("model:\n  provider: openai\n  model: m\n")
    with pytest.raises(Exception, match=r"ask.yaml: the prompt file is empty"):
        DataGenerationPipeline(config=tmp_path / "config.yaml").step("ask", prompt="ask.yaml")


# ---- failed and dropped items in the HTML report -----------------------------------------

def judged(draft: str) -> str:
    if "topic 1" in draft.lower():
        return DROP("a topic we do not want")  # type: ignore[return-value]
    if "topic 2" in draft.lower():
        raise ExtractionError("the draft is about the wrong thing")
    return draft


def a_run_with_every_outcome(tmp_path: Path) -> Path:
    with FakeOpenAIServer(responder=topic_draft) as server:
        p = DataGenerationPipeline(config=write_project(tmp_path), base_url=server.base_url)
        result = p.run_sync(make_pool(5), extract_function=extract.tag("draft").then(judged))
    assert result.counts["succeeded"] == 3 and result.counts["failed"] == 1
    assert result.counts["dropped"] == 1
    return result.files.results


def test_the_report_data_holds_failed_and_dropped_items(tmp_path: Path) -> None:
    data = report_data(a_run_with_every_outcome(tmp_path))
    assert (data["records"], data["failed"], data["dropped"]) == (3, 1, 1)
    assert [(r["i"], r["st"]) for r in data["rows"]] == [
        (0, "ok"), (1, "dropped"), (2, "failed"), (3, "ok"), (4, "ok")]
    failed = data["rows"][2]
    assert failed["why"] == "extraction: the draft is about the wrong thing"
    assert "Topic 2 is a subject" in failed["s"][0]["raw"]  # the answer that failed
    assert data["rows"][1]["why"] == "output: a topic we do not want"
    assert data["success_rate"] == 0.75  # dropped items are neither success nor failure


@needs_chromium
def test_failed_and_dropped_items_in_the_report_filtered_by_status(tmp_path: Path) -> None:
    report = write_report(a_run_with_every_outcome(tmp_path))

    def rows(fragment: str, n: int) -> tuple[list[tuple[str, str]], str]:
        dom = chromium("--dump-dom", report.as_uri() + fragment,
                       profile=tmp_path / f"profile{n}").stdout
        return re.findall(r'<tr class="record (\w+)" data-key="([0-9a-f]+)"', dom), dom

    every, dom = rows("", 1)
    assert [status for status, _ in every] == ["ok", "dropped", "failed", "ok", "ok"]
    assert re.search(r'id="total-dropped">1<', dom) and re.search(r'id="total-failed">1<',
                                                                     dom)
    failed, dom = rows("#status=failed", 2)
    assert [status for status, _ in failed] == ["failed"] and "1 matching" in dom
    assert "the draft is about the wrong thing" in dom
    dropped, dom = rows("#status=dropped", 3)
    assert [status for status, _ in dropped] == ["dropped"]
    assert "a topic we do not want" in dom
    ok, dom = rows("#status=ok&q=topic%204", 4)
    assert [status for status, _ in ok] == ["ok"] and "Topic 4 is a subject" in dom
    none, dom = rows("#status=failed&q=topic%204", 5)
    assert none == [] and "0 matching" in dom


def test_a_report_of_a_run_without_failures_or_drops(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=topic_draft) as server:
        p = DataGenerationPipeline(config=write_project(tmp_path), base_url=server.base_url)
        result = p.run_sync(make_pool(2))
    data = report_data(result.files.results)
    assert [r["st"] for r in data["rows"]] == ["ok", "ok"] and data["dropped"] == 0


