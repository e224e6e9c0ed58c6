"""What a run will do, settled before anything is sent: its steps, the models they use,
how items are read and checked, how records look, and the run's fingerprint.

Two plans share one engine. The single-step plan is the core template's form (items of
``user_prompt_kwargs`` / ``system_prompt_kwargs``, a system + user prompt pair, the
extractor from ``run()``, failure at the first extraction error): a pipeline of one step,
with the record shape that form promises. The steps plan is the builder's.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from datagen.config import ModelConfig, Settings, sampling_of
from datagen.errors import TemplateError
from datagen.llm import runtime
from datagen.llm.caller import Caller
from datagen.manifest import fingerprint
from datagen.plan import (
    ItemState,
    StepRuntime,
    legacy_failure,
    legacy_record,
    steps_failure,
    steps_record,
)  # fmt: skip
from datagen.pool import PoolItem, plain_item, to_item
from datagen.prompts import ChatPrompt, check_single_braces, environment
from datagen.steps import Step
from datagen.usercode import function_name

ExtractFunction = Callable[[str], Any]


def name_of(extractor: Any) -> str:
    return "raw" if extractor is None else function_name(extractor)


def endpoint_of(settings: Settings, names: list[str | None]) -> str:
    """Where a plan's requests go: for the fingerprint (resume refuses a switch)."""
    out = []
    for name in names:
        m = settings.named_model(name)
        out.append(f"{m.effective_provider()} @ {m.base_url or 'default endpoint'}")
    return ", ".join(dict.fromkeys(out))


def seeding(settings: Settings, name: str | None) -> tuple[bool, int]:
    """Whether samples of this model get distinct seeds (its transport sends a seed), and
    the seed they count from."""
    m = settings.named_model(name)
    takes_seed = runtime.transport_name(m) in ("openai", "local") or m.seed is not None
    return takes_seed, m.seed or 0


def shares_samples(m: ModelConfig, params: Mapping[str, Any], batch: bool) -> bool:
    """Whether a step's samples share one request with ``n`` (model.samples_in_one_request;
    not through a batch API, nor when the step's own parameters already set ``n``)."""
    return not batch and "n" not in params and runtime.shares_samples(m)


class SingleStepPlan:
    """The core template's single step."""

    STEP = "output"

    def __init__(self, settings: Settings, prompt: ChatPrompt,
                 extractor: ExtractFunction | None) -> None:
        self.settings, self.prompt, self.extractor = settings, prompt, extractor
        self.model_names: list[str | None] = [None]
        self.extractor_name = name_of(extractor)
        self.fingerprint = fingerprint(
            model=settings.model.model_string(), endpoint=endpoint_of(settings, [None]),
            sampling=settings.sampling_params(),
            templates={"user": prompt.user.source,
                       "system": prompt.system.source if prompt.system else None},
            extractor=self.extractor_name)

    def make_item(self, index: int, raw: Any, fresh: bool = False) -> PoolItem:
        return to_item(index, raw, fresh)

    def batch_steps(self) -> dict[str, str | None]:
        return {self.STEP: None} if self.settings.run.batch else {}

    def check_item(self, item: PoolItem) -> None:
        self.prompt.check(item.user_kwargs, item.system_kwargs, f"item {item.index}")

    def check_models(self) -> None:
        runtime.check_provider(self.settings.model)

    def record(self, state: ItemState) -> dict[str, Any]:
        return legacy_record(state)

    def failure(self, state: ItemState, step: str, error: dict[str, Any]) -> dict[str, Any]:
        return legacy_failure(state, step, error)

    def runtimes(self, callers: dict[str | None, Caller]) -> list[StepRuntime]:
        m = self.settings.model
        sampling = self.settings.sampling_params()
        params = {**sampling, **runtime.constraint_params(m, self.extractor, sampling)}
        prompt = self.prompt

        def render(state: ItemState, context: Mapping[str, Any], where: str
                   ) -> tuple[list[dict[str, Any]], None, None]:
            item = state.item
            return prompt.messages(item.user_kwargs, item.system_kwargs, where), None, None

        seeded, base = seeding(self.settings, None)
        batch = self.settings.run.batch
        return [StepRuntime(name=self.STEP, caller=callers[None], render=render,
                            build_request=runtime.request_builder(m, params),
                            extract=self.extractor, max_retries=0, seeded=seeded,
                            base_seed=base, batch=batch,
                            unsent_constraint=runtime.unsent_constraint(
                                m, self.extractor, sampling),
                            shared=shares_samples(m, params, batch))]


