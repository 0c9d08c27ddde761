"""REST routes and the event socket. Each handler validates, calls the registry or the
dispatcher, and answers JSON; errors become `{"error": {...}}` with the right status."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import msgspec
from aiohttp import WSMsgType, web

from gswarm import __version__
from gswarm.devices import validate_model_name, validate_node_id
from gswarm.errors import (
    BadRequest,
    Forbidden,
    GswarmError,
    PayloadTooLarge,
    Unauthorized,
)
from gswarm.head.app import HEAD_KEY, Head
from gswarm.protocol import Event, Failed, Inventory, Notice, Op, Succeeded, encode, to_builtins

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PUBLIC_PATHS = frozenset({"/health", "/ws/agent"})


# ---------------------------------------------------------------- plumbing


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
    if request.path in _PUBLIC_PATHS:
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


def _query_flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in {"1", "true", "yes"}


def _query_int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name}={raw!r} is not an integer") from None


def _head(request: web.Request) -> Head:
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
    head = _head(request)
    if _query_flag(request, "wait"):
        raw = request.query.get("timeout")
        try:
            timeout = float(raw) if raw else (op.timeout or head.settings.op_timeout)
        except ValueError:
            raise BadRequest(f"query parameter timeout={raw!r} is not a number") from None
        op = await head.dispatcher.wait(op.op_id, timeout)
        return json_response(op, status=200)
    return json_response(op, status=status)


# ---------------------------------------------------------------- bodies


class RegisterModelBody(msgspec.Struct):
    """`POST /models`."""

    name: str
    type: str
    source_url: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class RegisterNodeBody(msgspec.Struct):
    """`POST /nodes` of the original API."""

    node_id: str
    hostname: str = ""
    ip_address: str = ""
    storage_devices: dict[str, Any] = msgspec.field(default_factory=dict)
    gpu_count: int = 0


# ---------------------------------------------------------------- system


async def root(request: web.Request) -> web.Response:
    """`GET /`: what this head is and how big its cluster is."""
    head = _head(request)
    reg = head.registry
    return json_response(
        {
            "name": "gswarm",
            "version": __version__,
            "uptime": time.time() - head.started_at,
            "models": len(reg.models),
            "nodes": len(reg.nodes),
            "nodes_online": sum(1 for n in reg.nodes.values() if n.status == "online"),
            "agents_connected": head.agents.count,
            "ops_open": len(reg.open_ops()),
            "last_seq": head.bus.last_seq,
            "subscribers": head.bus.subscriber_count,
            "subscribers_dropped": head.bus.dropped_count,
        }
    )


async def health(request: web.Request) -> web.Response:
    """`GET /health`: liveness, no token needed."""
    return json_response({"status": "ok", "version": __version__})


# ---------------------------------------------------------------- models


def model_view(head: Head, name: str) -> dict[str, Any]:
    """A model with all its locations."""
    view: dict[str, Any] = to_builtins(head.registry.get_model(name))
    view["locations"] = to_builtins(head.registry.model_locations(name))
    return view


async def list_models(request: web.Request) -> web.Response:
    """`GET /models`."""
    head = _head(request)
    return json_response({"models": [model_view(head, name) for name in sorted(head.registry.models)]})


async def register_model(request: web.Request) -> web.Response:
    """`POST /models`."""
    head = _head(request)
    body = await read_json(request, RegisterModelBody)
    validate_model_name(body.name)
    if not body.type.strip():
        raise BadRequest("model type must not be empty", code="invalid_field", details={"field": "type"})
    _, events = head.registry.register_model(body.name, body.type, body.source_url, body.metadata)
    head.commit(events)
    return json_response(model_view(head, body.name), status=201)


async def get_model(request: web.Request) -> web.Response:
    """`GET /models/{model_name}`."""
    name = validate_model_name(request.match_info["model_name"], "model_name")
    return json_response(model_view(_head(request), name))


# ---------------------------------------------------------------- nodes


async def list_nodes(request: web.Request) -> web.Response:
    """`GET /nodes`."""
    reg = _head(request).registry
    return json_response({"nodes": [reg.nodes[k] for k in sorted(reg.nodes)]})


async def get_node(request: web.Request) -> web.Response:
    """`GET /nodes/{node_id}`."""
    node_id = validate_node_id(request.match_info["node_id"])
    return json_response(_head(request).registry.get_node(node_id))


async def register_node(request: web.Request) -> web.Response:
    """`POST /nodes` (original API): record a node; it gets work once its agent connects."""
    head = _head(request)
    body = await read_json(request, RegisterNodeBody)
    validate_node_id(body.node_id)
    node, events = head.registry.legacy_register_node(
        body.node_id, body.hostname, body.ip_address, body.storage_devices, body.gpu_count
    )
    head.commit(events)
    return json_response(node, status=201)


async def node_heartbeat(request: web.Request) -> web.Response:
    """`POST /nodes/{node_id}/heartbeat` (original API)."""
    head = _head(request)
    node_id = validate_node_id(request.match_info["node_id"])
    head.commit(head.registry.legacy_heartbeat(node_id))
    return json_response({"node_id": node_id, "status": head.registry.nodes[node_id].status})


async def probe_node(request: web.Request) -> web.Response:
    """`POST /nodes/{node_id}/probe`: the agent re-reads inventory and holdings."""
    head = _head(request)
    node_id = validate_node_id(request.match_info["node_id"])
    op = await head.dispatcher.submit("probe", node_id, {})
    return await op_response(request, op)


def _probe_result(head: Head) -> Callable[[Op, Succeeded | Failed], list[Event]]:
    def hook(op: Op, msg: Succeeded | Failed) -> list[Event]:
        if not isinstance(msg, Succeeded):
            return []
        inventory = msgspec.convert(msg.result.get("inventory", {}), Inventory)
        events = head.registry.node_heartbeat(op.node_id, inventory)
        if msg.holdings is not None:
            head.registry.nodes[op.node_id].holdings = msg.holdings
            events.extend(head.reconcile_holdings(op.node_id, msg.holdings))
        return events

    return hook


# ---------------------------------------------------------------- ops


async def list_ops(request: web.Request) -> web.Response:
    """`GET /ops?node=&state=&kind=&limit=`, newest first."""
    reg = _head(request).registry
    q = request.query
    ops = [
        op
        for op in reg.ops.values()
        if (not q.get("node") or op.node_id == q["node"])
        and (not q.get("state") or op.state == q["state"])
        and (not q.get("kind") or op.kind == q["kind"])
    ]
    ops.sort(key=lambda o: o.created_at, reverse=True)
    return json_response({"ops": ops[: _query_int(request, "limit", 200)]})


async def get_op(request: web.Request) -> web.Response:
    """`GET /ops/{op_id}` (with `?wait=true`, once it has ended)."""
    head = _head(request)
    op = head.registry.get_op(request.match_info["op_id"])
    if _query_flag(request, "wait"):
        return await op_response(request, op)
    return json_response(op)


async def cancel_op(request: web.Request) -> web.Response:
    """`POST /ops/{op_id}/cancel`."""
    head = _head(request)
    op = await head.dispatcher.cancel(request.match_info["op_id"])
    return json_response(op)


# ---------------------------------------------------------------- events


def _topics(request: web.Request) -> frozenset[str]:
    raw = ",".join(request.query.getall("topic", []))
    return frozenset(t.strip() for t in raw.split(",") if t.strip())


async def list_events(request: web.Request) -> web.Response:
    """`GET /events?since=SEQ&topic=&limit=`: the events after `since`."""
    head = _head(request)
    since = _query_int(request, "since", 0)
    limit = min(_query_int(request, "limit", 1000), 10_000)
    events = await head.bus.replay(since, head.bus.last_seq, _topics(request), limit)
    return json_response({"events": events, "last_seq": head.bus.last_seq})


async def events_socket(request: web.Request) -> web.WebSocketResponse:
    """`/ws/events?since=SEQ&topic=...`: replay what was missed, then follow live."""
    head = _head(request)
    since = _query_int(request, "since", -1)
    topics = _topics(request)
    ws = web.WebSocketResponse(heartbeat=head.settings.ws_ping_interval, timeout=2.0)
    await ws.prepare(request)
    sub, upto = head.bus.subscribe(topics)
    sender = asyncio.create_task(_send_events(ws, head, sub, since, upto, topics))
    reader = asyncio.create_task(_drain_reads(ws))
    dropped = asyncio.create_task(sub.dropped.wait())
    try:
        await asyncio.wait({sender, reader, dropped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        head.bus.unsubscribe(sub)
        for task in (sender, reader, dropped):
            task.cancel()
        await asyncio.gather(sender, reader, dropped, return_exceptions=True)
    if sub.dropped.is_set() and not ws.closed:
        notice = Notice(code="dropped", message=sub.drop_reason, last_seq=head.bus.last_seq)
        try:
            await asyncio.wait_for(ws.send_str(encode(notice).decode()), 1.0)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        code = 1001 if "shutting down" in sub.drop_reason else 4008
        try:
            await asyncio.wait_for(ws.close(code=code, message=sub.drop_reason[:120].encode()), 2.0)
        except (TimeoutError, ConnectionError):
            pass
    if not ws.closed:
        await ws.close()
    return ws


async def _send_events(
    ws: web.WebSocketResponse,
    head: Head,
    sub: Any,
    since: int,
    upto: int,
    topics: frozenset[str],
) -> None:
    if since >= 0:
        for ev in await head.bus.replay(since, upto, topics):
            await ws.send_str(encode(ev).decode())
    await ws.send_str(encode(Notice(code="live", message="following live", last_seq=upto)).decode())
    while True:
        ev = await sub.queue.get()
        if ev.seq > upto:
            await ws.send_str(encode(ev).decode())


async def _drain_reads(ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break


# ---------------------------------------------------------------- wiring


def setup_routes(app: web.Application) -> None:
    """Attach every route and middleware to a head's app."""
    head = app[HEAD_KEY]
    app.middlewares.extend([error_middleware, auth_middleware])
    r = app.router
    r.add_get("/", root)
    r.add_get("/health", health)
    r.add_get("/models", list_models)
    r.add_post("/models", register_model)
    r.add_get("/models/{model_name}", get_model)
    r.add_get("/nodes", list_nodes)
    r.add_post("/nodes", register_node)
    r.add_get("/nodes/{node_id}", get_node)
    r.add_post("/nodes/{node_id}/heartbeat", node_heartbeat)
    r.add_post("/nodes/{node_id}/probe", probe_node)
    r.add_get("/ops", list_ops)
    r.add_get("/ops/{op_id}", get_op)
    r.add_post("/ops/{op_id}/cancel", cancel_op)
    r.add_get("/events", list_events)
    r.add_get("/ws/agent", head.agents.handle)
    r.add_get("/ws/events", events_socket)
    head.dispatcher.on_result("probe", _probe_result(head))
    from gswarm.head import jobs, replication, services, transfers

    transfers.setup(app)
    replication.setup(app)
    services.setup(app)
    jobs.setup(app)
