"""Documents in: read a folder, chunk by tokens, take a seeded subset, stream the chunks.

- Files: ``.txt``, ``.md``, ``.json`` / ``.jsonl`` (a ``text`` field), and ``.pdf`` /
  ``.docx`` with the ``docs`` extra. A file that cannot be read (not UTF-8, broken JSON, a
  PDF without the extra) is reported by name; by default the whole read stops listing
  every such file (``on_error="skip"`` warns and goes on).
- Chunks follow paragraphs: paragraphs are packed into chunks of at most ``chunk_size``
  tokens; a paragraph too long for one chunk is split at sentence ends (and a sentence
  too long, at token boundaries). Each chunk is an exact slice of its file's text, so its
  paragraph breaks are kept and ``start``/``end`` are true character offsets.
- The chunk cache is keyed by the file's *contents* and the chunk size: editing one file
  re-chunks that file only (Augmentoolkit keys by file name, so edits leave stale chunks).
- ``subset_size`` with ``seed`` picks the same chunks for the same inputs every time
  (reservoir sampling over the files in sorted order, so it still streams).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from datagen.errors import DatagenError
from datagen.pool import seeded_sample
from datagen.redact import get_logger
from datagen.tokens import count_tokens, encoding

log = get_logger("datagen.ingest")
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
JSON_SUFFIXES = (".json", ".jsonl")
DOC_SUFFIXES = (".pdf", ".docx")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+")


class IngestError(DatagenError):
    """Input files that could not be read; the message names each one."""


@dataclass(frozen=True)
class Document:
    source: str  # the path (below the folder read), plus "#n" for the n-th text of a
    # JSON(L) file
    text: str


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8 "
                          "or move it out of the input folder") from None


def _read_json(path: Path) -> Iterator[Document]:
    raw = _read_text(path)
    if path.suffix == ".jsonl":
        values = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    values.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise IngestError(f"{path}, line {n}: not valid JSON ({exc})") from None
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise IngestError(f"{path}: not valid JSON ({exc})") from None
        values = data if isinstance(data, list) else [data]
    for n, value in enumerate(values):
        if not isinstance(value, dict) or not isinstance(value.get("text"), str):
            raise IngestError(f"{path}: entry {n} has no 'text' string field")
        yield Document(f"{path}#{n}", value["text"])


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise IngestError(f"{path}: reading PDF needs the docs extra: pip install "
                          "'datagen[docs]'") from None
    try:
        return "\n\n".join((page.extract_text() or "").strip() for page in
                           PdfReader(str(path)).pages)
    except Exception as exc:  # pypdf raises many types for damaged files
        raise IngestError(f"{path}: cannot read this PDF ({type(exc).__name__}: {exc})") from None


def _read_docx(path: Path) -> str:
    try:
        import docx
    except ImportError:
        raise IngestError(f"{path}: reading DOCX needs the docs extra: pip install "
                          "'datagen[docs]'") from None
    try:
        return "\n\n".join(p.text for p in docx.Document(str(path)).paragraphs)
    except Exception as exc:  # python-docx raises many types for damaged files
        raise IngestError(f"{path}: cannot read this DOCX ({type(exc).__name__}: {exc})") from None


def read_file(path: Path) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield Document(str(path), _read_text(path))
    elif suffix in JSON_SUFFIXES:
        yield from _read_json(path)
    elif suffix == ".pdf":
        yield Document(str(path), _read_pdf(path))
    elif suffix == ".docx":
        yield Document(str(path), _read_docx(path))


def input_files(root: str | Path) -> list[Path]:
    """The readable files under ``root`` (or ``root`` itself), in a stable order."""
    path = Path(root).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise IngestError(f"input path not found: {path}")
    known = TEXT_SUFFIXES + JSON_SUFFIXES + DOC_SUFFIXES
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def read_documents(root: str | Path, on_error: str = "raise") -> Iterator[Document]:
    """Every document under ``root``, one file in memory at a time.

    ``on_error="raise"``: every file is read once first, and if any cannot be, one
    IngestError lists them all before anything is yielded (a pipeline never starts on
    half the input). ``"skip"``: unreadable files are skipped with a warning naming them.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    files = input_files(root)
    if on_error == "raise":
        problems = []
        for path in files:
            try:
                for _ in read_file(path):
                    pass
            except IngestError as exc:
                problems.append(str(exc))
        if problems:
            raise IngestError("these input files cannot be read:\n"
                              + "\n".join(f"  - {p}" for p in problems)
                              + "\nfix or remove them, or pass on_error='skip'")
    base = Path(root).expanduser()
    base = base if base.is_dir() else base.parent
    for path in files:
        try:
            docs = list(read_file(path))
        except IngestError as exc:
            log.warning("skipped: %s", exc)
            warnings.warn(f"skipped {exc}", stacklevel=2)
            continue
        # the source as a path below the folder read, never where that folder lives: it
        # is part of each chunk's content, hence of its key (resume, the cache, a prompt
        # variation, a cluster shard), and a project moved or cloned elsewhere must give
        # the same keys
        where = path.relative_to(base).as_posix()
        for doc in docs:
            yield Document(where + doc.source[len(str(path)):], doc.text)


