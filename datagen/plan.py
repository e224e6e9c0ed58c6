"""What a run will do, settled before anything is sent: its steps, the models they use,
how items are read and checked, how records look, and the run's fingerprint.

Two plans share one engine. The single-step plan is the core template's form (items of
``user_prompt_kwargs`` / ``system_prompt_kwargs``, a system + user prompt pair, the
extractor from ``run()``, failure at the first extraction error): it is a pipeline of one
step, with the record shape that form promises. The steps plan is the builder's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from datagen.config import Settings
from datagen.engine import ItemState, StepRuntime
from datagen.errors import DataPoolError, TemplateError, a_type
from datagen.llm import runtime
from datagen.llm.caller import Caller
from datagen.manifest import fingerprint
from datagen.pool import PoolItem, to_item
from datagen.prompts import ChatPrompt, environment
from datagen.steps import Step

ExtractFunction = Callable[[str], Any]


def name_of(extractor: Any) -> str:
    if extractor is None:
        return "raw"
    name = getattr(extractor, "name", None) or getattr(extractor, "__qualname__", None)
    return str(name or type(extractor).__name__)


# ---- record shapes ----------------------------------------------------------------

def legacy_record(state: ItemState) -> dict[str, Any]:
    """The single-step record (the shape the core template promises)."""
    (trace,) = state.trace.values()
    return {**_legacy_inputs(state), "output": trace["output"],
            **{k: trace[k] for k in ("raw_response", "model", "finish_reason", "usage",
                                     "latency_s", "attempts", "cached", "messages")}}


def legacy_failure(state: ItemState, step: str, error: dict[str, Any]) -> dict[str, Any]:
    return {**_legacy_inputs(state), "error": error}


def _legacy_inputs(state: ItemState) -> dict[str, Any]:
    item = state.item
    record: dict[str, Any] = {"index": item.index, "key": state.key,
                              "user_prompt_kwargs": item.user_kwargs,
                              "system_prompt_kwargs": item.system_kwargs}
    if item.meta:
        record["meta"] = item.meta
    return record


def steps_record(state: ItemState) -> dict[str, Any]:
    """A multi-step record: the item, every step's trace, the last step's output."""
    last = list(state.trace)[-1]
    return {"index": state.item.index, "key": state.key, "item": state.context,
            "output": state.trace[last].get("output"), "steps": state.trace}


def steps_failure(state: ItemState, step: str, error: dict[str, Any]) -> dict[str, Any]:
    return {"index": state.item.index, "key": state.key, "item": state.context,
            "step": step, "error": {**error, "step": step}, "steps": state.trace}


class RunPlan(Protocol):
    model_names: list[str | None]
    fingerprint: dict[str, Any]
    extractor_name: str

    def make_item(self, index: int, raw: Any) -> PoolItem: ...

    def check_item(self, item: PoolItem) -> None: ...

    def runtimes(self, callers: dict[str | None, Caller]) -> list[StepRuntime]: ...

    def make_record(self, state: ItemState) -> dict[str, Any]: ...

    def make_failure(self, state: ItemState, step: str, error: dict[str, Any]
                     ) -> dict[str, Any]: ...


class SingleStepPlan:
    """The core template's single step."""

    STEP = "output"

    def __init__(self, settings: Settings, prompt: ChatPrompt,
                 extractor: ExtractFunction | None) -> None:
        self.settings, self.prompt, self.extractor = settings, prompt, extractor
        self.model_names: list[str | None] = [None]
        self.extractor_name = name_of(extractor)
        self.fingerprint = fingerprint(
            model=settings.model.model_string(), sampling=settings.sampling_params(),
            templates={"user": prompt.user.source,
                       "system": prompt.system.source if prompt.system else None},
            extractor=self.extractor_name)
        self.make_record = legacy_record
        self.make_failure = legacy_failure

    def make_item(self, index: int, raw: Any) -> PoolItem:
        return to_item(index, raw)

    def check_item(self, item: PoolItem) -> None:
        self.prompt.check(item.user_kwargs, item.system_kwargs, f"item {item.index}")

    def runtimes(self, callers: dict[str | None, Caller]) -> list[StepRuntime]:
        m = self.settings.model
        sampling = self.settings.sampling_params()
        params = {**sampling, **runtime.constraint_params(m, self.extractor, sampling)}
        prompt = self.prompt

        def render(state: ItemState, context: dict[str, Any], where: str
                   ) -> tuple[list[dict[str, str]], None]:
            item = state.item
            return prompt.messages(item.user_kwargs, item.system_kwargs, where), None

        return [StepRuntime(name=self.STEP, caller=callers[None], render=render,
                            build_request=runtime.request_builder(m, params),
                            extract=self.extractor, max_retries=0)]


