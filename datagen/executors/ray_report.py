"""A cluster run's manifest (through :func:`datagen.manifest.build_manifest`, the one place
its shape is defined) and summary line: the counts from the merged files (exact), the
calls, tokens and steps added up over every attempt, and the ``cluster`` section: shards,
attempts and where they ran, retried shards, lost nodes, the budget."""

from __future__ import annotations

from collections import Counter
from typing import Any

from datagen.engine.job import Job
from datagen.executors.ray_board import add_up, attempt_rows
from datagen.executors.ray_merge import Merger
from datagen.manifest import build_manifest
from datagen.redact import get_logger, redact
from datagen.store import iso_now

log = get_logger("datagen.pipeline")


def run_manifest(job: Job, m: Merger, attempts: list[dict[str, Any]], *, status: str,
                 error: dict[str, str] | None, started_at: str, elapsed: float,
                 callback_errors: int, cluster: dict[str, Any]) -> dict[str, Any]:
    totals = add_up(attempts)
    s = totals.stats
    ok, failed, dropped = m.count("results"), m.count("failures"), m.count("dropped")
    return build_manifest(
        job.manifest_base, status=status, error=error, started_at=started_at,
        updated_at=iso_now(), files=job.files.as_dict(),
        counts={"finished": ok + failed + dropped, "succeeded": ok, "failed": failed,
                "failed_by_kind": dict(m.failed_by_kind), "skipped_done": m.resumed,
                "results_in_file": m.streams["results"].lines},
        steps={name: {k: int(totals.steps.get(name, Counter())[k])
                      for k in ("done", "validation_retries", "dropped")}
               for name in job.step_names},
        calls={"requests": s.requests, "retries": s.retries, "rate_limited": s.rate_limited,
               "errors_by_kind": dict(s.errors_by_kind), "cache_hits": s.cache_hits,
               "cache_misses": s.cache_misses},
        tokens={"prompt": s.prompt_tokens, "completion": s.completion_tokens,
                "total": s.prompt_tokens + s.completion_tokens},
        cost_usd=s.cost_usd,
        timings={"duration_s": round(elapsed, 3),
                 "items_per_s": round((ok + failed + dropped) / elapsed, 3)
                 if elapsed > 0 else None,
                 "mean_latency_s": round(totals.latency_total / ok, 4) if ok else None},
        extra={"dropped": {"total": dropped, "by_step": dict(totals.dropped_by_step)},
               "callbacks": {"on_record_errors": callback_errors + totals.callback_errors},
               "cluster": {**cluster, **attempts_section(attempts), **m.summary()}})


def attempts_section(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every attempt (``lost``: it never ended and its node is gone), the shards that ran
    more than once, and the nodes that failed under a shard."""
    alive: set[str] = set()
    if attempts:
        from datagen.executors.ray_runtime import alive_nodes

        alive = alive_nodes()
    rows = attempt_rows(attempts, alive)
    tries = Counter(r["shard"] for r in rows)
    return {"attempts": rows, "retried_shards": sorted(s for s, n in tries.items() if n > 1),
            "node_failures": sorted({r["node"] for r in rows if r["status"] == "lost"})}


def summary(manifest: dict[str, Any]) -> str:
    c, calls, t = manifest["counts"], manifest["calls"], manifest["tokens"]
    cost = manifest["cost_usd"]
    return redact(
        f"{c['succeeded']} succeeded, {c['failed']} failed, "
        f"{manifest['dropped']['total']} dropped, {c['skipped_done']} already done; "
        f"{calls['requests']} requests, {calls['retries']} retries, "
        f"{calls['rate_limited']} rate-limited (429), {calls['cache_hits']} cache hits; "
        f"{t['prompt']} prompt + {t['completion']} completion tokens"
        f"{f', ${cost:.4f}' if cost is not None else ', cost unknown'}; "
        f"{manifest['cluster']['shards']} shards")


def input_order(record: dict[str, Any]) -> tuple[Any, ...]:
    """Input order: the item's index, then its samples and fan-out children by key."""
    key = str(record.get("key", ""))[32:]
    marks = [int(part) for part in key.replace("#", "/").split("/")[1:] if part.isdigit()]
    return (record.get("index", 0), marks)


__all__ = ["input_order", "run_manifest", "summary"]


class LiveView:
    """The driver's display (the one a local run shows), fed by the merged files' counts
    and the attempts' reports; ``progress_callback`` called as steps advance."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.steps_shown: dict[str, int] = {}

    def show(self, m: Merger, attempts: list[dict[str, Any]], notes: list[str]) -> None:
        display, totals = self.job.display, add_up(attempts)
        s = totals.stats
        display.update(m.count("results"), m.count("failures") + m.count("dropped"))
        display.usage(s.prompt_tokens + s.completion_tokens, s.cost_usd)
        display.calls(s.requests, s.retries, s.rate_limited, s.cache_hits)
        display.kinds(dict(m.failed_by_kind), dict(s.errors_by_kind))
        for name, counts in totals.steps.items():
            if counts["done"] != self.steps_shown.get(name):
                self.steps_shown[name] = counts["done"]
                display.step(name, counts["done"])
                self.progress(name, counts["done"])
        display.note("; ".join([*notes, *dict.fromkeys(totals.notes)]))

    def progress(self, name: str, done: int) -> None:
        callback, total = self.job.options.progress_callback, self.job.total
        if callback is None:
            return
        try:
            callback(name, min(1.0, done / total) if total else 0.0,
                     f"step {name}: {done} done")
        except Exception:  # a UI hook must never break a run
            log.exception("progress_callback raised; ignored")
