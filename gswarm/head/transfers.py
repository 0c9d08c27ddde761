"""REST routes and result hooks of the tier ops: download, copy, move, delete.

The head validates everything it can before an op exists (names, devices, sources, that the
node is online, that the source holds the model, that the target has room), records the
location being written, and lets the agent do the work; the result hooks turn the agent's
report into location changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from gswarm.api import CopyBody, DownloadBody
from gswarm.devices import Device, parse_device, validate_model_name
from gswarm.errors import BadRequest, Conflict, GswarmError, NotFound
from gswarm.head.copies import (
    already_there,
    gpu_device,
    marking,
    peer_sources,
    present,
    require_node,
    write_result,
)
from gswarm.head.dispatcher import Outcome
from gswarm.head.http import Submitted, json_response, op_response, query_flag, read_json, submitted_response
from gswarm.head.policy import check_room, known_size, storage_device, where
from gswarm.head.services import clear_backed, start_load
from gswarm.head.state import HEAD_KEY, Head
from gswarm.ops import (
    CopyArgs,
    CopyResult,
    DeleteArgs,
    DeleteResult,
    DownloadArgs,
    DownloadResult,
    FetchArgs,
    FetchResult,
    Op,
)
from gswarm.protocol import Event, to_builtins
from gswarm.sources import parse_source

# ---------------------------------------------------------------- routes


async def download(request: web.Request) -> web.Response:
    """`POST /download`: fetch a model onto a node's disk or dram."""
    body = await read_json(request, DownloadBody)
    return await submitted_response(request, await submit_download(request.app[HEAD_KEY], body))


async def submit_download(head: Head, body: DownloadBody) -> Submitted:
    """Validate a download and create its op (or join the running one)."""
    model = validate_model_name(body.model_name, "model_name")
    dev = storage_device(body.target_device, "target_device")
    source = parse_source(body.source_url)
    require_node(head, dev)
    reg = head.registry
    device = str(dev)
    loc = reg.locations.get((model, device))
    args = DownloadArgs(
        model_name=model,
        source_url=body.source_url,
        tier=dev.tier,
        allow_patterns=body.allow_patterns,
        ignore_patterns=body.ignore_patterns,
        bandwidth_limit=body.bandwidth_limit,
    )
    if body.prefer_peer and not body.allow_patterns and not body.ignore_patterns:
        # Only a copy of these very bytes (same repo and revision, same URL) may stand in.
        args.peers = peer_sources(head, model, dev.node, source=source)
    if loc is not None and loc.state == "ready":
        return Submitted(already_there(head, dev.node, args, present(loc, DownloadResult)), 200)
    running = reg.open_writer(model, device)
    if running is not None:
        return Submitted(running, 200)
    check_room(reg, dev, known_size(reg, model))
    if model not in reg.models:
        _, events = reg.register_model(model, body.model_type, body.source_url, {"source": str(source)})
        head.commit(events)
    op = await head.dispatcher.submit(
        dev.node, args, body.timeout, on_created=marking(head, model, device, "downloading")
    )
    return Submitted(op)


