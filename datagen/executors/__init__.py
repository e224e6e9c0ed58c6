"""Where a prepared run executes: ``local`` (the engine in this process); ``ray`` (shards
of the pool on a Ray cluster, each running the same engine)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from datagen.errors import ConfigError

Executor = Callable[[Any], Awaitable[Any]]


def get_executor(executor: Any) -> Executor:
    """``"local"``, ``"ray"`` (needs ``pip install 'datagen[ray]'``), or an executor
    object: any callable taking a prepared job and returning the run's result."""
    if callable(executor):
        return executor  # type: ignore[no-any-return]
    if executor == "local":
        from datagen.executors.local import run_local

        return run_local
    if executor == "ray":
        from datagen.executors.ray import RayExecutor

        return RayExecutor()  # a clear error when Ray is not installed
    raise ConfigError(f"unknown executor {executor!r}: use 'local', 'ray', or an "
                      "executor object")
