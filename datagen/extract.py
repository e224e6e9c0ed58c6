"""Extractor factories: turn a model's raw text into the value a record keeps.

Every factory returns an :class:`Extractor`, a plain callable ``str -> value`` that raises
:class:`~datagen.errors.ExtractionError` when it finds nothing. Any other callable, sync
or async, works in its place. Extractors carry a ``name`` (part of a run's fingerprint)
and, where one exists, a description of the output shape a constrained decoder can
enforce (``tag_name``, ``json_schema``).
"""

from __future__ import annotations

import inspect
import json as _json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from datagen.errors import ExtractionError

if TYPE_CHECKING:
    from datagen.choice import ChoiceExtractor

T = TypeVar("T")
_FENCE = re.compile(r"(?P<fence>```|~~~)[ \t]*(?P<lang>[\w+#.-]*)[^\n]*\n(?P<body>.*?)(?P=fence)",
                    re.DOTALL)


def _preview(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class Extractor(Generic[T]):
    """A named ``str -> T`` callable. Subclasses implement :meth:`extract`."""

    name: str = "extractor"
    datagen_builtin = True  # trusted: runs on the event loop, no thread hand-off
    tag_name: str | None = None
    json_schema: dict[str, Any] | None = None

    def constraint(self, max_tokens: int | None = None) -> dict[str, Any] | None:
        """Request parameters that make a model's output parse (a GBNF grammar or a JSON
        response format), or None. Sent to models that honour them (model.constrain_output).
        ``max_tokens`` lets a grammar end the output before the token budget runs out."""
        return None

    def __call__(self, text: str) -> T:
        if not isinstance(text, str):
            raise ExtractionError(f"{self.name}: expected text, got {type(text).__name__}")
        return self.extract(text)

    def extract(self, text: str) -> T:  # pragma: no cover - abstract
        raise NotImplementedError

    def then(self, fn: Callable[[T], Any]) -> ThenExtractor:
        """This extractor, then ``fn`` on what it found: ``extract.tag("poem").then(parse)``.

        The result keeps this extractor's output constraint (its grammar or JSON schema),
        so a model held to the format still is. ``fn`` may be sync or async, may return
        ``DROP``, and may raise :class:`~datagen.errors.ExtractionError` to say the answer
        is wrong (the step retries with that reason)."""
        return ThenExtractor(self, fn)

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _function_name(fn: Any) -> str:
    return str(getattr(fn, "name", None) or getattr(fn, "__qualname__", None)
               or type(fn).__name__)


class ThenExtractor(Extractor[Any]):
    """An extractor followed by a function of the user's: the pair has the extractor's
    constraint and a name of both (``tag(poem).then(parse)``, part of the fingerprint).
    Not trusted: it runs user code, so the engine calls it off the event loop, with a
    timeout. With an async ``fn`` a call returns an awaitable (the engine awaits it)."""

    datagen_builtin = False

    def __init__(self, base: Extractor[Any], fn: Callable[[Any], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"then() takes a function, not {type(fn).__name__}")
        self.base, self.fn = base, fn
        self.name = f"{base.name}.then({_function_name(fn)})"
        self.tag_name, self.json_schema = base.tag_name, base.json_schema

    def constraint(self, max_tokens: int | None = None) -> dict[str, Any] | None:
        return self.base.constraint(max_tokens)

    def constraint_after(self, prefill: str, max_tokens: int | None = None
                         ) -> dict[str, Any] | None:
        after = getattr(self.base, "constraint_after", None)
        return after(prefill, max_tokens) if callable(after) else None

    def extract(self, text: str) -> Any:
        value = self.base(text)
        if inspect.isawaitable(value):  # an async function earlier in the chain
            return self._later(value)
        return self._apply(value)

    def _apply(self, value: Any) -> Any:
        from datagen.steps import drop_reason

        return value if drop_reason(value) is not None else self.fn(value)

    async def _later(self, pending: Any) -> Any:
        result = self._apply(await pending)
        return await result if inspect.isawaitable(result) else result


class TagExtractor(Extractor[str]):
    """The stripped text of the first complete ``<tag>...</tag>`` block."""

    def __init__(self, tag: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", tag):
            raise ValueError(f"not a valid tag name: {tag!r} (use letters, digits, _ . -)")
        self.tag_name = tag
        self.name = f"tag({tag})"
        self._open = re.compile(rf"<{re.escape(tag)}(?:\s[^<>]*)?>")
        self._close = re.compile(rf"</{re.escape(tag)}\s*>")

    def gbnf(self, max_chars: int | None = None) -> str:
        """A GBNF grammar for exactly one non-empty ``<tag>...</tag>`` block.

        With ``max_chars`` the body is bounded, so a small model that would ramble until
        its token budget runs out has to close the tag in time.
        """
        t = self.tag_name
        rest = "[^<]*" if max_chars is None else f"[^<]{{0,{max(1, max_chars - 1)}}}"
        return f'root ::= "<{t}>" [ \\t\\n]* [^< \\t\\n] {rest} "</{t}>"\n'

    def constraint(self, max_tokens: int | None = None) -> dict[str, Any] | None:
        # ~3 characters per token, after ~16 tokens for the two tags and any leading
        # whitespace, leaves room for the closing tag in any English text
        max_chars = None if max_tokens is None else max(16, (max_tokens - 16) * 3)
        return {"grammar": self.gbnf(max_chars)}

    def constraint_after(self, prefill: str, max_tokens: int | None = None
                         ) -> dict[str, Any] | None:
        """The constraint for the continuation of the assistant's opening words: the block
        whole, or only its body and closing tag when the prefill opened it already."""
        if not prefill.rstrip().endswith(f"<{self.tag_name}>"):
            return self.constraint(max_tokens)
        max_chars = None if max_tokens is None else max(16, (max_tokens - 16) * 3)
        rest = "[^<]*" if max_chars is None else f"[^<]{{0,{max(1, max_chars - 1)}}}"
        return {"grammar": f'root ::= [ \\t\\n]* [^< \\t\\n] {rest} "</{self.tag_name}>"\n'}

    def extract(self, text: str) -> str:
        # The first closing tag ends the first complete block; its opening tag is the last
        # one before it (so "<d> stray <d>real</d>" gives "real").
        for close in self._close.finditer(text):
            opens = list(self._open.finditer(text, 0, close.start()))
            if not opens:
                continue
            body = text[opens[-1].end(): close.start()].strip()
            if body:
                return body
            raise ExtractionError(f"<{self.tag_name}> block is empty")
        raise ExtractionError(
            f"no complete <{self.tag_name}>...</{self.tag_name}> block in the response: "
            f"{_preview(text)!r}"
        )


class RegexExtractor(Extractor[Any]):
    """The first match of a pattern.

    Returns the named ``group`` if given; else the only named group; else a dict of all
    named groups; else group 1 (or the whole match when the pattern has no groups).
    """

    def __init__(self, pattern: str | re.Pattern[str], group: str | int | None = None,
                 flags: int = 0) -> None:
        self.pattern = re.compile(pattern, flags) if isinstance(pattern, str) else pattern
        names = list(self.pattern.groupindex)
        if group is not None and isinstance(group, str) and group not in names:
            raise ValueError(f"pattern {self.pattern.pattern!r} has no group named {group!r}")
        self.group = group
        self.name = f"regex({self.pattern.pattern})"

    def extract(self, text: str) -> Any:
        match = self.pattern.search(text)
        if match is None:
            raise ExtractionError(
                f"pattern {self.pattern.pattern!r} not found in the response: {_preview(text)!r}"
            )
        if self.group is not None:
            return match.group(self.group)
        names = list(self.pattern.groupindex)
        if len(names) == 1:
            return match.group(names[0])
        if names:
            return match.groupdict()
        return match.group(1) if self.pattern.groups else match.group(0)


def _json_candidates(text: str) -> list[str]:
    """Places a JSON value may start: the whole text, fenced blocks, then each { or [."""
    out = [text.strip()]
    out += [m.group("body").strip() for m in _FENCE.finditer(text)]
    return out


def find_json(text: str) -> Any:
    """The first JSON value in ``text``, tolerating code fences and surrounding prose."""
    decoder = _json.JSONDecoder()
    for candidate in _json_candidates(text):
        if not candidate:
            continue
        try:
            return _json.loads(candidate)
        except ValueError:
            pass
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
                return value
            except ValueError:
                continue
    raise ExtractionError(f"no JSON value found in the response: {_preview(text)!r}")


class JsonExtractor(Extractor[Any]):
    """The first JSON value in the response; validated into ``schema`` if one is given.

    ``schema`` may be a pydantic model class (the value becomes an instance of it) or any
    type pydantic's TypeAdapter accepts (``list[Question]``, ``dict[str, int]``, ...).
    """

    def __init__(self, schema: Any = None) -> None:
        self.schema = schema
        self._adapter: Any = None
        if schema is None:
            self.name = "json"
            return
        from pydantic import TypeAdapter

        self._adapter = TypeAdapter(schema)
        self.json_schema = self._adapter.json_schema()
        self.name = f"json({getattr(schema, '__name__', repr(schema))})"

    def constraint(self, max_tokens: int | None = None) -> dict[str, Any] | None:
        fmt: dict[str, Any] = {"type": "json_object"}
        if self.json_schema is not None:
            fmt["schema"] = self.json_schema
        return {"response_format": fmt}

    def extract(self, text: str) -> Any:
        value = find_json(text)
        if self._adapter is None:
            return value
        from pydantic import ValidationError

        try:
            return self._adapter.validate_python(value)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
            )
            raise ExtractionError(f"JSON does not match {self.name[5:-1]}: {problems}") from None


class CodeBlockExtractor(Extractor[str]):
    """The body of the first fenced code block (of ``language``, if given)."""

    def __init__(self, language: str | None = None) -> None:
        self.language = language.lower() if language else None
        self.name = f"code({language or ''})"

    def extract(self, text: str) -> str:
        for match in _FENCE.finditer(text):
            if self.language is None or match.group("lang").lower() == self.language:
                return match.group("body").rstrip("\n")
        lang = f"```{self.language}" if self.language else "fenced"
        raise ExtractionError(f"no {lang} code block in the response: {_preview(text)!r}")


def choice(*options: str, marker: str | None = None, reasoning: bool = True
           ) -> ChoiceExtractor:
    """Which of ``options`` a judge's response gives (e.g. ``choice("PASS", "FAIL")``):
    the first option after the last ``marker`` (default: common ones such as
    ``VERDICT:``, ``Final Judgment:``, ``Answer:``), else the last option mentioned.
    Its grammar lets the model reason first (``reasoning=False``: the option alone),
    then write the marker if one is given, then exactly one option."""
    from datagen.choice import ChoiceExtractor

    return ChoiceExtractor(*options, marker=marker, reasoning=reasoning)


def tag(name: str) -> TagExtractor:
    """Extract the text of the first complete ``<name>...</name>`` block, stripped."""
    return TagExtractor(name)


def regex(pattern: str | re.Pattern[str], group: str | int | None = None,
          flags: int = 0) -> RegexExtractor:
    """Extract the first match of ``pattern`` (see :class:`RegexExtractor`)."""
    return RegexExtractor(pattern, group, flags)


def json(schema: Any = None) -> JsonExtractor:
    """Extract the first JSON value, optionally validated into ``schema``."""
    return JsonExtractor(schema)


def pydantic(model: type[T]) -> JsonExtractor:
    """Extract JSON and validate it into the pydantic ``model`` (an instance is returned)."""
    return JsonExtractor(model)


def code(language: str | None = None) -> CodeBlockExtractor:
    """Extract the body of the first fenced code block, optionally of ``language``."""
    return CodeBlockExtractor(language)


def make_default_extractor(pattern_name: str = "draft") -> TagExtractor:
    """The template's default: the text between ``<pattern_name>`` tags."""
    return TagExtractor(pattern_name)
