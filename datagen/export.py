"""Datasets out: ShareGPT JSONL, OpenAI chat-messages JSONL, Hugging Face datasets.

Every export reads a results file (or a run's folder: its newest results file) and maps
each record to a conversation, a list of ``{"role", "content"}`` messages. The default
mapping: the messages that produced the record's output, then the output as the
assistant's turn. A multi-step record has one such pair per step, so which one is the
training pair must be said: ``step="answer"``, or ``mapper=`` for anything else (e.g. QA
pairs, or style transfer: generic text as the user turn, the original as the
assistant's); a mapper returns None to leave a record out. Nothing is guessed: a
multi-step record without either is an error that lists its steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import DatagenError

Conversation = list[dict[str, str]]
Mapper = Callable[[dict[str, Any]], "Conversation | None"]
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


class ExportError(DatagenError):
    """A results file that cannot be exported as asked."""


_NOT_RESULTS = ("_failures", "_meta", "_dropped", "_sharegpt", "_openai", "_pool")


def results_file(path: str | Path) -> Path:
    """A results file, or the newest results file in a run folder (a run's results have
    a manifest beside them; exports and the failures file are never taken for one)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        candidates = [f for f in p.glob("*.jsonl") if not f.stem.endswith(_NOT_RESULTS)]
        runs = [f for f in candidates if manifest_of(f).exists()]
        if runs or candidates:
            return max(runs or candidates, key=lambda f: f.stat().st_mtime)
        raise ExportError(f"no results file (*.jsonl) in {p}")
    raise ExportError(f"results file not found: {p}")


def manifest_of(results: Path) -> Path:
    return results.with_name(results.stem + "_manifest.json")


def failures_of(results: Path) -> Path:
    return results.with_name(results.stem + "_failures.jsonl")


def records(path: str | Path) -> Iterator[dict[str, Any]]:
    source = results_file(path)
    with open(source, "rb") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise ExportError(f"{source}, line {n}: not a JSON record") from None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def default_conversation(record: dict[str, Any], step: str | None = None) -> Conversation:
    """The prompt that produced the output (of ``step``, for a multi-step record), then the
    output as the assistant's turn."""
    if "steps" in record:
        steps = record["steps"]
        names = ", ".join(map(str, steps))
        if step is None and len(steps) > 1:
            raise ExportError(
                f"record {record.get('key')} comes from a multi-step run (steps: {names}): "
                "say which step's prompt and output make the training pair with step=NAME "
                "(datagen export --step NAME), or build the conversation with a "
                "mapper(record) (datagen export uses the one in the pipeline's pipeline.py)")
        name = step if step is not None else next(iter(steps))
        if name not in steps:
            raise ExportError(f"record {record.get('key')} has no step '{name}' (its steps: "
                              f"{names})")
        trace = steps[name]
        messages = trace.get("messages")
        if messages is None and "prompt" in trace:
            messages = [{"role": "user", "content": trace["prompt"]}]
        output = trace.get("output")
    else:
        if step not in (None, "output"):
            raise ExportError(f"record {record.get('key')} comes from a single-step run: "
                              f"it has no step '{step}' (leave the step out)")
        messages, output = record.get("messages"), record.get("output")
    if not messages:
        raise ExportError(f"record {record.get('key')} has no rendered messages (written by an "
                          "older datagen?): pass mapper= to say how to build the conversation")
    return [*({"role": m["role"], "content": m["content"]} for m in messages),
            {"role": "assistant", "content": _as_text(output)}]


def conversations(path: str | Path, mapper: Mapper | None = None, step: str | None = None
                  ) -> Iterator[Conversation]:
    build = mapper or partial(default_conversation, step=step)
    for record in records(path):
        conversation = build(record)
        if conversation is None:
            continue
        for turn in conversation:
            if turn.get("role") not in _SHAREGPT_ROLE or not isinstance(turn.get("content"), str):
                raise ExportError(f"record {record.get('key')}: each turn must be "
                                  "{'role': system|user|assistant, 'content': str}, got "
                                  f"{turn!r}")
        yield conversation


def _write(out: str | Path, rows: Iterator[dict[str, Any]], overwrite: bool = True) -> int:
    target = Path(out).expanduser()
    if not overwrite and target.exists():
        raise exists_error(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    n = 0
    try:
        with open(tmp, "wb") as fh:
            for row in rows:
                fh.write(orjson.dumps(row) + b"\n")
                n += 1
        if overwrite:
            tmp.replace(target)  # a half-written export never replaces a good one
        else:
            _link_new(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def exists_error(target: Path) -> ExportError:
    return ExportError(f"{target} already exists and was not written by this export (an "
                       "earlier export, or the pipeline's own export()): it is left as it "
                       "is. Choose another file with --out, or remove it first")


def _link_new(tmp: Path, target: Path) -> None:
    """``tmp`` becomes ``target`` only if no file of that name appeared meanwhile."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise exists_error(target) from None
    except OSError:  # no hard links on this file system: check, then move
        if target.exists():
            raise exists_error(target) from None
        tmp.replace(target)


def to_openai(results: str | Path, out: str | Path, mapper: Mapper | None = None,
              step: str | None = None, overwrite: bool = True) -> int:
    """OpenAI chat fine-tuning JSONL: ``{"messages": [...]}`` per line. Returns the count.
    ``overwrite=False`` refuses an ``out`` that exists."""
    return _write(out, ({"messages": c} for c in conversations(results, mapper, step)),
                  overwrite)


def to_sharegpt(results: str | Path, out: str | Path, mapper: Mapper | None = None,
                step: str | None = None, overwrite: bool = True) -> int:
    """ShareGPT JSONL: ``{"conversations": [{"from": "human", "value": ...}, ...]}``."""
    return _write(out, ({"conversations": [{"from": _SHAREGPT_ROLE[t["role"]],
                                            "value": t["content"]} for t in c]}
                        for c in conversations(results, mapper, step)), overwrite)


def to_hf(results: str | Path, mapper: Mapper | None = None, style: str = "openai",
          step: str | None = None) -> Any:
    """A Hugging Face ``datasets.Dataset`` (extra ``hf``): a ``messages`` column (style
    "openai") or a ``conversations`` column (style "sharegpt"). ``.to_parquet(path)``
    writes parquet."""
    try:
        import datasets
    except ImportError:
        raise ExportError("the Hugging Face export needs the hf extra: pip install "
                          "'datagen[hf]'") from None
    rows = list(conversations(results, mapper, step))
    if style == "sharegpt":
        data = {"conversations": [[{"from": _SHAREGPT_ROLE[t["role"]], "value": t["content"]}
                                   for t in c] for c in rows]}
    else:
        data = {"messages": rows}
    return datasets.Dataset.from_dict(data)
