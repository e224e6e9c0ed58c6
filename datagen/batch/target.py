"""Where a batch step's requests go: :class:`BatchTarget`, one model made ready for its
provider's batch API (which API, the endpoint, the key, the limits, the prices), and
:class:`BatchSettings`, the run's batch knobs. A model whose provider has no batch API
datagen can use is a :class:`~datagen.errors.ConfigError` here, before anything is
written or uploaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from datagen.config import ModelConfig
from datagen.config.schema import RunConfig
from datagen.costs import Prices, batch_prices_for, prices_for
from datagen.errors import ConfigError
from datagen.llm import providers
from datagen.llm.openai_transport import OPENAI_COMPATIBLE

MB = 1024 * 1024
# providers whose OpenAI-compatible API has Files + Batches (/v1/files, /v1/batches)
OPENAI_BATCH_PROVIDERS = ("openai", "groq", "together_ai")
LIMITS = {"openai": (50_000, 200 * MB), "anthropic": (100_000, 256 * MB)}
ANTHROPIC_URL = "https://api.anthropic.com"
ANTHROPIC_KEY_ENV = "ANTHROPIC_API_KEY"
API = Literal["openai", "anthropic"]


@dataclass(frozen=True)
class BatchTarget:
    """One model's batch API: ``api`` is the wire shape (OpenAI Files + Batches, or
    Anthropic Message Batches); ``base_url`` the API root the provider's paths hang off."""

    api: API
    base_url: str
    key_env: str
    model: str
    max_retries: int
    max_requests: int
    max_bytes: int
    prices: Prices | None
    online_prices: Prices | None
    price_source: str
    headers: dict[str, str] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)

    def key(self) -> str | None:
        """The credential: the config's, else the provider's environment variable."""
        return self.api_key or os.environ.get(self.key_env) or None

    def describe(self) -> dict[str, Any]:
        """What the ledger keeps of it (never the key): enough for ``datagen status``
        and ``datagen cancel`` to reach the provider again."""
        return {"api": self.api, "base_url": self.base_url, "key_env": self.key_env,
                "model": self.model}


@dataclass(frozen=True)
class BatchSettings:
    """The run's batch knobs (``run.batch_*``)."""

    poll_interval: float = 10.0
    poll_max: float = 300.0
    max_requests: int | None = None
    max_mb: float | None = None
    max_wait_s: float = 30 * 3600.0

    @classmethod
    def of(cls, run: RunConfig) -> BatchSettings:
        return cls(run.batch_poll_interval, max(run.batch_poll_max, run.batch_poll_interval),
                   run.batch_max_requests, run.batch_max_mb, run.batch_max_wait_hours * 3600)


def no_batch_api(step: str, m: ModelConfig) -> ConfigError:
    return ConfigError(
        f"step '{step}' is sent through a batch API, but model '{m.model_string()}' has "
        "none datagen can use: batch mode serves provider openai (and any OpenAI-compatible "
        "base_url that implements /v1/files and /v1/batches), groq, together_ai and "
        "anthropic. Turn batch off for this step (.step(..., batch=False) or run.batch: "
        "false), or give it a model of one of those providers.")


def batch_target(step: str, m: ModelConfig, settings: BatchSettings) -> BatchTarget:
    """The batch API that serves ``m`` for ``step``; ConfigError when there is none."""
    if providers.registered(m) is not None:  # served in this process: no batch API
        raise no_batch_api(step, m)
    provider = m.effective_provider()
    api: API
    if provider in OPENAI_BATCH_PROVIDERS:
        api = "openai"
        default_url, key_env = OPENAI_COMPATIBLE[provider]
    elif provider == "anthropic":
        api, default_url, key_env = "anthropic", ANTHROPIC_URL, ANTHROPIC_KEY_ENV
    else:
        raise no_batch_api(step, m)
    most, biggest = LIMITS[api]
    if settings.max_requests is not None:
        most = min(most, settings.max_requests)
    if settings.max_mb is not None:
        biggest = min(biggest, int(settings.max_mb * MB))
    prices, source = batch_prices_for(m)
    key = m.api_key.get_secret_value() if m.api_key else None
    return BatchTarget(api=api, base_url=m.base_url or default_url, key_env=key_env,
                       model=m.model_string(), max_retries=m.max_retries,
                       max_requests=most, max_bytes=biggest, prices=prices,
                       online_prices=prices_for(m), price_source=source,
                       headers=dict(m.headers), api_key=key)


@dataclass(frozen=True)
class BatchPlan:
    """Batch mode for one run: each batch step's target, and the run's knobs."""

    targets: dict[str, BatchTarget]
    settings: BatchSettings
