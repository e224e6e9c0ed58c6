"""One prompt template, in either of the two syntaxes a prompt file may be written in.

- ``jinja`` (the default): ``{{ name }}``, rendered in a sandbox with ``StrictUndefined``,
  so a variable an item lacks is an error instead of an empty string.
- ``format``: ``{name}``, as ``str.format`` (Augmentoolkit's prompt files, and many
  others). A message whose braces ``str.format`` can read is rendered as ``str.format``
  would (``{{`` is a literal brace); one it cannot read (a few-shot example holding JSON
  or code) has only its ``{identifier}`` placeholders filled and every other brace kept
  as written. A placeholder no item provides is an error at check time, like jinja's,
  unless it is listed in ``prompts.literal_placeholders`` (sent as written: RPToolkit's
  ``{user}``).

Both give the same interface: ``source``, ``variables``, ``render``, ``check``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from datagen.errors import TemplateError

if TYPE_CHECKING:  # jinja2 is imported on first use, not at `import datagen`
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")
_IDENTIFIER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# jinja's own blocks, removed before looking for single-brace {name} placeholders
_JINJA_BLOCK = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
_SINGLE_BRACE = re.compile(r"(?<!\{)\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}(?!\})")
SYNTAXES = ("jinja", "format")


@lru_cache(maxsize=1)
def environment() -> SandboxedEnvironment:
    """The jinja2 environment every datagen template is compiled in."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )


class Template(Protocol):
    path: Path
    source: str
    variables: frozenset[str]

    def render(self, kwargs: Mapping[str, Any], where: str) -> str: ...

    def check(self, kwargs: Mapping[str, Any], where: str) -> None: ...


def _missing_message(path: Path, name: str, where: str, kwargs: Mapping[str, Any],
                     guard: str) -> str:
    keys = ", ".join(sorted(map(str, kwargs))) or "none"
    return (f"{path}: variable '{name}' is undefined for {where} (its keys: {keys}). "
            f"Add it to the item, or {guard}.")


@dataclass(frozen=True)
class JinjaTemplate:
    """One jinja2 template, compiled, with the variables it uses at top level."""

    path: Path
    source: str
    template: jinja2.Template = field(repr=False)
    variables: frozenset[str]
    # a template of only text and {{ name }}: its parts, rendered without jinja's machinery
    # (a new context per render costs ~15 us; the output is the same: str() of each value)
    parts: tuple[tuple[bool, str], ...] | None = field(default=None, repr=False)
    syntax = "jinja"

    @classmethod
    def from_string(cls, source: str, path: str | Path = "<string>") -> JinjaTemplate:
        import jinja2
        from jinja2 import meta

        env = environment()
        try:
            ast = env.parse(source)
            template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"{path}, line {exc.lineno}: template syntax error: {exc.message}"
            ) from None
        variables = frozenset(meta.find_undeclared_variables(ast))
        return cls(Path(path), source, template, variables, _simple_parts(ast))

    def __reduce__(self) -> tuple[Any, tuple[str, Path]]:
        """Pickled as its source, compiled again where it is loaded (a compiled jinja
        template does not pickle): how a pipeline reaches a cluster's workers."""
        return (JinjaTemplate.from_string, (self.source, self.path))

    def render(self, kwargs: Mapping[str, Any], where: str) -> str:
        """Render with ``kwargs``; ``where`` says which item, for the error message."""
        import jinja2

        if self.parts is not None:
            try:
                return "".join(text if literal else str(kwargs[text])
                               for literal, text in self.parts)
            except KeyError:
                pass  # jinja says it properly (a global of that name, or the error)
        try:
            return self.template.render(**kwargs)
        except jinja2.UndefinedError as exc:
            match = _UNDEFINED_NAME.search(str(exc))
            if match is None:
                raise TemplateError(f"{self.path}: {exc} for {where}") from None
            raise TemplateError(_missing_message(
                self.path, match.group(1), where, kwargs,
                "guard it in the template with {% if name is defined %}")) from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{self.path}: cannot render for {where}: {exc}") from None
        except Exception as exc:  # a filter or a value's __str__ raised: still the template's
            raise TemplateError(
                f"{self.path}: rendering for {where} raised {type(exc).__name__}: {exc}"
            ) from exc

    def check(self, kwargs: Mapping[str, Any], where: str) -> None:
        """Raise TemplateError if rendering for this item would fail.

        Fast path: when the item has every top-level variable the template names, only a
        runtime fault could fail, which the real render reports; otherwise render now to
        tell a missing variable from one the template guards with ``is defined``.
        """
        if self.variables.issubset(kwargs.keys()):
            return
        self.render(kwargs, where)

    def single_brace_names(self) -> frozenset[str]:
        """Names written ``{name}`` (str.format style) outside jinja's own blocks."""
        return _single_brace_names(self.source)


