"""Multi-step pipelines: the builder, YAML chat prompts, validation, fan-out, named models,
observers, completion mode, progress, determinism."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from datagen import DataGenerationPipeline, extract
from datagen.errors import ConfigError, TemplateError
from datagen.llm import caller
from datagen.testing import FakeOpenAIServer, FakeReply
from datagen.testing.fake_server import last_user_message

QA = Path(__file__).resolve().parent / "pipelines" / "qa"
POOL = [{"text": "Bees make honey."}, {"text": "Rivers flow to the sea."}]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def step_of(body: dict[str, Any]) -> str:
    text = last_user_message(body)
    if text.startswith("Text:"):
        return "question"
    if "Answer from the text" in text:
        return "answer"
    return "judge"


class Model:
    """A rule-based stand-in for the model; the judge can be scripted to fail."""

    def __init__(self, judge_failures: int = 0, fail_only: str = "") -> None:
        self.judge_failures = judge_failures
        self.fail_only = fail_only  # judge failures only for questions containing this
        self.calls: Counter[str] = Counter()

    def __call__(self, body: dict[str, Any]) -> Any:
        step = step_of(body)
        self.calls[step] += 1
        text = last_user_message(body)
        if step == "question":
            subject = text.removeprefix("Text: ").split()[0]
            return json.dumps([f"What do {subject.lower()} do?", f"Why {subject.lower()}?"])
        if step == "answer":
            question = re.search(r"Question: (.*)", text).group(1)  # type: ignore[union-attr]
            return f"<answer>About: {question}</answer>"
        if self.judge_failures > 0 and self.fail_only in text:
            self.judge_failures -= 1
            return "VERDICT: FAIL"
        return "VERDICT: PASS"


def build(base_url: str, tmp_path: Path, **kw: Any) -> DataGenerationPipeline:
    return (DataGenerationPipeline(config=QA / "config.yaml", base_url=base_url,
                                   output_dir=str(tmp_path / "out"), experiment_name="qa", **kw)
            .step("question", prompt="question.yaml", extract=extract.json(list[str]),
                  one_to_many=True)
            .step("answer", prompt="answer.yaml", extract=extract.tag("answer"), model="large")
            .step("judge", prompt="judge.txt",
                  extract=extract.regex(r"VERDICT: (?P<v>PASS|FAIL)"),
                  validate=lambda out, item: out == "PASS" or "the answer is not supported"))


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_three_steps_with_fan_out_carry_every_output(tmp_path: Path) -> None:
    model = Model()
    with FakeOpenAIServer(responder=model) as server:
        p = build(server.base_url, tmp_path)
        results = p.run_sync(POOL, concurrency_limit=4)
    assert len(results) == 4  # 2 items x 2 questions
    assert [r["key"].rsplit("/", 1)[1] for r in results] == ["0", "1", "0", "1"]
    first = results[0]
    assert first["item"] == {"text": "Bees make honey."}
    assert first["steps"]["question"]["output"] == "What do bees do?"
    assert first["steps"]["question"]["fanout_index"] == 0
    assert first["steps"]["answer"]["output"] == "About: What do bees do?"
    assert first["steps"]["judge"]["output"] == "PASS" and first["output"] == "PASS"
    assert model.calls == {"question": 2, "answer": 4, "judge": 4}
    # the named model served the answer step, the main model the others
    models = {step_of(b): b["model"] for b in server.bodies}
    assert models == {"question": "small-model", "answer": "large-model",
                      "judge": "small-model"}
    assert {b["max_tokens"] for b in server.bodies if step_of(b) == "answer"} == {128}
    # the YAML prompt's few-shot turns were sent as they are
    question_body = next(b for b in server.bodies if step_of(b) == "question")
    assert [m["role"] for m in question_body["messages"]] == ["system", "user", "assistant",
                                                               "user"]


def test_a_judge_that_fails_twice_then_passes(tmp_path: Path) -> None:
    # the two fan-out children run concurrently (their user code runs off the event loop,
    # so their calls interleave): the failures are aimed at the first child's question
    with FakeOpenAIServer(responder=Model(judge_failures=2, fail_only="bees do")) as server:
        p = build(server.base_url, tmp_path)
        results = p.run_sync(POOL[:1], concurrency_limit=1)
        judge_prompts = [last_user_message(b) for b in server.bodies
                         if step_of(b) == "judge" and "bees do" in last_user_message(b)]
    assert [r["steps"]["judge"]["validation_retries"] for r in results] == [2, 0]
    # the reason reached the template of the retries
    assert "rejected: the answer is not supported" in judge_prompts[1]
    manifest = json.loads(results.files.manifest.read_text())
    assert manifest["steps"]["judge"]["validation_retries"] == 2
    assert manifest["calls"]["retries"] == 0  # counted apart from transport retries


def test_a_judge_that_keeps_failing_sends_the_item_to_failures(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=Model(judge_failures=100)) as server:
        p = build(server.base_url, tmp_path)
        result = p.run_sync(POOL[:1])
        assert result == []
    failures = lines(result.files.failures)
    assert len(failures) == 2
    assert failures[0]["step"] == "judge" and failures[0]["error"]["kind"] == "validation"
    assert failures[0]["error"]["message"] == "the answer is not supported"
    assert failures[0]["steps"]["answer"]["output"].startswith("About:")


def test_resume_after_the_first_step_sends_nothing_for_it(tmp_path: Path) -> None:
    model = Model()

    def answer_step_down(body: dict[str, Any]) -> Any:
        return FakeReply(status=503) if step_of(body) == "answer" else model(body)

    # the same server (its address is part of every request's identity) comes back
    with FakeOpenAIServer(responder=answer_step_down) as server:
        first = build(server.base_url, tmp_path)
        assert first.run_sync(POOL) == []  # died after the first step: every answer failed
        assert model.calls["question"] == 2
        port = server.port
    with FakeOpenAIServer(responder=model, port=port) as server:
        again = build(server.base_url, tmp_path).run_sync(POOL, resume=True)
        sent = Counter(step_of(b) for b in server.bodies)
    assert len(again) == 4
    assert sent["question"] == 0  # replayed from the cache
    assert sent == {"answer": 4, "judge": 4}
    # and finished children are not redone
    with FakeOpenAIServer(responder=model, port=port) as server:
        more = build(server.base_url, tmp_path).run_sync(
            [*POOL, {"text": "Stars shine at night."}], resume=True)
        assert len(more) == 2 and Counter(step_of(b) for b in server.bodies) == {
            "question": 1, "answer": 2, "judge": 2}


def test_missing_prompt_in_the_third_step_fails_before_any_request(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=Model()) as server:
        p = (DataGenerationPipeline(config=QA / "config.yaml", base_url=server.base_url)
             .step("question", prompt="question.yaml", extract=extract.json(list[str]),
                   one_to_many=True)
             .step("answer", prompt="answer.yaml"))
        with pytest.raises(TemplateError, match=r"step 'judge': prompt file 'judge_v2\.txt' "
                                                r"not found; looked in: .*prompts/judge_v2"):
            p.step("judge", prompt="judge_v2.txt")
        assert server.request_count == 0


def test_undefined_variable_in_a_later_step_fails_before_any_request(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "ask.txt").write_text("Ask about {{ text }}")
    (tmp_path / "prompts" / "use.txt").write_text("Use {{ ask }} and {{ qestion }}")
    (tmp_path / "config.yaml").write_text("model: {provider: openai, model: m, max_retries: 0}\n"
                                          "run: {progress: false}\n"
                                          f"output_data: {{output_dir: {tmp_path}/o}}\n")
    with FakeOpenAIServer(responder=Model()) as server:
        p = (DataGenerationPipeline(config=tmp_path / "config.yaml", base_url=server.base_url)
             .step("ask", prompt="ask.txt").step("use", prompt="use.txt"))
        with pytest.raises(TemplateError, match=r"step 'use': .*use\.txt: variable\(s\) qestion "
                                                r"undefined for item 0"):
            p.run_sync([{"text": "a"}, {"text": "b"}])
        assert server.request_count == 0


def test_unknown_named_model_and_bad_step_names(tmp_path: Path) -> None:
    p = DataGenerationPipeline(config=QA / "config.yaml")
    with pytest.raises(ConfigError, match=r"no model named 'huge'.*defined: large"):
        p.step("x", prompt="judge.txt", model="huge")
    with pytest.raises(ConfigError, match="must be a Python identifier"):
        p.step("my step", prompt="judge.txt")
    p.step("x", prompt="judge.txt")
    with pytest.raises(ConfigError, match="already exists"):
        p.step("x", prompt="judge.txt")


def test_input_processor_observers_debug_and_progress(tmp_path: Path) -> None:
    events: list[tuple[str, str, bool]] = []
    progress: list[tuple[str, float]] = []
    with FakeOpenAIServer(responder=lambda body: "<answer>ok</answer>") as server:
        p = (DataGenerationPipeline(config=QA / "config.yaml", base_url=server.base_url,
                                    output_dir=str(tmp_path), debug=True,
                                    api_key="sk-debug-secret-123456")
             .step("answer", prompt="answer.yaml", extract=extract.tag("answer"),
                   input_processor=lambda ctx: {**ctx, "question": ctx["text"].upper()}))
        p.on_call(before=lambda e: events.append(("before", e.step, e.response is None)),
                  after=lambda e: events.append(("after", e.step, e.response is None)))
        results = p.run_sync(POOL, progress_callback=lambda task, frac, msg:
                             progress.append((task, frac)))
        assert "Question: BEES MAKE HONEY." in last_user_message(server.bodies[0])
    assert events.count(("before", "answer", True)) == 2
    assert events.count(("after", "answer", False)) == 2
    assert progress[-1] == ("answer", 1.0)
    debug = list(results.files.results.parent.glob("*_debug/*.json"))
    assert len(debug) == 2
    for f in debug:
        data = json.loads(f.read_text())
        assert data["step"] == "answer" and data["response"] == "<answer>ok</answer>"
        assert "sk-debug-secret" not in f.read_text()


def test_completion_mode_for_base_models(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "story.txt").write_text("Once upon a time, {{ hero }}")
    (tmp_path / "config.yaml").write_text("model: {provider: openai, model: base, "
                                          "max_retries: 0}\nrun: {progress: false}\n"
                                          f"output_data: {{output_dir: {tmp_path}/o}}\n")
    for transport in ("openai", "litellm"):
        with FakeOpenAIServer(responder=lambda body: " a dragon appeared.") as server:
            p = (DataGenerationPipeline(config=tmp_path / "config.yaml", transport=transport,
                                        base_url=server.base_url, cache=False)
                 .step("story", prompt="story.txt", mode="completion", stop=["\n\n"]))
            results = p.run_sync([{"hero": "a knight"}])
            body = server.bodies[0]
        assert body["prompt"] == "Once upon a time, a knight" and body["stop"] == ["\n\n"]
        assert "messages" not in body
        assert results[0]["output"] == " a dragon appeared.", transport


def test_pydantic_response_format_is_sent_and_validated(tmp_path: Path) -> None:
    class Verdict(BaseModel):
        ok: bool
        reason: str

    with FakeOpenAIServer(responder=lambda body: '{"ok": true, "reason": "fine"}') as server:
        p = (DataGenerationPipeline(config=QA / "config.yaml", base_url=server.base_url,
                                    output_dir=str(tmp_path))
             .step("judge", prompt="judge.txt", response_format=Verdict))
        results = p.run_sync([{"question": "q", "answer": "a"}])
        fmt = server.bodies[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Verdict"
    # in memory as in the file (issue 11.6): the model as JSON
    assert results[0]["output"] == Verdict(ok=True, reason="fine").model_dump()
    assert lines(results.files.results)[0]["output"] == {"ok": True, "reason": "fine"}


def test_same_inputs_same_outputs_and_keys(tmp_path: Path) -> None:
    with FakeOpenAIServer(responder=Model()) as server:
        one = build(server.base_url, tmp_path).run_sync(POOL)
        two = build(server.base_url, tmp_path / "again").run_sync(POOL)
    assert [(r["key"], r["output"], r["steps"]["answer"]["output"]) for r in one] == [
        (r["key"], r["output"], r["steps"]["answer"]["output"]) for r in two]


def test_run_extract_function_is_refused_for_steps(tmp_path: Path) -> None:
    p = DataGenerationPipeline(config=QA / "config.yaml").step("j", prompt="judge.txt")
    with pytest.raises(ConfigError, match=r"per step"):
        p.run_sync(POOL, extract_function=str)


def test_own_prompts_folder_first_then_default_folders(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "judge.txt").write_text("SHARED judge {{ answer }}")
    (shared / "extra.txt").write_text("SHARED extra {{ answer }}")
    project = tmp_path / "pipe"
    (project / "prompts").mkdir(parents=True)
    (project / "prompts" / "judge.txt").write_text("OWN judge {{ answer }}")
    (project / "config.yaml").write_text(
        "model: {provider: openai, model: m, max_retries: 0}\nrun: {progress: false}\n"
        f"prompts: {{dirs: [{shared}]}}\noutput_data: {{output_dir: {tmp_path}/o}}\n")
    with FakeOpenAIServer(responder=lambda body: "fine") as server:
        p = (DataGenerationPipeline(config=project / "config.yaml", base_url=server.base_url)
             .step("judge", prompt="judge.txt").step("extra", prompt="extra.txt"))
        p.run_sync([{"answer": "a"}])
        sent = [last_user_message(b) for b in server.bodies]
    assert sent == ["OWN judge a", "SHARED extra a"]


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_steps import build
from pathlib import Path
build(sys.argv[1], Path(sys.argv[2])).run_sync({pool!r}, resume=True, concurrency_limit=2)
"""


