"""The run manifest (built here, in one place) and the fingerprint that guards resume.

The fingerprint lists what shapes the output: the endpoint (provider and server), the
model, every sampling parameter, the templates' text, the extractor's name. Resuming a
run whose fingerprint differs would mix two datasets in one file, so it is an error that
says what changed (unless forced).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import DatagenError


class ResumeError(DatagenError):
    """The run to resume was made with different templates, model or parameters."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint(*, model: str, endpoint: str, sampling: dict[str, Any],
                templates: dict[str, str | None], extractor: str) -> dict[str, Any]:
    """The components of a run's fingerprint (template texts as hashes)."""
    return {
        "model": model,
        "endpoint": endpoint,
        "sampling": orjson.loads(orjson.dumps(sampling, option=orjson.OPT_SORT_KEYS,
                                              default=repr)),
        "templates": {name: (_digest(text) if text is not None else None)
                      for name, text in sorted(templates.items())},
        "extractor": extractor,
    }


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes: list[str] = []
    for field in ("endpoint", "model"):
        if field in old and old.get(field) != new[field]:
            changes.append(f"{field}: {old.get(field)} -> {new[field]}")
    old_s, new_s = old.get("sampling") or {}, new["sampling"]
    for key in sorted(set(old_s) | set(new_s)):
        if old_s.get(key) != new_s.get(key):
            changes.append(f"{key}: {old_s.get(key)!r} -> {new_s.get(key)!r}")
    old_t, new_t = old.get("templates") or {}, new["templates"]
    for name in sorted(set(old_t) | set(new_t)):
        if old_t.get(name) != new_t.get(name):
            changes.append(f"template {name} changed")
    if old.get("extractor") != new["extractor"]:
        changes.append(f"extractor: {old.get('extractor')} -> {new['extractor']}")
    return changes


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def check_resume(previous: dict[str, Any] | None, current: dict[str, Any], results: Path,
                 force: bool) -> None:
    """Raise ResumeError when the run being resumed was made differently."""
    if previous is None or force:
        return
    old = previous.get("fingerprint")
    if not isinstance(old, dict):
        return
    changes = describe_changes(old, current)
    if changes:
        raise ResumeError(
            f"cannot resume {results}: what shapes its output changed since it was made:\n"
            + "\n".join(f"  - {c}" for c in changes)
            + "\nStart a new run (resume=False), undo the change, or pass resume='force' to "
            "append to it anyway."
        )


def build_manifest(base: Mapping[str, Any], *, status: str, error: dict[str, str] | None,
                   started_at: str, updated_at: str, files: Mapping[str, str],
                   counts: Mapping[str, Any], steps: Mapping[str, Any],
                   calls: Mapping[str, Any], tokens: Mapping[str, int],
                   cost_usd: float | None, timings: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a run, the one place its shape is defined."""
    return {**base, "status": status, "error": error, "started_at": started_at,
            "updated_at": updated_at, "files": dict(files), "counts": dict(counts),
            "steps": dict(steps), "calls": dict(calls), "tokens": dict(tokens),
            "cost_usd": round(cost_usd, 6) if cost_usd is not None else None,
            "timings": dict(timings), **(extra or {})}