class StepsPlan:
    """A pipeline built with ``.step()``."""

    def __init__(self, settings: Settings, steps: list[Step]) -> None:
        self.settings, self.steps = settings, steps
        self.model_names = list(dict.fromkeys(step.model for step in steps))
        self.extractor_name = ", ".join(f"{s.name}:{name_of(s.extract)}" for s in steps)
        templates: dict[str, str | None] = {}
        sampling: dict[str, Any] = {}
        for step in steps:
            for v, variant in enumerate(step.prompts):
                for i, (role, template) in enumerate(variant.messages):
                    suffix = f"<{v}>" if len(step.prompts) > 1 else ""
                    templates[f"{step.name}{suffix}[{i}].{role}"] = template.source
            sampling[step.name] = {**sampling_of(settings.named_model(step.model)),
                                   **step.sampling, "mode": step.mode,
                                   "max_retries": step.max_retries,
                                   "one_to_many": step.one_to_many,
                                   "samples": step.samples}
        self.fingerprint = fingerprint(
            model=", ".join(settings.named_model(n).model_string() for n in self.model_names),
            endpoint=endpoint_of(settings, self.model_names),
            sampling=sampling, templates=templates, extractor=self.extractor_name)
        self._globals = frozenset(environment().globals)

    def make_item(self, index: int, raw: Any, fresh: bool = False) -> PoolItem:
        return plain_item(index, raw, fresh)

    def record(self, state: ItemState) -> dict[str, Any]:
        return steps_record(state)

    def failure(self, state: ItemState, step: str, error: dict[str, Any]) -> dict[str, Any]:
        return steps_failure(state, step, error)

    def check_models(self) -> None:
        for name in self.model_names:
            runtime.check_provider(self.settings.named_model(name))
        for step in self.steps:
            if any(prompt.has_prefill for prompt in step.prompts):
                runtime.check_prefill(self.settings.named_model(step.model), step.name)

    def check_item(self, item: PoolItem) -> None:
        """Every step's template variables must be the item's fields or earlier steps'
        names (checked statically: later steps' values do not exist yet). A step with an
        input_processor is checked with the fields the processor adds, if it can be run
        on stand-ins; else not checked (it may add fields)."""
        available = set(item.user_kwargs) | {"error_message"} | self._globals
        done: list[str] = []
        for step in self.steps:
            for prompt in step.prompts:
                check_single_braces(prompt, available | set(done), f"step '{step.name}'")
            if step.input_processor is None:
                missing = sorted(step.variables - available)
                if missing and not self._renders(step, item, done):
                    raise TemplateError(_undefined_message(step, item, missing, done))
            available.add(step.name)
            done.append(step.name)

    @staticmethod
    def _renders(step: Step, item: PoolItem, earlier: list[str]) -> bool:
        """Whether the templates render anyway (their missing names guarded with
        ``is defined`` or ``default``), with stand-ins for earlier steps' outputs."""
        context = {**item.user_kwargs, **dict.fromkeys(earlier, ""), "error_message": None}
        try:
            for prompt in step.prompts:
                prompt.render(context, f"step '{step.name}', item {item.index}")
        except TemplateError:
            return False
        return True

    def batch_steps(self) -> dict[str, str | None]:
        run_wide = self.settings.run.batch
        return {step.name: step.model for step in self.steps
                if (run_wide if step.batch is None else step.batch)}

    def runtimes(self, callers: dict[str | None, Caller]) -> list[StepRuntime]:
        out = []
        for step in self.steps:
            m = self.settings.named_model(step.model)
            sampling = {**sampling_of(m), **step.sampling,
                        **runtime.response_format_params(step.response_format)}
            prefill, constraint = None, True
            if any(prompt.has_prefill for prompt in step.prompts):
                prefill = fixed_prefill(step)
                constraint = prefill is not None  # opening words that vary: none sent
            params = {**sampling, **(runtime.constraint_params(m, step.extract, sampling,
                                                               prefill) if constraint else {})}
            seeded, base = seeding(self.settings, step.model)
            batch = self.settings.run.batch if step.batch is None else step.batch
            out.append(StepRuntime(
                name=step.name, caller=callers[step.model], render=_renderer(step),
                build_request=runtime.request_builder(m, params), extract=step.extract,
                validate=step.validate, keep=step.keep, input_processor=step.input_processor,
                max_retries=step.max_retries, one_to_many=step.one_to_many,
                samples=step.samples, seeded=seeded, batch=batch,
                base_seed=int(step.sampling.get("seed", base) or 0),
                unsent_constraint=runtime.unsent_constraint(m, step.extract, sampling),
                # several prompts: its samples pick theirs by key, and ask apart
                shared=len(step.prompts) == 1 and shares_samples(m, params, batch)))
        return out


