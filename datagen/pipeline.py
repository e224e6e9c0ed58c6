"""DataGenerationPipeline: config + prompts + a data pool -> a JSONL dataset on disk.

The path of one item (see DESIGN.md): pull from the pool -> check its shape -> render the
prompt -> wait for a turn (rate limit) -> call -> retry transient errors -> extract ->
append one line to the results (or failures) file -> update the display. A fixed set of
``concurrency_limit`` workers pulls items one at a time, so records stream to disk from
the first second and memory holds only the items in flight, never one task per item.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from datagen import extract as extract_mod
from datagen import redact
from datagen.config import Settings, load_settings
from datagen.errors import ConfigError, DatagenError, RunAbortedError
from datagen.llm.caller import Caller, CallStats, Transport
from datagen.llm.errors import CallError
from datagen.llm.throttle import Throttle
from datagen.llm.types import ChatRequest, Completion
from datagen.pool import ItemSource, Pool, PoolItem, open_pool, to_item
from datagen.progress import Display, make_display
from datagen.prompts import ChatPrompt
from datagen.runlog import RunLog
from datagen.store import JsonlSink, RunFiles, dumps_line, iso_now, write_manifest

log = logging.getLogger("datagen.pipeline")
ExtractFunction = Callable[[str], Any]
# Providers datagen serves itself (registered with litellm as custom providers).
BUILTIN_PROVIDERS: frozenset[str] = frozenset({"local", "fake"})


def _version() -> str:
    from datagen import __version__

    return __version__


@dataclass
class _RunState:
    """Everything one call of ``run()`` shares between its workers."""

    settings: Settings
    prompt: ChatPrompt
    extractor: ExtractFunction | None
    extractor_name: str
    caller: Caller
    source: ItemSource
    prechecked: bool
    files: RunFiles
    results_sink: JsonlSink
    failures_sink: JsonlSink
    display: Display
    collect: bool
    constraint: dict[str, Any] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    succeeded: int = 0
    failed: int = 0
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    latency_total: float = 0.0
    stopping: bool = False


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

    def _make_transport(self) -> Transport:
        from datagen.llm.litellm_transport import LiteLLMTransport

        return LiteLLMTransport()

    def _check_provider(self) -> None:
        provider = self.settings.model.provider
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

    def _request(self, messages: list[dict[str, str]],
                 constraint: dict[str, Any] | None = None) -> ChatRequest:
        m = self.settings.model
        return ChatRequest(
            model=m.model_string(),
            messages=messages,
            params={**self.settings.sampling_params(), **(constraint or {})},
            api_key=m.api_key.get_secret_value() if m.api_key else None,
            base_url=m.base_url,
            timeout=m.timeout,
        )

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
    ) -> list[dict[str, Any]]:
        """Generate one record per pool item; return the successful records in input order.

        Every record is appended to the results file as soon as its item finishes; items
        that fail (after retries, or in extraction) go to the failures file with the
        reason. With ``collect=False`` nothing is kept in memory and ``[]`` is returned.
        """
        extractor = self._pick_extractor(extract_function, parse_response)
        concurrency = concurrency_limit or self.settings.run.concurrency_limit
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency_limit must be a whole number >= 1, got {concurrency!r}")
        if self._prompt is None:
            self._prompt = self._load_prompt()
        prompt = self._prompt
        pool = open_pool(data_pool)
        if pool.reiterable:
            self._precheck(pool, prompt)
        self._check_provider()

        out = self.settings.output_data
        files = RunFiles.create(out.output_dir, out.experiment_name, out.need_time_stamp)
        self.last_run_files = files
        files.results.touch()
        show = self.settings.run.progress if progress is None else progress
        state = _RunState(
            settings=self.settings,
            prompt=prompt,
            extractor=extractor,
            extractor_name=getattr(extractor, "name", None)
            or getattr(extractor, "__qualname__", None) or ("raw" if extractor is None
                                                            else type(extractor).__name__),
            caller=Caller(self._make_transport(), Throttle(self.settings.model.rate_limit),
                          max_retries=self.settings.model.max_retries),
            source=ItemSource(pool),
            prechecked=pool.reiterable,
            files=files,
            results_sink=JsonlSink(files.results),
            failures_sink=JsonlSink(files.failures),
            display=make_display(show, self.settings.output_data.experiment_name),
            collect=collect,
            constraint=self._constraint(extractor),
        )
        with RunLog(files.log):
            await self._execute(state, pool, concurrency)
        return [state.results[i] for i in sorted(state.results)]

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

    async def _execute(self, state: _RunState, pool: Pool, concurrency: int) -> None:
        started_at, t0 = iso_now(), time.monotonic()
        status, error = "running", None
        log.info("run started: model %s, %s items, concurrency %d, output %s",
                 self.settings.model.model_string(),
                 pool.total if pool.total is not None else "unknown", concurrency,
                 state.files.results)
        self._write_manifest(state, status, started_at, t0, None)
        state.display.start(pool.total)
        try:
            await self._work(state, concurrency)
            status = "completed"
        except DatagenError as exc:
            status, error = "failed", {"kind": getattr(exc, "kind", type(exc).__name__),
                                       "message": redact.redact(str(exc))}
            log.error("run stopped: %s", exc)
            raise
        except BaseException as exc:  # Ctrl+C, cancellation, or a bug: files stay valid
            status = "interrupted"
            error = {"kind": type(exc).__name__, "message": redact.redact(str(exc))}
            raise
        finally:
            state.results_sink.close()
            state.failures_sink.close()
            state.display.close(state.succeeded, state.failed)
            self._write_manifest(state, status, started_at, t0, error)
            self._log_summary(state, status)
        if state.succeeded == 0 and state.failed == 0:
            message = "the data pool is empty: nothing was generated"
            log.warning(message)
            warnings.warn(message, stacklevel=3)

    async def _work(self, state: _RunState, concurrency: int) -> None:
        workers = [asyncio.ensure_future(self._worker(state)) for _ in range(concurrency)]
        try:
            pending: set[asyncio.Future[None]] = set(workers)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                failures = [t.exception() for t in done if t.exception() is not None]
                if not failures:
                    continue
                fault = failures[0]
                state.stopping = True
                if isinstance(fault, RunAbortedError):
                    for task in pending:  # no retry can help: stop paying now
                        task.cancel()
                # Otherwise (a bad item or template) the others finish what they hold.
                await asyncio.gather(*pending, return_exceptions=True)
                assert fault is not None
                raise fault
        finally:
            for task in workers:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self, state: _RunState) -> None:
        while not state.stopping:
            nxt = await state.source.next()
            if nxt is None:
                return
            index, raw = nxt
            item = to_item(index, raw)
            if not state.prechecked:
                state.prompt.check(item.user_kwargs, item.system_kwargs, f"item {index}")
            await self._process(state, item)

    async def _process(self, state: _RunState, item: PoolItem) -> None:
        where = f"item {item.index}"
        messages = state.prompt.messages(item.user_kwargs, item.system_kwargs, where)
        try:
            completion, attempts = await state.caller.call(
                self._request(messages, state.constraint))
        except CallError as err:
            if err.fatal:
                raise RunAbortedError(self._fatal_message(err), err.kind) from None
            self._fail(state, item, err.kind, err.message, err.attempts)
            return
        try:
            output: Any = completion.text
            if state.extractor is not None:
                output = state.extractor(completion.text)
                if inspect.isawaitable(output):
                    output = await output
        except Exception as exc:  # the user's extractor: whatever it raises fails the item
            self._fail(state, item, "extraction", f"{type(exc).__name__}: {exc}", attempts,
                       completion)
            return
        record = self._record(item, output, completion, attempts)
        try:
            line = dumps_line(record)
        except TypeError as exc:
            self._fail(
                state, item, "serialization",
                f"the extractor returned a {type(output).__name__} that cannot be written as "
                f"JSON ({exc}); return dicts, lists, strings, numbers or a pydantic model",
                attempts, completion)
            return
        state.results_sink.write_line(line)
        state.succeeded += 1
        state.latency_total += completion.latency_s
        if state.collect:
            state.results[item.index] = record
        state.display.update(state.succeeded, state.failed)

    @staticmethod
    def _record(item: PoolItem, output: Any, completion: Completion, attempts: int
                ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "index": item.index,
            "key": item.key,
            "user_prompt_kwargs": item.user_kwargs,
            "system_prompt_kwargs": item.system_kwargs,
            "output": output,
            "raw_response": completion.text,
            "model": completion.model,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage.as_dict(),
            "latency_s": round(completion.latency_s, 4),
            "attempts": attempts,
        }
        if item.meta:
            record["meta"] = item.meta
        return record

    def _fail(self, state: _RunState, item: PoolItem, kind: str, message: str, attempts: int,
              completion: Completion | None = None) -> None:
        message = redact.redact(message)
        record: dict[str, Any] = {
            "index": item.index,
            "key": item.key,
            "user_prompt_kwargs": item.user_kwargs,
            "system_prompt_kwargs": item.system_kwargs,
            "error": {"kind": kind, "message": message, "attempts": attempts},
        }
        if completion is not None:
            record["raw_response"] = completion.text
            record["finish_reason"] = completion.finish_reason
        if item.meta:
            record["meta"] = item.meta
        try:
            line = dumps_line(record)
        except TypeError:  # an unserialisable item value: keep what can be kept
            record = {"index": item.index, "key": item.key, "error": record["error"],
                      "user_prompt_kwargs": repr(item.user_kwargs),
                      "system_prompt_kwargs": repr(item.system_kwargs)}
            line = dumps_line(record)
        state.failures_sink.write_line(line)
        state.failed += 1
        state.failed_by_kind[kind] += 1
        log.warning("item %d failed (%s) after %d attempt(s): %s", item.index, kind, attempts,
                    message[:300])
        state.display.update(state.succeeded, state.failed)

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

    # ---- bookkeeping -----------------------------------------------------------------

    def _write_manifest(self, state: _RunState, status: str, started_at: str, t0: float,
                        error: dict[str, str] | None) -> None:
        stats: CallStats = state.caller.stats
        elapsed = time.monotonic() - t0
        finished = state.succeeded + state.failed
        manifest = {
            "datagen_version": _version(),
            "status": status,
            "error": error,
            "started_at": started_at,
            "updated_at": iso_now(),
            "files": {name: str(getattr(state.files, name))
                      for name in ("results", "failures", "manifest", "log")},
            "model": self.settings.model.model_string(),
            "extractor": state.extractor_name,
            "config": self.settings.public_dict(),
            "counts": {
                "finished": finished,
                "succeeded": state.succeeded,
                "failed": state.failed,
                "failed_by_kind": dict(state.failed_by_kind),
            },
            "calls": {
                "requests": stats.requests,
                "retries": stats.retries,
                "rate_limited": stats.rate_limited,
                "errors_by_kind": dict(stats.errors_by_kind),
            },
            "tokens": {
                "prompt": stats.prompt_tokens,
                "completion": stats.completion_tokens,
                "total": stats.prompt_tokens + stats.completion_tokens,
            },
            "timings": {
                "duration_s": round(elapsed, 3),
                "items_per_s": round(finished / elapsed, 3) if elapsed > 0 else None,
                "mean_latency_s": round(state.latency_total / state.succeeded, 4)
                if state.succeeded else None,
            },
        }
        write_manifest(state.files.manifest, manifest)

    @staticmethod
    def _log_summary(state: _RunState, status: str) -> None:
        stats = state.caller.stats
        by_kind = ", ".join(f"{k}: {v}" for k, v in sorted(state.failed_by_kind.items()))
        log.info(
            "run %s: %d succeeded, %d failed%s; %d requests, %d retries, %d rate-limited; "
            "%d prompt + %d completion tokens",
            status, state.succeeded, state.failed, f" ({by_kind})" if by_kind else "",
            stats.requests, stats.retries, stats.rate_limited, stats.prompt_tokens,
            stats.completion_tokens,
        )


__all__ = ["DataGenerationPipeline"]
