"""The head's HTTP plumbing shared by every route family: JSON answers, typed bodies, query
parameters, the error and auth middlewares, and the answer for a submitted op."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import msgspec
from aiohttp import web

from gswarm.errors import (
    BadRequest,
    Forbidden,
    GswarmError,
    PayloadTooLarge,
    Unauthorized,
)
from gswarm.head.state import HEAD_KEY, Head
from gswarm.ops import Op
from gswarm.protocol import encode

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/health", "/ws/agent"})
"""Routes that need no api token (the agent socket authenticates by its Hello)."""


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON answer encoded by msgspec."""
    return web.Response(body=encode(data), status=status, content_type="application/json")


def _error_response(err: GswarmError) -> web.Response:
    return json_response(err.to_payload(), status=err.status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as a JSON error with a stable code."""
    try:
        return await handler(request)
    except GswarmError as err:
        return _error_response(err)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error_response(PayloadTooLarge(f"request body too large: {exc.text}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        body = {"error": {"code": code, "message": f"{exc.reason}: {request.method} {request.path}"}}
        return json_response(body, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_response({"error": {"code": "internal", "message": f"internal error: {exc}"}}, status=500)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route but /health (and the agent socket, which authenticates by Hello) needs
    `Authorization: Bearer <api token>`; the event socket may pass `?token=` instead."""
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    head = request.app[HEAD_KEY]
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token and request.path == "/ws/events":
        token = request.query.get("token", "")
    if not token:
        raise Unauthorized("missing token: send 'Authorization: Bearer <token>' (gswarm token)")
    if not hmac.compare_digest(token.encode(), head.tokens.api_token.encode()):
        raise Forbidden("wrong token")
    return await handler(request)


async def read_json(request: web.Request, typ: type[T]) -> T:
    """Decode the body as `typ`; 400 naming the parse error or the field, 413 when too large."""
    limit = request.app[HEAD_KEY].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"request body of {request.content_length} bytes is over the {limit}-byte limit"
        )
    body = await request.read()
    if not body:
        raise BadRequest("empty request body: a JSON object is expected", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("at `$.")[2].rstrip("`") if "at `$." in str(exc) else ""
        raise BadRequest(f"invalid field: {exc}", code="invalid_field", details={"field": field}) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}", code="invalid_json") from None


def query_flag(request: web.Request, name: str) -> bool:
    """A yes/no query parameter (`1`, `true`, `yes`)."""
    return request.query.get(name, "").lower() in {"1", "true", "yes"}


def query_int(request: web.Request, name: str, default: int) -> int:
    """An integer query parameter; 400 naming it when it is not one."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name}={raw!r} is not an integer") from None


def head_of(request: web.Request) -> Head:
    """The head serving a request."""
    return request.app[HEAD_KEY]


class Submitted(NamedTuple):
    """An op a request created (202), or an existing one it joined or that ended at once (200)."""

    op: Op
    status: int = 202


async def submitted_response(request: web.Request, sub: Submitted) -> web.Response:
    """The REST answer for a submitted op (see `op_response`)."""
    return await op_response(request, sub.op, sub.status)


async def op_response(request: web.Request, op: Op, status: int = 202) -> web.Response:
    """`status` (202) with the op at once, or with `?wait=true` 200 with the op once it has ended
    (or when `?timeout=` seconds have passed)."""
    head = head_of(request)
    if query_flag(request, "wait"):
        raw = request.query.get("timeout")
        try:
            timeout = float(raw) if raw else (op.timeout or head.settings.op_timeout)
        except ValueError:
            raise BadRequest(f"query parameter timeout={raw!r} is not a number") from None
        op = await head.dispatcher.wait(op.op_id, timeout)
        return json_response(op, status=200)
    return json_response(op, status=status)