# ---- chunking --------------------------------------------------------------------------

def _spans(text: str, pattern: re.Pattern[str], start: int, end: int) -> list[tuple[int, int]]:
    """Split text[start:end] after each separator match; spans cover the range exactly."""
    spans, cursor = [], start
    for match in pattern.finditer(text, start, end):
        if match.end() > cursor and match.start() > cursor:
            spans.append((cursor, match.end()))
            cursor = match.end()
    if cursor < end:
        spans.append((cursor, end))
    return spans


def _split_tokens(text: str, start: int, end: int, size: int) -> list[tuple[int, int]]:
    """An oversized sentence in pieces of at most ``size`` tokens, cut at whitespace so no
    word is split (a single word longer than ``size`` tokens is cut where it must be)."""
    enc = encoding()
    spans, cursor = [], start
    while cursor < end:
        tokens = enc.encode(text[cursor:end], disallowed_special=())
        if len(tokens) <= size:
            spans.append((cursor, end))
            break
        stop = min(end, cursor + len(enc.decode(tokens[:size])))
        if not text[stop].isspace() and not text[stop - 1].isspace():
            space = max(text.rfind(c, cursor, stop) for c in (" ", "\n", "\t"))
            if space > cursor:
                stop = space + 1  # the cut falls inside a word: cut before the word
        stop = max(stop, cursor + 1)
        spans.append((cursor, stop))
        cursor = stop
    return spans


def chunk_spans(text: str, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: paragraphs packed up to ``chunk_size`` tokens."""
    if chunk_size < 8:
        raise ValueError("chunk_size must be at least 8 tokens")
    units: list[tuple[int, int, int]] = []  # (start, end, tokens) of paragraphs or pieces
    for start, end in _spans(text, _PARAGRAPH_BREAK, 0, len(text)):
        n = count_tokens(text[start:end])
        if n <= chunk_size:
            units.append((start, end, n))
            continue
        for s_start, s_end in _spans(text, _SENTENCE_END, start, end):
            m = count_tokens(text[s_start:s_end])
            if m <= chunk_size:
                units.append((s_start, s_end, m))
            else:
                units += [(a, b, count_tokens(text[a:b]))
                          for a, b in _split_tokens(text, s_start, s_end, chunk_size)]
    chunks: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    used = 0
    for start, end, n in units:
        if current is not None and used + n <= chunk_size:
            current = (current[0], end)
            used += n
        else:
            if current is not None:
                chunks.append(current)
            current, used = (start, end), n
    if current is not None:
        chunks.append(current)
    # trailing whitespace stays in the text but not in the chunk
    return [(a, a + len(text[a:b].rstrip())) for a, b in chunks if text[a:b].strip()]


class ChunkCache:
    """Chunk boundaries per (file contents, chunk size), as small JSON files."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder).expanduser() if folder else None
        self.hits = self.misses = 0

    def spans(self, text: str, chunk_size: int) -> list[tuple[int, int]]:
        if self.folder is None:
            self.misses += 1
            return chunk_spans(text, chunk_size)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        path = self.folder / f"{digest[:32]}-{chunk_size}.json"
        if path.is_file():
            self.hits += 1
            return [(int(a), int(b)) for a, b in orjson.loads(path.read_bytes())]
        self.misses += 1
        spans = chunk_spans(text, chunk_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(spans))
        tmp.replace(path)
        return spans


def chunks(root: str | Path, chunk_size: int = 1000, subset_size: int | None = None,
           seed: int = 0, cache_dir: str | Path | None = ".datagen_chunks",
           on_error: str = "raise", cache: ChunkCache | None = None
           ) -> Iterator[dict[str, Any]]:
    """The chunks of every document under ``root``, as data-pool items:
    ``{"text", "source", "start", "end", "chunk_index", "tokens"}``.

    Streams (one document in memory at a time) unless ``subset_size`` is set, which keeps
    that many chunks (a seeded reservoir sample) and yields them in document order.
    """
    cache = cache or ChunkCache(cache_dir)

    def every() -> Iterator[dict[str, Any]]:
        for doc in read_documents(root, on_error=on_error):
            for i, (start, end) in enumerate(cache.spans(doc.text, chunk_size)):
                text = doc.text[start:end]
                yield {"text": text, "source": doc.source, "start": start, "end": end,
                       "chunk_index": i, "tokens": count_tokens(text)}

    if subset_size is None:
        yield from every()
        return
    yield from seeded_sample(every(), subset_size, seed)[0]
