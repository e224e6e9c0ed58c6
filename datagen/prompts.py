"""Prompt files -> chat messages, through one strict, sandboxed jinja2 environment.

StrictUndefined turns a variable an item lacks into an error instead of an empty string
(the silent ``{missing}`` that ``str.format`` pipelines ship to the model). The sandbox
keeps a template from reaching Python internals through an item's values.
"""

from __future__ import annotations

import os
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


_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class StepPrompt:
    """A step's prompt: chat messages (from a .yaml file, or a .txt user prompt with an
    optional .txt system prompt) or, in completion mode, one text.

    Every message is a template rendered with one context: the item's fields, every
    earlier step's output under its name, and ``error_message`` (the reason the last
    attempt failed validation, else None).
    """

    messages: tuple[tuple[str, PromptTemplate], ...]
    files: tuple[Path, ...]

    @property
    def variables(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for _, template in self.messages:
            out |= template.variables
        return out

    @classmethod
    def load(cls, path: Path, system: Path | None = None) -> StepPrompt:
        if path.suffix in (".yaml", ".yml"):
            if system is not None:
                raise TemplateError(f"{path}: a .yaml chat prompt holds its own system "
                                    "message; do not pass system_prompt= as well")
            return cls._from_yaml(path)
        user = PromptTemplate.from_file(path, "user")
        messages: list[tuple[str, PromptTemplate]] = []
        if system is not None:
            messages.append(("system", PromptTemplate.from_file(system, "system")))
        messages.append(("user", user))
        return cls(tuple(messages), tuple(p for p in (system, path) if p is not None))

    @classmethod
    def _from_yaml(cls, path: Path) -> StepPrompt:
        import yaml

        if not path.is_file():
            raise TemplateError(f"prompt file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise TemplateError(f"{path}{where}: YAML syntax error: "
                                f"{getattr(exc, 'problem', exc)}") from None
        if isinstance(data, dict) and "messages" in data:
            data = data["messages"]
        if not isinstance(data, list) or not data:
            raise TemplateError(f"{path}: a chat prompt is a list of messages, each "
                                "{role: system|user|assistant, content: ...}")
        messages = []
        for i, message in enumerate(data, start=1):
            if not isinstance(message, dict) or set(message) != {"role", "content"}:
                raise TemplateError(f"{path}, message {i}: each message needs exactly 'role' "
                                    "and 'content'")
            if message["role"] not in _ROLES:
                raise TemplateError(f"{path}, message {i}: role must be one of "
                                    f"{', '.join(_ROLES)}, not {message['role']!r}")
            template = PromptTemplate.from_string(str(message["content"]),
                                                  f"{path} (message {i})")
            messages.append((str(message["role"]), template))
        if messages[-1][0] == "assistant":
            raise TemplateError(f"{path}: the last message is the assistant's; end with the "
                                "user message the model should answer")
        return cls(tuple(messages), (path,))

    def render(self, context: Mapping[str, Any], where: str) -> list[Message]:
        return [{"role": role, "content": template.render(context, where)}
                for role, template in self.messages]

    def render_text(self, context: Mapping[str, Any], where: str) -> str:
        """Completion mode: the messages' texts, joined (a .txt prompt: just its text)."""
        return "\n\n".join(template.render(context, where) for _, template in self.messages)


def find_prompt(name: str | os.PathLike[str], search: list[Path], step: str) -> Path:
    """A prompt file: absolute as given, else the first of the search folders that has it
    (a pipeline's own prompts/ first, then default folders)."""
    path = Path(name).expanduser()
    if path.is_absolute():
        if path.is_file():
            return path
        raise TemplateError(f"step '{step}': prompt file not found: {path}")
    tried = []
    for folder in search:
        candidate = folder / path
        tried.append(str(candidate))
        if candidate.is_file():
            return candidate.resolve()
    raise TemplateError(f"step '{step}': prompt file {str(path)!r} not found; looked in: "
                        + ", ".join(tried))
