"""Wire shapes for the fake batch server: pure functions, no state and no HTTP.

Conversions between Anthropic's Messages shape and the OpenAI-style body a responder sees,
each provider's error bodies, one result line per request, the batch objects as each
provider shows them, and list pages. See ``fake_batch_server``.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson

from datagen.testing.fake_replies import FakeReply, completion_body

if TYPE_CHECKING:
    from datagen.testing.fake_batch_records import Job

MB = 1024 * 1024
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
ENDPOINTS = (CHAT, TEXT)
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ---- errors ------------------------------------------------------------------------------


def openai_error(status: int, message: str, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind, code = "requests", code or "rate_limit_exceeded"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = ANTHROPIC_ERRORS.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def batch_error(code: str, message: str, line: int | None = None,
                param: str | None = None) -> dict[str, Any]:
    """One entry of a failed OpenAI batch's ``errors.data``."""
    return {"code": code, "message": message, "param": param, "line": line}


# ---- Anthropic <-> the responder's OpenAI-style body -------------------------------------


def _plain_text(content: Any) -> Any:
    """Text blocks become one string (so ``last_user_message`` reads them); others stay."""
    if isinstance(content, list) and all(
            isinstance(block, dict) and block.get("type") == "text" for block in content):
        return "\n".join(str(block.get("text", "")) for block in content)
    return content


