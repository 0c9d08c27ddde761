"""What every op that writes or removes a copy shares on the head: the checks before it is
created, marking the copy being written, grants for peers, and the result hooks that turn an
agent's report into location changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gswarm import grants
from gswarm.devices import Device, parse_device
from gswarm.errors import BadRequest, Conflict
from gswarm.head.dispatcher import Outcome
from gswarm.head.policy import peer_holders
from gswarm.head.state import Head
from gswarm.ops import (
    CopyResult,
    DeleteArgs,
    DownloadResult,
    FetchResult,
    LoadResult,
    Op,
    OpArgs,
    OpResult,
    PeerSource,
)
from gswarm.protocol import Event, Location, holdings_problem
from gswarm.sources import Source
from gswarm.states import LocationState

GRANT_TTL = 2 * 3600.0
"""How long a peer may use a grant to fetch a copy."""


def require_node(head: Head, dev: Device) -> None:
    """409 unless the device's node is known and has a live agent."""
    if dev.node not in head.registry.nodes:
        raise Conflict(
            f"node {dev.node!r} is not known: no agent has joined with that id",
            code="node_offline",
            details={"node_id": dev.node},
        )
    head.dispatcher.require_online(dev.node)


def gpu_device(head: Head, address: str, field: str) -> Device:
    """A `node:gpuN` address of a GPU that node has; 400 otherwise, 409 when it is offline."""
    dev = parse_device(address, field)
    if not dev.is_gpu:
        raise BadRequest(
            f"{address} is not a GPU device (node:gpuN)", code="invalid_device", details={"field": field}
        )
    require_node(head, dev)
    gpus = head.registry.nodes[dev.node].inventory.gpus
    if dev.gpu_index not in {g.index for g in gpus}:
        have = ", ".join(f"gpu{g.index}" for g in gpus) or "no GPUs"
        raise BadRequest(
            f"node {dev.node} has no {dev.tier} (it has {have})",
            code="invalid_device",
            details={"field": field},
        )
    return dev


def already_there(head: Head, node_id: str, args: OpArgs, result: OpResult) -> Op:
    """An op that ended at once: the target already held a ready copy (nothing was sent)."""
    reg = head.registry
    op, events = reg.create_op(node_id, args, 0)
    events.extend(reg.op_finished(op.op_id, "succeeded", result=result))
    head.commit(events)
    return reg.get_op(op.op_id)


W = TypeVar("W", DownloadResult, FetchResult, CopyResult, LoadResult)


def present(loc: Location, result_type: type[W]) -> W:
    """The result of a write that found a ready copy in place."""
    tier = loc.device.partition(":")[2]
    return result_type(
        model=loc.model,
        tier=tier,
        path=loc.path,
        size=loc.size,
        source=loc.source,
        revision=loc.revision,
        already_present=True,
    )


def marking(head: Head, model: str, device: str, state: LocationState) -> Callable[[Op], list[Event]]:
    """An `on_created` callback: record the copy as being written by the new op."""

    def mark(op: Op) -> list[Event]:
        return head.registry.set_location(model, device, state, op_id=op.op_id)

    return mark


def peer_sources(
    head: Head, model: str, target_node: str, first: str | None = None, source: Source | None = None
) -> list[PeerSource]:
    """Copies of `model` that `target_node` may fetch, in order (see `policy.peer_holders`),
    each with a grant signed by the serving node's own key."""
    holders = peer_holders(head.registry, head.agents, model, target_node, first, source)
    return [
        PeerSource(
            node_id=h.node_id,
            url=h.url,
            tier=h.tier,
            token=grants.mint(
                head.node_key(h.node_id),
                model,
                h.node_id,
                target_node,
                GRANT_TTL,
            ),
        )
        for h in holders
    ]


def write_result(head: Head, op: Op, outcome: Outcome) -> list[Event]:
    """The result hook of every op that writes a copy (download, fetch, copy, load): the copy
    becomes ready (with where its bytes came from), or, if the write failed, goes or stays as
    a `partial` copy (what the agent kept to resume); a move drops its source."""
    reg = head.registry
    events: list[Event] = []
    (model, device), *_ = op.writes()
    result = outcome.result
    if outcome.ok and isinstance(result, DownloadResult | FetchResult | CopyResult | LoadResult):
        events.extend(
            reg.set_location(
                model,
                device,
                "ready",
                size=result.size,
                path=result.path,
                source=result.source,
                revision=result.revision,
            )
        )
        if result.removed_source and result.source_tier:
            events.extend(reg.remove_location(model, f"{op.node_id}:{result.source_tier}"))
        return events
    loc = reg.locations.get((model, device))
    if loc is not None and loc.op_id == op.op_id and loc.state != "ready":
        left = outcome.partial
        node = reg.nodes.get(op.node_id)
        if (
            left is not None
            and node is not None
            and (left.model, f"{op.node_id}:{left.tier}") == (model, device)
            and holdings_problem(node.inventory, [left], partial=True) is None
        ):
            # What was written stays on the node: listed with its size, resumed by a retry,
            # freed by a delete.
            events.extend(reg.set_location(model, device, "partial", size=left.size, path=left.path))
        else:
            events.extend(reg.remove_location(model, device))
    return events


def delete_result(head: Head, op: Op, outcome: Outcome) -> list[Event]:
    """The result hook of `delete`: the copy is gone, or back to what it was."""
    reg = head.registry
    args = op.args
    assert isinstance(args, DeleteArgs)
    device = f"{op.node_id}:{args.tier}"
    if outcome.ok:
        return reg.remove_location(args.model_name, device)
    loc = reg.locations.get((args.model_name, device))
    if loc is not None and loc.state == "deleting":
        return reg.set_location(args.model_name, device, args.previous_state, op_id=None)
    return []
