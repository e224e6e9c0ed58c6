"""DataGenerationPipeline: config + prompts + a data pool -> a JSONL dataset on disk.

This module is the user's side: configuration, the step builder, and ``run()``, which
prepares a job (``datagen.prepare``: every check made before anything is sent, the run's
files) and hands it to an executor (``datagen.executors``), which runs the engine.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datagen import extract as extract_mod
from datagen import redact
from datagen.config import Settings, load_settings
from datagen.engine.job import Job, RunOptions
from datagen.errors import ConfigError, TemplateError
from datagen.estimate import Estimate
from datagen.llm import runtime
from datagen.plan import Plan
from datagen.plans import SingleStepPlan, StepsPlan
from datagen.prompts import ChatPrompt, StepPrompt, Syntax, find_prompt
from datagen.result import RunResult
from datagen.steps import DEFAULT_VALIDATION_RETRIES, CallEvent, Step

if TYPE_CHECKING:
    from datagen.streaming import RecordStream

log = logging.getLogger("datagen.pipeline")
ExtractFunction = Callable[[str], Any]
PromptPath = str | PathLike[str]


def register_secrets(settings: Settings) -> None:
    """Every credential of the configuration, for the redactor (see datagen.redact)."""
    models = [settings.model.model_dump(mode="python"), *settings.models.values()]
    for model in models:
        key = model.get("api_key")
        if key is not None and hasattr(key, "get_secret_value"):
            model = {**model, "api_key": key.get_secret_value()}
        redact.register_model(model)
    redact.register_credentials(settings.params, "params")
    redact.register_environment()


class DataGenerationPipeline:
    """A generation pipeline built from config.yaml and keyword overrides: the template's
    single-step form (prompts.user_prompt_path + system_prompt_path), or the steps added
    with :meth:`step`.

    ``config`` is the path of a YAML file (default ``./config.yaml``), a dict with the
    same sections, or ``None`` for keywords only. Every key can be overridden by a
    keyword: flat (``temperature=0.9``), dotted (``**{"model.temperature": 0.9}``) or a
    whole section (``output_data={...}``, merged over the file's).
    """

    def __init__(
        self,
        config: str | PathLike[str] | Mapping[str, Any] | None = "config.yaml",
        **overrides: Any,
    ) -> None:
        self.settings: Settings = load_settings(config, overrides)
        self._config_source: Any = (Path(config).expanduser().resolve()
                                    if isinstance(config, (str, PathLike)) else config)
        self._overrides = dict(overrides)
        register_secrets(self.settings)
        self._prompt: ChatPrompt | None = None
        if self.settings.prompts.user_prompt_path:
            self._prompt = self._load_prompt()
        self._steps: list[Step] = []
        self._observers: dict[str, list[Callable[[CallEvent], Any]]] = {"before": [],
                                                                         "after": []}

    # ---- builder helpers -------------------------------------------------------------

    @property
    def syntax(self) -> Syntax:
        prompts = self.settings.prompts
        return Syntax(prompts.syntax, frozenset(prompts.literal_placeholders))

    def _load_prompt(self) -> ChatPrompt:
        return ChatPrompt.from_files(
            self.settings.prompts.user_prompt_path, self.settings.prompts.system_prompt_path,
            self.syntax)

    @staticmethod
    def make_default_extractor(pattern_name: str = "draft") -> extract_mod.TagExtractor:
        """An extractor returning the stripped text of the first ``<pattern_name>`` block."""
        return extract_mod.make_default_extractor(pattern_name)

    def with_overrides(self, **overrides: Any) -> DataGenerationPipeline:
        """A copy of this pipeline (its steps and observers too) with more overrides,
        e.g. from the command line's ``--set``."""
        copy = DataGenerationPipeline(self._config_source, **{**self._overrides, **overrides})
        copy._steps = list(self._steps)
        copy._observers = {k: list(v) for k, v in self._observers.items()}
        return copy

    def transport_name(self) -> str:
        """Which transport serves the main model: 'openai' or 'anthropic' (datagen's fast
        paths), 'litellm', or a registered provider ('local', 'fake')."""
        return runtime.transport_name(self.settings.model)

    @property
    def step_names(self) -> list[str]:
        """The names of the steps added with :meth:`step` (empty: the single-step form)."""
        return [step.name for step in self._steps]

    # ---- multi-step builder ----------------------------------------------------------

    def step(
        self,
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
    ) -> DataGenerationPipeline:
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
        outputs per input, each continuing as its own item. ``mode="completion"`` sends
        the rendered text to a text-completion endpoint (base models), with ``stop``.
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
            one_to_many=one_to_many, samples=samples, response_format=response_format,
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

    def on_call(self, before: Callable[[CallEvent], Any] | None = None,
                after: Callable[[CallEvent], Any] | None = None) -> DataGenerationPipeline:
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

    # ---- running ---------------------------------------------------------------------

    def run_sync(self, data_pool: Any, **kwargs: Any) -> RunResult:
        """``run()`` for scripts without an event loop of their own."""
        return asyncio.run(self.run(data_pool, **kwargs))

    async def run(
        self,
        data_pool: Any,
        concurrency_limit: int | None = None,
        extract_function: ExtractFunction | None = None,
        parse_response: ExtractFunction | None = None,
        progress: bool | None = None,
        collect: bool = True,
        resume: bool | str | None = None,
        on_record: Callable[[dict[str, Any]], Any] | None = None,
        progress_callback: Callable[[str, float, str], Any] | None = None,
        executor: Any = "local",
    ) -> RunResult:
        """Generate one record per pool item; return a :class:`RunResult`: the records
        in input order (a list), with the run's ``files``, ``counts``, ``status`` and
        ``manifest``.

        Every record is appended to the results file as soon as its item finishes; items
        that fail (after retries, or in extraction) go to the failures file with the
        reason, dropped ones to the dropped file. ``resume=True`` (or ``run.resume`` in
        config) continues the newest run of this experiment, skipping items already done.
        With ``collect=False`` nothing is kept in memory (the result is an empty list
        with its counts). ``on_record`` (sync or async) is called with each record once
        it is on disk; ``progress_callback(task_id, fraction, message)`` as steps
        complete. ``executor``: "local" (this process) or "ray". An error that stops the
        run carries what was done as ``.result``.

        ``run()`` is :meth:`prepare` (every check, the run's files) then :meth:`execute`.
        """
        job = self.prepare(data_pool, concurrency_limit=concurrency_limit,
                           extract_function=extract_function, parse_response=parse_response,
                           progress=progress, collect=collect, resume=resume,
                           on_record=on_record, progress_callback=progress_callback,
                           executor=executor)
        return await self.execute(job, executor)

    def prepare(self, data_pool: Any, concurrency_limit: int | None = None,
                extract_function: ExtractFunction | None = None,
                parse_response: ExtractFunction | None = None, progress: bool | None = None,
                collect: bool = True, resume: bool | str | None = None,
                on_record: Callable[[dict[str, Any]], Any] | None = None,
                progress_callback: Callable[[str, float, str], Any] | None = None,
                executor: Any = "local") -> Job:
        """Everything :meth:`run` does before the first request: the checks (a bad pool,
        template or config raises here, before anything is sent or written), the run's
        files (``job.files``, locked), the callers. Hand the job to :meth:`execute`."""
        from datagen.executors import get_executor
        from datagen.prepare import prepare

        get_executor(executor)  # an unknown executor fails before anything is opened
        plan = self._plan(self._pick_extractor(extract_function, parse_response))
        options = self._options(collect, on_record, progress_callback)
        return prepare(self.settings, plan, data_pool, concurrency=concurrency_limit,
                       resume=resume, options=options, step_names=self.step_names,
                       progress=progress)

    async def execute(self, job: Job, executor: Any = "local") -> RunResult:
        """Run a prepared job to the disk (see :meth:`prepare`)."""
        from datagen.executors import get_executor

        result: RunResult = await get_executor(executor)(job)
        if result.counts["finished"] + result.counts["skipped_done"] == 0:
            message = "the data pool is empty: nothing was generated"
            log.warning(message)
            warnings.warn(message, stacklevel=2)
        return result

    def _options(self, collect: bool, on_record: Callable[[dict[str, Any]], Any] | None,
                 progress_callback: Callable[[str, float, str], Any] | None) -> RunOptions:
        run = self.settings.run
        return RunOptions(
            collect=collect, on_record=on_record, progress_callback=progress_callback,
            observers={k: list(v) for k, v in self._observers.items()}, debug=run.debug,
            meta_datagen=run.meta_datagen, shutdown_timeout=run.shutdown_timeout,
            user_code_timeout=run.user_code_timeout,
            fsync_interval=self.settings.output_data.fsync_interval,
            cache_salt=run.cache_salt)

    def estimate(self, data_pool: Any, sample_size: int | None = None, seed: int = 0,
                 extract_function: ExtractFunction | None = None, fanout: float = 1.0
                 ) -> Estimate:
        """The dry run: render the pool's prompts (or a seeded sample of ``sample_size``,
        extrapolated), count tokens, and estimate cost and the time the rate limits imply.
        Sends nothing. ``fanout``: children per item assumed for one_to_many steps.
        ``print(pipeline.estimate(pool).report())``."""
        from datagen.estimate import dry_run

        return dry_run(self.settings, self._plan(extract_function), self._steps, data_pool,
                       sample_size, seed, fanout)

    def stream(self, data_pool: Any, **kwargs: Any) -> RecordStream:
        """Run, yielding each record as soon as it is on disk (in the order items finish).

        Memory stays flat for any pool size: nothing is collected, and a consumer slower
        than the model holds the workers back instead of piling records up. Takes the
        keywords of :meth:`run` (but ``collect`` and ``on_record``); the run is prepared
        (checked, files opened: ``stream.files``) at once. Leaving the loop stops the run
        (the manifest says ``interrupted``; resume continues it); ``stream.result`` has
        the counts once it ends.
        """
        from datagen.streaming import RecordStream

        for name in ("collect", "on_record"):
            if name in kwargs:
                raise ConfigError(f"stream() does not take {name}=")
        executor = kwargs.get("executor", "local")
        job = self.prepare(data_pool, **kwargs)
        return RecordStream(job, lambda prepared: self.execute(prepared, executor))

    def _pick_extractor(self, extract_function: ExtractFunction | None,
                        parse_response: ExtractFunction | None) -> ExtractFunction | None:
        if extract_function is not None and parse_response is not None:
            raise ConfigError("pass either extract_function or parse_response, not both")
        chosen = extract_function if extract_function is not None else parse_response
        if chosen is not None and not callable(chosen):
            raise ConfigError(
                f"extract_function must be a callable taking the response text, "
                f"got {type(chosen).__name__}"
            )
        if self._steps and chosen is not None:
            raise ConfigError("a multi-step pipeline takes its extractors per step: "
                              ".step(..., extract=...), not run(extract_function=...)")
        return chosen

    def _plan(self, extractor: ExtractFunction | None) -> Plan:
        if self._steps:
            return StepsPlan(self.settings, self._steps)
        if self._prompt is None:
            self._prompt = self._load_prompt()
        return SingleStepPlan(self.settings, self._prompt, extractor)


__all__ = ["DataGenerationPipeline"]
