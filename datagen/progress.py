"""The progress display on stderr: a rich bar on a terminal, a few plain lines elsewhere.

This module (with the CLI) is the only place datagen writes to the terminal; library code
logs through ``logging``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

PLAIN_INTERVAL_S = 30.0


class Display(Protocol):
    def start(self, total: int | None) -> None: ...

    def update(self, done: int, failed: int) -> None: ...

    def step(self, name: str, done: int) -> None: ...

    def usage(self, tokens: int, cost: float | None) -> None: ...

    def calls(self, requests: int, retries: int, rate_limited: int, cache_hits: int) -> None: ...

    def kinds(self, failed: dict[str, int], errors: dict[str, int]) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self, done: int, failed: int, summary: str = "") -> None: ...


def by_kind(label: str, counts: dict[str, int]) -> str:
    """'failed: extraction 3, timeout 1' (empty when there is nothing to say)."""
    if not counts:
        return ""
    return f"; {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


class NoDisplay:
    def start(self, total: int | None) -> None:
        return None

    def update(self, done: int, failed: int) -> None:
        return None

    def step(self, name: str, done: int) -> None:
        return None

    def usage(self, tokens: int, cost: float | None) -> None:
        return None

    def calls(self, requests: int, retries: int, rate_limited: int, cache_hits: int) -> None:
        return None

    def kinds(self, failed: dict[str, int], errors: dict[str, int]) -> None:
        return None

    def note(self, text: str) -> None:
        return None

    def close(self, done: int, failed: int, summary: str = "") -> None:
        return None


def _rate(done: int, started: float) -> float:
    elapsed = time.monotonic() - started
    return done / elapsed if elapsed > 0 else 0.0


class PlainDisplay:
    """For logs and CI: a line at the start, one every 30 s, one at the end."""

    def __init__(self, label: str, stream: Any = None, steps: list[str] | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.started = time.monotonic()
        self.last = self.started
        self.steps: dict[str, int] = dict.fromkeys(steps or [], 0)
        self.tokens: int = 0
        self.cost: float | None = None
        self.counters = (0, 0, 0, 0)
        self.detail = ""
        self._note = ""

    def usage(self, tokens: int, cost: float | None) -> None:
        self.tokens, self.cost = tokens, cost

    def calls(self, requests: int, retries: int, rate_limited: int, cache_hits: int) -> None:
        self.counters = (requests, retries, rate_limited, cache_hits)

    def kinds(self, failed: dict[str, int], errors: dict[str, int]) -> None:
        self.detail = by_kind("failed", failed) + by_kind("errors retried or not", errors)

    def note(self, text: str) -> None:
        """Why the run is waiting (a Retry-After pause...): said once, when it changes."""
        if text and text != self._note:
            self.stream.write(f"datagen {self.label}: {text}\n")
            self.stream.flush()
        self._note = text

    def _line(self, done: int, failed: int) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        steps = ("; steps " + ", ".join(f"{k} {v}" for k, v in self.steps.items())
                 if len(self.steps) > 1 else "")
        money = f", ${self.cost:.4f}" if self.cost else ""
        requests, retries, limited, hits = self.counters
        return (f"datagen {self.label}: {done + failed}{of} items, {done} done, {failed} failed, "
                f"{_rate(done + failed, self.started):.1f} items/s, {requests} requests "
                f"({retries} retries, {limited} 429s, {hits} cache hits), {self.tokens} tokens"
                f"{money}{steps}{self.detail}")

    def step(self, name: str, done: int) -> None:
        self.steps[name] = done

    def start(self, total: int | None) -> None:
        self.total = total
        self.started = self.last = time.monotonic()
        of = f"{total} items" if total is not None else "items from an iterator"
        self.stream.write(f"datagen {self.label}: started, {of}\n")

    def update(self, done: int, failed: int) -> None:
        now = time.monotonic()
        if now - self.last >= PLAIN_INTERVAL_S:
            self.last = now
            self.stream.write(self._line(done, failed) + "\n")

    def close(self, done: int, failed: int, summary: str = "") -> None:
        took = time.monotonic() - self.started
        self.stream.write(self._line(done, failed) + f" in {took:.1f}s\n")
        if summary:
            self.stream.write(f"datagen {self.label}: {summary}\n")
        self.stream.flush()


class RichDisplay:
    """A live view: a bar (items done/total, rate, failures, elapsed, ETA), a bar per step
    for multi-step pipelines, and a line of counters (requests/s, tokens/s, retries, 429s,
    cache hits, dollars so far and projected, failures and errors by kind)."""

    def __init__(self, label: str, console: Any = None, steps: list[str] | None = None
                 ) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )  # fmt: skip
        from rich.text import Text

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} items/s"),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.info = Text("", style="dim")
        self.live = Live(Group(self.progress, self.info), console=self.console,
                         refresh_per_second=4, transient=False)
        self.label = label
        self.task: Any = None
        self.started = time.monotonic()
        self.step_names = steps if steps and len(steps) > 1 else []
        self.step_tasks: dict[str, Any] = {}
        self.tokens: int = 0
        self.cost: float | None = None
        self.counters = (0, 0, 0, 0)
        self.detail = ""
        self._note = ""

    def start(self, total: int | None) -> None:
        self.started = time.monotonic()
        self.task = self.progress.add_task(self.label, total=total, failed=0, rate=0.0)
        for i, name in enumerate(self.step_names):  # the first step sees every item
            self.step_tasks[name] = self.progress.add_task(
                f"  step {name}", total=total if i == 0 else None, failed=0, rate=0.0)
        self.live.start()

    def update(self, done: int, failed: int) -> None:
        self.progress.update(self.task, completed=done + failed, failed=failed,
                             rate=_rate(done + failed, self.started))

    def step(self, name: str, done: int) -> None:
        task = self.step_tasks.get(name)
        if task is not None:
            self.progress.update(task, completed=done, rate=_rate(done, self.started))

    def usage(self, tokens: int, cost: float | None) -> None:
        self.tokens, self.cost = tokens, cost
        self._refresh_info()

    def calls(self, requests: int, retries: int, rate_limited: int, cache_hits: int) -> None:
        self.counters = (requests, retries, rate_limited, cache_hits)
        self._refresh_info()

    def kinds(self, failed: dict[str, int], errors: dict[str, int]) -> None:
        self.detail = by_kind("failed", failed) + by_kind("errors", errors)
        self._refresh_info()

    def note(self, text: str) -> None:
        self._note = text
        self._refresh_info()

    def _refresh_info(self) -> None:
        elapsed = max(1e-9, time.monotonic() - self.started)
        requests, retries, limited, hits = self.counters
        text = (f"{requests / elapsed:.1f} req/s, {self.tokens / elapsed:.0f} tok/s, "
                f"{retries} retries, {limited} x 429, {hits} cache hits")
        if self.cost:
            task = self.progress.tasks[0] if self.progress.tasks else None
            done = task.completed if task else 0
            projected = (f" (projected ${self.cost * task.total / done:.4f})"
                         if task and task.total and done else "")
            text += f", ${self.cost:.4f}{projected}"
        self.info.plain = "  " + text + self.detail + (f"\n  {self._note}" if self._note
                                                       else "")

    def close(self, done: int, failed: int, summary: str = "") -> None:
        self.update(done, failed)
        for task in self.progress.tasks:  # later steps' totals are known only at the end
            if task.total is None:
                self.progress.update(task.id, total=task.completed)
        self.live.refresh()  # the final numbers, not the last periodic frame
        self.live.stop()
        if summary:
            self.console.print(f"[bold]{self.label}[/bold]: {summary}", highlight=False)


def make_display(enabled: bool, label: str, steps: list[str] | None = None) -> Display:
    """Rich on a terminal; plain lines when stderr is redirected; nothing when disabled.
    With several steps, each step gets its own line (rich) or count (plain)."""
    if not enabled:
        return NoDisplay()
    if sys.stderr.isatty():
        return RichDisplay(label, steps=steps)
    return PlainDisplay(label, steps=steps)
