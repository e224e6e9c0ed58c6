"""The HTTP side shared by the fake batch server's routes: reading a JSON body, building
aiohttp responses (JSON, raw bytes, each provider's error body), the API-key check every
batch route makes, and one page of a list answer with the provider's cursor names. Pure
functions over aiohttp requests; the routes are in :mod:`datagen.testing.fake_batch_openai`
and :mod:`datagen.testing.fake_batch_anthropic`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from datagen.testing import fake_batch_shapes as shapes
from datagen.testing.fake_batch_records import Provider

Handler = Callable[[Any], Awaitable[Any]]
Route = tuple[str, str, Handler]  # method, path, handler


def loads(raw: bytes) -> Any:
    """The JSON in ``raw``, or None when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def read_json(request: Any) -> Any:
    """The request's JSON body, or None when it is not JSON."""
    return loads(await request.read())


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Any:
    return raw_response(orjson.dumps(data), "application/json", status, headers)


def raw_response(data: bytes | str, content_type: str, status: int = 200,
                 headers: dict[str, str] | None = None) -> Any:
    from aiohttp import web

    return web.Response(body=data, status=status, headers=headers,
                        content_type=content_type)


def error_response(provider: Provider, status: int, message: str,
                   param: str | None = None) -> Any:
    """An error answer with ``provider``'s error body."""
    if provider == "openai":
        return json_response(shapes.openai_error(status, message, param), status)
    return json_response(shapes.anthropic_error(status, message), status)


def denied(request: Any, provider: Provider, api_key: str | None) -> Any:
    """A 401 when ``api_key`` is set and the request carries another (as
    ``Authorization: Bearer`` or ``x-api-key``), else None."""
    if api_key is None or api_key in (
            request.headers.get("x-api-key"),
            request.headers.get("Authorization", "").removeprefix("Bearer ")):
        return None
    return error_response(provider, 401, "Incorrect API key provided.")


def page(request: Any, provider: Provider, views: list[dict[str, Any]], default: int,
         most: int) -> Any:
    """One page of a list answer, with the provider's cursor names and envelope."""
    query, anthropic = request.query, provider == "anthropic"
    limit = query.get("limit", str(default))
    if not limit.isdigit() or not 1 <= int(limit) <= most:
        return error_response(provider, 400, f"limit must be an integer from 1 to {most}",
                              "limit")
    try:
        return json_response(shapes.list_body(
            not anthropic, views, int(limit), query.get("after_id" if anthropic else "after"),
            query.get("before_id") if anthropic else None))
    except KeyError as exc:
        return error_response(provider, 400, f"No object with id {exc} to page from.")
