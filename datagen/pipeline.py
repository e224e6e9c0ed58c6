"""DataGenerationPipeline: config + prompts + a data pool -> a JSONL dataset on disk.

This module is the user's side: configuration, prompt loading, the checks made before
anything is sent, and the choice of run files (new, or the one being resumed). The
engine (``datagen.engine``) then carries every item to the disk.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from datagen import extract as extract_mod
from datagen import redact
from datagen.cache import ResponseCache
from datagen.config import Settings, load_settings
from datagen.engine import Engine, RunContext
from datagen.errors import ConfigError, TemplateError
from datagen.estimate import Estimate
from datagen.llm import runtime
from datagen.llm.errors import CallError
from datagen.manifest import check_resume, read_manifest
from datagen.plan import RunPlan, SingleStepPlan, StepsPlan
from datagen.pool import ItemSource, open_pool
from datagen.progress import make_display
from datagen.prompts import ChatPrompt
from datagen.runlog import RunLog
from datagen.steps import DEFAULT_VALIDATION_RETRIES, CallEvent, Step
from datagen.store import JsonlSink, RunFiles, read_index, repair_torn_tail

log = logging.getLogger("datagen.pipeline")
ExtractFunction = Callable[[str], Any]
CACHE_FILE = ".datagen_cache.sqlite"


def _version() -> str:
    from datagen import __version__

    return __version__


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
        api_key = self.settings.model.api_key
        redact.register(api_key.get_secret_value() if api_key else None)
        redact.register_environment()
        self._prompt: ChatPrompt | None = None
        if self.settings.prompts.user_prompt_path:
            self._prompt = self._load_prompt()
        self.last_run_files: RunFiles | None = None
        self._steps: list[Step] = []
        self._observers: dict[str, list[Callable[[CallEvent], Any]]] = {"before": [],
                                                                         "after": []}

    # ---- builder helpers -------------------------------------------------------------

    def _load_prompt(self) -> ChatPrompt:
        return ChatPrompt.from_files(
            self.settings.prompts.user_prompt_path, self.settings.prompts.system_prompt_path
        )

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
        """'openai' (the fast aiohttp path) or 'litellm', as model.transport resolves."""
        return runtime.transport_name(self.settings.model)

    @property
    def step_names(self) -> list[str]:
        """The names of the steps added with :meth:`step` (empty: the single-step form)."""
        return [step.name for step in self._steps]

    # ---- multi-step builder ----------------------------------------------------------

    def step(
        self,
        name: str,
        prompt: str | PathLike[str],
        extract: ExtractFunction | None = None,
        validate: Callable[..., Any] | None = None,
        input_processor: Callable[..., Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        model: str | None = None,
        max_retries: int | None = None,
        one_to_many: bool = False,
        response_format: Any = None,
        system_prompt: str | PathLike[str] | None = None,
        mode: str = "chat",
        stop: list[str] | None = None,
    ) -> DataGenerationPipeline:
        """Add a step; returns the pipeline, so steps chain.

        ``prompt``: a ``.yaml`` chat prompt (a list of {role, content}, few-shot turns
        welcome) or a ``.txt`` user prompt (with ``system_prompt=`` a ``.txt`` system
        prompt), found in the pipeline's own ``prompts/`` first, then in ``prompts.dirs``.
        Templates see the item's fields, every earlier step's output under its name, and
        ``error_message``. ``extract`` turns the text into the step's output (default: the
        text, or ``response_format``'s model); ``validate(output, context)`` returns True,
        False, (False, reason) or a reason; a failure is retried with the reason in
        ``error_message`` up to ``max_retries`` (default 2). ``model`` names a model of
        the config's ``models:`` section. ``one_to_many``: the output is a list, and each
        element continues through the later steps as its own item. ``mode="completion"``
        sends the rendered text to a text-completion endpoint (base models), with ``stop``.
        """
        from datagen.prompts import StepPrompt, find_prompt

        if not name.isidentifier() or name in ("error_message", "item"):
            raise ConfigError(f"step name {name!r} must be a Python identifier (templates "
                              "use it as a variable) and not 'error_message' or 'item'")
        if any(existing.name == name for existing in self._steps):
            raise ConfigError(f"a step named {name!r} already exists")
        if mode not in ("chat", "completion"):
            raise ConfigError(f"step '{name}': mode must be 'chat' or 'completion'")
        self.settings.named_model(model)  # an unknown name fails here, naming the step's model
        search = self._prompt_dirs()
        try:
            files = find_prompt(prompt, search, name)
            system = find_prompt(system_prompt, search, name) if system_prompt else None
            loaded = StepPrompt.load(files, system)
        except TemplateError as exc:
            text = str(exc)
            raise TemplateError(text if text.startswith("step '") else f"step '{name}': {text}"
                                ) from None
        if extract is None and response_format is not None and not isinstance(
                response_format, dict):
            extract = extract_mod.json(response_format)
        step_sampling = dict(sampling or {})
        if stop is not None:
            step_sampling["stop"] = stop
        self._steps.append(Step(
            name=name, prompt=loaded, extract=extract, validate=validate,
            input_processor=input_processor, sampling=step_sampling, model=model,
            max_retries=DEFAULT_VALIDATION_RETRIES if max_retries is None else max_retries,
            one_to_many=one_to_many, response_format=response_format,
            mode="completion" if mode == "completion" else "chat"))
        return self

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

    def run_sync(self, data_pool: Any, **kwargs: Any) -> list[dict[str, Any]]:
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
    ) -> list[dict[str, Any]]:
        """Generate one record per pool item; return the successful records in input order.

        Every record is appended to the results file as soon as its item finishes; items
        that fail (after retries, or in extraction) go to the failures file with the
        reason. ``resume=True`` (or ``run.resume`` in config) continues the newest run of
        this experiment, skipping items already in its results. With ``collect=False``
        nothing is kept in memory and ``[]`` is returned. ``on_record`` (sync or async) is
        called with each record once it is on disk; ``progress_callback(task_id, fraction,
        message)`` as steps complete (task_id: the step's name).
        """
        extractor = self._pick_extractor(extract_function, parse_response)
        if self._steps and extractor is not None:
            raise ConfigError("a multi-step pipeline takes its extractors per step: "
                              ".step(..., extract=...), not run(extract_function=...)")
        concurrency = concurrency_limit or self.settings.run.concurrency_limit
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency_limit must be a whole number >= 1, got {concurrency!r}")
        resume = self.settings.run.resume if resume is None else resume
        if resume not in (True, False, "force"):
            raise ConfigError(f"resume must be True, False or 'force', got {resume!r}")
        plan = self._plan(extractor)
        pool = open_pool(data_pool)
        if pool.reiterable:  # every item checked before anything is sent; and counted
            count = 0
            for count, raw in enumerate(pool.raw_items(), start=1):
                plan.check_item(plan.make_item(count - 1, raw))
            pool.total = count
        for name in plan.model_names:
            runtime.check_provider(self.settings.named_model(name))

        files, done_keys = self._open_run_files(resume, plan.fingerprint)
        self.last_run_files = files
        show = self.settings.run.progress if progress is None else progress
        run = self.settings.run
        cache = None
        if run.cache:
            cache = ResponseCache(run.cache_path or Path(self.settings.output_data.output_dir)
                                  / CACHE_FILE)
        callers = {name: runtime.make_caller(self.settings.named_model(name), concurrency,
                                             cache) for name in plan.model_names}
        model = self.settings.model
        ctx = RunContext(
            steps=plan.runtimes(callers),
            make_record=plan.make_record,
            make_failure=plan.make_failure,
            check_item=plan.check_item,
            files=files,
            results_sink=JsonlSink(files.results, self.settings.output_data.fsync_interval),
            failures_sink=JsonlSink(files.failures, self.settings.output_data.fsync_interval),
            display=make_display(show, self.settings.output_data.experiment_name,
                                 [step.name for step in self._steps]),
            prechecked=pool.reiterable,
            collect=collect,
            done_keys=done_keys,
            cache_salt=run.cache_salt,
            shutdown_timeout=run.shutdown_timeout,
            fatal_message=self._fatal_message,
            on_record=on_record,
            observers={k: list(v) for k, v in self._observers.items()},
            debug_dir=files.results.with_name(files.results.stem + "_debug") if run.debug
            else None,
            progress_callback=progress_callback,
            meta_sink=JsonlSink(files.results.with_name(files.results.stem + "_meta.jsonl"),
                                self.settings.output_data.fsync_interval)
            if run.meta_datagen else None,
            manifest_base={"datagen_version": _version(), "model": model.model_string(),
                           "extractor": plan.extractor_name, "fingerprint": plan.fingerprint,
                           "resumed": bool(done_keys), "config": self.settings.public_dict()},
        )
        engine = Engine(ctx, ItemSource(pool, plan.make_item))
        try:
            with RunLog(files.log):
                log.info("run started: model %s, %s items, concurrency %d, output %s%s",
                         model.model_string(),
                         pool.total if pool.total is not None else "unknown", concurrency,
                         files.results,
                         f" (resuming: {len(done_keys)} done)" if done_keys else "")
                await engine.run(concurrency, pool.total)
        finally:
            for caller in callers.values():
                await caller.transport.aclose()
            if cache is not None:
                cache.close()
        counts = engine.counts
        if counts.succeeded + counts.failed + counts.skipped == 0:
            message = "the data pool is empty: nothing was generated"
            log.warning(message)
            warnings.warn(message, stacklevel=2)
        return [engine.results[i] for i in sorted(engine.results)]

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

    async def stream(self, data_pool: Any, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """Run, yielding each record as soon as it is on disk (in the order items finish).

        Memory stays flat for any pool size: nothing is collected, and a consumer slower
        than the model holds the workers back instead of piling records up. Takes the
        keywords of :meth:`run` (but ``collect`` and ``on_record``). Breaking out of the
        loop stops the run (the manifest says ``interrupted``; resume continues it).
        """
        for name in ("collect", "on_record"):
            if name in kwargs:
                raise ConfigError(f"stream() does not take {name}=")
        concurrency = kwargs.get("concurrency_limit") or self.settings.run.concurrency_limit
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * concurrency)
        finished = object()

        async def produce() -> None:
            try:
                await self.run(data_pool, collect=False, on_record=queue.put, **kwargs)
            except asyncio.CancelledError:
                raise  # the consumer left: nobody is waiting for the end marker
            except BaseException:
                await queue.put(finished)
                raise
            await queue.put(finished)

        task = asyncio.ensure_future(produce())
        try:
            while (record := await queue.get()) is not finished:
                yield record
            await task  # re-raise what stopped the run, if anything did
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _open_run_files(self, resume: bool | str, current: dict[str, Any]
                        ) -> tuple[RunFiles, set[str]]:
        out = self.settings.output_data
        if resume:
            files = RunFiles.latest(out.output_dir, out.experiment_name, out.need_time_stamp)
            if files is not None:
                check_resume(read_manifest(files.manifest), current, files.results,
                             force=resume == "force")
                repair_torn_tail(files.results)
                repair_torn_tail(files.failures)
                index = read_index(files.results)
                return files, index.keys
            log.info("nothing to resume for %s in %s: starting a new run",
                     out.experiment_name, out.output_dir)
        files = RunFiles.create(out.output_dir, out.experiment_name, out.need_time_stamp)
        files.results.touch()
        return files, set()

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
        return chosen

    def _plan(self, extractor: ExtractFunction | None) -> RunPlan:
        if self._steps:
            return StepsPlan(self.settings, self._steps)
        if self._prompt is None:
            self._prompt = self._load_prompt()
        return SingleStepPlan(self.settings, self._prompt, extractor)

    def _fatal_message(self, err: CallError, model: str) -> str:
        if err.kind == "auth":
            return (
                f"the provider rejected the credentials ({err.status or 'auth'}): {err.message}. "
                "Check model.api_key in config.yaml (or the provider's environment variable, "
                "e.g. OPENAI_API_KEY) and that the key may use this model."
            )
        return (
            f"model '{model}' or its endpoint was not found "
            f"({err.status or 404}): {err.message}. Check model.provider, model.model and "
            "model.base_url."
        )


__all__ = ["DataGenerationPipeline"]
