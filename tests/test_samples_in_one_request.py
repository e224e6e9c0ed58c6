"""Issue 13, point 5: the samples of one input in one request (``n``) where the provider
bills the prompt once (model.samples_in_one_request): per run and per step, resumed,
with fewer choices than asked, refused, turned off, and through litellm."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from datagen import DataGenerationPipeline
from datagen.config import ModelConfig
from datagen.errors import ConfigError
from datagen.llm import caller, runtime
from datagen.llm.types import ChatRequest, Choice, Completion, Usage, request_identity
from datagen.testing import FakeOpenAIServer
from datagen.testing.fake_server import (
    FakeReply,
    choices_body,
    completion_body,
    last_user_message,
)  # fmt: skip


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caller, "BACKOFF_BASE_S", 0.01)


def answer(body: dict[str, Any]) -> str:
    """Each choice and each seed says which it is: distinct samples are visible."""
    return (f"{last_user_message(body)} choice={body.get('choice_index')} "
            f"seed={body.get('seed')}")


def project(tmp: Path, share: str = "true", **model: Any) -> Path:
    (tmp / "prompts").mkdir(parents=True, exist_ok=True)
    (tmp / "prompts" / "s.txt").write_text("About {{ text }}")
    (tmp / "prompts" / "t.txt").write_text("Title for {{ s }}")
    extra = "".join(f"  {k}: {orjson.dumps(v).decode()}\n" for k, v in model.items())
    (tmp / "config.yaml").write_text(
        f"model:\n  provider: openai\n  model: m\n  max_retries: 0\n"
        f"  samples_in_one_request: {share}\n{extra}"
        f"output_data:\n  output_dir: {tmp / 'out'}\n  experiment_name: sn\n"
        "run:\n  progress: false\n")
    return tmp / "config.yaml"


def pipe(config: Path, server: FakeOpenAIServer, *, step_samples: int = 1, then: bool = False,
         **kw: Any) -> DataGenerationPipeline:
    p = DataGenerationPipeline(config=config, base_url=server.base_url, **kw).step(
        "s", prompt="s.txt", samples=step_samples)
    return p.step("t", prompt="t.txt") if then else p


def server_usage(server: FakeOpenAIServer, responder: Any = answer,
                 max_choices: int | None = None) -> tuple[int, int]:
    """What the fake server billed, from the bodies it received (its own reply rules)."""
    prompt = completion = 0
    for body in server.bodies:
        n = body.get("n") or 1
        if n > 1:
            n = min(n, max_choices or n)
            usage = choices_body(body, [responder({**body, "choice_index": i})
                                        for i in range(n)])["usage"]
        else:
            usage = completion_body(body, responder(body))["usage"]
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    return prompt, completion


def record_usage(result: Any) -> tuple[int, int]:
    usages = [step["usage"] for r in result for step in r["steps"].values()]
    return (sum(u["prompt_tokens"] for u in usages),
            sum(u["completion_tokens"] for u in usages))


def manifest_usage(result: Any) -> tuple[int, int]:
    tokens = result.manifest["tokens"]
    return tokens["prompt"], tokens["completion"]


POOL = [{"text": "bees"}, {"text": "tea"}, {"text": "rivers"}]


# ---- one request for N samples ---------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 8])
def test_run_samples_of_an_item_cost_one_request(tmp_path: Path, concurrency: int) -> None:
    """run.samples hands out the copies one by one (to one worker, or to several): one
    request with n per item, each copy its own choice, the usage counted once."""
    config = project(tmp_path, input_cost_per_million=2.0, output_cost_per_million=8.0)
    with FakeOpenAIServer(responder=answer) as server:
        result = pipe(config, server, samples=4).run_sync(POOL, concurrency_limit=concurrency)
        assert server.request_count == 3
        assert [b.get("n") for b in server.bodies] == [4, 4, 4]
        billed = server_usage(server)
    assert len(result) == 12 and len({r["key"] for r in result}) == 12
    assert len({r["output"] for r in result}) == 12  # every sample its own choice
    for r in result:
        assert r["output"].endswith(f"choice={r['sample_index']} seed=None")
        assert r["key"].endswith(f"#{r['sample_index']}")
        assert set(r["steps"]["s"]) >= {"output", "raw_response", "usage", "attempts",
                                        "cached", "latency_s", "model", "finish_reason"}
    assert manifest_usage(result) == billed == record_usage(result)
    assert result.manifest["calls"]["requests"] == 3
    assert result.manifest["cost_usd"] == pytest.approx((billed[0] * 2 + billed[1] * 8) / 1e6)
    first = [r for r in result if r["sample_index"] == 0]
    assert all(r["steps"]["s"]["usage"]["prompt_tokens"] > 0 for r in first)
    assert all(r["steps"]["s"]["usage"]["prompt_tokens"] == 0 for r in result
               if r["sample_index"] > 0)  # the prompt, billed once, is sample 0's


def test_records_look_as_they_do_without_sharing(tmp_path: Path) -> None:
    """The single-step form (the core template's records) and the steps form: the same
    fields with the option on (one request) as off (one request per sample)."""
    config = project(tmp_path)
    legacy_pool = [{"user_prompt_kwargs": item, "system_prompt_kwargs": {}} for item in POOL]
    shapes: dict[bool, Any] = {}
    with FakeOpenAIServer(responder=answer) as server:
        for share in (True, False):
            kw = {"samples": 3, "samples_in_one_request": share, "cache_salt": str(share),
                  "experiment_name": f"x{share}"}
            server.reset()
            single = DataGenerationPipeline(
                config=config, base_url=server.base_url,
                user_prompt_path=str(tmp_path / "prompts" / "s.txt"), **kw).run_sync(
                legacy_pool[:2])
            asked = server.request_count
            steps = pipe(config, server, **kw, then=True).run_sync(POOL[:1])
            shapes[share] = (asked, {frozenset(r) for r in single},
                             {frozenset(r) for r in steps},
                             {frozenset(t) for r in steps for t in r["steps"].values()})
            assert sorted(r["sample_index"] for r in single) == [0, 0, 1, 1, 2, 2]
    assert shapes[True][0] == 2 and shapes[False][0] == 6
    assert shapes[True][1:] == shapes[False][1:]


def test_step_samples_cost_one_request_at_their_step(tmp_path: Path) -> None:
    config = project(tmp_path)
    with FakeOpenAIServer(responder=answer) as server:
        result = pipe(config, server, step_samples=3, then=True).run_sync(POOL[:2])
        asked = Counter(b.get("n") for b in server.bodies)
        billed = server_usage(server)
    assert asked == {3: 2, None: 6}  # one n=3 request per item, then one per sample
    assert len(result) == 6 and len({r["output"] for r in result}) == 6
    assert sorted(r["steps"]["s"]["sample_index"] for r in result) == [0, 0, 1, 1, 2, 2]
    assert manifest_usage(result) == billed == record_usage(result)


@pytest.mark.parametrize("share", ["false", "auto"])  # auto: off for a base_url
def test_off_each_sample_sends_its_own_request(tmp_path: Path, share: str) -> None:
    config = project(tmp_path, share)
    with FakeOpenAIServer(responder=answer) as server:
        result = pipe(config, server, samples=3).run_sync(POOL[:2])
        run_level = server.request_count
        server.reset()
        steps = pipe(config, server, step_samples=3, experiment_name="b",
                     cache_salt="b").run_sync(POOL[:2])
        step_level = server.request_count
        assert not any("n" in b for b in server.bodies)
    assert run_level == 6 and step_level == 6 and len(result) == len(steps) == 6
    assert len({r["output"] for r in result}) == 6  # distinct by their seeds


def test_a_step_with_several_prompts_asks_per_sample(tmp_path: Path) -> None:
    """Its samples pick their prompt by key: their requests differ, so none is shared."""
    config = project(tmp_path)
    (tmp_path / "prompts" / "s2.txt").write_text("Regarding {{ text }}")
    with FakeOpenAIServer(responder=answer) as server:
        p = DataGenerationPipeline(config=config, base_url=server.base_url).step(
            "s", prompt=["s.txt", "s2.txt"], samples=4)
        result = p.run_sync(POOL[:1])
        assert server.request_count == 4 and not any("n" in b for b in server.bodies)
    assert len(result) == 4


def test_auto_is_on_only_for_openais_own_api() -> None:
    def on(**kw: Any) -> bool:
        return runtime.shares_samples(ModelConfig(**kw))

    assert on(provider="openai", model="gpt-4o-mini")
    assert on(provider="openai", model="gpt-4o-mini", transport="litellm")
    assert not on(provider="openai", model="m", base_url="http://127.0.0.1:8000/v1")
    assert not on(provider="local", model="smollm2")
    assert not on(provider="local", model="smollm2", base_url="http://127.0.0.1:8080/v1")
    assert not on(provider="anthropic", model="claude-x")
    assert not on(provider="deepseek", model="deepseek-chat")
    assert on(provider="openai", model="m", base_url="http://127.0.0.1:8000/v1",
              samples_in_one_request=True)  # vLLM, opted in
    assert not on(provider="openai", model="gpt-4o-mini", samples_in_one_request=False)


@pytest.mark.parametrize("model", [
    {"provider": "anthropic", "model": "claude-x"},
    {"provider": "local", "model": "smollm2", "base_url": None},
])
def test_true_where_it_cannot_work_stops_before_anything_is_written(
        tmp_path: Path, model: dict[str, Any]) -> None:
    config = project(tmp_path)
    with FakeOpenAIServer(responder=answer) as server:
        p = DataGenerationPipeline(config=config, **model).step("s", prompt="s.txt")
        with pytest.raises(ConfigError) as caught:
            p.run_sync(POOL)
        assert server.request_count == 0
    name = f"{model['provider']}/{model['model']}"
    assert f"model {name}: samples_in_one_request is true" in str(caught.value)
    assert "auto or false" in str(caught.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.jsonl"))


def test_a_named_model_of_another_provider_does_not_inherit_it(tmp_path: Path) -> None:
    config = project(tmp_path)
    config.write_text(config.read_text().replace(
        "output_data:", "models:\n  judge: {provider: anthropic, model: claude-x}\n"
        "  forced: {provider: anthropic, model: claude-y, samples_in_one_request: true}\n"
        "output_data:"))
    p = DataGenerationPipeline(config=config)
    assert p.settings.named_model("judge").samples_in_one_request == "auto"
    with pytest.raises(ConfigError, match="model anthropic/claude-y: samples_in_one"):
        p.step("s", prompt="s.txt", model="forced").run_sync(POOL)


# ---- resume, fewer choices, rejections, refusals --------------------------------------

def interrupted(p: DataGenerationPipeline, pool: list[dict[str, Any]], after: int) -> None:
    async def go() -> None:
        stream = p.stream(pool, concurrency_limit=1)
        n = 0
        async for _ in stream:
            n += 1
            if n >= after:
                break
        await stream.aclose()

    asyncio.run(go())


def test_resume_after_an_interruption_pays_nothing_for_an_answered_group(tmp_path: Path
                                                                         ) -> None:
    """The run stops (the stream left) while sample 1 of the first item is in its
    extractor: sample 0 is written, 1 and 2 are not. The resume sends one request, for
    the item never asked; the first item's missing samples take their choices from the
    run's own cache."""
    config = project(tmp_path)
    config.write_text(config.read_text() + "  cache: false\n")  # its own answers: kept
    hold = [True]

    async def text_of(text: str) -> str:
        if hold[0] and "t0 choice=1" in text:
            await asyncio.sleep(30)
        return text

    def samples(server: FakeOpenAIServer) -> DataGenerationPipeline:
        return DataGenerationPipeline(config=config, base_url=server.base_url,
                                      samples=3).step("s", prompt="s.txt", extract=text_of)

    pool = [{"text": "t0"}, {"text": "t1"}]
    with FakeOpenAIServer(responder=answer) as server:
        interrupted(samples(server), pool, after=1)
        assert [last_user_message(b) for b in server.bodies] == ["About t0"]
        server.reset()
        hold[0] = False
        result = samples(server).run_sync(pool, resume=True)
        assert [(last_user_message(b), b["n"]) for b in server.bodies] == [("About t1", 3)]
    assert result.counts["skipped_done"] == 1
    assert sorted((r["item"]["text"], r["sample_index"]) for r in result) == [
        ("t0", 1), ("t0", 2), ("t1", 0), ("t1", 1), ("t1", 2)]
    assert all(r["output"].endswith(f"choice={r['sample_index']} seed=None") for r in result)
    assert [r["steps"]["s"]["cached"] for r in result if r["item"]["text"] == "t0"] == [
        True, True]


def test_a_partly_done_group_gets_its_missing_choices_from_the_cache(tmp_path: Path
                                                                     ) -> None:
    """Sample 2's extractor failed (the answer kept: the user's code raised): on resume,
    its choice comes from the cached answer, nothing sent."""
    config = project(tmp_path)
    broken = [True]

    def text_of(text: str) -> str:
        if broken[0] and "choice=2" in text:
            raise ZeroDivisionError("oops")
        return text

    with FakeOpenAIServer(responder=answer) as server:
        def run(**kw: Any) -> Any:
            p = DataGenerationPipeline(config=config, base_url=server.base_url, samples=3)
            return p.step("s", prompt="s.txt", extract=text_of, max_retries=0).run_sync(
                POOL[:1], **kw)

        first = run()
        assert len(first) == 2 and first.counts["failed"] == 1
        assert server.request_count == 1
        broken[0] = False  # the user fixed their code
        again = run(resume=True)
        assert server.request_count == 1
    (record,) = again
    assert record["sample_index"] == 2 and record["output"].endswith("choice=2 seed=None")
    assert record["steps"]["s"]["cached"] is True


def test_a_rejected_choice_is_asked_again_on_its_own(tmp_path: Path) -> None:
    """Validation rejects sample 1's choice: it retries with its own request (no n, its
    own seed); the others keep theirs. Resumed after it failed for good, the rejected
    choice is not handed out again."""
    config = project(tmp_path)
    config.write_text(config.read_text() + "  cache: false\n")  # each run on its own

    def not_one(output: str, context: Any) -> bool:
        return "choice=1" not in output

    with FakeOpenAIServer(responder=answer) as server:
        def run(retries: int, **kw: Any) -> Any:
            p = DataGenerationPipeline(config=config, base_url=server.base_url, samples=3)
            return p.step("s", prompt="s.txt", max_retries=retries,
                          validate=not_one).run_sync(POOL[:1], **kw)

        result = run(1)
        bodies = list(server.bodies)
        assert len(bodies) == 2 and bodies[0]["n"] == 3
        assert "n" not in bodies[1] and bodies[1]["seed"] == 1  # sample 1's own
        assert sorted(r["output"].split(" ", 2)[2] for r in result) == [
            "choice=0 seed=None", "choice=2 seed=None", "choice=None seed=1"]
        assert [r["steps"]["s"]["validation_retries"] for r in
                sorted(result, key=lambda r: r["sample_index"])] == [0, 1, 0]
        server.reset()
        config.write_text(config.read_text().replace("experiment_name: sn",
                                                     "experiment_name: sn2"))
        failed = run(0)
        assert len(failed) == 2 and failed.counts["failed"] == 1
        assert server.request_count == 1
        resumed = run(0, resume=True)  # its rejected choice is not handed out again
        assert server.request_count == 2 and "n" not in server.bodies[1]
        assert server.bodies[1]["seed"] == 1
    (record,) = resumed
    assert record["sample_index"] == 1 and record["output"].endswith("choice=None seed=1")


@pytest.mark.parametrize("max_choices", [1, 2])
def test_fewer_choices_than_asked_fall_back_to_single_requests(tmp_path: Path,
                                                              max_choices: int) -> None:
    config = project(tmp_path)
    with FakeOpenAIServer(responder=answer, max_choices=max_choices) as server:
        result = pipe(config, server, samples=4).run_sync(POOL[:1])
        bodies = list(server.bodies)
        billed = server_usage(server, max_choices=max_choices)
    assert [b.get("n") for b in bodies] == [4] + [None] * (4 - max_choices)
    assert sorted(b.get("seed") for b in bodies[1:]) == list(range(max_choices, 4))
    assert len(result) == 4 and len({r["output"] for r in result}) == 4
    assert result.counts["failed"] == 0
    assert manifest_usage(result) == billed == record_usage(result)


def test_a_server_that_refuses_n_is_asked_per_sample_from_then_on(tmp_path: Path) -> None:
    def refuses_n(body: dict[str, Any]) -> str | FakeReply:
        if body.get("n"):
            return FakeReply(status=400, body={"error": {"message": "n must be 1"}})
        return answer(body)

    config = project(tmp_path)
    with FakeOpenAIServer(responder=refuses_n) as server:
        result = pipe(config, server, samples=2).run_sync(POOL, concurrency_limit=1)
        asked = [b.get("n") for b in server.bodies]
    assert asked == [2, None, None, None, None, None, None]
    assert len(result) == 6 and result.counts["failed"] == 0


def test_the_litellm_transport_reads_every_choice(tmp_path: Path) -> None:
    config = project(tmp_path, transport="litellm")
    with FakeOpenAIServer(responder=answer) as server:
        result = pipe(config, server, samples=3).run_sync(POOL[:2])
        assert [b.get("n") for b in server.bodies] == [3, 3]
        billed = server_usage(server)
    assert len(result) == 6 and len({r["output"] for r in result}) == 6
    assert manifest_usage(result) == billed == record_usage(result)


# ---- the parts ---------------------------------------------------------------------------

def test_n_is_part_of_the_cache_key() -> None:
    one = ChatRequest(model="openai/m", messages=[{"role": "user", "content": "hi"}])
    three = ChatRequest(model="openai/m", messages=one.messages, params={"n": 3})
    assert request_identity(one) != request_identity(three)


def test_usage_shares_add_up_to_the_servers_count() -> None:
    choices = (Choice("a" * 10, "stop"), Choice("b" * 31, "stop"), Choice("", "stop"))
    whole = Completion("a" * 10, "stop", Usage(17, 23), "m", choices=choices)
    shares = [whole.choice(i) for i in range(3)]
    assert all(s is not None for s in shares)
    usages = [s.usage for s in shares if s is not None]
    assert [u.prompt_tokens for u in usages] == [17, 0, 0]
    assert sum(u.completion_tokens for u in usages) == 23
    assert usages[1].completion_tokens > usages[0].completion_tokens > 0
    assert whole.choice(3) is None


def test_the_cache_keeps_every_choice_and_marks_a_rejected_one(tmp_path: Path) -> None:
    from datagen.llm.cache import ResponseCache

    cache = ResponseCache(tmp_path / "c.sqlite")
    choices = (Choice("x", "stop"), Choice("y", "length"))
    cache.put("k", Completion("x", "stop", Usage(5, 2), "m", choices=choices))
    cache.flush()
    cache.reject_choice("k", 1)
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")
    hit = again.get("k")
    again.close()
    assert hit is not None and hit.usage == Usage(5, 2)
    first = hit.choice(0)
    assert first is not None and first.text == "x"
    assert hit.choice(1) is None and hit.choices[1].finish_reason == "length"


class _SlowCaller:
    """Stands in for a model's caller: answers when told to, notes a cancellation."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = False
        self.go = asyncio.Event()

    async def call(self, request: ChatRequest, key: str | None) -> tuple[Completion, int]:
        self.calls += 1
        try:
            await self.go.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        texts = [f"answer {i}" for i in range(request.params["n"])]
        return Completion(texts[0], "stop", Usage(3, 6), "m",
                          choices=tuple(Choice(t, "stop") for t in texts)), 1

    def cached(self, key: str) -> Completion | None:
        return None


def _sharing_step(caller: _SlowCaller) -> Any:
    from datagen.plan import StepRuntime

    return StepRuntime(name="s", caller=caller, render=None,  # type: ignore[arg-type]
                       build_request=None, shared=True)  # type: ignore[arg-type]


def test_a_group_is_forgotten_once_each_sample_asked_or_gave_up() -> None:
    from datagen.engine.sharing import SharedRequests

    async def go() -> None:
        caller = _SlowCaller()
        step, shared = _sharing_step(caller), SharedRequests()
        request = ChatRequest(model="openai/m", messages=[], params={"n": 3})
        seats = [shared.seat(step, "k", 0, i, 3, 3) for i in range(3)]
        assert all(seat is not None for seat in seats)
        asking = [asyncio.ensure_future(shared.answer(step, seat, request, "id"))
                  for seat in seats[:2] if seat is not None]
        await asyncio.sleep(0.01)
        assert caller.calls == 1 and len(shared) == 1
        assert seats[2] is not None
        shared.leave(seats[2])  # it failed before asking (an input processor raised)
        assert len(shared) == 0  # each of the three asked or gave up
        caller.go.set()
        answers = await asyncio.gather(*asking)
        assert [a[0].text for a in answers if a is not None] == ["answer 0", "answer 1"]
        assert caller.calls == 1

    asyncio.run(go())


def test_a_shared_request_is_cancelled_with_the_last_sample_waiting_for_it() -> None:
    from datagen.engine.sharing import SharedRequests

    async def go() -> None:
        caller = _SlowCaller()
        step, shared = _sharing_step(caller), SharedRequests()
        request = ChatRequest(model="openai/m", messages=[], params={"n": 3})
        seats = [shared.seat(step, "k", 0, i, 3, 3) for i in range(3)]
        asking = [asyncio.ensure_future(shared.answer(step, seat, request, "id"))
                  for seat in seats[:2] if seat is not None]
        await asyncio.sleep(0.01)
        asking[0].cancel()
        await asyncio.sleep(0.01)
        assert not caller.cancelled  # sample 1 still waits for it
        asking[1].cancel()
        await asyncio.gather(*asking, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert caller.cancelled and caller.calls == 1
        late = seats[2]
        assert late is not None  # the third, arriving after: asks on its own
        assert await shared.answer(step, late, request, "id") is None
        assert len(shared) == 0

    asyncio.run(go())