async def submit_copy(head: Head, body: CopyBody, move: bool, force: bool = False) -> Submitted:
    """Validate a copy or move (between tiers, between nodes, or onto a GPU) and create its op.
    A move that would take away the copy a running service serves from is refused unless
    `force`, which stops the service first."""
    model = validate_model_name(body.model_name, "model_name")
    src = storage_device(body.source_device, "source_device")
    reg = head.registry
    reg.get_model(model)
    if parse_device(body.target_device, "target_device").is_gpu:
        gpu = gpu_device(head, body.target_device, "target_device")
        # A GPU holds only the tensors; config and tokenizer files stay with the source copy,
        # so a move onto a GPU keeps it (serving and restarts read from it).
        return await start_load(head, model, gpu, str(src), False, body.timeout)
    dst = storage_device(body.target_device, "target_device")
    if src == dst:
        raise BadRequest("source and target are the same device", details={"field": "target_device"})
    src_loc = reg.locations.get((model, str(src)))
    if src_loc is None or src_loc.state != "ready":
        raise Conflict(
            f"{model} is not held on {src}: {where(reg, model)}",
            code="not_held",
            details={"locations": [loc.device for loc in reg.model_locations(model)]},
        )
    require_node(head, dst)
    remove_source = move and not body.keep_source
    if remove_source:
        what = f"moving {model} from {src} to {dst}"
        await clear_backed(head, model, [str(src)], force, what, arriving=str(dst))
    if src.node != dst.node:
        return await _between_nodes(head, model, src, dst, remove_source, body)
    args = CopyArgs(
        model_name=model,
        source_tier=src.tier,
        target_tier=dst.tier,
        remove_source=remove_source,
        verify=body.verify,
    )
    dst_loc = reg.locations.get((model, str(dst)))
    if dst_loc is not None and dst_loc.state == "ready" and not remove_source:
        return Submitted(already_there(head, dst.node, args, present(dst_loc, CopyResult)), 200)
    running = reg.open_writer(model, str(dst))
    if running is not None:
        return Submitted(running, 200)
    if dst_loc is None or dst_loc.state != "ready":
        check_room(reg, dst, src_loc.size)
    # A move onto a ready copy still runs: the agent checks the copies match, then removes the
    # source, and its result says so (already_present and removed_source).
    op = await head.dispatcher.submit(
        dst.node, args, body.timeout, on_created=_mark_unless_ready(head, model, str(dst))
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
    require_node(head, src)
    reg = head.registry
    peers = peer_sources(head, model, dst.node, first=str(src))
    if not peers or peers[0].node_id != src.node:
        raise Conflict(f"{src.node} has no data server reachable for peers", code="node_offline")
    args = FetchArgs(
        model_name=model,
        tier=dst.tier,
        peers=peers,
        bandwidth_limit=body.bandwidth_limit,
        source_device=str(src),
        remove_source=remove_source,
    )
    dst_loc = reg.locations.get((model, str(dst)))
    if dst_loc is not None and dst_loc.state == "ready" and not remove_source:
        return Submitted(already_there(head, dst.node, args, present(dst_loc, FetchResult)), 200)
    running = reg.open_writer(model, str(dst))
    if running is not None:
        return Submitted(running, 200)
    src_loc = reg.locations[(model, str(src))]
    if dst_loc is None or dst_loc.state != "ready":
        check_room(reg, dst, src_loc.size)
    op = await head.dispatcher.submit(
        dst.node, args, body.timeout, on_created=_mark_unless_ready(head, model, str(dst))
    )
    return Submitted(op)


async def copy(request: web.Request) -> web.Response:
    """`POST /copy`: copy a model between tiers of a node or between nodes."""
    body = await read_json(request, CopyBody)
    return await submitted_response(request, await submit_copy(request.app[HEAD_KEY], body, move=False))


async def move(request: web.Request) -> web.Response:
    """`POST /move`: move a model between tiers; the source goes only after the target is
    verified (`keep_source` keeps it). 409 `serving` when a service serves from the source,
    unless `?force=true`, which stops it first."""
    body = await read_json(request, CopyBody)
    head = request.app[HEAD_KEY]
    sub = await submit_copy(head, body, move=True, force=query_flag(request, "force"))
    return await submitted_response(request, sub)


async def delete_location(request: web.Request) -> web.Response:
    """`DELETE /models/{model_name}/locations/{device}`: remove one copy. 409 while it is being
    written or a service serves from it, unless `?force=true` (cancel, stop the service)."""
    head = request.app[HEAD_KEY]
    model = validate_model_name(request.match_info["model_name"], "model_name")
    dev = parse_device(request.match_info["device"], "device")
    head.registry.get_model(model)
    op = await delete_copy(head, model, dev, force=query_flag(request, "force"))
    return await op_response(request, op)


async def delete_copy(head: Head, model: str, dev: Device, force: bool) -> Op:
    """Remove one copy (a `delete` op); 409 while an op writes it or a service serves from it,
    unless `force`, which cancels the write and stops the service first."""
    device = str(dev)
    loc = head.registry.locations.get((model, device))
    if loc is None:
        raise NotFound(
            f"no copy of {model} on {device}: {where(head.registry, model)}", code="location_not_found"
        )
    if await clear_backed(head, model, [device], force, f"removing {model} from {device}"):
        loc = head.registry.locations.get((model, device))
        if loc is None:  # stopping the builtin server freed its GPU copy
            done = DeleteResult(model=model, tier=dev.tier, removed=True)
            return already_there(head, dev.node, DeleteArgs(model_name=model, tier=dev.tier), done)
    writer = head.registry.open_writer(model, device)
    if writer is not None:
        if not force:
            raise Conflict(
                f"{model} on {device} is being written by op {writer.op_id} ({writer.kind}); "
                "wait, cancel it, or pass force=true",
                code="busy",
                details={"op_id": writer.op_id},
            )
        await head.dispatcher.cancel(writer.op_id, "cancelled to delete the copy")
    require_node(head, dev)
    args = DeleteArgs(model_name=model, tier=dev.tier, previous_state=loc.state)
    return await head.dispatcher.submit(dev.node, args, 600, marking(head, model, device, "deleting"))


async def delete_model(request: web.Request) -> web.Response:
    """`DELETE /models/{model_name}`: remove every copy, then the registration. Refused (409)
    while a copy is being written or a service serves the model, unless `?force=true`, which
    cancels the writes and stops the services first."""
    head = request.app[HEAD_KEY]
    model = validate_model_name(request.match_info["model_name"], "model_name")
    head.registry.get_model(model)
    force = query_flag(request, "force")
    locs = head.registry.model_locations(model)
    busy = [loc for loc in locs if head.registry.open_writer(model, loc.device) is not None]
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
    view = to_builtins(head.registry.model_view(model))
    stopped = await clear_backed(head, model, [loc.device for loc in locs], force, f"deleting {model}")
    if stopped:  # stopping a builtin server on a GPU freed that copy
        locs = head.registry.model_locations(model)
        offline = [loc.device for loc in locs if head.agents.get(loc.device.partition(":")[0]) is None]
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
                f"{_tier(op)} on {op.node_id}: {op.error.message if op.error else op.state}" for op in failed
            ),
            code="delete_failed",
        )
    if model in head.registry.models:
        head.commit(head.registry.delete_model(model))
    stopped_ids = [svc.service_id for svc in stopped]
    return json_response({"deleted": model, "model": view, "ops": finals, "stopped_services": stopped_ids})


