"""What the driver of a cluster run knows about its shards: every attempt (where it ran,
how it ended) and its counters, kept by the run's coordinator actor (the :class:`Board`),
reported by each attempt's :class:`ShardDisplay`, and added up here for the driver's live
display and the run's manifest. No Ray in this module."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from datagen.llm.caller import CallStats

STEP_FIELDS = ("done", "validation_retries", "dropped")


class ShardDisplay:
    """The display of a shard's engine: keeps what the engine shows, for the reports the
    attempt sends to the driver (which shows it on the run's one display)."""

    def __init__(self) -> None:
        self.done = self.failed = 0
        self.steps: dict[str, int] = {}
        self.failed_by_kind: dict[str, int] = {}
        self.text = ""

    def start(self, total: int | None) -> None:
        return None

    def update(self, done: int, failed: int) -> None:
        self.done, self.failed = done, failed

    def step(self, name: str, done: int) -> None:
        self.steps[name] = done

    def usage(self, tokens: int, cost: float | None) -> None:
        return None  # the calls' stats are reported whole (snapshot)

    def calls(self, requests: int, retries: int, rate_limited: int, cache_hits: int) -> None:
        return None

    def kinds(self, failed: dict[str, int], errors: dict[str, int]) -> None:
        self.failed_by_kind = dict(failed)

    def note(self, text: str) -> None:
        self.text = text

    def close(self, done: int, failed: int, summary: str = "") -> None:
        self.update(done, failed)

    def snapshot(self, stats: CallStats) -> dict[str, Any]:
        return {"done": self.done, "failed": self.failed, "steps": dict(self.steps),
                "failed_by_kind": dict(self.failed_by_kind), "note": self.text,
                "calls": {**asdict(stats), "errors_by_kind": dict(stats.errors_by_kind)}}


class Board:
    """Every attempt of every shard of one driver's run (kept by the coordinator)."""

    def __init__(self) -> None:
        self.attempts: dict[str, dict[str, Any]] = {}

    def begin(self, shard: int, epoch: int, info: dict[str, Any]) -> None:
        self.attempts[f"{shard}/{epoch}"] = {"shard": shard, "attempt": epoch, **info,
                                             "started": time.time(), "snapshot": None,
                                             "outcome": None}

    def report(self, shard: int, epoch: int, snapshot: dict[str, Any]) -> None:
        entry = self.attempts.get(f"{shard}/{epoch}")
        if entry is not None:
            entry["snapshot"] = snapshot

    def end(self, shard: int, epoch: int, outcome: dict[str, Any]) -> None:
        entry = self.attempts.get(f"{shard}/{epoch}")
        if entry is not None:
            entry["outcome"], entry["ended"] = outcome, time.time()

    def view(self) -> list[dict[str, Any]]:
        return list(self.attempts.values())


def _stats(calls: dict[str, Any] | None) -> CallStats:
    stats = CallStats()
    if calls:
        for name, value in calls.items():
            setattr(stats, name, Counter(value) if name == "errors_by_kind" else value)
    return stats


@dataclass
class Totals:
    """The counters of every attempt, added up."""

    stats: CallStats = field(default_factory=CallStats)
    steps: dict[str, Counter[str]] = field(default_factory=dict)
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    dropped_by_step: Counter[str] = field(default_factory=Counter)
    latency_total: float = 0.0
    notes: list[str] = field(default_factory=list)
    callback_errors: int = 0


def add_up(attempts: list[dict[str, Any]]) -> Totals:
    """Finished attempts count with their manifests; the others with their last report
    (an attempt lost with its node counts what it had reported, at most a second old)."""
    out = Totals()
    for a in attempts:
        manifest = (a.get("outcome") or {}).get("manifest")
        snap = a.get("snapshot") or {}
        if manifest:
            calls, tokens = manifest["calls"], manifest["tokens"]
            out.stats.add(_stats({**{k: calls[k] for k in (
                "requests", "retries", "rate_limited", "errors_by_kind", "cache_hits",
                "cache_misses")}, "prompt_tokens": tokens["prompt"],
                "completion_tokens": tokens["completion"], "cost_usd": manifest["cost_usd"]}))
            for name, step in manifest["steps"].items():
                out.steps.setdefault(name, Counter()).update(step)
                out.dropped_by_step[name] += step.get("dropped", 0)
            out.failed_by_kind.update(manifest["counts"]["failed_by_kind"])
            mean = manifest["timings"].get("mean_latency_s") or 0.0
            out.latency_total += mean * manifest["counts"]["succeeded"]
            out.callback_errors += manifest.get("callbacks", {}).get("on_record_errors", 0)
        elif snap:
            out.stats.add(_stats(snap.get("calls")))
            for name, done in snap.get("steps", {}).items():
                out.steps.setdefault(name, Counter())["done"] += done
            out.failed_by_kind.update(snap.get("failed_by_kind", {}))
        if snap.get("note") and a.get("outcome") is None:
            out.notes.append(snap["note"])
    return out


def shard_states(attempts: list[dict[str, Any]], count: int, skipped: int) -> str:
    """'shards: 3 running, 1 done, 4 waiting; 1 retried' for the display."""
    last: dict[int, dict[str, Any]] = {}
    tried: Counter[int] = Counter()
    for a in sorted(attempts, key=lambda a: (a["shard"], a["attempt"])):
        last[a["shard"]] = a
        tried[a["shard"]] += 1
    running = sum(1 for a in last.values() if a["outcome"] is None)
    done = sum(1 for a in last.values() if (a["outcome"] or {}).get("status") == "completed")
    text = f"shards: {running} running, {done + skipped} done, " \
           f"{count - running - done - skipped} waiting"
    retried = sum(1 for n in tried.values() if n > 1)
    return text + (f"; {retried} retried" if retried else "")


def attempt_rows(attempts: list[dict[str, Any]], alive: set[str]) -> list[dict[str, Any]]:
    """The manifest's list of attempts: where each ran and how it ended (``lost``: it never
    reported an end, and its node is gone: the node failed)."""
    rows = []
    for a in sorted(attempts, key=lambda a: (a["shard"], a["attempt"])):
        outcome = a.get("outcome")
        status = outcome["status"] if outcome else (
            "lost" if a.get("node_id") not in alive else "unfinished")
        row = {"shard": a["shard"], "attempt": a["attempt"],
               "ray_attempt": a.get("ray_attempt"), "node": a.get("node"),
               "pid": a.get("pid"), "status": status}
        if outcome and outcome.get("error"):
            row["error"] = outcome["error"]
        rows.append(row)
    return rows
