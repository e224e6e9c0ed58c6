"""The fake batch server over real HTTP: OpenAI's Files + Batch API, Anthropic's Message
Batches and the online endpoints on one port, its fake clock, knobs and counters."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from datagen.testing.fake_batch_server import FakeBatchServer
from datagen.testing.fake_server import FakeReply, last_user_message

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
OPENAI_BATCH_FIELDS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at", "request_counts", "metadata"}
ANTHROPIC_BATCH_FIELDS = {
    "id", "type", "processing_status", "request_counts", "ended_at", "created_at",
    "expires_at", "archived_at", "cancel_initiated_at", "results_url"}


@pytest.fixture
def server() -> Iterator[FakeBatchServer]:
    with FakeBatchServer() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


# ---- helpers -----------------------------------------------------------------------------


def chat_line(custom_id: str, text: str, model: str = "gpt-fake", url: str = CHAT
              ) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": text}]}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any
               ) -> tuple[int, Any]:
    async with http.request(method, url, **kw) as response:
        raw = await response.read()
        try:
            return response.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return response.status, raw


async def upload(http: aiohttp.ClientSession, server: FakeBatchServer, data: bytes,
                 purpose: str = "batch") -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", data, filename="requests.jsonl", content_type="application/jsonl")
    status, file = await call(http, "POST", f"{server.base_url}/files", data=form)
    assert status == 200, file
    return dict(file)


async def openai_batch(http: aiohttp.ClientSession, server: FakeBatchServer,
                       lines: list[dict[str, Any]] | bytes, endpoint: str = CHAT,
                       **extra: Any) -> dict[str, Any]:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    file = await upload(http, server, data)
    status, batch = await call(http, "POST", f"{server.base_url}/batches", json={
        "input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h",
        **extra})
    assert status == 200, batch
    return dict(batch)


async def poll(http: aiohttp.ClientSession, server: FakeBatchServer, batch_id: str,
               anthropic: bool = False) -> dict[str, Any]:
    path = "messages/batches" if anthropic else "batches"
    status, batch = await call(http, "GET", f"{server.base_url}/{path}/{batch_id}")
    assert status == 200, batch
    return dict(batch)


async def file_lines(http: aiohttp.ClientSession, server: FakeBatchServer,
                     file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    status, raw = await call(http, "GET", f"{server.base_url}/files/{file_id}/content")
    assert status == 200
    text = raw if isinstance(raw, bytes) else orjson.dumps(raw)  # one line parses as JSON
    return [orjson.loads(line) for line in text.splitlines()]


def anthropic_request(custom_id: str, text: str, **params: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": {
        "model": "claude-fake", "max_tokens": 64,
        "messages": [{"role": "user", "content": text}], **params}}


async def anthropic_batch(http: aiohttp.ClientSession, server: FakeBatchServer,
                          requests: list[dict[str, Any]]) -> dict[str, Any]:
    status, batch = await call(http, "POST", f"{server.base_url}/messages/batches",
                               json={"requests": requests})
    assert status == 200, batch
    return dict(batch)


async def results(http: aiohttp.ClientSession, batch: dict[str, Any]
                  ) -> dict[str, dict[str, Any]]:
    status, raw = await call(http, "GET", batch["results_url"])
    assert status == 200
    text = raw if isinstance(raw, bytes) else orjson.dumps(raw)
    return {line["custom_id"]: line["result"]
            for line in map(orjson.loads, text.splitlines())}


# ---- OpenAI ------------------------------------------------------------------------------


async def test_openai_round_trip(server: FakeBatchServer, http: aiohttp.ClientSession
                                 ) -> None:
    lines = [chat_line(f"r{i}", f"topic {i}") for i in range(3)]
    file = await upload(http, server, jsonl(lines))
    assert file["object"] == "file" and file["id"].startswith("file-")
    assert file["bytes"] == len(jsonl(lines)) and file["purpose"] == "batch"
    assert file["filename"] == "requests.jsonl" and isinstance(file["created_at"], int)
    status, created = await call(http, "POST", f"{server.base_url}/batches", json={
        "input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h",
        "metadata": {"run": "7"}})
    assert status == 200 and set(created) >= OPENAI_BATCH_FIELDS
    assert created["id"].startswith("batch_") and created["object"] == "batch"
    assert created["status"] == "validating" and created["metadata"] == {"run": "7"}
    assert created["expires_at"] == created["created_at"] + 24 * 3600

    done = await poll(http, server, created["id"])
    assert done["status"] == "completed" and done["error_file_id"] is None
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert done["model"] == "gpt-fake" and done["usage"]["total_tokens"] > 0
    assert done["in_progress_at"] <= done["finalizing_at"] <= done["completed_at"]
    output = await file_lines(http, server, done["output_file_id"])
    assert [line["custom_id"] for line in output] == ["r0", "r1", "r2"]
    first = output[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    body = first["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "<draft>topic 0</draft>"

    stats = server.stats()
    assert stats["files_uploaded"] == 1 and stats["bytes_uploaded"] == file["bytes"]
    assert stats["batches_created"] == 1 and stats["requests_answered"] == 3
    assert stats["custom_id_submitted"] == {"r0": 1, "r1": 1, "r2": 1}
    assert stats["succeeded_twice"] == [] and stats["polls_per_batch"] == {done["id"]: 1}
    assert len(stats["body_succeeded"]) == 3 and stats["requests"] == 0  # no online call


async def test_openai_errors_inside_a_batch(server: FakeBatchServer,
                                            http: aiohttp.ClientSession) -> None:
    server.error_for = lambda cid, body: FakeReply(status=400) if cid == "bad" else None
    server.responder = lambda body: (FakeReply(status=500) if "boom" in
                                     last_user_message(body) else "fine")
    no_messages = {"custom_id": "empty", "method": "POST", "url": CHAT,
                   "body": {"model": "gpt-fake"}}
    batch = await openai_batch(http, server, [
        chat_line("ok", "hello"), chat_line("bad", "x"), chat_line("boom", "boom"),
        no_messages])
    done = await poll(http, server, batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 4, "completed": 1, "failed": 3}
    errors = {line["custom_id"]: line for line in
              await file_lines(http, server, done["error_file_id"])}
    assert set(errors) == {"bad", "boom", "empty"}
    assert errors["bad"]["response"]["status_code"] == 400 and errors["bad"]["error"] is None
    assert errors["boom"]["response"]["body"]["error"]["type"] == "server_error"
    assert "messages" in errors["empty"]["response"]["body"]["error"]["message"]
    output = await file_lines(http, server, done["output_file_id"])
    assert [line["custom_id"] for line in output] == ["ok"]
    assert server.stats()["custom_id_succeeded"] == {"ok": 1}


async def test_openai_text_completions_endpoint(server: FakeBatchServer,
                                                http: aiohttp.ClientSession) -> None:
    line = {"custom_id": "t", "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-fake", "prompt": "say"}}
    batch = await openai_batch(http, server, [line], endpoint="/v1/completions")
    done = await poll(http, server, batch["id"])
    [output] = await file_lines(http, server, done["output_file_id"])
    body = output["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == (
        "<draft>say</draft>")


async def test_openai_timeline_follows_the_fake_clock(server: FakeBatchServer,
                                                      http: aiohttp.ClientSession) -> None:
    server.validation_delay, server.completion_delay, server.finalize_delay = 10, 110, 5
    batch = await openai_batch(http, server, [chat_line(f"r{i}", "x") for i in range(10)])
    assert (await poll(http, server, batch["id"]))["status"] == "validating"
    server.advance(10)
    assert (await poll(http, server, batch["id"]))["request_counts"]["completed"] == 0
    server.advance(50)  # half-way through processing
    half = await poll(http, server, batch["id"])
    assert half["status"] == "in_progress" and half["request_counts"]["completed"] == 5
    assert server.stats()["requests_answered"] == 5
    server.advance(50)
    finalizing = await poll(http, server, batch["id"])
    assert finalizing["status"] == "finalizing" and finalizing["output_file_id"] is None
    server.advance(5)
    done = await poll(http, server, batch["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 10
    created = done["created_at"]
    assert done["in_progress_at"] - created in (10, 11)
    assert done["finalizing_at"] - created in (110, 111)
    assert done["completed_at"] - created in (115, 116)


async def test_openai_cancel_keeps_answered_requests(server: FakeBatchServer,
                                                     http: aiohttp.ClientSession) -> None:
    server.completion_delay, server.cancel_delay = 100, 10
    batch = await openai_batch(http, server, [chat_line(f"r{i}", "x") for i in range(4)])
    server.advance(50)
    assert (await poll(http, server, batch["id"]))["request_counts"]["completed"] == 2
    url = f"{server.base_url}/batches/{batch['id']}/cancel"
    status, cancelling = await call(http, "POST", url)
    assert status == 200 and cancelling["status"] == "cancelling"
    assert cancelling["cancelling_at"] is not None
    server.advance(9)
    assert (await poll(http, server, batch["id"]))["status"] == "cancelling"
    server.advance(1)
    cancelled = await poll(http, server, batch["id"])
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] is not None
    assert cancelled["request_counts"] == {"total": 4, "completed": 2, "failed": 0}
    output = await file_lines(http, server, cancelled["output_file_id"])
    assert [line["custom_id"] for line in output] == ["r0", "r1"]
    errors = await file_lines(http, server, cancelled["error_file_id"])
    assert [line["custom_id"] for line in errors] == ["r2", "r3"]
    assert errors[0]["response"] is None and errors[0]["error"]["code"] == "batch_cancelled"
    status, refused = await call(http, "POST", url)  # too late now
    assert status == 409 and "cancelled" in refused["error"]["message"]
    stats = server.stats()
    assert stats["cancels"] == 2 and stats["requests_canceled"] == 2
    assert stats["requests_answered"] == 2


async def test_openai_expiry_completes_a_fraction(server: FakeBatchServer,
                                                  http: aiohttp.ClientSession) -> None:
    server.completion_delay, server.expire_after, server.expire_done_fraction = 1000, 60, 0.25
    batch = await openai_batch(http, server, [chat_line(f"r{i}", "x") for i in range(8)])
    assert batch["expires_at"] == batch["created_at"] + 60
    server.advance(61)
    expired = await poll(http, server, batch["id"])
    assert expired["status"] == "expired" and expired["expired_at"] == batch["expires_at"]
    assert expired["request_counts"] == {"total": 8, "completed": 2, "failed": 0}
    output = await file_lines(http, server, expired["output_file_id"])
    assert [line["custom_id"] for line in output] == ["r0", "r1"]
    errors = await file_lines(http, server, expired["error_file_id"])
    assert [line["custom_id"] for line in errors] == [f"r{i}" for i in range(2, 8)]
    assert all(line["response"] is None and line["error"]["code"] == "batch_expired"
               for line in errors)

    server.expire_after, server.expire_done_fraction = None, 0.5  # and by hand
    other = await openai_batch(http, server, [chat_line(f"s{i}", "x") for i in range(4)])
    assert server.expire(other["id"]) == "expired"
    assert (await poll(http, server, other["id"]))["request_counts"]["completed"] == 2
    assert server.stats()["requests_expired"] == 6 + 2


async def test_openai_bad_file_fails_naming_each_line(server: FakeBatchServer,
                                                      http: aiohttp.ClientSession) -> None:
    data = b"\n".join([
        orjson.dumps(chat_line("a", "x")),
        b"{not json",
        orjson.dumps(chat_line("a", "again")),
        orjson.dumps(chat_line("c", "x", url="/v1/completions")),
        orjson.dumps(chat_line("d", "x", model="other-model")),
        orjson.dumps({"custom_id": "e", "method": "GET", "url": CHAT, "body": {}}),
    ]) + b"\n"
    batch = await openai_batch(http, server, data)
    failed = await poll(http, server, batch["id"])
    assert failed["status"] == "failed" and failed["failed_at"] is not None
    assert failed["output_file_id"] is None and failed["in_progress_at"] is None
    assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    errors = {e["line"]: e for e in failed["errors"]["data"]}
    assert failed["errors"]["object"] == "list"
    assert {line: e["code"] for line, e in errors.items()} == {
        2: "invalid_json_line", 3: "duplicate_custom_id", 4: "url_mismatch",
        5: "model_mismatch", 6: "invalid_method"}
    assert errors[5]["param"] == "body.model" and "other-model" in errors[5]["message"]
    assert server.stats()["requests_answered"] == 0


async def test_openai_whole_file_limits_and_fail_batches(server: FakeBatchServer,
                                                         http: aiohttp.ClientSession) -> None:
    async def errors_of(data: bytes) -> list[dict[str, Any]]:
        batch = await openai_batch(http, server, data)
        failed = await poll(http, server, batch["id"])
        assert failed["status"] == "failed"
        return list(failed["errors"]["data"])

    three = jsonl([chat_line(f"r{i}", "x") for i in range(3)])
    assert [e["code"] for e in await errors_of(b"")] == ["empty_file"]
    server.openai_max_requests = 2
    assert [e["code"] for e in await errors_of(three)] == ["too_many_tasks"]
    server.openai_max_requests, server.openai_max_bytes = 50_000, 10
    assert [e["code"] for e in await errors_of(three)] == ["file_too_large"]
    server.openai_max_bytes, server.fail_batches = 200 * 2**20, 1
    [error] = await errors_of(three)
    assert error["code"] == "token_limit_exceeded" and error["line"] is None
    retried = await openai_batch(http, server, three)  # fail_batches was used up
    assert (await poll(http, server, retried["id"]))["status"] == "completed"
    assert server.stats()["custom_id_submitted"]["r0"] == 4
    assert server.stats()["custom_id_succeeded"] == {"r0": 1, "r1": 1, "r2": 1}


async def test_openai_create_refusals(server: FakeBatchServer, http: aiohttp.ClientSession
                                      ) -> None:
    good = await upload(http, server, jsonl([chat_line("r", "x")]))
    other = await upload(http, server, b"{}", purpose="user_data")
    base = {"input_file_id": good["id"], "endpoint": CHAT, "completion_window": "24h"}
    cases = [({"input_file_id": "file-nope"}, 404, "input_file_id"),
             ({"input_file_id": other["id"]}, 400, "input_file_id"),
             ({"endpoint": "/v1/embeddings"}, 400, "endpoint"),
             ({"completion_window": "1h"}, 400, "completion_window"),
             ({"metadata": {"k": "v" * 513}}, 400, "metadata")]
    for change, want, param in cases:
        status, body = await call(http, "POST", f"{server.base_url}/batches",
                                  json={**base, **change})
        assert (status, body["error"]["param"]) == (want, param)
        assert body["error"]["type"] == "invalid_request_error"
    status, body = await call(http, "GET", f"{server.base_url}/batches/batch_nope")
    assert status == 404 and "batch_nope" in body["error"]["message"]
    assert server.stats()["batches_rejected"] == 5 and server.stats()["batches_created"] == 0


async def test_files_retrieve_list_delete(server: FakeBatchServer,
                                          http: aiohttp.ClientSession) -> None:
    first = await upload(http, server, b"one")
    second = await upload(http, server, b"two", purpose="user_data")
    status, got = await call(http, "GET", f"{server.base_url}/files/{first['id']}")
    assert status == 200 and got == first
    status, listed = await call(http, "GET", f"{server.base_url}/files")
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [
        second["id"], first["id"]]
    _, only_batch = await call(http, "GET", f"{server.base_url}/files",
                               params={"purpose": "batch"})
    assert [f["id"] for f in only_batch["data"]] == [first["id"]]
    status, deleted = await call(http, "DELETE", f"{server.base_url}/files/{first['id']}")
    assert status == 200 and deleted == {"id": first["id"], "object": "file", "deleted": True}
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        status, gone = await call(http, method, f"{server.base_url}/files/{first['id']}"
                                                f"{suffix}")
        assert status == 404 and first["id"] in gone["error"]["message"]
    assert server.stats()["files_deleted"] == 1 and server.stats()["files_uploaded"] == 2


async def test_openai_list_pagination(server: FakeBatchServer, http: aiohttp.ClientSession
                                      ) -> None:
    created = [(await openai_batch(http, server, [chat_line("r", "x")]))["id"]
               for _ in range(5)]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    for _ in range(5):
        status, listed = await call(http, "GET", f"{server.base_url}/batches", params=params)
        assert status == 200 and listed["object"] == "list"
        seen += [b["id"] for b in listed["data"]]
        assert listed["first_id"] == listed["data"][0]["id"]
        if not listed["has_more"]:
            break
        params["after"] = listed["last_id"]
    assert seen == created[::-1]  # newest first, each once
    status, _ = await call(http, "GET", f"{server.base_url}/batches", params={"limit": 101})
    assert status == 400


async def test_downloads_never_change(server: FakeBatchServer, http: aiohttp.ClientSession
                                      ) -> None:
    server.error_rate = 0.5
    batch = await openai_batch(http, server, [chat_line(f"r{i}", "x") for i in range(20)])
    done = await poll(http, server, batch["id"])
    url = f"{server.base_url}/files/{done['output_file_id']}/content"
    first = [await call(http, "GET", url) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    server.advance(3 * 24 * 3600)
    assert await poll(http, server, batch["id"]) == done
    assert (await call(http, "GET", url)) == first[0]
    stats = server.stats()
    assert stats["downloads_per_id"] == {done["output_file_id"]: 4}
    assert stats["requests_answered"] == 20 and 0 < stats["requests_errored"] < 20

    claude = await anthropic_batch(http, server, [anthropic_request("a", "x")])
    ended = await poll(http, server, claude["id"], anthropic=True)
    once, twice = [await call(http, "GET", ended["results_url"]) for _ in range(2)]
    assert once == twice and server.stats()["downloads_per_id"][claude["id"]] == 2


async def test_finish_ends_a_long_batch_now(server: FakeBatchServer,
                                            http: aiohttp.ClientSession) -> None:
    server.completion_delay, server.finalize_delay = 3600, 600
    batch = await openai_batch(http, server, [chat_line("r", "x")])
    assert (await poll(http, server, batch["id"]))["status"] == "in_progress"
    assert server.finish(batch["id"]) == "completed"
    assert (await poll(http, server, batch["id"]))["request_counts"]["completed"] == 1


async def test_concurrent_polls_answer_each_request_once(server: FakeBatchServer,
                                                         http: aiohttp.ClientSession) -> None:
    import asyncio

    server.completion_delay = 100
    batch = await openai_batch(http, server, [chat_line(f"r{i}", "x") for i in range(200)])
    for _ in range(10):
        server.advance(10)
        await asyncio.gather(*(poll(http, server, batch["id"]) for _ in range(10)))
    stats = server.stats()
    assert stats["requests_answered"] == 200 and stats["succeeded_twice"] == []
    assert stats["polls_per_batch"][batch["id"]] == 100


async def test_the_openai_sdk_drives_it(server: FakeBatchServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    server.completion_delay = 60
    file = await client.files.create(file=("in.jsonl", jsonl([chat_line("r0", "sdk")])),
                                     purpose="batch")
    ids = []
    for _ in range(3):
        batch = await client.batches.create(input_file_id=file.id, endpoint=CHAT,
                                            completion_window="24h")
        ids.append(batch.id)
    assert batch.status == "validating" and batch.request_counts is not None
    cancelled = await client.batches.cancel(ids[0])
    assert cancelled.status == "cancelling"
    server.advance(60)
    done = await client.batches.retrieve(ids[1])
    assert done.status == "completed" and done.output_file_id is not None
    content = await client.files.content(done.output_file_id)
    [line] = [orjson.loads(row) for row in content.text.splitlines()]
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "<draft>sdk</draft>"
    listed = [b.id async for b in client.batches.list(limit=2)]  # follows has_more / after
    assert listed == ids[::-1]
    assert (await client.batches.retrieve(ids[0])).status == "cancelled"
    assert (await client.files.delete(file.id)).deleted is True
    await client.close()


# ---- Anthropic ---------------------------------------------------------------------------


async def test_anthropic_round_trip(server: FakeBatchServer, http: aiohttp.ClientSession
                                    ) -> None:
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body)
        return f"re: {last_user_message(body)}"

    server.responder = responder
    server.completion_delay = 30
    blocks = [{"type": "text", "text": "in blocks"}]
    created = await anthropic_batch(http, server, [
        anthropic_request("plain", "hello", system="be brief"),
        anthropic_request("blocks", "", messages=[{"role": "user", "content": blocks}])])
    assert set(created) == ANTHROPIC_BATCH_FIELDS and created["type"] == "message_batch"
    assert created["id"].startswith("msgbatch_")
    assert created["processing_status"] == "in_progress" and created["results_url"] is None
    assert created["request_counts"] == {"processing": 2, "succeeded": 0, "errored": 0,
                                         "canceled": 0, "expired": 0}
    status, early = await call(http, "GET", f"{server.base_url}/messages/batches/"
                                            f"{created['id']}/results")
    assert status == 400 and early["error"]["type"] == "invalid_request_error"
    server.advance(30)
    ended = await poll(http, server, created["id"], anthropic=True)
    assert ended["processing_status"] == "ended" and ended["ended_at"].endswith("Z")
    assert ended["request_counts"]["succeeded"] == 2 and ended["request_counts"][
        "processing"] == 0
    assert ended["results_url"].startswith(server.base_url)
    got = await results(http, ended)
    assert got["plain"]["type"] == "succeeded"
    message = got["plain"]["message"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": "re: hello"}]
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    assert set(message["usage"]) == {"input_tokens", "output_tokens"}
    assert got["blocks"]["message"]["content"][0]["text"] == "re: in blocks"
    assert seen[0]["messages"][0] == {"role": "system", "content": "be brief"}
    assert seen[0]["max_tokens"] == 64 and seen[0]["model"] == "claude-fake"


async def test_anthropic_errors_inside_a_batch(server: FakeBatchServer,
                                               http: aiohttp.ClientSession) -> None:
    server.error_for = lambda cid, body: FakeReply(status=429) if cid == "limited" else None
    no_max = {"custom_id": "no-max", "params": {"model": "claude-fake", "messages": [
        {"role": "user", "content": "x"}]}}
    batch = await anthropic_batch(http, server, [
        anthropic_request("ok", "x"), anthropic_request("limited", "x"), no_max])
    got = await results(http, await poll(http, server, batch["id"], anthropic=True))
    assert got["ok"]["type"] == "succeeded"
    assert got["limited"] == {"type": "errored", "error": {"type": "error", "error": {
        "type": "rate_limit_error", "message": "fake error 429"}}}
    assert got["no-max"]["error"]["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in got["no-max"]["error"]["error"]["message"]

    server.error_for, server.error_rate = None, 0.5
    many = await anthropic_batch(http, server, [anthropic_request(f"m{i}", "x")
                                                for i in range(40)])
    counts = (await poll(http, server, many["id"], anthropic=True))["request_counts"]
    assert counts["succeeded"] + counts["errored"] == 40 and 5 < counts["errored"] < 35
    kinds = {r["type"] for r in (await results(http, await poll(
        http, server, many["id"], anthropic=True))).values()}
    assert kinds == {"succeeded", "errored"}


async def test_anthropic_cancel_expire_delete(server: FakeBatchServer,
                                              http: aiohttp.ClientSession) -> None:
    server.completion_delay = 100
    batch = await anthropic_batch(http, server, [anthropic_request(f"r{i}", "x")
                                                 for i in range(4)])
    base = f"{server.base_url}/messages/batches/{batch['id']}"
    status, refused = await call(http, "DELETE", base)
    assert status == 400 and "cancel" in refused["error"]["message"]
    server.advance(75)
    status, canceling = await call(http, "POST", f"{base}/cancel")
    assert status == 200 and canceling["processing_status"] == "canceling"
    assert canceling["cancel_initiated_at"] is not None
    ended = await poll(http, server, batch["id"], anthropic=True)
    assert ended["request_counts"] == {"processing": 0, "succeeded": 3, "errored": 0,
                                       "canceled": 1, "expired": 0}
    assert (await results(http, ended))["r3"] == {"type": "canceled"}
    status, deleted = await call(http, "DELETE", base)
    assert status == 200 and deleted == {"id": batch["id"], "type": "message_batch_deleted"}
    status, _ = await call(http, "GET", base)
    assert status == 404

    server.expire_done_fraction = 0.5
    other = await anthropic_batch(http, server, [anthropic_request(f"s{i}", "x")
                                                 for i in range(4)])
    assert server.expire(other["id"]) == "expired"
    expired = await poll(http, server, other["id"], anthropic=True)
    assert expired["request_counts"]["expired"] == 2
    assert (await results(http, expired))["s3"] == {"type": "expired"}
    assert server.stats()["batches_deleted"] == 1


async def test_anthropic_create_refusals(server: FakeBatchServer,
                                         http: aiohttp.ClientSession) -> None:
    url = f"{server.base_url}/messages/batches"
    cases = [([anthropic_request("has space", "x")], "requests.0.custom_id"),
             ([anthropic_request("a" * 65, "x")], "requests.0.custom_id"),
             ([anthropic_request("dup", "x"), anthropic_request("dup", "y")],
              "requests.1.custom_id: duplicate"),
             ([], "requests")]
    for requests, named in cases:
        status, body = await call(http, "POST", url, json={"requests": requests})
        assert status == 400 and body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith(named)
    server.fail_batches = 1
    status, _ = await call(http, "POST", url, json={"requests": [anthropic_request("a", "x")]})
    assert status == 400
    server.anthropic_max_requests = 1
    status, _ = await call(http, "POST", url, json={"requests": [
        anthropic_request("a", "x"), anthropic_request("b", "x")]})
    assert status == 400
    server.anthropic_max_bytes = 10
    status, body = await call(http, "POST", url, json={"requests": [
        anthropic_request("a", "x")]})
    assert status == 413 and body["error"]["type"] == "request_too_large"
    stats = server.stats()
    assert stats["batches_rejected"] == 7 and stats["batches_created"] == 0
    assert stats["custom_id_submitted"] == {}


async def test_anthropic_list_pagination(server: FakeBatchServer,
                                         http: aiohttp.ClientSession) -> None:
    created = [(await anthropic_batch(http, server, [anthropic_request("r", "x")]))["id"]
               for _ in range(5)]
    newest_first = created[::-1]
    url = f"{server.base_url}/messages/batches"
    _, page1 = await call(http, "GET", url, params={"limit": 2})
    assert [b["id"] for b in page1["data"]] == newest_first[:2] and page1["has_more"]
    assert "object" not in page1 and page1["last_id"] == newest_first[1]
    _, page2 = await call(http, "GET", url, params={"limit": 2, "after_id": page1["last_id"]})
    assert [b["id"] for b in page2["data"]] == newest_first[2:4] and page2["has_more"]
    _, back = await call(http, "GET", url, params={"limit": 5, "before_id": page2["first_id"]})
    assert [b["id"] for b in back["data"]] == newest_first[:2] and not back["has_more"]
    _, last = await call(http, "GET", url, params={"after_id": newest_first[3]})
    assert [b["id"] for b in last["data"]] == newest_first[4:] and not last["has_more"]
    status, _ = await call(http, "GET", url, params={"after_id": "msgbatch_nope"})
    assert status == 400


# ---- one server for everything -----------------------------------------------------------


async def test_online_endpoints_share_the_server(server: FakeBatchServer,
                                                 http: aiohttp.ClientSession) -> None:
    server.responder = lambda body: (FakeReply(status=429, headers={"Retry-After": "2"})
                                     if last_user_message(body) == "busy" else
                                     f"echo {last_user_message(body)}")
    status, chat = await call(http, "POST", f"{server.base_url}/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["choices"][0]["message"]["content"] == "echo hi"
    status, message = await call(http, "POST", f"{server.base_url}/messages", json={
        "model": "claude-fake", "max_tokens": 10, "system": "sys",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}]})
    assert status == 200 and message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": "echo yo"}]
    assert message["model"] == "claude-fake" and message["usage"]["output_tokens"] == 2
    async with http.post(f"{server.base_url}/messages", json={
            "model": "c", "max_tokens": 10,
            "messages": [{"role": "user", "content": "busy"}]}) as response:
        assert response.status == 429 and response.headers["Retry-After"] == "2"
        assert (await response.json())["error"]["type"] == "rate_limit_error"
    status, bad = await call(http, "POST", f"{server.base_url}/messages",
                             json={"model": "c", "messages": []})
    assert status == 400 and bad["error"]["type"] == "invalid_request_error"
    assert server.request_count == 4 and server.stats()["requests"] == 4


async def test_stats_route_duplicates_and_reset(server: FakeBatchServer,
                                                http: aiohttp.ClientSession) -> None:
    for _ in range(2):  # the same request submitted twice, as a careless resume would
        batch = await openai_batch(http, server, [chat_line("same", "x")])
        await poll(http, server, batch["id"])
    status, stats = await call(http, "GET", f"http://127.0.0.1:{server.port}/stats")
    assert status == 200 and stats == server.stats()
    assert stats["submitted_twice"] == ["same"] and stats["succeeded_twice"] == ["same"]
    assert len(stats["bodies_succeeded_twice"]) == 1 and stats["files_uploaded"] == 2
    status, _ = await call(http, "POST", f"http://127.0.0.1:{server.port}/reset")
    assert status == 200
    after = server.stats()
    assert after["submitted_twice"] == [] and after["batches_created"] == 0
    assert len(after["batches"]) == 2  # the batches themselves stay


async def test_api_key_guards_batch_routes(http: aiohttp.ClientSession) -> None:
    with FakeBatchServer(api_key="sk-test") as server:
        status, body = await call(http, "GET", f"{server.base_url}/batches")
        assert status == 401 and body["error"]["type"] == "invalid_request_error"
        status, body = await call(http, "GET", f"{server.base_url}/messages/batches")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, _ = await call(http, "GET", f"{server.base_url}/batches",
                               headers={"Authorization": "Bearer sk-test"})
        assert status == 200
        status, _ = await call(http, "GET", f"{server.base_url}/messages/batches",
                               headers={"x-api-key": "sk-test"})
        assert status == 200


def test_command_line_prints_its_base_url() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "datagen.testing.fake_batch_server", "--port", "0",
         "--completion-delay", "5", "--error-rate", "0.1", "--expire-after", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", first)
        assert match, first
        import urllib.request

        port_url = match.group(1).removesuffix("/v1")
        with urllib.request.urlopen(f"{port_url}/stats", timeout=10) as response:
            assert orjson.loads(response.read())["batches_created"] == 0
    finally:
        process.terminate()
        process.wait(10)
