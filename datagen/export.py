"""Datasets out: ShareGPT JSONL, OpenAI chat-messages JSONL, Hugging Face datasets.

Every export reads a results file (or a run's folder: its newest results file) and maps
each record to a conversation, a list of ``{"role", "content"}`` messages. The default
mapping: the messages that produced the record's output (the last step's, for a
multi-step record), then the output as the assistant's turn. Pass ``mapper=`` for
anything else (e.g. style transfer: generic text as the user turn, the original as the
assistant's); return None from it to leave a record out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import DatagenError

Conversation = list[dict[str, str]]
Mapper = Callable[[dict[str, Any]], "Conversation | None"]
_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


class ExportError(DatagenError):
    """A results file that cannot be exported as asked."""


def results_file(path: str | Path) -> Path:
    """A results file, or the newest results file in a run folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        candidates = [f for f in p.glob("*.jsonl") if not f.stem.endswith(
            ("_failures", "_meta", "_dropped", "_pool"))]
        if candidates:
            return max(candidates, key=lambda f: f.stat().st_mtime)
        raise ExportError(f"no results file (*.jsonl) in {p}")
    raise ExportError(f"results file not found: {p}")


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


def default_conversation(record: dict[str, Any]) -> Conversation:
    """The prompt that produced the output, then the output as the assistant's turn."""
    if "steps" in record:
        last = list(record["steps"].values())[-1]
        messages = last.get("messages")
        if messages is None and "prompt" in last:
            messages = [{"role": "user", "content": last["prompt"]}]
        output = last.get("output", record.get("output"))
    else:
        messages, output = record.get("messages"), record.get("output")
    if not messages:
        raise ExportError(f"record {record.get('key')} has no rendered messages (written by an "
                          "older datagen?): pass mapper= to say how to build the conversation")
    return [*({"role": m["role"], "content": m["content"]} for m in messages),
            {"role": "assistant", "content": _as_text(output)}]


def conversations(path: str | Path, mapper: Mapper | None = None) -> Iterator[Conversation]:
    build = mapper or default_conversation
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


def _write(out: str | Path, rows: Iterator[dict[str, Any]]) -> int:
    target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    n = 0
    with open(tmp, "wb") as fh:
        for row in rows:
            fh.write(orjson.dumps(row) + b"\n")
            n += 1
    tmp.replace(target)  # a half-written export never replaces a good one
    return n


def to_openai(results: str | Path, out: str | Path, mapper: Mapper | None = None) -> int:
    """OpenAI chat fine-tuning JSONL: ``{"messages": [...]}`` per line. Returns the count."""
    return _write(out, ({"messages": c} for c in conversations(results, mapper)))


def to_sharegpt(results: str | Path, out: str | Path, mapper: Mapper | None = None) -> int:
    """ShareGPT JSONL: ``{"conversations": [{"from": "human", "value": ...}, ...]}``."""
    return _write(out, ({"conversations": [{"from": _SHAREGPT_ROLE[t["role"]],
                                            "value": t["content"]} for t in c]}
                        for c in conversations(results, mapper)))


def to_hf(results: str | Path, mapper: Mapper | None = None, style: str = "openai") -> Any:
    """A Hugging Face ``datasets.Dataset`` (extra ``hf``): a ``messages`` column (style
    "openai") or a ``conversations`` column (style "sharegpt"). ``.to_parquet(path)``
    writes parquet."""
    try:
        import datasets
    except ImportError:
        raise ExportError("the Hugging Face export needs the hf extra: pip install "
                          "'datagen[hf]'") from None
    rows = list(conversations(results, mapper))
    if style == "sharegpt":
        data = {"conversations": [[{"from": _SHAREGPT_ROLE[t["role"]], "value": t["content"]}
                                   for t in c] for c in rows]}
    else:
        data = {"messages": rows}
    return datasets.Dataset.from_dict(data)
