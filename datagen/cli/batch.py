"""``datagen status`` and ``datagen cancel``: a batch run's batches, seen or cancelled,
from its ledger (``<run>_batches.sqlite``), while its run waits on them or long after.

Both reach the provider with the key of the model (``--config`` the pipeline's
config.yaml, else the provider's environment variable, e.g. OPENAI_API_KEY); ``status
--offline`` shows what the ledger last recorded, asking nobody.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from datagen.cli.common import EXIT_OK, error

EXAMPLES_STATUS = """examples:
  datagen status output/                      the newest batch run in output/
  datagen status output/qa_20261122_101500.jsonl --offline
"""
EXAMPLES_CANCEL = """examples:
  datagen cancel output/                      cancel the open batches of the newest run
  datagen run . --resume --batch              later: send again what is missing
"""
COLUMNS = ("completed", "failed", "expired", "cancelled", "waiting")


def add_commands(sub: Any, fmt: Any) -> None:
    status_parser = sub.add_parser(
        "status", help="a batch run's batches: provider status and request counts",
        formatter_class=fmt, epilog=EXAMPLES_STATUS,
        description="List a batch run's batches with the provider's status and their "
                    "request counts (completed / failed / expired / cancelled).")
    status_parser.add_argument("run", help="a run folder (its newest batch run) or a "
                                           "results file")
    status_parser.add_argument("--offline", action="store_true",
                               help="what the ledger last recorded; ask the provider nothing")
    status_parser.add_argument("--config", help="the pipeline's config.yaml (for the key)")
    status_parser.set_defaults(func=status)
    cancel_parser = sub.add_parser(
        "cancel", help="cancel a batch run's open batches", formatter_class=fmt,
        epilog=EXAMPLES_CANCEL,
        description="Cancel every open batch of a run at the provider; a run waiting on "
                    "them stops. Answers already given are kept; --resume sends the rest.")
    cancel_parser.add_argument("run", help="a run folder (its newest batch run) or a "
                                           "results file")
    cancel_parser.add_argument("--config", help="the pipeline's config.yaml (for the key)")
    cancel_parser.set_defaults(func=cancel)


def find_ledger(path: str) -> Path:
    """The ledger of a run: a results file's, a ledger itself, or a folder's newest."""
    from datagen.errors import OutputError

    p = Path(path).expanduser()
    if p.is_dir():
        ledgers = sorted(p.glob("*_batches.sqlite"), key=lambda f: f.stat().st_mtime)
        if not ledgers:
            raise OutputError(f"no batch run in {p} (no *_batches.sqlite): was it run with "
                              "--batch (run.batch: true)?")
        return ledgers[-1]
    if p.name.endswith("_batches.sqlite") and p.is_file():
        return p
    ledger = p.with_name(p.stem + "_batches.sqlite")
    if not ledger.is_file():
        raise OutputError(f"{p} has no batch ledger ({ledger.name} not found): was it run "
                          "with --batch (run.batch: true)?")
    return ledger


def waiting_run(ledger: Path) -> str:
    """Who holds the run's lock (a run waiting on its batches), or ""."""
    import fcntl

    lock = ledger.with_name(ledger.name.removesuffix("_batches.sqlite") + ".lock")
    try:
        fd = open(lock, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return ""
    with fd:
        try:
            fcntl.flock(fd.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(fd.read(4096))
        fcntl.flock(fd.fileno(), fcntl.LOCK_UN)
    return ""


def _holder(raw: bytes) -> str:
    import orjson

    try:
        info = orjson.loads(raw)
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "a running process"


def _keys(config: str | None) -> dict[str, str]:
    """model string -> API key, from a pipeline's config (empty without one)."""
    if not config:
        return {}
    from datagen.config import load_settings

    settings = load_settings(config, {})
    found = {}
    for name in [None, *settings.models]:
        m = settings.named_model(name)
        if m.api_key is not None:
            found[m.model_string()] = m.api_key.get_secret_value()
    return found


def _api(row: Any, keys: dict[str, str]) -> Any:
    from datagen.batch.api import make_api
    from datagen.batch.target import BatchTarget

    described = row.target or {}
    return make_api(BatchTarget(
        api=described.get("api", row.api), base_url=described.get("base_url", ""),
        key_env=described.get("key_env", ""), model=row.model, max_retries=0,
        max_requests=1, max_bytes=1, prices=None, online_prices=None, price_source="",
        api_key=keys.get(row.model)))


async def _fresh(rows: list[Any], keys: dict[str, str]) -> dict[int, Any]:
    """The provider's view of each open batch (errors shown, not raised)."""
    from datagen.batch.http import BatchAPIError

    views: dict[int, Any] = {}
    for row in rows:
        if row.state not in ("submitted", "ended") or not row.batch_id:
            continue
        api = _api(row, keys)
        try:
            views[row.seq] = await api.retrieve(row.batch_id)
        except BatchAPIError as err:
            views[row.seq] = err
        finally:
            await api.aclose()
    return views


def status(args: argparse.Namespace) -> int:
    from datagen.batch.ledger import BatchLedger
    from datagen.batch.summary import section
    from datagen.errors import DatagenError

    try:
        path = find_ledger(args.run)
        ledger = BatchLedger(path, readonly=True)
        try:
            rows, summary = ledger.batches(), section(ledger, {}, {})
        finally:
            ledger.close()
        views = {} if args.offline else asyncio.run(_fresh(rows, _keys(args.config)))
    except DatagenError as exc:
        return error(exc)
    print(render(path, summary, views, waiting_run(path)))
    return EXIT_OK


def render(path: Path, summary: dict[str, Any], views: dict[int, Any], holder: str) -> str:
    run = path.name.removesuffix("_batches.sqlite")
    lines = [f"run {path.parent / run}: {len(summary['batches'])} batch(es)"
             + (f"; a run is waiting on them ({holder})" if holder else "")]
    lines.append(f"  {'#':>3}  {'batch':<34} {'step':<12} {'status':<12} {'requests':>8}  "
                 + "  ".join(f"{c:>9}" for c in COLUMNS))
    for row in summary["batches"]:
        view, note = views.get(row["seq"]), ""
        counts = dict(row)
        status_text = row["status"] or row["state"]
        if view is not None and hasattr(view, "counts"):
            status_text = view.status
            counts.update({k: view.counts.get(k, 0) for k in COLUMNS[:4]})
            counts["waiting"] = max(0, row["requests"] - sum(counts[k] for k in COLUMNS[:4]))
        elif view is not None:
            note = f"  (provider not reached: {view})"
        lines.append(f"  {row['seq']:>3}  {row['id'] or '-'!s:<34} {row['step'][:12]:<12} "
                     f"{str(status_text)[:12]:<12} {row['requests']:>8}  "
                     + "  ".join(f"{counts[c]:>9}" for c in COLUMNS) + note)
    t = summary["totals"]
    if t:
        lines.append(f"totals: {t['requests']} requests, " + ", ".join(
            f"{t[c]} {c}" for c in COLUMNS) + f"; {t['sent_again']} sent again, "
            f"{t['failed_for_good']} failed for good")
    cost = summary["cost"]
    if cost.get("batch_usd") is not None:
        lines.append(f"cost: ${cost['batch_usd']:.4f} through batches (online: "
                     f"${cost['online_usd'] or 0:.4f})")
    return "\n".join(lines)


def cancel(args: argparse.Namespace) -> int:
    from datagen.batch.ledger import BatchLedger
    from datagen.errors import DatagenError

    try:
        path = find_ledger(args.run)
        ledger = BatchLedger(path)
        try:
            ledger.set_meta("cancel_requested_at", str(time.time()))
            rows = ledger.batches("submitted")
        finally:
            ledger.close()
        done = asyncio.run(_cancel(rows, _keys(args.config)))
    except DatagenError as exc:
        return error(exc)
    if not rows:
        print(f"{path.parent}: no open batch to cancel")
    for line in done:
        print(line)
    if waiting_run(path):
        print("the run waiting on them stops; datagen run --resume sends what is missing "
              "again", file=sys.stderr)
    return EXIT_OK


async def _cancel(rows: list[Any], keys: dict[str, str]) -> list[str]:
    from datagen.batch.http import BatchAPIError

    out = []
    for row in rows:
        api = _api(row, keys)
        try:
            view = await api.cancel(row.batch_id)
            out.append(f"{row.batch_id} ({row.step}): {view.status}")
        except BatchAPIError as err:
            out.append(f"{row.batch_id} ({row.step}): not cancelled: {err.message}")
        finally:
            await api.aclose()
    return out
