"""Reading a judge's verdict: which of a few options a response gives (``extract.choice``).

Judges reason first and give the verdict last ("... so it does not fit. Final Judgment:
unsuitable"), so the verdict is the first option after the last marker (``VERDICT:``,
``Final Judgment:``, ... or the one the step names), and without a marker the last option
mentioned. At one position the longest option wins ("Not suitable" over "suitable"), and
a phrase that negates one option where another option is its negation ("not relevant"
when "irrelevant" is an option) reads as that other option.

The constraint is a GBNF grammar that lets the model reason first (free text, bounded by
the token budget, ending in whitespace), then write the marker if one is set, then
exactly one option: a small model held to it always ends with a verdict, and the prompt's
"think step by step, then answer" still works.
"""

from __future__ import annotations

import json
import re
from typing import Any

from datagen.errors import ExtractionError
from datagen.extract import Extractor, _preview

# what judges write before a verdict: "VERDICT:", "Final Judgment:", "**Answer:**", ...
DEFAULT_MARKERS = re.compile(
    r"(?<!\w)(?:final\s+)?(?:verdict|judge?ment|answer|decision|conclusion|classification)"
    r"\s*\**\s*:", re.IGNORECASE)
_NEGATING_PREFIXES = ("not ", "un", "in", "ir", "im", "il", "non", "non-", "dis")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _phrases(options: tuple[str, ...]) -> dict[str, str]:
    """Every phrase that names an option (lower case) -> that option."""
    phrases = {_norm(o): o for o in options}
    for o in options:
        for p in options:
            if p != o and any(_norm(p) == prefix + _norm(o) for prefix in _NEGATING_PREFIXES):
                phrases.setdefault(f"not {_norm(o)}", p)  # "not relevant" -> "irrelevant"
    return phrases


class ChoiceExtractor(Extractor[str]):
    """Which of ``options`` the response gives, returned as written in ``options``."""

    def __init__(self, *options: str, marker: str | None = None,
                 reasoning: bool = True) -> None:
        if len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
            raise ValueError("choice() needs at least two non-empty options")
        if len({_norm(o) for o in options}) != len(options):
            raise ValueError(f"choice() options must differ (ignoring case): {options}")
        if marker is not None and not (isinstance(marker, str) and marker.strip()):
            raise ValueError("choice(marker=...) must be a non-empty string, e.g. 'VERDICT:'")
        self.options, self.marker, self.reasoning = options, marker, reasoning
        self.name = f"choice({'|'.join(options)})" + (f"@{marker}" if marker else "")
        self._lookup = _phrases(options)
        alternatives = "|".join(r"\s+".join(map(re.escape, phrase.split()))
                                for phrase in sorted(self._lookup, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)({alternatives})(?!\w)", re.IGNORECASE)
        self._markers = re.compile(re.escape(marker.strip()), re.IGNORECASE) if marker \
            else DEFAULT_MARKERS

    def gbnf(self, max_chars: int | None = None) -> str:
        """Optional reasoning (at most ``max_chars`` characters, ending in whitespace;
        none with ``reasoning=False``), the marker if one is set, then exactly one
        option."""
        head = f'{json.dumps(self.marker.strip())} " "? ' if self.marker else ""
        verdict = " | ".join(json.dumps(o) for o in self.options)
        if not self.reasoning:
            return f"root ::= {head}verdict\nverdict ::= {verdict}\n"
        think = ".*" if max_chars is None else f".{{0,{max(1, max_chars)}}}"
        return (f"root ::= think? {head}verdict\n"
                f"think ::= {think} [ \\t\\n]\n"
                f"verdict ::= {verdict}\n")

    def constraint(self, max_tokens: int | None = None) -> dict[str, Any] | None:
        # as for a tag: ~3 characters a token, after ~16 tokens for the verdict itself
        max_chars = None if max_tokens is None else max(16, (max_tokens - 16) * 3)
        return {"grammar": self.gbnf(max_chars)}

    def extract(self, text: str) -> str:
        for marker in reversed(list(self._markers.finditer(text))):
            hit = self._pattern.search(text, marker.end())
            if hit is not None:
                return self._lookup[_norm(hit.group(1))]
        hits = list(self._pattern.finditer(text))
        if not hits:
            raise ExtractionError(f"none of {', '.join(self.options)} in the response: "
                                  f"{_preview(text)!r}")
        return self._lookup[_norm(hits[-1].group(1))]