def _mark_unless_ready(head: Head, model: str, device: str) -> Callable[[Op], list[Event]] | None:
    """Mark the target as being copied, unless it already holds a ready copy (a move onto it
    only removes the source: the ready copy must not look, or be dropped as, half-written)."""
    loc = head.registry.locations.get((model, device))
    if loc is not None and loc.state == "ready":
        return None
    return marking(head, model, device, "copying")


def _tier(op: Op) -> str:
    return op.args.tier if isinstance(op.args, DeleteArgs) else "?"


# ---------------------------------------------------------------- result hooks


def fetch_result(head: Head, op: Op, outcome: Outcome) -> list[Event]:
    """A fetch's copy becomes ready; after a move between nodes the source goes (only now,
    after the target verified)."""
    events = write_result(head, op, outcome)
    args = op.args
    if outcome.ok and isinstance(args, FetchArgs) and args.remove_source and args.source_device:
        head.spawn(_remove_after_move(head, args.model_name, parse_device(args.source_device)))
    return events


async def _remove_after_move(head: Head, model: str, source: Device) -> None:
    try:
        await delete_copy(head, model, source, force=False)
    except GswarmError as exc:
        head.log_warning(f"move of {model}: the source copy on {source} stays: {exc.message}")


def setup(app: web.Application) -> None:
    """Attach the tier-op routes."""
    r = app.router
    r.add_post("/download", download)
    r.add_post("/copy", copy)
    r.add_post("/move", move)
    r.add_delete("/models/{model_name}/locations/{device}", delete_location)
    r.add_delete("/models/{model_name}", delete_model)
