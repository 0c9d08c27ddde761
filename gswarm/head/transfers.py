"""REST routes and result hooks of the tier ops: download, copy, move, delete.

The head validates everything it can before an op exists (names, devices, sources, that the
node is online, that the source holds the model, that the target has room), records the
location being written, and lets the agent do the work; the result hooks turn the agent's
report into location changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from gswarm import grants
from gswarm.devices import Device, parse_device, validate_model_name
from gswarm.errors import BadRequest, Conflict, GswarmError, InsufficientSpace, NotFound
from gswarm.head.app import HEAD_KEY, Head
from gswarm.head.routes import (
    Submitted,
    _query_flag,
    json_response,
    model_view,
    op_response,
    read_json,
    submitted_response,
)
from gswarm.protocol import Event, Failed, Location, Op, Succeeded
from gswarm.sources import parse_source

WRITING_STATES = frozenset({"pending", "downloading", "copying", "loading"})


class DownloadBody(msgspec.Struct):
    """`POST /download` (the original body, plus optional patterns)."""

    model_name: str
    source_url: str
    target_device: str
    model_type: str = "unknown"
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    prefer_peer: bool = True
    bandwidth_limit: int | None = None
    timeout: float | None = None


class CopyBody(msgspec.Struct):
    """`POST /copy` and `POST /move` (the original body)."""

    model_name: str
    source_device: str
    target_device: str
    keep_source: bool = False
    verify: str = "size"
    bandwidth_limit: int | None = None
    timeout: float | None = None


# ---------------------------------------------------------------- helpers


def _storage_device(address: str, field: str) -> Device:
    dev = parse_device(address, field)
    if dev.is_gpu:
        raise BadRequest(
            f"{address}: GPU tiers are reached with the load op, not {field.split('_')[0]} copies",
            code="unsupported_tier",
            details={"field": field},
        )
    return dev


def _require_node(head: Head, dev: Device) -> None:
    if dev.node not in head.registry.nodes:
        raise Conflict(
            f"node {dev.node!r} is not known: no agent has joined with that id",
            code="node_offline",
            details={"node_id": dev.node},
        )
    head.dispatcher.require_online(dev.node)


def _where(head: Head, model: str) -> str:
    locs = head.registry.model_locations(model)
    if not locs:
        return "it has no copies yet"
    return "it is on " + ", ".join(f"{loc.device} ({loc.state})" for loc in locs)


def _tier_free(head: Head, dev: Device) -> int | None:
    node = head.registry.nodes.get(dev.node)
    if node is None:
        return None
    for tier in node.inventory.tiers:
        if tier.name == dev.tier:
            return tier.free
    return None


def _known_size(head: Head, model: str) -> int:
    sizes = [loc.size for loc in head.registry.model_locations(model) if loc.state == "ready" and loc.size]
    return max(sizes, default=0)


def _check_room(head: Head, dev: Device, size: int) -> None:
    free = _tier_free(head, dev)
    if size and free is not None and size > free:
        raise InsufficientSpace(
            f"{dev} has {free} bytes free, {size} needed; nothing was written",
            details={"needed": size, "free": free, "device": str(dev)},
        )


def _open_writer(head: Head, model: str, device: str) -> Op | None:
    loc = head.registry.locations.get((model, device))
    if loc is None or loc.op_id is None:
        return None
    op = head.registry.ops.get(loc.op_id)
    return op if op is not None and not op.terminal else None


def _already_there(head: Head, kind: str, node: str, args: dict[str, Any], loc: Location) -> Op:
    """A finished op that says the target already held a ready copy."""
    reg = head.registry
    op, events = reg.create_op(kind, node, args, 0)
    result = {"already_present": True, "model": loc.model, "path": loc.path, "size": loc.size}
    events.extend(reg.op_finished(op.op_id, "succeeded", result=result))
    head.commit(events)
    return reg.get_op(op.op_id)


GRANT_TTL = 2 * 3600.0


def _partial_holder(head: Head, model: str, device: str) -> bool:
    """True when a copy is being written by a download or fetch that peers can read from
    while it runs (its agent serves the ranges already written)."""
    op = _open_writer(head, model, device)
    if op is None or op.kind not in ("download", "fetch") or op.progress.done <= 0:
        return False  # bytes flowing means the plan peers read is written
    return not str(op.args.get("source_url", "")).startswith("file://")


def peer_sources(head: Head, model: str, target_node: str, first: str | None = None) -> list[dict[str, Any]]:
    """Copies of `model` on online nodes with a data server, each with a grant for
    `target_node`: `first` (a device) leads, then ready copies, then copies still being
    downloaded (served as far as they go)."""
    reg = head.registry
    holders = []
    for loc in reg.model_locations(model):
        node_id, _, tier = loc.device.partition(":")
        node = reg.nodes.get(node_id)
        if tier not in ("disk", "dram") or node is None or node_id == target_node:
            continue
        if node.status != "online" or not node.data_url or head.agents.get(node_id) is None:
            continue
        partial = loc.state != "ready"
        if partial and not _partial_holder(head, model, loc.device):
            continue
        holders.append(
            (loc.device != first, partial, tier != "dram", loc.device, node_id, tier, node.data_url)
        )
    holders.sort()
    return [
        {
            "node_id": node_id,
            "url": url,
            "tier": tier,
            "token": grants.mint(
                grants.node_key(head.tokens.transfer_key, node_id), model, node_id, target_node, GRANT_TTL
            ),
        }
        for _, _, _, _, node_id, tier, url in holders
    ]


def _writing(head: Head, model: str, device: str, state: str) -> Any:
    def mark(op: Op) -> list[Event]:
        return head.registry.set_location(model, device, state, op_id=op.op_id)

    return mark


# ---------------------------------------------------------------- routes


async def download(request: web.Request) -> web.Response:
    """`POST /download`: fetch a model onto a node's disk or dram."""
    body = await read_json(request, DownloadBody)
    return await submitted_response(request, await submit_download(request.app[HEAD_KEY], body))


