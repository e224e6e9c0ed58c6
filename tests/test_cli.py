"""The datagen command through its real entry point (the installed console script)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import topic_draft

from datagen.testing import FakeOpenAIServer, FakeReply

DATAGEN = str(Path(sys.executable).parent / "datagen")
ROOT = Path(__file__).resolve().parent.parent
LOCAL = os.environ.get("DATAGEN_REQUIRE_LOCAL") == "1" or bool(
    __import__("importlib").util.find_spec("llama_cpp"))


def datagen(*args: str, cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DATAGEN, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_help_imports_nothing_heavy_and_every_command_has_examples() -> None:
    code = ("import sys; from datagen.cli import build_parser; build_parser(); "
            "print([m for m in ('litellm', 'aiohttp', 'jinja2', 'pydantic', 'rich', 'yaml') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
    assert "examples:" in datagen("--help").stdout
    for command in ("run", "estimate", "export", "check", "init"):
        result = datagen(command, "--help")
        assert result.returncode == 0 and "examples:" in result.stdout, command


@pytest.fixture
def five_topics(tmp_path: Path) -> Path:
    target = tmp_path / "five_topics"
    shutil.copytree(ROOT / "examples" / "five_topics", target)
    return target


def test_run_with_set_and_limit(five_topics: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=topic_draft) as server:
        result = datagen("run", str(five_topics), "--set", f"base_url={server.base_url}",
                         "--set", "model.temperature=0.2", "--limit", "2", "--output",
                         str(tmp_path / "out"), "--no-progress")
        assert result.returncode == 0, result.stderr
        assert {b["temperature"] for b in server.bodies} == {0.2}
        assert server.request_count == 2
    (results,) = [p for p in (tmp_path / "out").glob("five_topics_*.jsonl")
                  if "_failures" not in p.name]
    assert len(results.read_bytes().splitlines()) == 2
    assert f"results: {results}" in result.stdout


def test_run_in_the_current_folder_and_dry_run(five_topics: Path) -> None:
    with FakeOpenAIServer(responder=topic_draft) as server:
        dry = datagen("run", "--dry-run", "--set", f"base_url={server.base_url}",
                      cwd=five_topics)
        assert dry.returncode == 0 and "dry run: 5 items" in dry.stdout
        assert server.request_count == 0
        est = datagen("estimate", "--set", f"base_url={server.base_url}", cwd=five_topics)
        assert est.returncode == 0 and "5 requests" in est.stdout
        run = datagen("run", "--set", f"base_url={server.base_url}", "--no-progress",
                      cwd=five_topics)
        assert run.returncode == 0, run.stderr
        assert server.request_count == 5


def test_exit_codes(five_topics: Path, tmp_path: Path) -> None:
    bad = datagen("run", str(five_topics), "--set", "temprature=1")
    assert bad.returncode == 2 and "Did you mean 'temperature'" in bad.stderr
    missing = datagen("run", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such pipeline folder" in missing.stderr
    with FakeOpenAIServer(responder=lambda body: FakeReply(status=400)) as server:
        failed = datagen("run", str(five_topics), "--set", f"base_url={server.base_url}",
                         "--set", "max_retries=0", "--no-progress", "--output",
                         str(tmp_path / "o"))
        assert failed.returncode == 1 and "above --max-failure-rate" in failed.stderr
        tolerated = datagen("run", str(five_topics), "--set", f"base_url={server.base_url}",
                            "--no-progress", "--max-failure-rate", "1", "--output",
                            str(tmp_path / "o2"))
        assert tolerated.returncode == 0


def test_ctrl_c_exits_130_and_resume_finishes(five_topics: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=topic_draft, latency=0.5) as server:
        args = [DATAGEN, "run", str(five_topics), "--set", f"base_url={server.base_url}",
                "--set", "concurrency_limit=1", "--no-progress", "--output", str(tmp_path)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while server.request_count < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode == 130
        resumed = datagen("run", str(five_topics), "--set", f"base_url={server.base_url}",
                          "--resume", "--no-progress", "--output", str(tmp_path))
        assert resumed.returncode == 0, resumed.stderr
        (results,) = [p for p in tmp_path.glob("five_topics_*.jsonl") if "_fail" not in p.name]
        keys = [orjson.loads(x)["key"] for x in results.read_bytes().splitlines()]
        assert len(keys) == 5 == len(set(keys))


def test_params_key_the_pipeline_does_not_take_is_a_warning(tmp_path: Path) -> None:
    folder = tmp_path / "styled"
    shutil.copytree(ROOT / "examples" / "style_clone", folder,
                    ignore=shutil.ignore_patterns("output", ".datagen_chunks"))
    config = folder / "config.yaml"
    config.write_text(config.read_text() + "  old_unused_key: 3\n")
    result = datagen("check", str(folder))
    assert result.returncode == 0, result.stderr
    assert "params.old_unused_key" in result.stderr and "ignored" in result.stderr


def test_export_command(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    results.write_bytes(orjson.dumps({"key": "k", "output": "hi", "messages": [
        {"role": "user", "content": "say hi"}]}) + b"\n")
    out = datagen("export", str(results), "--format", "openai", "--out", str(tmp_path / "o.jsonl"))
    assert out.returncode == 0 and "1 conversations written" in out.stdout
    assert json.loads((tmp_path / "o.jsonl").read_text())["messages"][-1] == {
        "role": "assistant", "content": "hi"}
    assert datagen("export", str(tmp_path / "none.jsonl")).returncode == 2


@pytest.mark.skipif(not LOCAL, reason="the local model is not installed")
def test_init_then_run_on_the_local_model_then_its_test_replays(tmp_path: Path) -> None:
    created = datagen("init", "demo", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    demo = tmp_path / "demo"
    assert {p.name for p in demo.iterdir()} >= {"pipeline.py", "config.yaml", "prompts",
                                                "input", "test_pipeline.py", "cassettes"}
    run = datagen("run", "--no-progress", cwd=demo, timeout=600)
    assert run.returncode == 0, run.stderr
    (results,) = [p for p in (demo / "output").glob("summaries_*.jsonl")
                  if not p.stem.endswith(("_failures", "_sharegpt"))]
    assert results.read_bytes().strip()
    assert "exported:" in run.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                           cwd=demo, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert datagen("init", "demo", cwd=tmp_path).returncode == 2  # never overwrites


def test_a_broken_pipeline_py_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model: {provider: openai, model: m}\n")
    (tmp_path / "pipeline.py").write_text("def build(pipeline):\n    return pipeline.step(\n")
    result = datagen("check", str(tmp_path))
    assert result.returncode == 2 and "pipeline.py, line" in result.stderr
    (tmp_path / "pipeline.py").write_text("import no_such_module_xyz\n")
    result = datagen("check", str(tmp_path))
    assert result.returncode == 2 and "no_such_module_xyz" in result.stderr
    (tmp_path / "pipeline.py").write_text("x = 1\n")
    result = datagen("check", str(tmp_path))
    assert result.returncode == 2 and "must define `build(pipeline, **params)`" in result.stderr
