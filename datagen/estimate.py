"""The dry run: what a run would send, cost and take, with nothing sent.

Every prompt of the pool is rendered (or a seeded sample, extrapolated to the pool) and
its tokens counted: with the local model's own tokenizer for ``provider: local``, with
cl100k_base (offline) for everything else, plus the chat format's per-message overhead.
Completion tokens are bounded by ``max_tokens``; the cost is given for that bound and for
half of it (a typical answer). Steps after the first are rendered with stand-in outputs
(earlier steps' outputs do not exist yet), and a fan-out step counts ``fanout`` children
per item: both are estimates, said so in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datagen.config import ModelConfig, Settings
from datagen.costs import prices_for
from datagen.llm import runtime
from datagen.plan import ItemState, Plan, StepRuntime
from datagen.pool import PoolItem, checked_items, open_pool, seeded_sample
from datagen.steps import Step
from datagen.tokens import count_tokens
from datagen.usercode import arguments

MESSAGE_OVERHEAD = 4  # role and separators per chat message (OpenAI's and ChatML's ~4)
REPLY_PRIMING = 3


Counter = Callable[[list[dict[str, Any]] | None, str | None], int]


def token_counter(m: ModelConfig) -> Counter:
    """(messages, prompt) -> prompt tokens, as the model will see them."""
    if m.provider == "local":  # embedded, or served by llama.cpp: the same tokenizer
        try:
            from datagen.llm.local import runtime

            llm = runtime().model(m.model.removeprefix("local/"))
        except Exception:  # the local model is not installed: fall back to cl100k
            llm = None
        if llm is not None:
            def exact(messages: list[dict[str, str]] | None, prompt: str | None) -> int:
                # SmolLM2's own chat template (ChatML), tokenized by the model itself
                text = prompt if prompt is not None else "".join(
                    f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                    for m in messages or []) + "<|im_start|>assistant\n"
                return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

            return exact

    def approximate(messages: list[dict[str, str]] | None, prompt: str | None) -> int:
        if prompt is not None:
            return count_tokens(prompt)
        return sum(count_tokens(m["content"]) + MESSAGE_OVERHEAD
                   for m in messages or []) + REPLY_PRIMING

    return approximate


@dataclass
class StepEstimate:
    name: str
    model: str
    requests: float = 0.0
    prompt_tokens: float = 0.0
    max_completion_tokens: float = 0.0
    cost_max: float | None = 0.0
    cost_typical: float | None = 0.0
    approximate: bool = False


@dataclass
class Estimate:
    items: int
    sampled: int
    steps: list[StepEstimate] = field(default_factory=list)
    seconds_by_rate: float | None = None
    seconds_by_tokens: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return round(sum(s.prompt_tokens for s in self.steps))

    @property
    def requests(self) -> int:
        return round(sum(s.requests for s in self.steps))

    def cost(self, kind: str = "max") -> float | None:
        total = 0.0
        for s in self.steps:
            value = s.cost_max if kind == "max" else s.cost_typical
            if value is None:
                return None
            total += value
        return total

    def report(self) -> str:
        lines = [f"dry run: {self.items} items"
                 + (f" (rendered a seeded sample of {self.sampled}, extrapolated)"
                    if self.sampled < self.items else " (every prompt rendered)")]
        for s in self.steps:
            money = ("price unknown" if s.cost_max is None else
                     f"${s.cost_typical:.4f} typical, ${s.cost_max:.4f} at most")
            lines.append(f"  step {s.name} ({s.model}): {s.requests:.0f} requests, "
                         f"{s.prompt_tokens:.0f} prompt tokens, up to "
                         f"{s.max_completion_tokens:.0f} completion tokens; {money}"
                         + (" [estimated: depends on earlier outputs]" if s.approximate
                            else ""))
        cost = self.cost("max")
        lines.append(f"total: {self.requests} requests, {self.prompt_tokens} prompt tokens, "
                     + ("cost unknown (set model.input_cost_per_million / "
                        "output_cost_per_million)" if cost is None else
                        f"${self.cost('typical'):.4f} typical, ${cost:.4f} at most"))
        if self.seconds_by_rate is not None:
            lines.append(f"time: at least {self.seconds_by_rate:.0f} s at the request rate "
                         "limit")
        if self.seconds_by_tokens is not None:
            lines.append(f"time: at least {self.seconds_by_tokens:.0f} s at the token limit")
        return "\n".join(lines)


def limits_time(settings: Settings, models: list[ModelConfig], requests: float,
                tokens: float) -> tuple[float | None, float | None]:
    m = models[0] if models else settings.model
    rates = [r for r in (m.rate_limit, m.requests_per_minute / 60 if m.requests_per_minute
                         else None) if r]
    by_rate = requests / min(rates) if rates else None
    by_tokens = tokens / (m.tokens_per_minute / 60) if m.tokens_per_minute else None
    return by_rate, by_tokens


def step_estimate(name: str, m: ModelConfig, params: dict[str, Any],
                  rendered: list[int], scale: float, multiplier: float,
                  approximate: bool) -> StepEstimate:
    requests = len(rendered) * scale * multiplier
    prompt = sum(rendered) * scale * multiplier
    budget = params.get("max_tokens") or params.get("max_completion_tokens") or 1024
    completion = requests * budget
    prices = prices_for(m)
    if prices is None:
        cost_max = cost_typical = None
    else:
        cost_max = prompt * prices[0] + completion * prices[1]
        cost_typical = prompt * prices[0] + completion / 2 * prices[1]
    return StepEstimate(name, m.model_string(), requests, prompt, completion, cost_max,
                        cost_typical, approximate)


def _call_sync(fn: Callable[..., Any], *args: Any) -> Any:
    """A user's function from sync code: an async one runs on a loop of its own."""
    import asyncio
    import inspect

    result = fn(*arguments(fn, args))
    if not inspect.isawaitable(result):
        return result
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(result))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # inside a running loop: another thread's loop
        return pool.submit(asyncio.run, _awaited(result)).result()


