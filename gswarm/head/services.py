"""REST routes and result hooks of the GPU tier and serving: load, serve, stop, services,
logs, health checks."""

from __future__ import annotations

from aiohttp import web

from gswarm.api import HealthBody, LoadBody, ServeBody
from gswarm.devices import Device, parse_device, validate_model_name
from gswarm.errors import BadRequest, Conflict, InsufficientSpace, NotFound
from gswarm.head.copies import already_there, gpu_device, marking, present, require_node, write_result
from gswarm.head.dispatcher import Outcome
from gswarm.head.http import Submitted, json_response, query_int, read_json, submitted_response
from gswarm.head.policy import check_gpu_share, local_source, where
from gswarm.head.state import HEAD_KEY, Head
from gswarm.ops import (
    HealthCheckArgs,
    LoadArgs,
    LoadResult,
    LogsArgs,
    LogsResult,
    Op,
    ServeArgs,
    StopArgs,
)
from gswarm.protocol import Event, service_id


async def start_load(
    head: Head,
    model: str,
    dev: Device,
    source: str | None,
    remove_source: bool,
    timeout: float | None,
) -> Submitted:
    """Create a `load` op (shared by `POST /load` and copy/move to a GPU)."""
    reg = head.registry
    src = local_source(reg, model, dev, source)
    assert dev.gpu_index is not None
    args = LoadArgs(model_name=model, gpu=dev.gpu_index, source_tier=src.tier, remove_source=remove_source)
    loc = reg.locations.get((model, str(dev)))
    if loc is not None and loc.state == "ready":
        return Submitted(already_there(head, dev.node, args, present(loc, LoadResult)), 200)
    running = reg.open_writer(model, str(dev))
    if running is not None:
        return Submitted(running, 200)
    svc = reg.services.get(service_id(model, str(dev)))
    if svc is not None and svc.backend != "builtin" and svc.state not in ("failed", "stopped"):
        raise Conflict(
            f"{model} is served on {dev} by {svc.backend}, which holds its own copy of the weights "
            "there: stop it first",
            code="already_serving",
        )
    size = reg.locations[(model, str(src))].size
    gpu = next(g for g in reg.nodes[dev.node].inventory.gpus if g.index == dev.gpu_index)
    if size > gpu.memory_free:
        raise InsufficientSpace(
            f"{model} ({size} bytes) does not fit in {dev}: {gpu.memory_free} bytes free",
            details={"needed": size, "free": gpu.memory_free},
        )
    op = await head.dispatcher.submit(dev.node, args, timeout, marking(head, model, str(dev), "loading"))
    return Submitted(op)


async def load(request: web.Request) -> web.Response:
    """`POST /load`: stage a model into a GPU's memory from the node's fastest copy."""
    body = await read_json(request, LoadBody)
    return await submitted_response(request, await submit_load(request.app[HEAD_KEY], body))


async def submit_load(head: Head, body: LoadBody) -> Submitted:
    """Validate a load and create its op."""
    model = validate_model_name(body.model_name, "model_name")
    head.registry.get_model(model)
    dev = gpu_device(head, body.device, "device")
    return await start_load(head, model, dev, body.source_device, not body.keep_source, body.timeout)


async def serve(request: web.Request) -> web.Response:
    """`POST /serve`: start an inference server for a model on a device."""
    body = await read_json(request, ServeBody)
    return await submitted_response(request, await submit_serve(request.app[HEAD_KEY], body))


async def submit_serve(head: Head, body: ServeBody) -> Submitted:
    """Validate a serve request and create its op."""
    model = validate_model_name(body.model_name, "model_name")
    if not 1 <= body.port <= 65535:  # the input first, then what it names
        raise BadRequest(
            f"port {body.port} is out of range (1-65535)", code="invalid_port", details={"field": "port"}
        )
    head.registry.get_model(model)
    dev = parse_device(body.device, "device")
    if dev.is_gpu:
        dev = gpu_device(head, body.device, "device")
    else:
        require_node(head, dev)
    node = head.registry.nodes[dev.node]
    backend = body.backend or str(body.config.get("backend") or "builtin")
    if node.backends and backend not in node.backends:
        raise BadRequest(
            f"unknown backend {backend!r}: {dev.node} offers {', '.join(node.backends)}",
            code="unknown_backend",
        )
    reg = head.registry
    on_node = [
        loc
        for loc in reg.model_locations(model)
        if loc.device.partition(":")[0] == dev.node and loc.state == "ready"
    ]
    if dev.is_gpu and backend != "builtin":  # it loads the weights itself, from a local copy
        usable = any(loc.device.split(":")[1] in ("disk", "dram") for loc in on_node)
    elif dev.is_gpu:
        usable = any(
            loc.device == str(dev) or loc.device.split(":")[1] in ("disk", "dram") for loc in on_node
        )
    else:
        usable = any(loc.device == str(dev) for loc in on_node)
    if not usable:
        what = f"{dev.node}'s dram or disk ({backend} loads the weights itself)" if dev.is_gpu else str(dev)
        if dev.is_gpu and backend == "builtin":
            what = dev.node
        raise Conflict(f"{model} is not on {what}: {where(reg, model)}", code="not_held")
    sid = service_id(model, str(dev))
    existing = reg.services.get(sid)
    if existing is not None and existing.state not in ("failed", "stopped"):
        raise Conflict(f"{model} is already served on {dev} at {existing.url}", code="already_serving")
    if dev.is_gpu and backend != "builtin":
        check_gpu_share(reg, model, dev, backend)
    # No host: the service listens where the node's operator said (127.0.0.1 by default).
    args = ServeArgs(model_name=model, device=str(dev), port=body.port, backend=backend, config=body.config)
    op = await head.dispatcher.submit(dev.node, args, body.timeout)
    return Submitted(op)


