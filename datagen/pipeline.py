"""DataGenerationPipeline: config + prompts + a data pool -> a JSONL dataset on disk.

This module is the user's side: configuration, the step builder, and ``run()``, which
prepares a job (``datagen.prepare``: every check made before anything is sent, the run's
files) and hands it to an executor (``datagen.executors``), which runs the engine.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datagen import extract as extract_mod
from datagen import redact
from datagen.builder import StepBuilder
from datagen.config import Settings, load_settings
from datagen.engine.job import Job, RunOptions
from datagen.errors import ConfigError
from datagen.estimate import Estimate
from datagen.executors import get_executor
from datagen.executors.local import run_local  # noqa: F401 - a run needs it: loaded with us
from datagen.llm import runtime
from datagen.plan import Plan
from datagen.plans import SingleStepPlan, StepsPlan
from datagen.prepare import prepare as prepare_job
from datagen.prompts import ChatPrompt
from datagen.result import RunResult
from datagen.steps import CallEvent, Step

if TYPE_CHECKING:
    from datagen.streaming import RecordStream

log = redact.get_logger("datagen.pipeline")
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


class DataGenerationPipeline(StepBuilder):
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
        # set by load_folder: how a cluster's worker builds this pipeline again (from its
        # folder, instead of unpickling it)
        self._shard_origin: Callable[..., Job] | None = None

    # ---- builder helpers -------------------------------------------------------------

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
        paths), 'litellm', or a registered provider (the embedded model: 'local')."""
        return runtime.transport_name(self.settings.model)

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
        complete. ``executor``: "local" (this process), "ray" (shards of the pool on a
        Ray cluster: ``pip install "datagen[ray]"``), or an executor object such as
        ``datagen.executors.ray.RayExecutor(address=..., shards=...)``. An error that
        stops the run carries what was done as ``.result``.

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
        run_it = get_executor(executor)  # an unknown executor fails before anything is opened
        plan = self._plan(self._pick_extractor(extract_function, parse_response))
        if plan.batch_steps() and getattr(run_it, "__name__", "") != "run_local":
            raise ConfigError(
                f"batch mode (steps {', '.join(plan.batch_steps())}) runs in one process: "
                "the provider does the work, there is nothing for a cluster to share. Run "
                "it without executor='ray' (--executor local), or without batch")
        options = self._options(collect, on_record, progress_callback)
        return prepare_job(self.settings, plan, data_pool, concurrency=concurrency_limit,
                           resume=resume, options=options, step_names=self.step_names,
                           progress=progress, shard_origin=self._shard_origin)

    async def execute(self, job: Job, executor: Any = "local") -> RunResult:
        """Run a prepared job to the disk (see :meth:`prepare`)."""
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

    def check(self, data_pool: Any, extract_function: ExtractFunction | None = None
              ) -> int | None:
        """Everything a run checks before its first request, with nothing sent or
        written: the providers, the prompts against the models (a prefill where a model
        cannot continue one), and every item of ``data_pool`` against every template.
        Returns the number of items checked (None without a pool)."""
        from datagen.pool import checked_items, open_pool

        plan = self._plan(extract_function)
        plan.check_models()
        if data_pool is None:
            return None
        return sum(1 for _ in checked_items(open_pool(data_pool), plan.make_item,
                                            plan.check_item))

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
