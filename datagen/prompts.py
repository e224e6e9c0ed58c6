"""Prompt files -> chat messages, through one strict, sandboxed jinja2 environment.

StrictUndefined turns a variable an item lacks into an error instead of an empty string
(the silent ``{missing}`` that ``str.format`` pipelines ship to the model). The sandbox
keeps a template from reaching Python internals through an item's values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datagen.errors import TemplateError

if TYPE_CHECKING:  # jinja2 is imported on first use, not at `import datagen`
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

Message = dict[str, str]
_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")


@lru_cache(maxsize=1)
def environment() -> SandboxedEnvironment:
    """The jinja2 environment every datagen template is compiled in."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )


@dataclass(frozen=True)
class PromptTemplate:
    """One template file, compiled, with the variables it uses at top level."""

    path: Path
    source: str
    template: jinja2.Template = field(repr=False)
    variables: frozenset[str]

    @classmethod
    def from_file(cls, path: str | Path, role: str) -> PromptTemplate:
        p = Path(path)
        if not p.is_file():
            raise TemplateError(
                f"{role} prompt file not found: {p}. Check prompts.{role}_prompt_path in "
                "config.yaml (relative paths there are read from the config file's folder)."
            )
        try:
            source = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TemplateError(f"{p}: not UTF-8 text; save the prompt file as UTF-8") from None
        return cls.from_string(source, p)

    @classmethod
    def from_string(cls, source: str, path: str | Path = "<string>") -> PromptTemplate:
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
        return cls(Path(path), source, template, variables)

    def render(self, kwargs: Mapping[str, Any], where: str) -> str:
        """Render with ``kwargs``; ``where`` says which item, for the error message."""
        import jinja2

        try:
            return self.template.render(**kwargs)
        except jinja2.UndefinedError as exc:
            match = _UNDEFINED_NAME.search(str(exc))
            what = f"variable '{match.group(1)}'" if match else str(exc)
            keys = ", ".join(sorted(map(str, kwargs))) or "none"
            raise TemplateError(
                f"{self.path}: {what} is undefined for {where} (its keys: {keys}). "
                "Add it to the item, or guard it in the template with "
                "{% if name is defined %}."
            ) from None
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


@dataclass(frozen=True)
class ChatPrompt:
    """A system template (optional) and a user template: the single-step prompt form."""

    user: PromptTemplate
    system: PromptTemplate | None = None

    @classmethod
    def from_files(cls, user_path: str | Path | None, system_path: str | Path | None
                   ) -> ChatPrompt:
        if not user_path:
            raise TemplateError(
                "no user prompt: set prompts.user_prompt_path in config.yaml or pass "
                "user_prompt_path=... to DataGenerationPipeline"
            )
        user = PromptTemplate.from_file(user_path, "user")
        system = PromptTemplate.from_file(system_path, "system") if system_path else None
        return cls(user=user, system=system)

    def check(self, user_kwargs: Mapping[str, Any], system_kwargs: Mapping[str, Any],
              where: str) -> None:
        self.user.check(user_kwargs, f"{where} (user_prompt_kwargs)")
        if self.system is not None:
            self.system.check(system_kwargs, f"{where} (system_prompt_kwargs)")

    def messages(self, user_kwargs: Mapping[str, Any], system_kwargs: Mapping[str, Any],
                 where: str) -> list[Message]:
        out: list[Message] = []
        if self.system is not None:
            out.append({"role": "system",
                        "content": self.system.render(system_kwargs,
                                                      f"{where} (system_prompt_kwargs)")})
        out.append({"role": "user",
                    "content": self.user.render(user_kwargs, f"{where} (user_prompt_kwargs)")})
        return out
