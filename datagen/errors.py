"""Errors a user can cause, each with a message that says what to fix.

Pipeline-level faults (bad config, bad template, bad pool, invalid API key) raise one of
these and stop the run. Item-level faults (an extractor that finds nothing, a request that
still fails after its retries) never raise: they become a line in the failures file.
"""

from __future__ import annotations


def a_type(value: object) -> str:
    """'a str', 'an int': the type of ``value`` with its article, for messages."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


class DatagenError(Exception):
    """Base class of every error datagen raises on purpose."""


class ConfigError(DatagenError):
    """config.yaml or a constructor keyword is wrong."""


class TemplateError(DatagenError):
    """A prompt file is missing, does not parse, or cannot be rendered for an item."""


class DataPoolError(DatagenError):
    """The data pool, or one of its items, does not have the expected shape."""


class OutputError(DatagenError):
    """The output files cannot be created or written."""


class ExtractionError(DatagenError):
    """An extractor could not find what it looks for in a response (an item-level fault)."""


class RunAbortedError(DatagenError):
    """A fault that no retry can fix stopped the whole run (for example an invalid API key).

    ``kind`` names the fault (``auth``, ``not_found``, ...); the files written so far stay
    valid and the manifest records why the run stopped.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
