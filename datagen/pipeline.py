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
from datagen.errors import ConfigError
from datagen.llm.caller import Caller, Transport
from datagen.llm.errors import CallError
from datagen.llm.throttle import Throttle
from datagen.llm.types import ChatRequest
from datagen.manifest import check_resume, fingerprint, read_manifest
from datagen.pool import ItemSource, Pool, open_pool, to_item
from datagen.progress import make_display
from datagen.prompts import ChatPrompt
from datagen.runlog import RunLog
from datagen.store import JsonlSink, RunFiles, read_index, repair_torn_tail

log = logging.getLogger("datagen.pipeline")
ExtractFunction = Callable[[str], Any]
# Providers datagen serves itself (registered with litellm as custom providers).
BUILTIN_PROVIDERS: frozenset[str] = frozenset({"local", "fake"})
CACHE_FILE = ".datagen_cache.sqlite"


def _version() -> str:
    from datagen import __version__

    return __version__


class DataGenerationPipeline:
    """A single-step generation pipeline built from config.yaml and keyword overrides.

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
        api_key = self.settings.model.api_key
        redact.register(api_key.get_secret_value() if api_key else None)
        redact.register_environment()
        self._prompt: ChatPrompt | None = None
        if self.settings.prompts.user_prompt_path:
            self._prompt = self._load_prompt()
        self.last_run_files: RunFiles | None = None
        self._transport: Transport | None = None

    # ---- builder helpers -------------------------------------------------------------

    def _load_prompt(self) -> ChatPrompt:
        return ChatPrompt.from_files(
            self.settings.prompts.user_prompt_path, self.settings.prompts.system_prompt_path
        )

    @staticmethod
    def make_default_extractor(pattern_name: str = "draft") -> extract_mod.TagExtractor:
        """An extractor returning the stripped text of the first ``<pattern_name>`` block."""
        return extract_mod.make_default_extractor(pattern_name)

    def transport_name(self) -> str:
        """'openai' (the fast aiohttp path) or 'litellm', as model.transport resolves."""
        from datagen.llm.openai_transport import speaks_openai

        m = self.settings.model
        fits = speaks_openai(m.effective_provider()) and not m.is_embedded()
        if m.transport == "auto":
            return "openai" if fits else "litellm"
        if m.transport == "openai" and not fits:
            raise ConfigError(
                f"transport 'openai' needs an OpenAI-compatible endpoint, and provider "
                f"'{m.provider}' is not one: use transport 'litellm' (or 'auto'), or "
                "provider 'openai' with model.base_url"
            )
        return m.transport

    def _make_transport(self, concurrency: int) -> Transport:
        m = self.settings.model
        if self.transport_name() == "openai":
            from datagen.llm.openai_transport import OpenAITransport

            key = m.api_key.get_secret_value() if m.api_key else None
            return OpenAITransport(m.effective_provider(), m.base_url, key,
                                   pool_size=concurrency)
        from datagen.llm.litellm_transport import LiteLLMTransport

        return LiteLLMTransport()

    def _check_provider(self) -> None:
        provider = self.settings.model.provider
        if self.transport_name() == "openai":
            return  # a provider the fast path knows: no need to load litellm to check it
        if self.settings.model.is_embedded():
            from datagen.llm.local import check_available

            check_available(self.settings.model.model.removeprefix("local/"))
            return
        if provider in BUILTIN_PROVIDERS:
            return
        from datagen.llm.litellm_transport import known_providers

        known = known_providers()
        if provider not in known:
            import difflib

            close = difflib.get_close_matches(provider, sorted(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown model provider '{provider}' (model.provider).{hint} For any "
                "OpenAI-compatible server (vLLM, llama.cpp, Ollama's /v1) use provider "
                "'openai' with model.base_url."
            )

    def _constraint(self, extractor: ExtractFunction | None) -> dict[str, Any]:
        """The extractor's output constraint, for models that take one (see
        model.constrain_output); never replaces a grammar or format the user set."""
        m = self.settings.model
        wanted = m.is_embedded() if m.constrain_output is None else m.constrain_output
        constraint = getattr(extractor, "constraint", None)
        budget = m.max_tokens or m.max_completion_tokens
        params = constraint(budget) if wanted and callable(constraint) else None
        if not params:
            return {}
        sampling = self.settings.sampling_params()
        if any(k in sampling for k in ("grammar", "response_format")):
            return {}
        if "grammar" in params and not m.is_embedded():
            return {"extra_body": {"grammar": params["grammar"]}}  # llama.cpp server form
        return dict(params)

    def _request_builder(self, constraint: dict[str, Any] | None = None
                         ) -> Callable[[list[dict[str, str]]], ChatRequest]:
        """messages -> ChatRequest, with everything but the messages fixed once per run."""
        m = self.settings.model
        model, base_url, timeout = m.model_string(), m.base_url, m.timeout
        params = {**self.settings.sampling_params(), **(constraint or {})}
        key = m.api_key.get_secret_value() if m.api_key else None

        def build(messages: list[dict[str, str]]) -> ChatRequest:
            return ChatRequest(model=model, messages=messages, params=params, api_key=key,
                               base_url=base_url, timeout=timeout)

        return build

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
    ) -> list[dict[str, Any]]:
        """Generate one record per pool item; return the successful records in input order.

        Every record is appended to the results file as soon as its item finishes; items
        that fail (after retries, or in extraction) go to the failures file with the
        reason. ``resume=True`` (or ``run.resume`` in config) continues the newest run of
        this experiment, skipping items already in its results. With ``collect=False``
        nothing is kept in memory and ``[]`` is returned. ``on_record`` (sync or async) is
        called with each record once it is on disk.
        """
        extractor = self._pick_extractor(extract_function, parse_response)
        concurrency = concurrency_limit or self.settings.run.concurrency_limit
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency_limit must be a whole number >= 1, got {concurrency!r}")
        resume = self.settings.run.resume if resume is None else resume
        if resume not in (True, False, "force"):
            raise ConfigError(f"resume must be True, False or 'force', got {resume!r}")
        if self._prompt is None:
            self._prompt = self._load_prompt()
        prompt = self._prompt
        pool = open_pool(data_pool)
        if pool.reiterable:
            self._precheck(pool, prompt)
        self._check_provider()

        extractor_name = _name_of(extractor)
        current = fingerprint(
            model=self.settings.model.model_string(), sampling=self.settings.sampling_params(),
            templates={"user": prompt.user.source,
                       "system": prompt.system.source if prompt.system else None},
            extractor=extractor_name)
        files, done_keys = self._open_run_files(resume, current)
        self.last_run_files = files
        show = self.settings.run.progress if progress is None else progress
        run = self.settings.run
        cache = None
        if run.cache:
            cache = ResponseCache(run.cache_path or Path(self.settings.output_data.output_dir)
                                  / CACHE_FILE)
        model = self.settings.model
        constraint = self._constraint(extractor)
        transport = self._make_transport(concurrency)
        ctx = RunContext(
            prompt=prompt,
            extractor=extractor,
            caller=Caller(transport,
                          Throttle(model.rate_limit, requests_per_minute=model.requests_per_minute,
                                   tokens_per_minute=model.tokens_per_minute,
                                   concurrency=concurrency,
                                   slack=transport.name != "litellm"),
                          max_retries=model.max_retries, cache=cache),
            build_request=self._request_builder(constraint),
            files=files,
            results_sink=JsonlSink(files.results, self.settings.output_data.fsync_interval),
            failures_sink=JsonlSink(files.failures, self.settings.output_data.fsync_interval),
            display=make_display(show, self.settings.output_data.experiment_name),
            prechecked=pool.reiterable,
            collect=collect,
            done_keys=done_keys,
            cache_salt=run.cache_salt,
            shutdown_timeout=run.shutdown_timeout,
            fatal_message=self._fatal_message,
            on_record=on_record,
            manifest_base={"datagen_version": _version(), "model": model.model_string(),
                           "extractor": extractor_name, "fingerprint": current,
                           "resumed": bool(done_keys), "config": self.settings.public_dict()},
        )
        engine = Engine(ctx, ItemSource(pool))
        try:
            with RunLog(files.log):
                log.info("run started: model %s, %s items, concurrency %d, output %s%s",
                         model.model_string(),
                         pool.total if pool.total is not None else "unknown", concurrency,
                         files.results,
                         f" (resuming: {len(done_keys)} done)" if done_keys else "")
                await engine.run(concurrency, pool.total)
        finally:
            await transport.aclose()
            if cache is not None:
                cache.close()
        counts = engine.counts
        if counts.succeeded + counts.failed + counts.skipped == 0:
            message = "the data pool is empty: nothing was generated"
            log.warning(message)
            warnings.warn(message, stacklevel=2)
        return [engine.results[i] for i in sorted(engine.results)]

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
            finally:
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

    def _precheck(self, pool: Pool, prompt: ChatPrompt) -> None:
        """Check every item's shape and templates before the first request is sent."""
        for index, raw in enumerate(pool.raw_items()):
            item = to_item(index, raw)
            prompt.check(item.user_kwargs, item.system_kwargs, f"item {index}")

    def _fatal_message(self, err: CallError) -> str:
        m = self.settings.model
        if err.kind == "auth":
            return (
                f"the provider rejected the credentials ({err.status or 'auth'}): {err.message}. "
                "Check model.api_key in config.yaml (or the provider's environment variable, "
                "e.g. OPENAI_API_KEY) and that the key may use this model."
            )
        return (
            f"model '{m.model_string()}' or its endpoint was not found "
            f"({err.status or 404}): {err.message}. Check model.provider, model.model and "
            "model.base_url."
        )


def _name_of(extractor: ExtractFunction | None) -> str:
    if extractor is None:
        return "raw"
    name = getattr(extractor, "name", None) or getattr(extractor, "__qualname__", None)
    return str(name or type(extractor).__name__)


__all__ = ["DataGenerationPipeline"]