async def stop(request: web.Request) -> web.Response:
    """`POST /stop/{model_name}/{device}`: stop a service and free its GPU memory."""
    head = request.app[HEAD_KEY]
    sub = await submit_stop(head, request.match_info["model_name"], request.match_info["device"])
    return await submitted_response(request, sub)


async def submit_stop(head: Head, model_name: str, device: str) -> Submitted:
    """Validate a stop and create its op."""
    model = validate_model_name(model_name, "model_name")
    dev = parse_device(device, "device")
    sid = service_id(model, str(dev))
    if sid not in head.registry.services:
        raise NotFound(f"{model} is not served on {dev}", code="service_not_found")
    require_node(head, dev)
    op = await head.dispatcher.submit(dev.node, StopArgs(service_id=sid), 120)
    return Submitted(op)


async def list_services(request: web.Request) -> web.Response:
    """`GET /services`: every service with URL, backend and health."""
    reg = request.app[HEAD_KEY].registry
    return json_response({"services": [reg.services[k] for k in sorted(reg.services)]})


async def logs(request: web.Request) -> web.Response:
    """`GET /logs/{model_name}/{device}?lines=N`: the tail of a service's log."""
    head = request.app[HEAD_KEY]
    model = validate_model_name(request.match_info["model_name"], "model_name")
    dev = parse_device(request.match_info["device"], "device")
    lines = query_int(request, "lines", 100, lo=1, hi=10_000)
    require_node(head, dev)
    sid = service_id(model, str(dev))
    op = await head.dispatcher.submit(dev.node, LogsArgs(service_id=sid, lines=lines), 30)
    op = await head.dispatcher.wait(op.op_id, 30)
    if op.state != "succeeded" or not isinstance(op.result, LogsResult):
        raise NotFound(op.error.message if op.error else f"no log for {sid}", code="service_not_found")
    return json_response(op.result)


async def health_check(request: web.Request) -> web.Response:
    """`POST /health_check`: an op that checks a service, or a node."""
    body = await read_json(request, HealthBody)
    return await submitted_response(request, await submit_health_check(request.app[HEAD_KEY], body))


async def submit_health_check(head: Head, body: HealthBody) -> Submitted:
    """Validate a health check and create its op."""
    if body.model_name and body.device:
        dev = parse_device(body.device, "device")
        sid = service_id(validate_model_name(body.model_name, "model_name"), str(dev))
        if sid not in head.registry.services:
            raise NotFound(f"{body.model_name} is not served on {dev}", code="service_not_found")
        node, args = dev.node, HealthCheckArgs(service_id=sid)
    elif body.node_id or body.device:
        node = body.node_id or parse_device(str(body.device), "device").node
        args = HealthCheckArgs()
    else:
        raise BadRequest("give model_name and device (a service), or node_id", code="invalid_field")
    require_node(head, Device(node, "disk"))
    op = await head.dispatcher.submit(node, args, 60)
    return Submitted(op)


def stop_result(head: Head, op: Op, outcome: Outcome) -> list[Event]:
    """The result hook of `stop`: the service is gone (or was never there)."""
    args = op.args
    assert isinstance(args, StopArgs)
    if outcome.error is None or outcome.error.code == "service_not_found":
        return head.registry.remove_service(args.service_id)
    return []


load_result = write_result
"""The result hook of `load`: the GPU copy is ready, or gone."""


def setup(app: web.Application) -> None:
    """Attach the GPU and serving routes."""
    r = app.router
    r.add_post("/load", load)
    r.add_post("/serve", serve)
    r.add_post("/stop/{model_name}/{device}", stop)
    r.add_get("/services", list_services)
    r.add_get("/logs/{model_name}/{device}", logs)
    r.add_post("/health_check", health_check)
