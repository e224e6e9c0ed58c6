"""The fast Anthropic transport: the body it sends, what it reads back, every error kind,
every unreadable body (on both fast transports), rate-limit headers (both dialects), and
parity with litellm's anthropic path, all over real HTTP against the fake servers."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from datagen.llm.anthropic_transport import (
    DEFAULT_MAX_TOKENS,
    AnthropicTransport,
    build_body,
    messages_url,
)
from datagen.llm.errors import CallError
from datagen.llm.openai_transport import OpenAITransport
from datagen.llm.ratelimits import (
    duration_seconds,
    from_anthropic_headers,
    from_openai_headers,
    rfc3339_timestamp,
)
from datagen.llm.types import ChatRequest, Completion, RateLimitInfo, Usage
from datagen.redact import register
from datagen.testing import FakeAnthropicServer, FakeOpenAIServer, FakeReply, FaultPlan
from datagen.testing.fake_anthropic import Limits, anthropic_error
from datagen.testing.fake_server import echo_draft, last_user_message

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ant-test-key-0001"
CHAT = [{"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Write about cats."}]


def request(messages: list[dict[str, Any]] | None = None, **params: Any) -> ChatRequest:
    return ChatRequest(model="anthropic/claude-test", messages=messages or CHAT,
                       params=params, timeout=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body_of(messages: list[dict[str, Any]] | None = None, **params: Any) -> dict[str, Any]:
    return build_body(request(messages, **params))


@pytest.fixture(scope="module")
def anthropic() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer(api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts from a server that echoes and has counted nothing."""
    yield
    for name in ("anthropic", "openai"):
        if name in request.fixturenames:
            server = request.getfixturevalue(name)
            server.responder = echo_draft
            server.faults = None
            server.reset()


async def send(server: FakeAnthropicServer, req: ChatRequest | None = None,
               **transport_kw: Any) -> Completion:
    transport = AnthropicTransport(**{"base_url": server.base_url, "api_key": KEY,
                                      **transport_kw})
    try:
        return await transport.complete(req or request())
    finally:
        await transport.aclose()


async def send_openai(server: FakeOpenAIServer) -> Completion:
    transport = OpenAITransport("openai", server.base_url, "sk-test")
    try:
        return await transport.complete(ChatRequest(model="openai/m", messages=CHAT))
    finally:
        await transport.aclose()


async def failure(coro: Any) -> CallError:
    with pytest.raises(CallError) as info:
        await coro
    return info.value


# ---- the body sent -----------------------------------------------------------------------

def test_system_messages_become_the_system_field_and_the_prefix_goes() -> None:
    body = body_of([{"role": "system", "content": "One."}, {"role": "developer",
                                                            "content": "Two."},
                    {"role": "user", "content": "Hi"}])
    assert body["model"] == "claude-test"
    assert body["system"] == "One.\n\nTwo."
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert "system" not in body_of([{"role": "user", "content": "Hi"}])


def test_consecutive_messages_of_one_role_are_merged_in_order() -> None:
    body = body_of([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"},
                    {"role": "user", "content": [{"type": "text", "text": "e"}]}])
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": [{"type": "text", "text": "d"},
                                     {"type": "text", "text": "e"}]},
    ]


def test_the_callers_messages_are_not_changed() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "Sure: "}]
    before = orjson.dumps(messages)
    body_of(messages)
    assert orjson.dumps(messages) == before


@pytest.mark.parametrize(("stop", "sent"), [("END", ["END"]), (["A", "B"], ["A", "B"]),
                                            (None, None), ([], None)])
def test_stop_becomes_stop_sequences(stop: Any, sent: list[str] | None) -> None:
    body = body_of(stop=stop)
    assert body.get("stop_sequences") == sent and "stop" not in body


@pytest.mark.parametrize(("params", "max_tokens"), [
    ({}, DEFAULT_MAX_TOKENS), ({"max_tokens": 64}, 64), ({"max_completion_tokens": 32}, 32),
])
def test_max_tokens_is_always_sent(params: dict[str, Any], max_tokens: int) -> None:
    body = body_of(**params)
    assert body["max_tokens"] == max_tokens and "max_completion_tokens" not in body
    assert DEFAULT_MAX_TOKENS == 4096