def _plain_item(index: int, raw: Any) -> PoolItem:
    if not isinstance(raw, Mapping):
        raise DataPoolError(f"data pool item {index} is {a_type(raw)}, not a dict. Items of a "
                            "multi-step pipeline are dicts of fields the templates use.")
    return PoolItem(index, raw, {}, {})


class StepsPlan:
    """A pipeline built with ``.step()``."""

    def __init__(self, settings: Settings, steps: list[Step]) -> None:
        self.settings, self.steps = settings, steps
        self.model_names = list(dict.fromkeys(step.model for step in steps))
        self.extractor_name = ", ".join(f"{s.name}:{name_of(s.extract)}" for s in steps)
        templates: dict[str, str | None] = {}
        sampling: dict[str, Any] = {}
        for step in steps:
            for i, (role, template) in enumerate(step.prompt.messages):
                templates[f"{step.name}[{i}].{role}"] = template.source
            sampling[step.name] = {**runtime.sampling_of(settings.named_model(step.model)),
                                   **step.sampling, "mode": step.mode,
                                   "max_retries": step.max_retries,
                                   "one_to_many": step.one_to_many}
        self.fingerprint = fingerprint(
            model=", ".join(settings.named_model(n).model_string() for n in self.model_names),
            sampling=sampling, templates=templates, extractor=self.extractor_name)
        self._globals = frozenset(environment().globals)
        self.make_record = steps_record
        self.make_failure = steps_failure

    def make_item(self, index: int, raw: Any) -> PoolItem:
        return _plain_item(index, raw)

    def check_item(self, item: PoolItem) -> None:
        """Every step's template variables must be the item's fields or earlier steps'
        names (checked statically: later steps' values do not exist yet). A step with an
        input_processor is not checked: it may add fields."""
        available = set(item.user_kwargs) | {"error_message"} | self._globals
        done: list[str] = []
        for step in self.steps:
            if step.input_processor is None:
                missing = sorted(step.prompt.variables - available)
                if missing and not self._renders(step, item, done):
                    files = ", ".join(str(f) for f in step.prompt.files)
                    keys = ", ".join(sorted(map(str, item.user_kwargs))) or "none"
                    raise TemplateError(
                        f"step '{step.name}': {files}: variable(s) {', '.join(missing)} "
                        f"undefined for item {item.index}: neither a field of the item (its "
                        f"keys: {keys}) nor the name of an earlier step")
            available.add(step.name)
            done.append(step.name)

    @staticmethod
    def _renders(step: Step, item: PoolItem, earlier: list[str]) -> bool:
        """Whether the template renders anyway (its missing names guarded with
        ``is defined`` or ``default``), with stand-ins for earlier steps' outputs."""
        context = {**item.user_kwargs, **dict.fromkeys(earlier, ""), "error_message": None}
        try:
            step.prompt.render(context, f"step '{step.name}', item {item.index}")
        except TemplateError:
            return False
        return True

    def runtimes(self, callers: dict[str | None, Caller]) -> list[StepRuntime]:
        out = []
        for step in self.steps:
            m = self.settings.named_model(step.model)
            sampling = {**runtime.sampling_of(m), **step.sampling,
                        **runtime.response_format_params(step.response_format)}
            params = {**sampling, **runtime.constraint_params(m, step.extract, sampling)}
            out.append(StepRuntime(
                name=step.name, caller=callers[step.model], render=_renderer(step),
                build_request=runtime.request_builder(m, params), extract=step.extract,
                validate=step.validate, input_processor=step.input_processor,
                max_retries=step.max_retries, one_to_many=step.one_to_many))
        return out


def _renderer(step: Step) -> Callable[..., tuple[Any, Any]]:
    prompt, name, completion = step.prompt, step.name, step.mode == "completion"

    def render(state: ItemState, context: dict[str, Any], where: str
               ) -> tuple[list[dict[str, str]] | None, str | None]:
        where = f"step '{name}', {where}"
        if completion:
            return None, prompt.render_text(context, where)
        return prompt.render(context, where), None

    return render