def chat_from_anthropic(params: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages body as the OpenAI-style dict a responder gets."""
    chat = {key: value for key, value in params.items() if key not in ("system", "messages")}
    messages: list[dict[str, Any]] = []
    if params.get("system"):
        messages.append({"role": "system", "content": _plain_text(params["system"])})
    for message in params.get("messages") or []:
        if isinstance(message, dict):
            messages.append({"role": message.get("role"),
                             "content": _plain_text(message.get("content"))})
    chat["messages"] = messages
    return chat


def anthropic_message(chat: dict[str, Any], body: Any) -> dict[str, Any]:
    """An Anthropic message from a reply body (a chat.completion is converted)."""
    if isinstance(body, dict) and body.get("type") == "message":
        return body
    completion = body if isinstance(body, dict) else completion_body(chat, "")
    choices = completion.get("choices") or []
    first = choices[0] if choices else {}
    text = (first.get("message") or {}).get("content") or ""
    usage = completion.get("usage") or {}
    return {"id": new_id("msg_"), "type": "message", "role": "assistant",
            "model": chat.get("model", "fake-model"),
            "content": [{"type": "text", "text": text}] if choices else [],
            "stop_reason": STOP_REASONS.get(first.get("finish_reason", "stop"), "end_turn"),
            "stop_sequence": None,
            "usage": {"input_tokens": usage.get("prompt_tokens", 1),
                      "output_tokens": usage.get("completion_tokens", 1)}}


# ---- one request's reply, shaped for its provider ----------------------------------------


def _reply_parts(chat: dict[str, Any], answer: str | FakeReply) -> tuple[int, Any]:
    if not isinstance(answer, FakeReply):
        completion = completion_body(chat, str(answer))
        completion["id"] = new_id("chatcmpl-")
        return 200, completion
    body: Any = answer.body
    if isinstance(body, (bytes, str)):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            body = body.decode(errors="replace") if isinstance(body, bytes) else body
    return answer.status, body


def openai_reply(endpoint: str, chat: dict[str, Any], answer: str | FakeReply
                 ) -> tuple[int, Any]:
    """(status, body) of one request inside an OpenAI batch."""
    status, body = _reply_parts(chat, answer)
    if status >= 300:
        ok = isinstance(body, dict) and "error" in body
        return status, body if ok else openai_error(status, f"fake error {status}")
    if body is None:
        body = completion_body(chat, "")
    if endpoint == TEXT and isinstance(body, dict) and body.get("object") == "chat.completion":
        body = {**body, "object": "text_completion", "choices": [
            {"index": c.get("index", 0), "finish_reason": c.get("finish_reason"),
             "logprobs": None, "text": (c.get("message") or {}).get("content", "")}
            for c in body.get("choices") or []]}
    return status, body


def anthropic_reply(chat: dict[str, Any], answer: str | FakeReply) -> tuple[int, Any]:
    """(status, message or error response) of one request inside an Anthropic batch."""
    status, body = _reply_parts(chat, answer)
    if status < 300:
        return status, anthropic_message(chat, body)
    if isinstance(body, dict) and body.get("type") == "error":
        return status, body
    message = f"fake error {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message", message))
    return status, anthropic_error(status, message)


# ---- result lines ------------------------------------------------------------------------


def openai_line(custom_id: str, kind: str, status: int, body: Any, request_id: str
                ) -> dict[str, Any]:
    """A line of an OpenAI output file (kind "succeeded") or error file (the others)."""
    line: dict[str, Any] = {"id": new_id("batch_req_"), "custom_id": custom_id,
                            "response": None, "error": None}
    if kind == "expired":
        line["error"] = {"code": "batch_expired", "message": EXPIRED_MESSAGE}
    elif kind == "canceled":
        line["error"] = {"code": "batch_cancelled", "message": CANCELLED_MESSAGE}
    else:
        line["response"] = {"status_code": status, "request_id": request_id, "body": body}
    return line


def anthropic_line(custom_id: str, kind: str, body: Any) -> dict[str, Any]:
    """A line of an Anthropic results file."""
    result: dict[str, Any] = {"type": kind}
    if kind == "succeeded":
        result["message"] = body
    elif kind == "errored":
        result["error"] = body
    return {"custom_id": custom_id, "result": result}


# ---- batch objects and lists ------------------------------------------------------------


def openai_batch(job: Job) -> dict[str, Any]:
    """The batch object, as OpenAI's API shows it."""
    failed = job.status == "failed"
    tokens_in, tokens_out = job.tokens["input"], job.tokens["output"]
    return {
        "id": job.id, "object": "batch", "endpoint": job.endpoint,
        "errors": {"object": "list", "data": job.errors} if failed else None,
        "input_file_id": job.input_file_id, "completion_window": "24h",
        "status": job.status, "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id, "created_at": int(job.created),
        "in_progress_at": job.stamp("in_progress"), "expires_at": int(job.expires_at),
        "finalizing_at": job.stamp("finalizing"), "completed_at": job.stamp("completed"),
        "failed_at": job.stamp("failed"), "expired_at": job.stamp("expired"),
        "cancelling_at": job.stamp("cancelling"), "cancelled_at": job.stamp("cancelled"),
        "request_counts": {"total": 0 if failed else len(job.tasks),
                           "completed": job.tally["succeeded"],
                           "failed": job.tally["errored"]},
        "metadata": job.metadata, "model": job.model,
        "usage": {"input_tokens": tokens_in, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": tokens_out,
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": tokens_in + tokens_out},
    }


def anthropic_batch(job: Job, base_url: str) -> dict[str, Any]:
    """The message batch object, as Anthropic's API shows it."""
    ended = job.ended
    status = "ended" if ended else "canceling" if job.status == "cancelling" else (
        "in_progress")
    counts = {kind: job.tally[kind] if ended else 0
              for kind in ("succeeded", "errored", "canceled", "expired")}
    return {"id": job.id, "type": "message_batch", "processing_status": status,
            "request_counts": {"processing": 0 if ended else len(job.tasks), **counts},
            "ended_at": iso(job.at[job.status]) if ended else None,
            "created_at": iso(job.created), "expires_at": iso(job.expires_at),
            "archived_at": None, "cancel_initiated_at": iso(job.at.get("cancelling")),
            "results_url": f"{base_url}/messages/batches/{job.id}/results" if ended else None}


def iso(when: float | None) -> str | None:
    """RFC 3339 in UTC, as Anthropic writes its times."""
    if when is None:
        return None
    moment = datetime.fromtimestamp(when, tz=timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def list_body(openai: bool, views: list[dict[str, Any]], limit: int,
              after: str | None = None, before: str | None = None) -> dict[str, Any]:
    """A list answer: one page of ``views`` (in list order) in the provider's envelope.

    Raises KeyError for a cursor that names no object.
    """
    by_id = {view["id"]: view for view in views}
    ids, more = page(list(by_id), limit, after, before)
    envelope = {"object": "list"} if openai else {}
    return {**envelope, "data": [by_id[i] for i in ids], "has_more": more,
            "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}


# ---- pagination --------------------------------------------------------------------------


def page(ids: list[str], limit: int, after: str | None = None,
         before: str | None = None) -> tuple[list[str], bool]:
    """The ids of one page (``ids`` in list order) and whether more lie beyond it.

    Raises KeyError for a cursor that names no object.
    """
    if after is not None:
        if after not in ids:
            raise KeyError(after)
        start = ids.index(after) + 1
        return ids[start:start + limit], start + limit < len(ids)
    if before is not None:
        if before not in ids:
            raise KeyError(before)
        end = ids.index(before)
        start = max(0, end - limit)
        return ids[start:end], start > 0
    return ids[:limit], limit < len(ids)
