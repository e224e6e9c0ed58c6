"""Prompt files -> chat messages.

A prompt file is a ``.txt`` (one message) or a ``.yaml`` chat (a list of ``{role,
content}``, few-shot turns welcome, optionally ending with the assistant's opening words:
a prefill). Its placeholders are jinja (default: strict and sandboxed, so a variable an
item lacks is an error, never the silent ``{missing}`` of a naive str.format pipeline) or
``str.format`` (``prompts.syntax: format``), see :mod:`datagen.templates`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.errors import TemplateError
from datagen.templates import (
    AnyTemplate,
    JinjaTemplate,
    check_single_brace,
    environment,
    make_template,
)  # fmt: skip

Message = dict[str, Any]
__all__ = ["ChatPrompt", "JinjaTemplate", "PromptTemplate", "StepPrompt", "Syntax",
           "environment", "find_prompt"]


def read_prompt_file(path: Path, role: str) -> str:
    """A prompt file's text; a missing, undecodable or empty file is a clear error."""
    if not path.is_file():
        raise TemplateError(
            f"{role} prompt file not found: {path}. Check prompts.{role}_prompt_path in "
            "config.yaml (relative paths there are read from the config file's folder)."
            if role in ("user", "system") else f"prompt file not found: {path}")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TemplateError(f"{path}: not UTF-8 text; save the prompt file as UTF-8") from None
    if not source.strip():
        raise TemplateError(f"{path}: the prompt file is empty; write the prompt in it (an "
                            "empty prompt would be sent as an empty message)")
    return source


@dataclass(frozen=True)
class Syntax:
    """How a prompt's placeholders are written (see datagen.templates)."""

    name: str = "jinja"
    literal: frozenset[str] = frozenset()

    def template(self, source: str, path: str | Path, strip: bool = False) -> AnyTemplate:
        return make_template(source, path, self.name, self.literal, strip)


class PromptTemplate:
    """Loading a single template file (kept for the single-step form and its tests)."""

    @staticmethod
    def from_file(path: str | Path, role: str, syntax: Syntax | None = None) -> AnyTemplate:
        p = Path(path)
        return (syntax or Syntax()).template(read_prompt_file(p, role), p)

    @staticmethod
    def from_string(source: str, path: str | Path = "<string>",
                    syntax: Syntax | None = None) -> AnyTemplate:
        return (syntax or Syntax()).template(source, path)


@dataclass(frozen=True)
class ChatPrompt:
    """A system template (optional) and a user template: the single-step prompt form."""

    user: AnyTemplate
    system: AnyTemplate | None = None

    @classmethod
    def from_files(cls, user_path: str | Path | None, system_path: str | Path | None,
                   syntax: Syntax | None = None) -> ChatPrompt:
        if not user_path:
            raise TemplateError(
                "no user prompt: set prompts.user_prompt_path in config.yaml or pass "
                "user_prompt_path=... to DataGenerationPipeline"
            )
        user = PromptTemplate.from_file(user_path, "user", syntax)
        system = PromptTemplate.from_file(system_path, "system", syntax) if system_path \
            else None
        return cls(user=user, system=system)

    def check(self, user_kwargs: Mapping[str, Any], system_kwargs: Mapping[str, Any],
              where: str) -> None:
        check_single_brace(self.user, set(user_kwargs), f"{where} (user_prompt_kwargs)")
        self.user.check(user_kwargs, f"{where} (user_prompt_kwargs)")
        if self.system is not None:
            check_single_brace(self.system, set(system_kwargs),
                               f"{where} (system_prompt_kwargs)")
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
    attempt failed validation, else None). A chat whose last message is the assistant's
    is a prefill: the model continues that message.
    """

    messages: tuple[tuple[str, AnyTemplate], ...]
    files: tuple[Path, ...]

    @property
    def variables(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for _, template in self.messages:
            out |= template.variables
        return out

    @property
    def has_prefill(self) -> bool:
        return self.messages[-1][0] == "assistant"

    @classmethod
    def load(cls, path: Path, system: Path | None = None,
             syntax: Syntax | None = None) -> StepPrompt:
        syntax = syntax or Syntax()
        if path.suffix in (".yaml", ".yml"):
            if system is not None:
                raise TemplateError(f"{path}: a .yaml chat prompt holds its own system "
                                    "message; do not pass system_prompt= as well")
            return cls._from_yaml(path, syntax)
        user = PromptTemplate.from_file(path, "prompt", syntax)
        messages: list[tuple[str, AnyTemplate]] = []
        if system is not None:
            messages.append(("system", PromptTemplate.from_file(system, "prompt", syntax)))
        messages.append(("user", user))
        return cls(tuple(messages), tuple(p for p in (system, path) if p is not None))

    @classmethod
    def _from_yaml(cls, path: Path, syntax: Syntax) -> StepPrompt:
        import yaml

        source = read_prompt_file(path, "prompt")
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise TemplateError(f"{path}{where}: YAML syntax error: "
                                f"{getattr(exc, 'problem', exc)}") from None
        if isinstance(data, dict) and "messages" in data:
            if "syntax" in data:  # a file may say how it is written
                syntax = Syntax(str(data["syntax"]), syntax.literal)
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
            template = syntax.template(str(message["content"] or ""), f"{path} (message {i})",
                                       strip=True)
            messages.append((str(message["role"]), template))
        if all(role == "assistant" for role, _ in messages):
            raise TemplateError(f"{path}: a chat prompt needs a user (or system) message "
                                "before the assistant's")
        return cls(tuple(messages), (path,))

    def render(self, context: Mapping[str, Any], where: str) -> list[Message]:
        return [{"role": role, "content": template.render(context, where)}
                for role, template in self.messages]

    def render_text(self, context: Mapping[str, Any], where: str) -> str:
        """Completion mode: the messages' texts, joined (a .txt prompt: just its text)."""
        return "\n\n".join(template.render(context, where) for _, template in self.messages)


def check_single_braces(prompt: StepPrompt, available: set[str], where: str) -> None:
    for _, template in prompt.messages:
        check_single_brace(template, available, where)


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
