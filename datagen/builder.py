"""The step builder: ``pipeline.step(...)`` and ``pipeline.on_call(...)``, the half of
:class:`~datagen.pipeline.DataGenerationPipeline` that describes a multi-step pipeline
(the other half runs it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

from datagen import extract as extract_mod
from datagen.config import Settings
from datagen.errors import ConfigError, TemplateError
from datagen.prompts import StepPrompt, Syntax, find_prompt
from datagen.steps import DEFAULT_VALIDATION_RETRIES, CallEvent, Step

ExtractFunction = Callable[[str], Any]
PromptPath = str | PathLike[str]
B = TypeVar("B", bound="StepBuilder")


class StepBuilder:
    settings: Settings
    _steps: list[Step]
    _observers: dict[str, list[Callable[[CallEvent], Any]]]

    @property
    def syntax(self) -> Syntax:
        prompts = self.settings.prompts
        return Syntax(prompts.syntax, frozenset(prompts.literal_placeholders))

    @property
    def step_names(self) -> list[str]:
        """The names of the steps added with :meth:`step` (empty: the single-step form)."""
        return [step.name for step in self._steps]

    def step(
        self: B,
        name: str,
        prompt: PromptPath | Sequence[PromptPath],
        extract: ExtractFunction | None = None,
        validate: Callable[..., Any] | None = None,
        input_processor: Callable[..., Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        model: str | None = None,
        max_retries: int | None = None,
        one_to_many: bool = False,
        response_format: Any = None,
        system_prompt: PromptPath | None = None,
        mode: str = "chat",
        stop: list[str] | None = None,
        keep: Callable[..., Any] | None = None,
        samples: int = 1,
        syntax: str | None = None,
        batch: bool | None = None,
    ) -> B:
        """Add a step; returns the pipeline, so steps chain.

        ``prompt``: a ``.yaml`` chat prompt (a list of {role, content}, few-shot turns
        welcome, ending with the assistant's opening words for a prefill) or a ``.txt``
        user prompt (with ``system_prompt=`` a ``.txt`` system prompt), found in the
        pipeline's own ``prompts/`` first, then in ``prompts.dirs``. A list of prompts
        picks one per item, by its key (the same one on every run; the record says which).
        Templates see the item's fields, every earlier step's output under its name, and
        ``error_message``; ``syntax="format"`` reads them as str.format (``{name}``).
        ``extract`` turns the text into the step's output (default: the text, or
        ``response_format``'s model); ``validate(output, context)`` returns True, False,
        (False, reason) or a reason; a failure is retried with the reason in
        ``error_message`` up to ``max_retries`` (default 2). Returning ``DROP`` from the
        extractor or validator, or False from ``keep(output, context)``, drops the item (a
        filter: counted and listed, never a failure). ``model`` names a model of the
        config's ``models:`` section. ``one_to_many``: the output is a list, and each
        element continues through the later steps as its own item. ``samples=N``: N
        outputs per input, each continuing as its own item (asked in one request with
        ``n=N`` where ``model.samples_in_one_request`` is on). ``mode="completion"`` sends
        the rendered text to a text-completion endpoint (base models), with ``stop``.
        ``batch=True`` sends this step through the provider's batch API (default: the
        config's ``run.batch``).
        """
        self._check_step_args(name, mode, samples, max_retries, model)
        chosen = Syntax(syntax, self.syntax.literal) if syntax else self.syntax
        prompts = self._load_step_prompts(name, prompt, system_prompt, chosen)
        if extract is None and response_format is not None and not isinstance(
                response_format, dict):
            extract = extract_mod.json(response_format)
        step_sampling = dict(sampling or {})
        if stop is not None:
            step_sampling["stop"] = stop
        self._steps.append(Step(
            name=name, prompts=prompts, extract=extract, validate=validate, keep=keep,
            input_processor=input_processor, sampling=step_sampling, model=model,
            max_retries=DEFAULT_VALIDATION_RETRIES if max_retries is None else max_retries,
            one_to_many=one_to_many, samples=samples, batch=batch,
            response_format=response_format,
            mode="completion" if mode == "completion" else "chat"))
        return self

    def _check_step_args(self, name: str, mode: str, samples: int, max_retries: int | None,
                         model: str | None) -> None:
        if not name.isidentifier() or name in ("error_message", "item"):
            raise ConfigError(f"step name {name!r} must be a Python identifier (templates "
                              "use it as a variable) and not 'error_message' or 'item'")
        if any(existing.name == name for existing in self._steps):
            raise ConfigError(f"a step named {name!r} already exists")
        if mode not in ("chat", "completion"):
            raise ConfigError(f"step '{name}': mode must be 'chat' or 'completion'")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"step '{name}': samples must be a whole number >= 1, got "
                              f"{samples!r}")
        if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(
                max_retries, int) or max_retries < 0):
            raise ConfigError(f"step '{name}': max_retries must be a whole number >= 0, got "
                              f"{max_retries!r}")
        self.settings.named_model(model)  # an unknown name fails here, naming the model

    def _load_step_prompts(self, name: str, prompt: PromptPath | Sequence[PromptPath],
                           system_prompt: PromptPath | None, syntax: Syntax
                           ) -> tuple[StepPrompt, ...]:
        names = [prompt] if isinstance(prompt, (str, PathLike)) else list(prompt)
        if not names:
            raise ConfigError(f"step '{name}': prompt= is an empty list")
        search = self._prompt_dirs()
        try:
            system = find_prompt(system_prompt, search, name) if system_prompt else None
            return tuple(StepPrompt.load(find_prompt(one, search, name), system, syntax)
                         for one in names)
        except TemplateError as exc:
            text = str(exc)
            raise TemplateError(text if text.startswith("step '") else f"step '{name}': {text}"
                                ) from None

    def on_call(self: B, before: Callable[[CallEvent], Any] | None = None,
                after: Callable[[CallEvent], Any] | None = None) -> B:
        """Observers called before and after every LLM call with a :class:`CallEvent`
        (step, key, messages, response, usage, latency, cached, error)."""
        if before is not None:
            self._observers["before"].append(before)
        if after is not None:
            self._observers["after"].append(after)
        return self

    def _prompt_dirs(self) -> list[Path]:
        base = self.settings.config_path.parent if self.settings.config_path else Path.cwd()
        dirs = [base / "prompts"]
        for extra in self.settings.prompts.dirs:
            p = Path(extra).expanduser()
            dirs.append(p if p.is_absolute() else base / p)
        return [*dirs, base, Path.cwd()]
