"""What the providers check before they accept a batch, for the fake batch server.

OpenAI reads the input file while the batch is "validating" and fails the whole batch with
``errors.data[]`` naming each bad line; a bad body inside a good file is that request's 400.
Anthropic refuses a malformed create with a 400 at once and reports bad ``params`` as an
errored result when the batch ends. Pure functions; see ``fake_batch_server``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from datagen.testing import fake_batch_shapes as shapes

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def metadata_ok(metadata: Any) -> bool:
    """OpenAI's metadata: at most 16 pairs, keys up to 64 and values up to 512 characters."""
    if metadata is None:
        return True
    return isinstance(metadata, dict) and len(metadata) <= 16 and all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
        for k, v in metadata.items())


@dataclass
class OpenAIInput:
    """An OpenAI batch input file, read: its requests and what is wrong with it."""

    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    seen: set[str] = field(default_factory=set)


def read_openai_input(data: bytes, endpoint: str, max_requests: int, max_bytes: int
                      ) -> OpenAIInput:
    """Every check OpenAI makes while a batch is validating, each naming its line."""
    read = OpenAIInput()
    lines = data.splitlines()
    if not lines:
        read.errors.append(shapes.batch_error("empty_file", "The batch input file is empty."))
    if len(lines) > max_requests:
        read.errors.append(shapes.batch_error(
            "too_many_tasks", f"The batch has {len(lines):,} requests; at most "
                              f"{max_requests:,} are allowed."))
    for number, raw in enumerate(lines, 1):
        _read_line(read, number, raw, endpoint)
    if len(data) > max_bytes:  # the requests stay read: they were submitted all the same
        read.errors = [shapes.batch_error("file_too_large", (
            f"The input file has {len(data):,} bytes; at most {max_bytes:,} are allowed."))]
    return read


def _read_line(read: OpenAIInput, number: int, raw: bytes, endpoint: str) -> None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        line = None
    if not isinstance(line, dict):
        read.errors.append(shapes.batch_error("invalid_json_line",
                                       "This line is not parseable as valid JSON.", number))
        return
    custom_id, body = line.get("custom_id"), line.get("body")
    problem = _line_problem(read, line, endpoint)
    if problem is not None:
        read.errors.append(shapes.batch_error(problem[0], problem[1], number, problem[2]))
    if isinstance(custom_id, str) and isinstance(body, dict):
        read.requests.append((custom_id, body))
        read.seen.add(custom_id)


def _line_problem(read: OpenAIInput, line: dict[str, Any], endpoint: str
                  ) -> tuple[str, str, str] | None:
    custom_id, body = line.get("custom_id"), line.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_required_parameter", "Missing required parameter: 'custom_id'.", (
            "custom_id")
    if custom_id in read.seen:
        return "duplicate_custom_id", (
            f"The custom_id '{custom_id}' is a duplicate of another request's. The "
            "custom_id parameter must be unique for each request in a batch."), "custom_id"
    if line.get("method") != "POST":
        return "invalid_method", "The method must be 'POST'.", "method"
    if line.get("url") != endpoint:
        return "url_mismatch", (f"The url '{line.get('url')}' does not match the batch's "
                                f"endpoint '{endpoint}'."), "url"
    if not isinstance(body, dict):
        return "missing_required_parameter", "Missing required parameter: 'body'.", "body"
    return _model_problem(read, body.get("model"))


def _model_problem(read: OpenAIInput, model: Any) -> tuple[str, str, str] | None:
    if not isinstance(model, str):
        return "missing_required_parameter", "Missing required parameter: 'model'.", (
            "body.model")
    if read.model is None:
        read.model = model
    if model != read.model:
        return "model_mismatch", (f"Every request in a batch must use the same model: this "
                                  f"line uses '{model}', the first uses '{read.model}'."), (
            "body.model")
    return None


def openai_body_problem(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why the endpoint would answer this body with a 400 (inside the batch), or None."""
    if endpoint == shapes.CHAT and (not isinstance(body.get("messages"), list)
                             or not body["messages"]):
        return "Missing required parameter: 'messages'."
    if endpoint == shapes.TEXT and "prompt" not in body:
        return "Missing required parameter: 'prompt'."
    return None


def anthropic_requests_problem(body: Any, max_requests: int) -> str | None:
    """Why Anthropic would refuse to create this batch (a 400), or None."""
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        return "requests: Field required (a list of at least one request)"
    if len(requests) > max_requests:
        return f"requests: at most {max_requests} requests in a batch, got {len(requests)}"
    seen: set[str] = set()
    for index, request in enumerate(requests):
        custom_id = request.get("custom_id") if isinstance(request, dict) else None
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            return (f"requests.{index}.custom_id: String should match pattern "
                    f"'{CUSTOM_ID.pattern}'")
        if custom_id in seen:
            return f"requests.{index}.custom_id: duplicate custom_id '{custom_id}'"
        seen.add(custom_id)
    return None




def anthropic_params_problem(params: Any) -> str | None:
    """Why Anthropic would reject these params (reported as an errored result), or None."""
    if not isinstance(params, dict):
        return "params: Input should be a valid dictionary"
    if not isinstance(params.get("model"), str):
        return "params.model: Field required"
    if not isinstance(params.get("max_tokens"), int) or params["max_tokens"] < 1:
        return "params.max_tokens: Field required (an integer >= 1)"
    if not isinstance(params.get("messages"), list) or not params["messages"]:
        return "params.messages: Field required (at least one message)"
    return None