async def submit_download(head: Head, body: DownloadBody) -> Submitted:
    """Validate a download and create its op (or join the running one)."""
    model = validate_model_name(body.model_name, "model_name")
    dev = _storage_device(body.target_device, "target_device")
    source = parse_source(body.source_url)
    _require_node(head, dev)
    device = str(dev)
    loc = head.registry.locations.get((model, device))
    args: dict[str, Any] = {
        "model_name": model,
        "source_url": body.source_url,
        "tier": dev.tier,
        "allow_patterns": body.allow_patterns,
        "ignore_patterns": body.ignore_patterns,
        "bandwidth_limit": body.bandwidth_limit,
    }
    if body.prefer_peer and not body.allow_patterns and not body.ignore_patterns:
        args["peers"] = peer_sources(head, model, dev.node)
    if loc is not None and loc.state == "ready":
        return Submitted(_already_there(head, "download", dev.node, args, loc), 200)
    running = _open_writer(head, model, device)
    if running is not None:
        return Submitted(running, 200)
    _check_room(head, dev, _known_size(head, model))
    if model not in head.registry.models:
        _, events = head.registry.register_model(
            model, body.model_type, body.source_url, {"source": str(source)}
        )
        head.commit(events)
    op = await head.dispatcher.submit(
        "download", dev.node, args, body.timeout, on_created=_writing(head, model, device, "downloading")
    )
    return Submitted(op)


async def submit_copy(head: Head, body: CopyBody, move: bool) -> Submitted:
    """Validate a copy or move (between tiers, between nodes, or onto a GPU) and create its op."""
    model = validate_model_name(body.model_name, "model_name")
    src = _storage_device(body.source_device, "source_device")
    head.registry.get_model(model)
    if parse_device(body.target_device, "target_device").is_gpu:
        from gswarm.head.services import _gpu_device, start_load

        gpu = _gpu_device(head, body.target_device, "target_device")
        # A GPU holds only the tensors; config and tokenizer files stay with the source copy,
        # so a move onto a GPU keeps it (serving and restarts read from it).
        return await start_load(head, model, gpu, str(src), False, body.timeout)
    dst = _storage_device(body.target_device, "target_device")
    if src == dst:
        raise BadRequest("source and target are the same device", details={"field": "target_device"})
    if body.verify not in ("size", "sha256"):
        raise BadRequest(
            "verify must be 'size' or 'sha256'", code="invalid_field", details={"field": "verify"}
        )
    src_loc = head.registry.locations.get((model, str(src)))
    if src_loc is None or src_loc.state != "ready":
        raise Conflict(
            f"{model} is not held on {src}: {_where(head, model)}",
            code="not_held",
            details={"locations": [loc.device for loc in head.registry.model_locations(model)]},
        )
    _require_node(head, dst)
    remove_source = move and not body.keep_source
    if src.node != dst.node:
        return await _between_nodes(head, model, src, dst, remove_source, body)
    args = {
        "model_name": model,
        "source_tier": src.tier,
        "target_tier": dst.tier,
        "remove_source": remove_source,
        "verify": body.verify,
    }
    kind_name = "move" if move else "copy"
    dst_loc = head.registry.locations.get((model, str(dst)))
    if dst_loc is not None and dst_loc.state == "ready" and not remove_source:
        return Submitted(_already_there(head, kind_name, dst.node, args, dst_loc), 200)
    running = _open_writer(head, model, str(dst))
    if running is not None:
        return Submitted(running, 200)
    if dst_loc is None or dst_loc.state != "ready":
        _check_room(head, dst, src_loc.size)
    op = await head.dispatcher.submit(
        "copy", dst.node, args, body.timeout, on_created=_writing(head, model, str(dst), "copying")
    )
    return Submitted(op)