def test_parameters_the_api_rejects_are_dropped_with_a_warning(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from datagen.llm import anthropic_transport

    monkeypatch.setattr(anthropic_transport, "_warned", set())
    rejected = {"seed": 1, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                "logit_bias": {"1": 2}, "response_format": {"type": "json_object"}, "n": 2,
                "logprobs": True, "top_logprobs": 2, "min_p": 0.1, "repetition_penalty": 1.1,
                "reasoning_effort": "low", "stream": True}
    kept = {"temperature": 0.3, "top_p": 0.9, "top_k": 40, "metadata": {"user_id": "u1"}}
    with caplog.at_level(logging.WARNING, logger="datagen.llm"):
        body = body_of(**rejected, **kept)
        body_of(**rejected)  # warned once per parameter, not per request
    assert not set(rejected) & set(body)
    assert {k: body[k] for k in kept} == kept
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(rejected) and all(f"'{name}'" in " ".join(warned)
                                                for name in rejected)


def test_extra_body_is_merged_last_and_user_becomes_metadata() -> None:
    body = body_of(temperature=0.1, user="u-7",
                   extra_body={"temperature": 0.9, "thinking": {"type": "disabled"}})
    assert body["temperature"] == 0.9 and body["thinking"] == {"type": "disabled"}
    assert body["metadata"] == {"user_id": "u-7"} and "user" not in body
    assert "extra_body" not in body


@pytest.mark.parametrize(("prefill", "sent"), [
    ("<draft> \n", "<draft>"),
    ([{"type": "text", "text": "Sure:"}, {"type": "text", "text": "  "}],
     [{"type": "text", "text": "Sure:"}]),
    (" \n", None),  # nothing left of it: not sent at all
])
def test_a_prefill_is_sent_last_without_trailing_whitespace(prefill: Any, sent: Any) -> None:
    body = body_of([*CHAT, {"role": "assistant", "content": prefill}])
    if sent is None:
        assert body["messages"][-1] == {"role": "user", "content": "Write about cats."}
    else:
        assert body["messages"][-1] == {"role": "assistant", "content": sent}


def test_an_unsupported_role_is_a_bad_request() -> None:
    with pytest.raises(CallError) as info:
        body_of([{"role": "tool", "content": "42"}])
    assert info.value.kind == "bad_request" and "'tool'" in info.value.message


@pytest.mark.parametrize(("base", "url"), [
    (None, "https://api.anthropic.com/v1/messages"),
    ("http://h:1", "http://h:1/v1/messages"), ("http://h:1/", "http://h:1/v1/messages"),
    ("http://h:1/v1", "http://h:1/v1/messages"), ("http://h:1/v1/", "http://h:1/v1/messages"),
    ("http://h:1/proxy/v1/messages", "http://h:1/proxy/v1/messages"),
])
def test_the_url_takes_a_base_with_or_without_v1(base: str | None, url: str) -> None:
    assert messages_url(base) == url


# ---- over HTTP: what the server receives and what comes back --------------------------

async def test_a_call_sends_the_headers_and_body_the_api_wants(
        anthropic: FakeAnthropicServer) -> None:
    completion = await send(anthropic, request(max_tokens=50, temperature=0.2, stop="END"))
    assert completion.text == "<draft>Write about cats.</draft>"
    assert completion.finish_reason == "stop" and completion.model == "claude-test"
    assert completion.usage == Usage(prompt_tokens=5, completion_tokens=3)
    headers = anthropic.headers[0]
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert anthropic.bodies == [{"model": "claude-test", "max_tokens": 50,
                                 "messages": [{"role": "user",
                                               "content": "Write about cats."}],
                                 "system": "Be terse.", "temperature": 0.2,
                                 "stop_sequences": ["END"]}]


async def test_a_base_url_with_v1_reaches_the_same_route(
        anthropic: FakeAnthropicServer) -> None:
    await send(anthropic, base_url=anthropic.base_url + "/v1/")
    assert anthropic.request_count == 1


async def test_the_key_comes_from_the_request_else_the_environment(
        anthropic: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    transport = AnthropicTransport(base_url=anthropic.base_url)
    try:
        await transport.complete(request())  # the environment's key
        wrong = ChatRequest(model="claude-test", messages=CHAT, api_key="sk-ant-wrong-key")
        err = await failure(transport.complete(wrong))  # the request's key wins
    finally:
        await transport.aclose()
    assert err.kind == "auth" and err.status == 401 and err.fatal
    assert "authentication_error" in err.message
    assert [h["x-api-key"] for h in anthropic.headers] == [KEY, "sk-ant-wrong-key"]


async def test_a_prefill_reaches_the_server_last_and_only_the_continuation_returns(
        anthropic: FakeAnthropicServer) -> None:
    anthropic.responder = lambda body: " purr."
    completion = await send(anthropic, request([*CHAT, {"role": "assistant",
                                                        "content": "Cats \n"}]))
    assert completion.text == " purr."
    assert anthropic.bodies[0]["messages"][-1] == {"role": "assistant", "content": "Cats"}


async def test_a_trailing_whitespace_prefill_is_what_the_api_rejects(
        anthropic: FakeAnthropicServer) -> None:
    """The fake rejects what the real API rejects, so the strip above is proven needed."""
    import aiohttp

    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure "}]}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as session, session.post(
            f"{anthropic.base_url}/v1/messages", json=body, headers=headers) as response:
        answer = await response.json()
    assert response.status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert "trailing whitespace" in answer["error"]["message"]


async def test_a_text_completion_prompt_is_refused_before_any_request(
        anthropic: FakeAnthropicServer) -> None:
    req = ChatRequest(model="claude-test", messages=[], prompt="Once upon a time")
    err = await failure(send(anthropic, req))
    assert err.kind == "bad_request" and "text-completion prompt" in err.message
    assert anthropic.request_count == 0


# ---- reading the answer --------------------------------------------------------------------

def message(**fields: Any) -> FakeReply:
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "output_tokens": 2}}
    return FakeReply(body={**body, **fields})


