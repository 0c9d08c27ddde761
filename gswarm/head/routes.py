"""REST routes and the event socket. Each handler validates, calls the registry or the
dispatcher, and answers JSON; errors become `{"error": {...}}` with the right status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import get_args

from aiohttp import WSMsgType, web

from gswarm import __version__
from gswarm.api import RegisterModelBody, RegisterNodeBody
from gswarm.devices import validate_model_name, validate_node_id
from gswarm.errors import BadRequest, Conflict, GswarmError, NotFound
from gswarm.head.dispatcher import Outcome
from gswarm.head.events import Subscriber
from gswarm.head.http import (
    auth_middleware,
    error_middleware,
    head_of,
    json_response,
    op_response,
    query_flag,
    query_int,
    read_json,
)
from gswarm.head.state import Head
from gswarm.ops import KINDS, Op, ProbeArgs, ProbeResult
from gswarm.protocol import Event, NodeRemoved, Notice, OpError, encode, holdings_problem, inventory_problem
from gswarm.states import OpState

log = logging.getLogger(__name__)

MAX_SEQ = (1 << 63) - 1
"""The largest event sequence number (SQLite's INTEGER)."""


# ---------------------------------------------------------------- system


async def root(request: web.Request) -> web.Response:
    """`GET /`: what this head is and how big its cluster is."""
    head = head_of(request)
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
            "heartbeats_dropped": head.agents.heartbeats_dropped,
        }
    )


async def health(request: web.Request) -> web.Response:
    """`GET /health`: liveness, no token needed."""
    return json_response({"status": "ok", "version": __version__})


# ---------------------------------------------------------------- models


async def list_models(request: web.Request) -> web.Response:
    """`GET /models`."""
    head = head_of(request)
    return json_response(
        {"models": [head.registry.model_view(name) for name in sorted(head.registry.models)]}
    )


async def register_model(request: web.Request) -> web.Response:
    """`POST /models`."""
    head = head_of(request)
    body = await read_json(request, RegisterModelBody)
    validate_model_name(body.name)
    if not body.type.strip():
        raise BadRequest("model type must not be empty", code="invalid_field", details={"field": "type"})
    _, events = head.registry.register_model(body.name, body.type, body.source_url, body.metadata)
    head.commit(events)
    return json_response(head.registry.model_view(body.name), status=201)


async def get_model(request: web.Request) -> web.Response:
    """`GET /models/{model_name}`."""
    name = validate_model_name(request.match_info["model_name"], "model_name")
    return json_response(head_of(request).registry.model_view(name))


# ---------------------------------------------------------------- nodes


async def list_nodes(request: web.Request) -> web.Response:
    """`GET /nodes`."""
    reg = head_of(request).registry
    return json_response({"nodes": [reg.nodes[k] for k in sorted(reg.nodes)]})


async def get_node(request: web.Request) -> web.Response:
    """`GET /nodes/{node_id}`."""
    node_id = validate_node_id(request.match_info["node_id"])
    return json_response(head_of(request).registry.get_node(node_id))


async def register_node(request: web.Request) -> web.Response:
    """`POST /nodes` (original API): record a node; it gets work once its agent connects."""
    head = head_of(request)
    body = await read_json(request, RegisterNodeBody)
    validate_node_id(body.node_id)
    node, events = head.registry.legacy_register_node(
        body.node_id, body.hostname, body.ip_address, body.storage_devices, body.gpu_count
    )
    head.commit(events)
    return json_response(node, status=201)


async def forget_node(head: Head, node_id: str, force: bool) -> NodeRemoved:
    """Forget a node and revoke its credential: its agent is refused from then on, and grants
    minted for its data server stop working. Refused (409 `node_online`) while the node is
    online unless `force`, which closes its agent's socket; its open ops fail (`node_removed`)
    and the copies and services recorded on it are forgotten."""
    reg = head.registry
    if node_id not in reg.nodes and node_id not in head.credentials:
        raise NotFound(f"node {node_id!r} is not known", code="node_not_found")
    node = reg.nodes.get(node_id)
    online = head.agents.get(node_id) is not None or (node is not None and node.status == "online")
    if online and not force:
        raise Conflict(
            f"node {node_id!r} is online: stop its agent first, or pass force=true to disconnect it",
            code="node_online",
            details={"node_id": node_id},
        )
    was_online = await head.agents.revoke(node_id, f"node {node_id} was removed from this head")
    error = OpError(code="node_removed", message=f"node {node_id} was removed")
    ops = reg.open_ops(node_id)
    for op in ops:
        head.dispatcher.finish(op, Outcome(error=error))
    locations: list[str] = []
    services: list[str] = []
    if node_id in reg.nodes:
        locations, services, events = reg.remove_node(node_id)
        head.commit(events)
    log.info("node %s removed (%d open ops failed)", node_id, len(ops))
    return NodeRemoved(
        node_id=node_id,
        was_online=was_online,
        ops_failed=[op.op_id for op in ops],
        locations=locations,
        services=services,
    )


async def remove_node(request: web.Request) -> web.Response:
    """`DELETE /nodes/{node_id}?force=`: forget a node and revoke its credential."""
    node_id = validate_node_id(request.match_info["node_id"])
    return json_response(await forget_node(head_of(request), node_id, query_flag(request, "force")))