async def _awaited(value: Any) -> Any:
    return await value


def _render_count(step: StepRuntime, item: PoolItem, stand_ins: dict[str, str],
                  count: Counter) -> int:
    """One item's prompt tokens at ``step``, rendered as the run would render it: with
    the step's input_processor applied (it may add what the template uses)."""
    state = ItemState(item=item, key=item.key, context=dict(item.user_kwargs))
    context: dict[str, Any] = {**state.context, **stand_ins}
    if step.input_processor is not None:
        context = dict(_call_sync(step.input_processor, context))
    context["error_message"] = None
    messages, prompt, _ = step.render(state, context, f"item {item.index}")
    return count(messages, prompt)


def dry_run(settings: Settings, plan: Plan, steps: list[Step], data_pool: Any,
            sample_size: int | None, seed: int, fanout: float) -> Estimate:
    """Render the pool's prompts (or a seeded sample, extrapolated) through the step
    runtimes a run would use, and count; nothing is sent (no connection opens)."""
    plan.check_models()  # a run would stop here (a prefill the model cannot take)
    pool = open_pool(data_pool)
    # every item checked as a run checks it (one place: pool.checked_items)
    items = checked_items(pool, plan.make_item, plan.check_item)
    chosen, total = seeded_sample(items, sample_size, seed)
    total *= settings.run.samples
    scale = total / len(chosen) if chosen else 0.0
    result = Estimate(items=total, sampled=len(chosen))
    callers = {name: runtime.make_caller(settings.named_model(name), 1, None)
               for name in plan.model_names}
    step_models = [step.model for step in steps] or [None]
    fan_out = {step.name: step.one_to_many for step in steps}
    multiplier = 1.0
    stand_ins: dict[str, str] = {}  # earlier steps' outputs do not exist yet
    for position, step_runtime in enumerate(plan.runtimes(callers)):
        m = settings.named_model(step_models[position])
        params = step_runtime.build_request([], None).params
        count = token_counter(m)
        counts = [_render_count(step_runtime, item, stand_ins, count) for item in chosen]
        result.steps.append(step_estimate(step_runtime.name, m, dict(params), counts, scale,
                                          multiplier, position > 0))
        budget = params.get("max_tokens") or 256
        stand_ins[step_runtime.name] = "word " * max(1, budget // 2)
        multiplier *= step_runtime.samples
        if fan_out.get(step_runtime.name):
            multiplier *= fanout
    tokens = sum(s.prompt_tokens + s.max_completion_tokens / 2 for s in result.steps)
    models = [settings.named_model(name) for name in plan.model_names]
    result.seconds_by_rate, result.seconds_by_tokens = limits_time(settings, models,
                                                                   result.requests, tokens)
    return result
