"""Providers datagen serves without litellm's provider list: the embedded model, the test
kit's fake model, and any a user registers. Each maps a model's settings to a transport.

The library special-cases none of them by name: ``datagen.testing`` registers ``fake``
when it is imported (the pytest plugin imports it), the embedded model registers
``local``, and a user may register their own (see :mod:`datagen.llm.handler`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datagen.config import ModelConfig
    from datagen.llm.caller import Transport


@dataclass(frozen=True)
class Provider:
    name: str
    make_transport: Callable[[ModelConfig, int], Transport]
    prices: tuple[float, float] | None = (0.0, 0.0)  # dollars per input / output token
    check: Callable[[ModelConfig], None] | None = None  # raise ConfigError if unusable


_PROVIDERS: dict[str, Provider] = {}


def register_provider(name: str, make_transport: Callable[[ModelConfig, int], Transport],
                      prices: tuple[float, float] | None = (0.0, 0.0),
                      check: Callable[[ModelConfig], None] | None = None) -> None:
    """Serve ``provider: <name>`` with ``make_transport(model_config, concurrency)``.
    ``prices``: dollars per input and output token (None: unknown)."""
    _PROVIDERS[name] = Provider(name, make_transport, prices, check)


def registered(m: ModelConfig) -> Provider | None:
    """The registered provider serving ``m`` (a model with a base_url goes to its server
    instead: ``provider: local`` with a base_url is a llama.cpp server)."""
    if m.base_url:
        return None
    _register_builtins()
    return _PROVIDERS.get(m.provider)


def _register_builtins() -> None:
    if "local" not in _PROVIDERS:
        from datagen.llm.local import check_model, make_transport

        register_provider("local", make_transport, (0.0, 0.0), check_model)