def test_killed_after_the_first_step_resume_sends_nothing_for_it(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    model = Model()

    def slow_answers(body: dict[str, Any]) -> Any:
        from datagen.testing.fake_server import completion_body

        if step_of(body) == "answer":  # the answers never come back before the kill
            return FakeReply(body=completion_body(body, model(body)), delay=30)
        return model(body)

    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), pool=POOL)
    with FakeOpenAIServer(responder=slow_answers) as server:
        proc = subprocess.Popen([sys.executable, "-c", script, server.base_url, str(tmp_path)],
                                env={**os.environ}, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Counter(
                step_of(b) for b in server.bodies)["answer"] < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # both questions answered, answers in flight
        proc.wait()
        assert Counter(step_of(b) for b in server.bodies)["question"] == 2
        port = server.port  # the same server comes back (it is part of the identity)
    with FakeOpenAIServer(responder=Model(), port=port) as server:
        results = build(server.base_url, tmp_path).run_sync(POOL, resume=True)
        sent = Counter(step_of(b) for b in server.bodies)
    assert len(results) == 4
    assert sent["question"] == 0 and sent["answer"] == 4


def test_a_steps_answer_is_on_disk_before_the_next_steps_request_goes_out(
        tmp_path: Path) -> None:
    """The deterministic form of the kill test above: answers are committed in groups
    every few milliseconds, and a kill -9 after step 2's request left but before the
    group commit paid for step 1's answer again on resume."""
    import sqlite3

    model = Model()
    stored_when_asked: list[int] = []

    def watching(body: dict[str, Any]) -> Any:
        if step_of(body) == "answer":
            with sqlite3.connect(tmp_path / "out" / ".datagen_cache.sqlite") as db:
                stored_when_asked.append(db.execute(
                    "SELECT COUNT(*) FROM responses").fetchone()[0])
        return model(body)

    with FakeOpenAIServer(responder=watching) as server:
        results = build(server.base_url, tmp_path).run_sync(POOL, concurrency_limit=2)
    assert len(results) == 4 and stored_when_asked
    # every answer request came after at least its own item's question answer was stored
    assert min(stored_when_asked) >= 1, stored_when_asked


def test_input_processor_that_raises_fails_only_that_item(tmp_path: Path) -> None:
    def shout(ctx: dict[str, Any]) -> dict[str, Any]:
        if "Rivers" in ctx["text"]:
            raise KeyError("missing field")
        return {**ctx, "question": ctx["text"]}

    with FakeOpenAIServer(responder=lambda body: "<answer>ok</answer>") as server:
        p = (DataGenerationPipeline(config=QA / "config.yaml", base_url=server.base_url,
                                    output_dir=str(tmp_path))
             .step("answer", prompt="answer.yaml", input_processor=shout))
        results = p.run_sync(POOL)
    assert [r["item"]["text"] for r in results] == ["Bees make honey."]
    (failure,) = lines(results.files.failures)
    assert failure["error"]["kind"] == "input_processor"
    assert "KeyError" in failure["error"]["message"] and failure["step"] == "answer"
