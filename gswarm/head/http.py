"""The head's HTTP plumbing shared by every route family: JSON answers, typed bodies, query
parameters, the error and auth middlewares, and the answer for a submitted op."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, NamedTuple, TypeVar

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gswarm.api import FREE_FORM_DEPTH, MAX_TIMEOUT, TOO_DEEP
from gswarm.errors import (
    BadRequest,
    Forbidden,
    GswarmError,
    PayloadTooLarge,
    Unauthorized,
)
from gswarm.head.dashboard import is_public
from gswarm.head.state import HEAD_KEY, Head
from gswarm.ops import Op
from gswarm.protocol import encode

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/health", "/ws/agent"})
"""Routes that need no api token (the agent socket authenticates by its Hello); the dashboard's
page and assets (`/ui`, `/ui/...`, which hold no data) need none either."""


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON answer encoded by msgspec."""
    return web.Response(body=encode(data), status=status, content_type="application/json")


def _error_response(err: GswarmError) -> web.Response:
    return json_response(err.to_payload(), status=err.status)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
}


def http_error_body(status: int, message: str) -> dict[str, Any]:
    """The documented error body for an answer aiohttp itself makes (404, 405, a bad request line)."""
    return {"error": {"code": _HTTP_CODES.get(status, "http_error"), "message": message, "details": {}}}


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
        path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
        body = http_error_body(exc.status, f"{exc.reason}: {request.method} {path}")
        return json_response(body, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_response(
            {"error": {"code": "internal", "message": f"internal error: {exc}", "details": {}}}, status=500
        )


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what fails before any route (a request line or
    header over the parser's limits, a malformed request) with the documented JSON error body
    instead of plain text."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if already answering
        if status >= 500:
            text = "internal error"
        else:
            text = str(getattr(exc, "message", None) or message or HTTPStatus(status).phrase)
        resp = json_response(http_error_body(status, text[:500]), status=status)
        resp.force_close()
        return resp


class JsonErrorServer(web.Server):
    """A `web.Server` whose connections are `JsonErrorRequestHandler`s."""

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """`web.AppRunner` serving through a `JsonErrorServer`."""

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return JsonErrorServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route but /health, the dashboard's files and the agent socket (which
    authenticates by Hello) needs `Authorization: Bearer <api token>`; the event socket may pass
    `?token=` instead."""
    if request.path in PUBLIC_PATHS or is_public(request.path):
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


async def read_body(request: web.Request, limit: int, what: str = "request body") -> bytes:
    """The body, read up to `limit` bytes (this route's own limit, whatever aiohttp's
    `client_max_size`); 413 as soon as it is longer."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"{what} of {request.content_length} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(1 << 16):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


_DECODE_OFF_LOOP = 64 * 1024
"""Bodies larger than this are decoded in a thread, so the event loop never stalls on one."""


def _decode(body: bytes, typ: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = text.rpartition("at `$.")[2].rstrip("`") if "at `$." in text else ""
        if text.startswith(TOO_DEEP):
            text = f"nested too deeply: free-form JSON has at most {FREE_FORM_DEPTH} levels - at `$.{field}`"
        raise BadRequest(f"invalid field: {text}", code="invalid_field", details={"field": field}) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply", code="invalid_json") from None


async def read_json(request: web.Request, typ: type[T]) -> T:
    """Decode the body as `typ`; 400 naming the parse error or the field, 413 when too large."""
    body = await read_body(request, request.app[HEAD_KEY].settings.max_body_bytes)
    if not body:
        raise BadRequest("empty request body: a JSON object is expected", code="invalid_json")
    if len(body) > _DECODE_OFF_LOOP:
        return await asyncio.to_thread(_decode, body, typ)
    return _decode(body, typ)


def query_flag(request: web.Request, name: str) -> bool:
    """A yes/no query parameter (`1`, `true`, `yes`)."""
    return request.query.get(name, "").lower() in {"1", "true", "yes"}


def query_int(request: web.Request, name: str, default: int, lo: int = 0, hi: int = 100_000) -> int:
    """An integer query parameter from `lo` to `hi`; 400 naming it when it is not one."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if len(raw) <= 20 else None
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise BadRequest(
            f"query parameter {name}={shown!r} is not an integer from {lo} to {hi}",
            code="invalid_query",
            details={"field": name},
        )
    return value


def query_float(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    """A number query parameter from `lo` to `hi` (finite); 400 naming it otherwise."""
    raw = request.query.get(name)
    if not raw:
        return default
    try:
        value = float(raw) if len(raw) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:  # also false for NaN
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise BadRequest(
            f"query parameter {name}={shown!r} is not a number from {lo:g} to {hi:g}",
            code="invalid_query",
            details={"field": name},
        )
    return value


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
        timeout = query_float(request, "timeout", op.timeout or head.settings.op_timeout, 0.0, MAX_TIMEOUT)
        op = await head.dispatcher.wait(op.op_id, timeout)
        return json_response(op, status=200)
    return json_response(op, status=status)