@lru_cache(maxsize=256)
def _single_brace_names(source: str) -> frozenset[str]:
    # cached: the pre-check asks once per item (a million times for a million items)
    return frozenset(_SINGLE_BRACE.findall(_JINJA_BLOCK.sub(" ", source)))


def _simple_parts(ast: Any) -> tuple[tuple[bool, str], ...] | None:
    """(is literal text, text or variable name) for a template of only text and plain
    ``{{ name }}`` outputs; None for anything else (filters, tags, attributes...)."""
    from jinja2 import nodes

    parts: list[tuple[bool, str]] = []
    for node in ast.body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                parts.append((True, child.data))
            elif isinstance(child, nodes.Name) and child.ctx == "load":
                parts.append((False, child.name))
            else:
                return None
    return tuple(parts)


def _format_fields(source: str) -> list[str] | None:
    """The field names str.format sees in ``source``, or None when str.format cannot
    read it (or uses a field that is not a plain name: positional, attribute, index)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(source)
                 if name is not None]
    except ValueError:
        return None
    if any(not name.isidentifier() for name in names):
        return None
    return names


@dataclass(frozen=True)
class FormatTemplate:
    """One ``str.format``-style template (see the module docstring)."""

    path: Path
    source: str
    variables: frozenset[str]
    literal: frozenset[str]
    readable: bool  # str.format can read the whole text (else: {identifier} only)
    strip: bool  # chat messages are stripped (as Augmentoolkit does); completion text not
    syntax = "format"

    @classmethod
    def from_string(cls, source: str, path: str | Path = "<string>",
                    literal: frozenset[str] = frozenset(), strip: bool = False
                    ) -> FormatTemplate:
        fields = _format_fields(source)
        names = set(fields) if fields is not None else set(_IDENTIFIER.findall(source))
        return cls(Path(path), source, frozenset(names - literal), literal,
                   fields is not None, strip)

    def render(self, kwargs: Mapping[str, Any], where: str) -> str:
        self.check(kwargs, where)
        if self.readable:
            values = {**{name: "{" + name + "}" for name in self.literal}, **kwargs}
            try:
                text = self.source.format_map(values)
            except (ValueError, KeyError, IndexError, AttributeError) as exc:
                raise TemplateError(f"{self.path}: cannot render for {where}: "
                                    f"{type(exc).__name__}: {exc}") from None
        else:
            def fill(match: re.Match[str]) -> str:
                name = match.group(1)
                return str(kwargs[name]) if name in self.variables else match.group(0)

            text = _IDENTIFIER.sub(fill, self.source)
        return text.strip() if self.strip else text

    def check(self, kwargs: Mapping[str, Any], where: str) -> None:
        for name in sorted(self.variables):
            if name not in kwargs:
                raise TemplateError(_missing_message(
                    self.path, name, where, kwargs,
                    f"write it as {{{{{name}}}}} for a literal brace, or list it in "
                    "prompts.literal_placeholders to send it as written"))

    def single_brace_names(self) -> frozenset[str]:
        return frozenset()


AnyTemplate = JinjaTemplate | FormatTemplate


def make_template(source: str, path: str | Path, syntax: str,
                  literal: frozenset[str] = frozenset(), strip: bool = False) -> AnyTemplate:
    if syntax == "format":
        return FormatTemplate.from_string(source, path, literal, strip)
    if syntax != "jinja":
        raise TemplateError(f"{path}: unknown prompt syntax {syntax!r}; use 'jinja' or "
                            "'format'")
    return JinjaTemplate.from_string(source, path)


def check_single_brace(template: AnyTemplate, available: set[str], where: str) -> None:
    """Under jinja, ``{name}`` where ``name`` is a field the template could use is almost
    surely a str.format placeholder that would be sent literally: an error, before
    anything is sent, naming the file, the placeholder and both fixes."""
    found = sorted(template.single_brace_names() & available)
    if found:
        name = found[0]
        raise TemplateError(
            f"{where}: {template.path} writes {{{name}}} (str.format style), but this "
            f"prompt is read as jinja, where it would be sent literally as '{{{name}}}' "
            f"while '{name}' is a field of the item. Fix: write {{{{ {name} }}}} (jinja), "
            "or read the file as str.format: prompts.syntax: format in config.yaml (or "
            ".step(..., syntax=\"format\")).")