async def node_heartbeat(request: web.Request) -> web.Response:
    """`POST /nodes/{node_id}/heartbeat` (original API)."""
    head = head_of(request)
    node_id = validate_node_id(request.match_info["node_id"])
    head.commit(head.registry.legacy_heartbeat(node_id))
    return json_response({"node_id": node_id, "status": head.registry.nodes[node_id].status})


async def probe_node(request: web.Request) -> web.Response:
    """`POST /nodes/{node_id}/probe`: the agent re-reads inventory and holdings."""
    head = head_of(request)
    node_id = validate_node_id(request.match_info["node_id"])
    op = await head.dispatcher.submit(node_id, ProbeArgs())
    return await op_response(request, op)


def probe_result(head: Head, op: Op, outcome: Outcome) -> list[Event]:
    """The result hook of `probe`: fresh inventory, and the locations follow the holdings."""
    result = outcome.result
    if not isinstance(result, ProbeResult):
        return []
    inv = result.inventory
    problem = (
        inventory_problem(inv)
        or holdings_problem(inv, result.holdings)
        or holdings_problem(inv, result.partials, partial=True)
    )
    if problem is not None:
        raise GswarmError(f"the agent's report is refused: {problem}", code="bad_result")
    reg = head.registry
    events = reg.node_heartbeat(op.node_id, inv)
    reg.node_holdings(op.node_id, result.holdings)
    events.extend(reg.reconcile_holdings(op.node_id, result.holdings, result.partials))
    return events


# ---------------------------------------------------------------- ops


async def list_ops(request: web.Request) -> web.Response:
    """`GET /ops?node=&state=&kind=&limit=`, newest first."""
    reg = head_of(request).registry
    node = request.query.get("node", "")
    state = _one_of(request, "state", get_args(OpState))
    kind = _one_of(request, "kind", KINDS)
    ops = [
        op
        for op in reg.ops.values()
        if (not node or op.node_id == node)
        and (not state or op.state == state)
        and (not kind or op.kind == kind)
    ]
    ops.sort(key=lambda o: o.created_at, reverse=True)
    return json_response({"ops": ops[: query_int(request, "limit", 200, lo=1)]})


async def get_op(request: web.Request) -> web.Response:
    """`GET /ops/{op_id}` (with `?wait=true`, once it has ended)."""
    head = head_of(request)
    op = head.registry.get_op(request.match_info["op_id"])
    if query_flag(request, "wait"):
        return await op_response(request, op)
    return json_response(op)


async def cancel_op(request: web.Request) -> web.Response:
    """`POST /ops/{op_id}/cancel`."""
    head = head_of(request)
    op = await head.dispatcher.cancel(request.match_info["op_id"])
    return json_response(op)


# ---------------------------------------------------------------- events


TOPICS = frozenset({"model", "node", "location", "op", "service", "job"})
"""The event topics: the part of an event's kind before the dot."""


def _topics(request: web.Request) -> frozenset[str]:
    raw = ",".join(request.query.getall("topic", []))
    topics = frozenset(t.strip() for t in raw.split(",") if t.strip())
    unknown = sorted(topics - TOPICS)
    if unknown:
        raise BadRequest(
            f"unknown topic {unknown[0]!r}: topics are {', '.join(sorted(TOPICS))}",
            code="invalid_query",
            details={"field": "topic"},
        )
    return topics


def _one_of(request: web.Request, name: str, allowed: Iterable[str]) -> str:
    value = request.query.get(name, "")
    choices = sorted(allowed)
    if value and value not in choices:
        raise BadRequest(
            f"unknown {name} {value[:64]!r}: one of {', '.join(choices)}",
            code="invalid_query",
            details={"field": name},
        )
    return value


async def list_events(request: web.Request) -> web.Response:
    """`GET /events?since=SEQ&topic=&limit=`: the events after `since`, one page: at most
    `limit` events and `replay_page_bytes` of them; `more` says whether the next page (from the
    last event's seq) has any."""
    head = head_of(request)
    since = query_int(request, "since", 0, lo=-1, hi=MAX_SEQ)
    limit = query_int(request, "limit", 1000, lo=1, hi=10_000)
    until = head.bus.last_seq
    events, seen = await head.bus.replay(
        since, until, _topics(request), limit, head.settings.replay_page_bytes
    )
    return json_response({"events": events, "last_seq": until, "more": seen < until})


async def events_socket(request: web.Request) -> web.WebSocketResponse:
    """`/ws/events?since=SEQ&topic=...`: replay what was missed, then follow live."""
    head = head_of(request)
    since = query_int(request, "since", -1, lo=-1, hi=MAX_SEQ)
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
    sub: Subscriber,
    since: int,
    upto: int,
    topics: frozenset[str],
) -> None:
    cursor = since
    while 0 <= cursor < upto:  # page by page: a long replay never sits in memory at once
        page, cursor = await head.bus.replay(cursor, upto, topics, 1000, head.settings.replay_page_bytes)
        for ev in page:
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


def setup(app: web.Application) -> None:
    """Attach the core routes (system, models, nodes, ops, events) and the middlewares."""
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
    r.add_delete("/nodes/{node_id}", remove_node)
    r.add_post("/nodes/{node_id}/heartbeat", node_heartbeat)
    r.add_post("/nodes/{node_id}/probe", probe_node)
    r.add_get("/ops", list_ops)
    r.add_get("/ops/{op_id}", get_op)
    r.add_post("/ops/{op_id}/cancel", cancel_op)
    r.add_get("/events", list_events)
    r.add_get("/ws/events", events_socket)
