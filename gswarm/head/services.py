"""REST routes and result hooks of the GPU tier and serving: load, serve, stop, services,
logs, health checks."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gswarm.api import HealthBody, LoadBody, ServeBody
from gswarm.devices import Device, parse_device, validate_model_name
from gswarm.errors import BadRequest, Conflict, GswarmError, InsufficientSpace, NotFound
from gswarm.head.copies import already_there, gpu_device, marking, present, require_node, write_result
from gswarm.head.dispatcher import Outcome
from gswarm.head.http import (
    Submitted,
    json_response,
    query_flag,
    query_float,
    query_int,
    read_json,
    submitted_response,
)
from gswarm.head.policy import (
    backed_services,
    check_gpu_share,
    describe_service,
    live_services,
    local_source,
    port_holder,
    where,
)
from gswarm.head.state import HEAD_KEY, Head
from gswarm.ops import (
    HealthCheckArgs,
    LoadArgs,
    LoadResult,
    LogsArgs,
    LogsResult,
    Op,
    ServeArgs,
    ServeResult,
    StopArgs,
    decode_builtin_config,
)
from gswarm.protocol import Event, Service, service_id

log = logging.getLogger(__name__)

STOP_TIMEOUT = 120.0
"""Seconds a `stop` op may take (the backend's grace period, then freeing GPU memory)."""


async def start_load(
    head: Head,
    model: str,
    dev: Device,
    source: str | None,
    remove_source: bool,
    timeout: float | None,
    force: bool = False,
) -> Submitted:
    """Create a `load` op (shared by `POST /load` and copy/move to a GPU). Removing the source
    copy that a service serves from is refused unless `force` (which stops the service)."""
    reg = head.registry
    src = local_source(reg, model, dev, source)
    if remove_source:
        what = f"loading {model} onto {dev} without keeping {src}"
        await clear_backed(head, model, [str(src)], force, what)
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
    sub = await submit_load(request.app[HEAD_KEY], body, force=query_flag(request, "force"))
    return await submitted_response(request, sub)


async def submit_load(head: Head, body: LoadBody, force: bool = False) -> Submitted:
    """Validate a load and create its op."""
    model = validate_model_name(body.model_name, "model_name")
    head.registry.get_model(model)
    dev = gpu_device(head, body.device, "device")
    return await start_load(head, model, dev, body.source_device, not body.keep_source, body.timeout, force)


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
    if backend == "builtin":
        try:
            decode_builtin_config(body.config)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_config", details={"field": "config"}) from None
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
    # No host: the service listens where the node's operator said (127.0.0.1 by default).
    args = ServeArgs(model_name=model, device=str(dev), port=body.port, backend=backend, config=body.config)
    running = next((svc for svc in live_services(reg, model) if svc.service_id == sid), None)
    if running is not None:
        return _serving_already(head, running, args)
    holder = port_holder(reg, dev.node, body.port, sid)
    if holder is not None:
        raise Conflict(
            f"port {body.port} on {dev.node} is taken by {describe_service(holder)}; "
            "serve on another port, or stop that service first",
            code="port_in_use",
            details={"service_id": holder.service_id, "port": body.port},
        )
    if dev.is_gpu and backend != "builtin":
        check_gpu_share(reg, model, dev, backend)
    op = await head.dispatcher.submit(dev.node, args, body.timeout)
    return Submitted(op)


def _serving_already(head: Head, svc: Service, args: ServeArgs) -> Submitted:
    """The same serve again answers with the running service (the op starting it, while it
    starts); another port, backend or configuration on that device is a conflict naming it."""
    same = svc.port == args.port and svc.backend == args.backend
    if args.config and svc.config != args.config:
        same = False
    if not same:
        raise Conflict(
            f"{args.model_name} is already served on {args.device}: {describe_service(svc)}"
            f"{' at ' + svc.url if svc.url else ''}; stop it first to serve it differently "
            f"(asked: {args.backend} on port {args.port})",
            code="already_serving",
            details={"service_id": svc.service_id, "port": svc.port, "backend": svc.backend},
        )
    starting = _serve_ops(head, {svc.service_id})
    if starting:
        return Submitted(starting[0], 200)
    result = ServeResult(
        service_id=svc.service_id, url=svc.url, state=svc.state, pid=svc.pid, already_running=True
    )
    return Submitted(already_there(head, svc.device.partition(":")[0], args, result), 200)


def _serve_ops(head: Head, sids: set[str]) -> list[Op]:
    """The open `serve` ops starting any of these services."""
    return [
        op
        for op in head.registry.open_ops()
        if isinstance(op.args, ServeArgs) and service_id(op.args.model_name, op.args.device) in sids
    ]


async def stop_services(head: Head, services: list[Service], why: str) -> None:
    """Stop services (cancelling a serve still starting one) and wait until they are gone;
    Conflict `stop_failed` naming those that would not stop."""
    for op in _serve_ops(head, {svc.service_id for svc in services}):
        await head.dispatcher.cancel(op.op_id, why)
    stops = []
    for svc in services:
        if svc.service_id in head.registry.services:
            args = StopArgs(service_id=svc.service_id)
            stops.append(await head.dispatcher.submit(svc.device.partition(":")[0], args, STOP_TIMEOUT))
    finals = await asyncio.gather(*(head.dispatcher.wait(op.op_id, STOP_TIMEOUT) for op in stops))
    failed = [
        op
        for op in finals
        if op.state != "succeeded" and not (op.error is not None and op.error.code == "service_not_found")
    ]
    if failed:
        raise Conflict(
            "could not stop "
            + "; ".join(
                f"{op.args.service_id if isinstance(op.args, StopArgs) else '?'}: "
                f"{op.error.message if op.error else op.state}"
                for op in failed
            ),
            code="stop_failed",
        )
    for svc in services:
        log.warning("stopped %s: %s", svc.service_id, why)


async def clear_backed(
    head: Head, model: str, removed: list[str], force: bool, what: str, arriving: str | None = None
) -> list[Service]:
    """Before copies of `model` on `removed` go: the live services serving from them (see
    `policy.backed_services`) make it a 409 `serving` naming them, unless `force`, which stops
    them first. Returns the services stopped."""
    backed = backed_services(head.registry, model, removed, arriving)
    if not backed:
        return []
    if not force:
        names = ", ".join(describe_service(svc) for svc in backed)
        raise Conflict(
            f"{what} would remove what {names} serve{'s' if len(backed) == 1 else ''} from; "
            "stop it first, or force it (force=true), which stops it",
            code="serving",
            details={"services": [svc.service_id for svc in backed]},
        )
    await stop_services(head, backed, f"forced by {what}")
    return backed


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
    op = await head.dispatcher.submit(dev.node, StopArgs(service_id=sid), STOP_TIMEOUT)
    return Submitted(op)


async def list_services(request: web.Request) -> web.Response:
    """`GET /services`: every service with URL, backend and health."""
    reg = request.app[HEAD_KEY].registry
    return json_response({"services": [reg.services[k] for k in sorted(reg.services)]})


LOG_WAIT_MAX = 25.0
"""The longest a `logs` long poll (`?since_bytes=N&timeout=S`) waits for new bytes."""


async def logs(request: web.Request) -> web.Response:
    """`GET /logs/{model_name}/{device}?lines=N`: the tail of a service's log, and the offset
    its end was at. `?since_bytes=N[&timeout=S]`: the bytes past offset N (at most 64 KiB) and
    the offset to ask next, waiting up to S seconds (at most 25) for some: `logs --follow`."""
    head = request.app[HEAD_KEY]
    model = validate_model_name(request.match_info["model_name"], "model_name")
    dev = parse_device(request.match_info["device"], "device")
    lines = query_int(request, "lines", 100, lo=1, hi=10_000)
    since: int | None = None
    if "since_bytes" in request.query:
        since = query_int(request, "since_bytes", 0, lo=0, hi=2**63 - 1)
    wait = query_float(request, "timeout", 0.0, 0.0, LOG_WAIT_MAX)
    require_node(head, dev)
    sid = service_id(model, str(dev))
    args = LogsArgs(service_id=sid, lines=lines, since_bytes=since, wait=wait if since is not None else 0.0)
    op = await head.dispatcher.submit(dev.node, args, LOG_WAIT_MAX + 30)
    op = await head.dispatcher.wait(op.op_id, args.wait + 30)
    if op.state == "succeeded" and isinstance(op.result, LogsResult):
        return json_response(op.result)
    if op.error is not None and op.error.code != "service_not_found":
        raise GswarmError(f"cannot read the log of {sid}: {op.error.message}", code=op.error.code)
    raise NotFound(op.error.message if op.error else f"no log for {sid}", code="service_not_found")


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
        raise BadRequest(
            "give model_name and device (a service), or node_id",
            code="invalid_field",
            details={"fields": ["model_name", "device", "node_id"]},
        )
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