async def test_text_blocks_are_joined_and_thinking_is_skipped(
        anthropic: FakeAnthropicServer) -> None:
    anthropic.responder = lambda body: message(content=[
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "redacted_thinking", "data": "xyz"},
        {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}])
    assert (await send(anthropic)).text == "Hello, world."


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("refusal", "content_filter"), ("pause_turn", "pause_turn"), (None, None),
])
async def test_stop_reasons_map_to_finish_reasons(anthropic: FakeAnthropicServer,
                                                  stop_reason: str | None,
                                                  finish: str | None) -> None:
    anthropic.responder = lambda body: message(stop_reason=stop_reason)
    assert (await send(anthropic)).finish_reason == finish


async def test_cache_tokens_count_as_prompt_tokens(anthropic: FakeAnthropicServer) -> None:
    anthropic.responder = lambda body: message(usage={
        "input_tokens": 10, "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1000, "output_tokens": 7})
    assert (await send(anthropic)).usage == Usage(prompt_tokens=1110, completion_tokens=7)


async def test_no_text_block_is_an_empty_response(anthropic: FakeAnthropicServer) -> None:
    anthropic.responder = lambda body: message(content=[])
    err = await failure(send(anthropic))
    assert err.kind == "empty_response" and err.retryable


# ---- errors ------------------------------------------------------------------------------

def error(status: int, kind: str, text: str, headers: dict[str, str] | None = None
          ) -> FakeReply:
    return FakeReply(status, {"type": "error", "error": {"type": kind, "message": text},
                              "request_id": "req_1"}, headers or {})


@pytest.mark.parametrize(("reply", "kind"), [
    (error(400, "invalid_request_error", "max_tokens: Field required"), "bad_request"),
    (error(400, "invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum"),
     "context_window"),
    (error(400, "invalid_request_error", "input length and `max_tokens` exceed context limit: "
                                         "199759 + 8192 > 200000"), "context_window"),
    (error(401, "authentication_error", "invalid x-api-key"), "auth"),
    (error(402, "billing_error", "your credit balance is too low"), "auth"),
    (error(403, "permission_error", "no access to this model"), "auth"),
    (error(404, "not_found_error", "model: claude-nope"), "not_found"),
    (error(413, "request_too_large", "Request exceeds the maximum size"), "bad_request"),
    (FakeReply(413, b"<html><body>413 Request Entity Too Large</body></html>"), "bad_request"),
    (error(429, "rate_limit_error", "Number of requests has exceeded your rate limit"),
     "rate_limit"),
    (error(500, "api_error", "Internal server error"), "server_error"),
    (error(504, "timeout_error", "Request timed out"), "timeout"),
    (error(529, "overloaded_error", "Overloaded"), "server_error"),
    (FakeReply(529, b""), "server_error"),
])
async def test_error_statuses_and_types_map_to_kinds(anthropic: FakeAnthropicServer,
                                                     reply: FakeReply, kind: str) -> None:
    anthropic.responder = lambda body: reply
    err = await failure(send(anthropic))
    assert err.kind == kind and err.status == reply.status
    assert anthropic.request_count == 1  # one HTTP request per call: no hidden retries


async def test_a_429_honours_retry_after_and_carries_the_limits(
        anthropic: FakeAnthropicServer) -> None:
    anthropic.responder = lambda body: error(429, "rate_limit_error", "slow down",
                                             {"retry-after": "7"})
    err = await failure(send(anthropic))
    assert err.kind == "rate_limit" and err.retry_after == 7.0 and err.retryable
    assert err.rate_limits is not None and err.rate_limits.requests_limit == 4000


async def test_529_from_the_fault_plan_is_retryable(anthropic: FakeAnthropicServer) -> None:
    anthropic.faults = FaultPlan(rate_529=1.0)
    err = await failure(send(anthropic))
    assert (err.kind, err.status, err.retryable) == ("server_error", 529, True)
    assert "overloaded_error" in err.message and anthropic.faults.injected["529"] == 1


async def test_error_messages_are_redacted(anthropic: FakeAnthropicServer) -> None:
    secret = "sk-ant-leaked-secret-99"
    register(secret)
    anthropic.responder = lambda body: error(400, "invalid_request_error", f"bad key {secret}")
    err = await failure(send(anthropic))
    assert secret not in err.message and "<redacted>" in err.message


async def test_no_answer_in_time_is_a_timeout(anthropic: FakeAnthropicServer) -> None:
    anthropic.responder = lambda body: FakeReply(body=message().body, delay=3.0)
    req = ChatRequest(model="claude-test", messages=CHAT, timeout=0.2)
    err = await failure(send(anthropic, req))
    assert err.kind == "timeout" and err.retryable


async def test_a_refused_connection_is_a_connection_error() -> None:
    transport = AnthropicTransport(base_url=f"http://127.0.0.1:{free_port()}", api_key=KEY)
    try:
        err = await failure(transport.complete(request()))
    finally:
        await transport.aclose()
    assert err.kind == "connection" and err.retryable


# ---- unreadable bodies, on both fast transports ---------------------------------------

ANTHROPIC_MALFORMED = {
    "a JSON list": b"[1, 2]",
    "a JSON string": b'"hello"',
    "no content": {"type": "message", "usage": {}},
    "content a string": {"content": "hello"},
    "content an object": {"content": {"type": "text", "text": "hi"}},
    "a block a string": {"content": ["hello"]},
    "a text block's text a number": {"content": [{"type": "text", "text": 42}]},
    "usage a list": {"content": [{"type": "text", "text": "hi"}], "usage": [1, 2]},
    "input_tokens n/a": {"content": [{"type": "text", "text": "hi"}],
                         "usage": {"input_tokens": "n/a", "output_tokens": 1}},
    "output_tokens n/a": {"content": [{"type": "text", "text": "hi"}],
                          "usage": {"input_tokens": 1, "output_tokens": "n/a"}},
    "cache tokens negative": {"content": [{"type": "text", "text": "hi"}],
                              "usage": {"input_tokens": 1, "cache_read_input_tokens": -4}},
    "stop_reason a number": {"content": [{"type": "text", "text": "hi"}], "stop_reason": 3},
    "an error with status 200": anthropic_error(529, "Overloaded"),
}


@pytest.mark.parametrize("shape", list(ANTHROPIC_MALFORMED))
async def test_anthropic_unreadable_bodies_are_malformed_responses(
        anthropic: FakeAnthropicServer, shape: str) -> None:
    anthropic.responder = lambda body: FakeReply(body=ANTHROPIC_MALFORMED[shape])
    err = await failure(send(anthropic))
    assert err.kind == "malformed_response" and err.retryable, err.message
    assert err.message.startswith("malformed response: ")
    assert err.rate_limits is not None  # the headers were readable all the same


OPENAI_MALFORMED = {
    "a JSON list": b"[1, 2]",
    "choices an object": {"choices": {"0": {}}},
    "choices[0] a string": {"choices": ["hello"]},
    "message a string": {"choices": [{"message": "hello"}]},
    "content a number": {"choices": [{"message": {"content": 42}}]},
    "a content part a string": {"choices": [{"message": {"content": ["hi"]}}]},
    "usage a list": {"choices": [{"message": {"content": "hi"}}], "usage": [1]},
    "prompt_tokens n/a": {"choices": [{"message": {"content": "hi"}}],
                          "usage": {"prompt_tokens": "n/a", "completion_tokens": 1}},
    "completion_tokens n/a": {"choices": [{"message": {"content": "hi"}}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": "n/a"}},
}


@pytest.mark.parametrize("shape", list(OPENAI_MALFORMED))
async def test_openai_unreadable_bodies_are_malformed_responses(
        openai: FakeOpenAIServer, shape: str) -> None:
    openai.responder = lambda body: FakeReply(body=OPENAI_MALFORMED[shape])
    err = await failure(send_openai(openai))
    assert err.kind == "malformed_response" and err.retryable, err.message
    assert err.message.startswith("malformed response: ")


@pytest.mark.parametrize("body", [b'{"choices": [{"mess', b"<html>502 Bad Gateway</html>"])
async def test_a_body_that_is_not_json_is_a_server_error_on_both_fast_transports(
        openai: FakeOpenAIServer, anthropic: FakeAnthropicServer, body: bytes) -> None:
    # as litellm reports it (a cut-off body or a proxy's error page): retried the same way
    openai.responder = lambda b: FakeReply(body=body)
    anthropic.responder = lambda b: FakeReply(body=body)
    for err in (await failure(send_openai(openai)), await failure(send(anthropic))):
        assert err.kind == "server_error" and err.retryable, err.message
        assert "not valid JSON" in err.message


@pytest.mark.parametrize(("error_field", "kind"), [
    ({"message": "Rate limit exceeded: free-models-per-min", "code": 429}, "rate_limit"),
    ({"message": "This model's maximum context length is 8192 tokens", "type":
      "invalid_request_error", "code": "context_length_exceeded"}, "context_window"),
    ({"message": "No auth credentials found", "code": 401}, "auth"),
    # no HTTP status in it: a bad request whatever its type says, as litellm reads it
    ({"message": "bad", "type": "authentication_error"}, "bad_request"),
    ({"message": "Provider returned error", "code": 502}, "server_error"),
    # of no known type: the request's fault, as litellm reads it too
    ({"message": "upstream failed"}, "bad_request"),
    ("something went wrong", "bad_request"),
])
async def test_openai_a_200_carrying_an_error_is_classified_from_it(
        openai: FakeOpenAIServer, error_field: Any, kind: str) -> None:
    openai.responder = lambda body: FakeReply(body={"error": error_field})
    err = await failure(send_openai(openai))
    assert err.kind == kind, err.message
    assert "no choices" not in err.message


async def test_openai_content_parts_are_joined(openai: FakeOpenAIServer) -> None:
    openai.responder = lambda body: FakeReply(body={"choices": [{"message": {"content": [
        {"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]},
        "finish_reason": "stop"}], "usage": {"prompt_tokens": 3.0, "completion_tokens": 1}})
    completion = await send_openai(openai)
    assert completion.text == "ab" and completion.usage == Usage(3, 1)


# ---- rate-limit headers ------------------------------------------------------------------

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def test_anthropic_headers_are_read_into_rate_limit_info() -> None:
    headers = {}
    for i, name in enumerate(("requests", "tokens", "input-tokens", "output-tokens")):
        headers[f"anthropic-ratelimit-{name}-limit"] = str(1000 * (i + 1))
        headers[f"anthropic-ratelimit-{name}-remaining"] = str(999 * (i + 1))
        headers[f"anthropic-ratelimit-{name}-reset"] = f"2023-11-14T22:13:{30 + i}Z"
    assert from_anthropic_headers(headers, now=NOW) == RateLimitInfo(
        requests_limit=1000, requests_remaining=999, requests_reset_s=10.0,
        tokens_limit=2000, tokens_remaining=1998, tokens_reset_s=11.0,
        input_tokens_limit=3000, input_tokens_remaining=2997, input_tokens_reset_s=12.0,
        output_tokens_limit=4000, output_tokens_remaining=3996, output_tokens_reset_s=13.0)


def test_anthropic_headers_partial_odd_or_absent() -> None:
    info = from_anthropic_headers({"anthropic-ratelimit-requests-remaining": "n/a",
                                   "anthropic-ratelimit-requests-limit": "50",
                                   "anthropic-ratelimit-requests-reset": "tomorrow",
                                   "anthropic-ratelimit-tokens-reset": "2023-11-14T22:00:00Z"},
                                  now=NOW)
    assert info == RateLimitInfo(requests_limit=50, tokens_reset_s=0.0)  # past: 0, not < 0
    assert from_anthropic_headers({"content-type": "application/json"}) is None
    assert from_anthropic_headers(None) is None


@pytest.mark.parametrize(("value", "timestamp"), [
    ("2023-11-14T22:13:20Z", NOW), ("2023-11-14T22:13:20.25Z", NOW + 0.25),
    ("2023-11-15T00:13:20+02:00", NOW), ("2023-11-14t22:13:20z", NOW),
    ("2023-11-14T22:13:20", NOW), ("2023-11-14T22:13:20.5+0000", NOW + 0.5),
    ("not a time", None), ("2023-13-40T99:00:00Z", None),
])
def test_rfc3339_times(value: str, timestamp: float | None) -> None:
    assert rfc3339_timestamp(value) == timestamp


@pytest.mark.parametrize(("value", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
    ("59.991s", 59.991), ("300us", 0.0003), ("soon", None), ("1s soon", None), ("", None),
])
def test_openai_reset_durations(value: str, seconds: float | None) -> None:
    result = duration_seconds(value)
    assert result == pytest.approx(seconds) if seconds is not None else result is None


def test_openai_headers_are_read_into_rate_limit_info() -> None:
    info = from_openai_headers({"x-ratelimit-limit-requests": "5000",
                                "x-ratelimit-remaining-requests": "4999",
                                "x-ratelimit-reset-requests": "12ms",
                                "x-ratelimit-limit-tokens": "160000",
                                "x-ratelimit-remaining-tokens": "159976",
                                "x-ratelimit-reset-tokens": "6m0s"})
    assert info == RateLimitInfo(requests_limit=5000, requests_remaining=4999,
                                 requests_reset_s=0.012, tokens_limit=160000,
                                 tokens_remaining=159976, tokens_reset_s=360.0)
    assert from_openai_headers({"server": "vllm"}) is None


def test_rate_limits_default_to_none() -> None:
    assert Completion("t", "stop", Usage(), "m").rate_limits is None
    assert CallError("timeout", "slow").rate_limits is None


async def test_anthropic_remaining_counts_down_within_the_window() -> None:
    limits = Limits(requests=3, input_tokens=1000, output_tokens=500, enforce=True)
    with FakeAnthropicServer(limits=limits) as server:
        first, second, third = [await send(server) for _ in range(3)]
        err = await failure(send(server))
    assert [c.rate_limits.requests_remaining for c in (first, second, third)
            if c.rate_limits] == [2, 1, 0]
    assert first.rate_limits is not None and second.rate_limits is not None
    assert first.rate_limits.input_tokens_remaining == 1000 - first.usage.prompt_tokens
    assert second.rate_limits.output_tokens_remaining == 500 - 2 * first.usage.completion_tokens
    assert 55 < (first.rate_limits.requests_reset_s or 0) <= 60
    assert err.kind == "rate_limit" and err.retry_after is not None and err.retry_after > 50
    assert err.rate_limits is not None and err.rate_limits.requests_remaining == 0


async def test_openai_transport_exposes_rate_limits(openai: FakeOpenAIServer) -> None:
    headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "1s", "Retry-After": "1"}
    openai.responder = lambda body: FakeReply(status=429, headers=headers)
    err = await failure(send_openai(openai))
    assert err.rate_limits == RateLimitInfo(requests_limit=60, requests_remaining=0,
                                            requests_reset_s=1.0)
    openai.responder = lambda body: FakeReply(body={
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]},
        headers={**headers, "x-ratelimit-remaining-requests": "59"})
    completion = await send_openai(openai)
    assert completion.rate_limits is not None
    assert completion.rate_limits.requests_remaining == 59


# ---- the fake server itself --------------------------------------------------------------

async def test_the_responder_reads_an_openai_style_body(anthropic: FakeAnthropicServer) -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body)
        return f"<draft>{last_user_message(body)}</draft>"

    anthropic.responder = responder
    await send(anthropic, request([*CHAT, {"role": "user", "content": "Briefly."}], stop="X"))
    assert seen[0]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Write about cats.\n\nBriefly."}]
    assert seen[0]["stop"] == ["X"] and seen[0]["model"] == "claude-test"


async def test_the_fake_rejects_what_the_api_rejects(anthropic: FakeAnthropicServer) -> None:
    transport = AnthropicTransport(base_url=anthropic.base_url, api_key=KEY)
    try:
        # extra_body is sent as it is: a field the API does not take comes back as a 400
        err = await failure(transport.complete(request(extra_body={"seed": 1})))
    finally:
        await transport.aclose()
    assert err.kind == "bad_request" and "seed: Extra inputs are not permitted" in err.message


def test_the_cli_prints_its_base_url_first() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "datagen.testing.fake_anthropic", "--port", str(port),
         "--latency", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(
            f"fake Anthropic server at http://127.0.0.1:{port}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as answer:
            assert orjson.loads(answer.read())["requests"] == 0
    finally:
        process.terminate()
        process.wait(10)


# ---- parity with litellm's anthropic path ------------------------------------------------

def _as_blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A body with its text in one form (litellm sends block lists where we send strings)."""
    return {"system": "".join(b["text"] for b in _as_blocks(body.get("system", ""))),
            "messages": [{"role": m["role"], "content": _as_blocks(m["content"])}
                         for m in body["messages"]],
            **{k: body.get(k) for k in ("model", "max_tokens", "temperature", "top_p",
                                        "stop_sequences")}}


async def test_the_same_request_through_litellm_sends_an_equivalent_body(
        anthropic: FakeAnthropicServer) -> None:
    from datagen.llm.litellm_transport import LiteLLMTransport

    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Write about cats."},
                {"role": "user", "content": "In five words."},
                {"role": "assistant", "content": "Cats "}]
    req = ChatRequest(model="anthropic/claude-test", messages=messages, api_key=KEY,
                      base_url=anthropic.base_url, timeout=30.0,
                      params={"max_tokens": 40, "temperature": 0.5, "top_p": 0.9,
                              "stop": ["</draft>"]})
    ours = await send(anthropic, req)
    theirs = await LiteLLMTransport().complete(req)
    assert len(anthropic.bodies) == 2
    sent_ours, sent_theirs = (_comparable(b) for b in anthropic.bodies)
    assert sent_ours == sent_theirs
    assert sent_ours["messages"][-1] == {"role": "assistant",
                                         "content": [{"type": "text", "text": "Cats"}]}
    assert (ours.text, ours.usage, ours.finish_reason) == (
        theirs.text, theirs.usage, theirs.finish_reason)