async def _between_nodes(
    head: Head,
    model: str,
    src: Device,
    dst: Device,
    remove_source: bool,
    body: CopyBody,
) -> Submitted:
    """The target node pulls from the source node's data server (other holders as fallbacks)."""
    _require_node(head, src)
    peers = peer_sources(head, model, dst.node, first=str(src))
    if not peers or peers[0]["node_id"] != src.node:
        raise Conflict(f"{src.node} has no data server reachable for peers", code="node_offline")
    args: dict[str, Any] = {
        "model_name": model,
        "tier": dst.tier,
        "peers": peers,
        "bandwidth_limit": body.bandwidth_limit,
        "source_device": str(src),
        "remove_source": remove_source,
    }
    dst_loc = head.registry.locations.get((model, str(dst)))
    if dst_loc is not None and dst_loc.state == "ready" and not remove_source:
        return Submitted(_already_there(head, "fetch", dst.node, args, dst_loc), 200)
    running = _open_writer(head, model, str(dst))
    if running is not None:
        return Submitted(running, 200)
    src_loc = head.registry.locations[(model, str(src))]
    if dst_loc is None or dst_loc.state != "ready":
        _check_room(head, dst, src_loc.size)
    op = await head.dispatcher.submit(
        "fetch", dst.node, args, body.timeout, on_created=_writing(head, model, str(dst), "copying")
    )
    return Submitted(op)


async def copy(request: web.Request) -> web.Response:
    """`POST /copy`: copy a model between tiers of a node or between nodes."""
    body = await read_json(request, CopyBody)
    return await submitted_response(request, await submit_copy(request.app[HEAD_KEY], body, move=False))


async def move(request: web.Request) -> web.Response:
    """`POST /move`: move a model between tiers; the source goes only after the target is
    verified (`keep_source` keeps it)."""
    body = await read_json(request, CopyBody)
    return await submitted_response(request, await submit_copy(request.app[HEAD_KEY], body, move=True))


async def delete_location(request: web.Request) -> web.Response:
    """`DELETE /models/{model_name}/locations/{device}`: remove one copy."""
    head = request.app[HEAD_KEY]
    model = validate_model_name(request.match_info["model_name"], "model_name")
    dev = parse_device(request.match_info["device"], "device")
    head.registry.get_model(model)
    op = await delete_copy(head, model, dev, force=_query_flag(request, "force"))
    return await op_response(request, op)


async def delete_copy(head: Head, model: str, dev: Device, force: bool) -> Op:
    device = str(dev)
    loc = head.registry.locations.get((model, device))
    if loc is None:
        raise NotFound(f"no copy of {model} on {device}: {_where(head, model)}", code="location_not_found")
    writer = _open_writer(head, model, device)
    if writer is not None:
        if not force:
            raise Conflict(
                f"{model} on {device} is being written by op {writer.op_id} ({writer.kind}); "
                "wait, cancel it, or pass force=true",
                code="busy",
                details={"op_id": writer.op_id},
            )
        await head.dispatcher.cancel(writer.op_id, "cancelled to delete the copy")
    _require_node(head, dev)
    previous = loc.state

    def on_created(op: Op) -> list[Event]:
        return head.registry.set_location(model, device, "deleting", op_id=op.op_id)

    op = await head.dispatcher.submit(
        "delete",
        dev.node,
        {"model_name": model, "tier": dev.tier, "previous_state": previous},
        600,
        on_created,
    )
    return op


