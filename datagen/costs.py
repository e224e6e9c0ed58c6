"""Prices per token: from litellm's local price map, or the config's own numbers.

The map is read as the JSON file litellm ships (``model_prices_and_context_window_backup
.json``), without importing litellm: the fast transport never pays litellm's import time,
and nothing reaches for the network. ``model.input_cost_per_million`` and
``output_cost_per_million`` in config override it (and price any model it lacks, e.g. a
self-hosted one). Providers datagen serves itself (the embedded model, test fakes) carry
their own prices (``datagen.llm.providers``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from datagen.config import ModelConfig

Prices = tuple[float, float]  # dollars per input token, per output token


@lru_cache(maxsize=1)
def _price_text() -> str:
    spec = importlib.util.find_spec("litellm")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "model_prices_and_context_window_backup.json"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return ""


@lru_cache(maxsize=64)
def price_entry(name: str) -> dict[str, Any] | None:
    """One model's entry of the price map. Only that entry is decoded: the whole map as
    Python objects is ~10 MB a run would carry for one or two prices."""
    text = _price_text()
    start = _entry_start(text, f'"{name}"')
    if start is None:
        return None
    entry, _ = json.JSONDecoder().raw_decode(text, start)
    return entry if isinstance(entry, dict) else None


_OBJECT_AFTER_KEY = re.compile(r"\s*:\s*(?=\{)")


def _entry_start(text: str, quoted: str) -> int | None:
    """Where the object of the key ``quoted`` (first on its line) begins. A plain find,
    then the line checked: a regex over the whole 1.5 MB map took 16 ms a name."""
    at = text.find(quoted)
    while at >= 0:
        line = text.rfind("\n", 0, at) + 1
        after = _OBJECT_AFTER_KEY.match(text, at + len(quoted))
        if after is not None and not text[line:at].strip():
            return after.end()
        at = text.find(quoted, at + 1)
    return None


def prices_for(m: ModelConfig) -> Prices | None:
    """Dollars per token for a model, or None when its price is unknown."""
    if m.input_cost_per_million is not None or m.output_cost_per_million is not None:
        return ((m.input_cost_per_million or 0.0) / 1e6, (m.output_cost_per_million or 0.0) / 1e6)
    from datagen.llm.providers import registered

    plugin = registered(m)
    if plugin is not None:  # served by datagen itself (the embedded model, test fakes)
        return plugin.prices
    # A name the map knows is priced even behind a base_url (a proxy or gateway); a
    # self-hosted model's name is not in it, and its price stays unknown.
    name = m.model.removeprefix(f"{m.provider}/")
    for key in (f"{m.provider}/{name}", name):
        entry = price_entry(key)
        if entry is not None and "input_cost_per_token" in entry:
            return (float(entry["input_cost_per_token"]),
                    float(entry.get("output_cost_per_token", 0.0)))
    return None


def cost(prices: Prices | None, prompt_tokens: int, completion_tokens: int) -> float | None:
    if prices is None:
        return None
    return prompt_tokens * prices[0] + completion_tokens * prices[1]


BATCH_DISCOUNT = 0.5  # OpenAI's and Anthropic's documented batch price: half the online one


def batch_prices_for(m: ModelConfig) -> tuple[Prices | None, str]:
    """Dollars per token through the provider's batch API, and where the price came from:
    the config (``batch_*_cost_per_million``), litellm's price map (its ``*_batches``
    entries), or half the online price (the providers' documented discount)."""
    if m.batch_input_cost_per_million is not None or \
            m.batch_output_cost_per_million is not None:
        return (((m.batch_input_cost_per_million or 0.0) / 1e6,
                 (m.batch_output_cost_per_million or 0.0) / 1e6), "config")
    name = m.model.removeprefix(f"{m.provider}/")
    if m.input_cost_per_million is None and m.output_cost_per_million is None:
        for key in (f"{m.provider}/{name}", name):
            entry = price_entry(key)
            if entry is not None and "input_cost_per_token_batches" in entry:
                return ((float(entry["input_cost_per_token_batches"]),
                         float(entry.get("output_cost_per_token_batches", 0.0))),
                        "litellm price map (batch prices)")
    online = prices_for(m)
    if online is None:
        return None, "unknown"
    return ((online[0] * BATCH_DISCOUNT, online[1] * BATCH_DISCOUNT),
            "half the online price (the providers' documented batch discount)")