def _undefined_message(step: Step, item: PoolItem, missing: list[str], earlier: list[str]
                       ) -> str:
    """Which names, where (the file, and the message of a chat file), what the item has,
    and the fix for the template's syntax."""
    places = list(dict.fromkeys(str(template.path) for prompt in step.prompts
                                for _, template in prompt.messages
                                if template.variables & set(missing)))
    keys = ", ".join(sorted(map(str, item.user_kwargs))) or "none"
    close = [f"'{name}' (did you mean '{match[0]}'?)" if match else f"'{name}'"
             for name in missing
             for match in [difflib.get_close_matches(name, [*map(str, item.user_kwargs),
                                                           *earlier], n=1)]]
    text = (f"step '{step.name}': {', '.join(places)}: variable(s) {', '.join(missing)} "
            f"undefined for item {item.index}: neither a field of the item (its keys: "
            f"{keys}) nor the name of an earlier step ({', '.join(earlier) or 'none'}): "
            f"{', '.join(close)}.")
    if any(template.syntax == "format" for prompt in step.prompts
           for _, template in prompt.messages):
        shown = ", ".join("{" + name + "}" for name in missing)
        text += (f" If {shown} is text to send as written, list it in "
                 "prompts.literal_placeholders (or write it with doubled braces).")
    else:
        text += " Add it to the item, or guard it: {% if name is defined %}."
    return text


def fixed_prefill(step: Step) -> str | None:
    """The assistant's opening words of a step's prompts when they are the same fixed text
    in every variant (None when they vary or use variables)."""
    texts = set()
    for prompt in step.prompts:
        role, template = prompt.messages[-1]
        if role != "assistant" or template.variables:
            return None
        texts.add(template.render({}, "the prefill"))
    return texts.pop() if len(texts) == 1 else None


def _renderer(step: Step) -> Callable[..., tuple[Any, Any, Any]]:
    prompts, name, completion = step.prompts, step.name, step.mode == "completion"
    names = [str(p.files[-1].name) for p in prompts] if len(prompts) > 1 else None

    def render(state: ItemState, context: Mapping[str, Any], where: str
               ) -> tuple[list[dict[str, Any]] | None, str | None, str | None]:
        where = f"step '{name}', {where}"
        chosen = state.choice(len(prompts)) if names else 0
        prompt, label = prompts[chosen], (names[chosen] if names else None)
        if completion:
            return None, prompt.render_text(context, where), label
        return prompt.render(context, where), None, label

    return render