async def delete_model(request: web.Request) -> web.Response:
    """`DELETE /models/{model_name}`: remove every copy, then the registration. Refused (409)
    while a copy is being written, unless `?force=true`."""
    head = request.app[HEAD_KEY]
    model = validate_model_name(request.match_info["model_name"], "model_name")
    head.registry.get_model(model)
    force = _query_flag(request, "force")
    locs = head.registry.model_locations(model)
    busy = [loc for loc in locs if _open_writer(head, model, loc.device) is not None]
    if busy and not force:
        raise Conflict(
            f"{model} is being written on {', '.join(loc.device for loc in busy)}; "
            "pass force=true to cancel and delete",
            code="busy",
        )
    offline = [loc.device for loc in locs if head.agents.get(loc.device.partition(":")[0]) is None]
    if offline and not force:
        raise Conflict(
            f"cannot remove copies on offline nodes: {', '.join(offline)} (force=true forgets them)",
            code="node_offline",
        )
    view = model_view(head, model)
    ops = [
        await delete_copy(head, model, parse_device(loc.device), force=True)
        for loc in locs
        if loc.device not in offline
    ]
    finals = await asyncio.gather(*(head.dispatcher.wait(op.op_id, 600) for op in ops))
    failed = [op for op in finals if op.state != "succeeded"]
    if failed:
        raise GswarmError(
            f"could not remove every copy of {model}: "
            + "; ".join(
                f"{op.args.get('tier')} on {op.node_id}: {op.error.message if op.error else op.state}"
                for op in failed
            ),
            code="delete_failed",
        )
    if model in head.registry.models:
        head.commit(head.registry.delete_model(model))
    return json_response({"deleted": model, "model": view, "ops": finals})


# ---------------------------------------------------------------- result hooks


def write_result_hook(head: Head) -> Any:
    """The result hook of every op that writes a copy (download, copy, fetch, load): the
    location becomes ready, or goes if the write failed; a move drops its source."""

    def hook(op: Op, msg: Succeeded | Failed) -> list[Event]:
        reg = head.registry
        model = str(op.args.get("model_name"))
        tier = str(op.args.get("tier") or op.args.get("target_tier"))
        device = f"{op.node_id}:{tier}"
        events: list[Event] = []
        if isinstance(msg, Succeeded):
            r = msg.result
            events.extend(
                reg.set_location(
                    model, device, "ready", size=int(r.get("size", 0)), path=str(r.get("path", ""))
                )
            )
            if r.get("removed_source"):
                events.extend(reg.remove_location(model, f"{op.node_id}:{op.args.get('source_tier')}"))
            source = op.args.get("source_device")
            if op.kind == "fetch" and op.args.get("remove_source") and isinstance(source, str):
                # A move between nodes: the source goes only now, after the target verified.
                head.spawn(_remove_after_move(head, model, parse_device(source)))
        else:
            loc = reg.locations.get((model, device))
            if loc is not None and loc.op_id == op.op_id and loc.state != "ready":
                events.extend(reg.remove_location(model, device))
        return events

    return hook


async def _remove_after_move(head: Head, model: str, source: Device) -> None:
    try:
        await delete_copy(head, model, source, force=False)
    except GswarmError as exc:
        head.log_warning(f"move of {model}: the source copy on {source} stays: {exc.message}")


def _on_delete_result(head: Head) -> Any:
    def hook(op: Op, msg: Succeeded | Failed) -> list[Event]:
        reg = head.registry
        model = str(op.args.get("model_name"))
        device = f"{op.node_id}:{op.args.get('tier')}"
        if isinstance(msg, Succeeded):
            return reg.remove_location(model, device)
        loc = reg.locations.get((model, device))
        if loc is not None and loc.state == "deleting":
            return reg.set_location(model, device, str(op.args.get("previous_state", "ready")), op_id=None)
        return []

    return hook


def setup(app: web.Application) -> None:
    """Attach the tier-op routes and hooks."""
    head = app[HEAD_KEY]
    r = app.router
    r.add_post("/download", download)
    r.add_post("/copy", copy)
    r.add_post("/move", move)
    r.add_delete("/models/{model_name}/locations/{device}", delete_location)
    r.add_delete("/models/{model_name}", delete_model)
    head.dispatcher.on_result("download", write_result_hook(head))
    head.dispatcher.on_result("copy", write_result_hook(head))
    head.dispatcher.on_result("fetch", write_result_hook(head))
    head.dispatcher.on_result("delete", _on_delete_result(head))
