"""What the ledger says about a run's batches, for the manifest's ``batches`` section,
``datagen status`` and ``datagen report``: per batch its provider status and counts, the
totals, the cost beside what the same tokens cost online, and in words how the requests
sent became the records written."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from datagen.batch.ledger import BatchLedger, BatchRow

OUTCOMES = ("completed", "failed", "expired", "cancelled", "missing", "waiting")
FROM_TALLY = {"succeeded": "completed", "errored": "failed", "expired": "expired",
              "cancelled": "cancelled", "missing": "missing", "waiting": "waiting"}


def _per_seq(ledger: BatchLedger, query: str) -> dict[int, int]:
    return {int(seq): int(n) for seq, n in ledger.db.execute(query)}


def batch_rows(ledger: BatchLedger) -> list[dict[str, Any]]:
    """One dict per batch that reached the provider (or is on its way), oldest first."""
    bad = "('errored', 'expired', 'cancelled', 'missing')"
    resent = _per_seq(ledger, f"SELECT r.seq, count(*) FROM requests r WHERE r.outcome IN "
                      f"{bad} AND EXISTS (SELECT 1 FROM requests o WHERE o.key = r.key AND "
                      "o.seq > r.seq) GROUP BY r.seq")
    gave_up = _per_seq(ledger, "SELECT r.seq, count(*) FROM requests r JOIN answers a ON "
                       "a.custom_id = r.custom_id WHERE a.error IS NOT NULL GROUP BY r.seq")
    return [_row(b, resent.get(b.seq, 0), gave_up.get(b.seq, 0))
            for b in ledger.batches() if b.state != "discarded"]


def _row(b: BatchRow, resent: int, gave_up: int) -> dict[str, Any]:
    counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
    if b.tally:  # collected: our own count of every request's outcome
        for name, n in b.tally.items():
            counts[FROM_TALLY.get(name, name)] += int(n)
    else:  # still open: what the provider says so far
        shown = b.counts or {}
        for name in ("completed", "failed", "expired", "cancelled"):
            counts[name] = int(shown.get(name, 0))
        counts["waiting"] = max(0, b.requests - sum(counts.values()))
    usage = b.usage or {}
    return {"seq": b.seq, "id": b.batch_id, "step": b.step, "api": b.api, "model": b.model,
            "state": b.state, "status": b.status, "requests": b.requests, **counts,
            "sent_again": resent, "failed_for_good": gave_up,
            "created_at": b.created_at, "ended_at": b.ended_at, "error": b.error,
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "cost_usd": usage.get("cost_usd"), "online_cost_usd": usage.get("online_cost_usd")}


def _sum_money(rows: list[dict[str, Any]], name: str) -> float | None:
    values = [r[name] for r in rows if r["state"] == "collected"]
    if any(v is None for v in values):
        return None
    return float(round(sum(values), 9))


def section(ledger: BatchLedger, run: Mapping[str, Any], price_sources: Mapping[str, str]
            ) -> dict[str, Any]:
    """The manifest's ``batches`` section. ``run``: this run's counts (records written,
    failures and drops by step, validation retries, cache hits, items waiting)."""
    rows = batch_rows(ledger)
    totals = Counter[str]()
    for row in rows:
        for name in ("requests", *OUTCOMES, "sent_again", "failed_for_good",
                     "prompt_tokens", "completion_tokens"):
            totals[name] += int(row[name] or 0)
    batch_usd, online_usd = _sum_money(rows, "cost_usd"), _sum_money(rows, "online_cost_usd")
    cost = {"batch_usd": batch_usd, "online_usd": online_usd,
            "saved_usd": round(online_usd - batch_usd, 9)
            if batch_usd is not None and online_usd is not None else None,
            "prices": dict(price_sources)}
    answered = _per_step_answers(ledger)
    money = (f", ${batch_usd:.4f} (online it would have cost ${online_usd:.4f})"
             if batch_usd is not None and online_usd is not None else "")
    return {"batches": rows, "totals": dict(totals), "cost": cost,
            "answers_by_step": answered,
            "summary": f"{totals['requests']} requests in {len(rows)} batch(es){money}",
            "explanation": explain(dict(totals), len(rows), answered, run, cost)}


def _per_step_answers(ledger: BatchLedger) -> dict[str, int]:
    return {str(step): int(n) for step, n in ledger.db.execute(
        "SELECT step, count(*) FROM requests WHERE outcome = 'succeeded' GROUP BY step")}


def explain(t: Mapping[str, int], batches: int, answered: Mapping[str, int],
            run: Mapping[str, Any], cost: Mapping[str, Any]) -> list[str]:
    """How the requests sent became the records written, in sentences."""
    if not batches:
        return ["no batch was sent: every answer came from the response cache or an "
                "earlier round"] if run.get("records") else []
    lines = [f"{t['requests']} requests were sent in {batches} batch(es): {t['completed']} "
             f"answered, {t['failed']} errored, {t['expired']} expired, {t['cancelled']} "
             f"cancelled, {t['missing']} came back without a result, {t['waiting']} are "
             "still waiting at the provider."]
    unanswered = sum(t[k] for k in ("failed", "expired", "cancelled", "missing"))
    if unanswered:
        later = unanswered - t["sent_again"] - t["failed_for_good"]
        lines.append(
            f"Of the {unanswered} unanswered, {t['sent_again']} were sent again in a later "
            f"batch (alone: a batch of only what was missing; each counts once per batch it "
            f"was in), {t['failed_for_good']} failed for good (a 4xx, or model.max_retries "
            "used up: their items are in the failures file with the error)"
            + (f", {later} go into the next batch when the run is resumed" if later else "")
            + ".")
    for step, n in sorted(answered.items()):
        parts = [f"step {step}: {n} answers"]
        retried = run.get("validation_retries", {}).get(step, 0)
        if retried:
            parts.append(f"{retried} rejected by extraction or validation and asked again "
                         "(each retry is a request of its own)")
        failed = run.get("failed_by_step", {}).get(step, 0)
        if failed:
            parts.append(f"{failed} items failed at this step")
        dropped = run.get("dropped_by_step", {}).get(step, 0)
        if dropped:
            parts.append(f"{dropped} dropped by a filter")
        lines.append(", ".join(parts) + ".")
    hits = run.get("cache_hits", 0)
    lines.append(
        f"{run.get('records', 0)} records were written this run ({run.get('in_file', 0)} in "
        "the results file)" + (f"; {hits} answers came from the response cache (nothing "
                               "sent)" if hits else "")
        + "; in a multi-step pipeline an answer to an earlier step feeds the next step, not "
        "a record, and a fan-out or samples turn one answer into several records.")
    if run.get("failed_again"):
        lines.append(f"{run['failed_again']} items failed again exactly as the failures file "
                     "already records (the same answer replayed): not written twice.")
    if run.get("waiting"):
        lines.append(f"{run['waiting']} items wait for batches still open: datagen run "
                     "--resume collects them.")
    if cost.get("batch_usd") is not None and cost.get("online_usd") is not None:
        lines.append(f"cost: ${cost['batch_usd']:.4f} through batches; the same tokens online "
                     f"would have cost ${cost['online_usd']:.4f}.")
    return lines
