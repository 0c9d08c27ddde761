"""Placement rules: who holds what, which copy may feed which node, whether there is room.

Pure functions of the registry (and of which nodes have a live agent): no sockets, no clock,
no events, so each rule is tested on its own. The route families and the replication
coordinator ask these; none of them keeps a rule of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Container
from dataclasses import dataclass

from gswarm.devices import STORAGE_TIERS, Device, gpu_memory_utilization, parse_device
from gswarm.errors import BadRequest, Conflict, InsufficientSpace
from gswarm.ops import ServeArgs
from gswarm.protocol import Location, Service, service_id
from gswarm.registry import Registry
from gswarm.sources import FileSource, HttpSource, HubSource, Source, parse_source


def storage_device(address: str, field: str) -> Device:
    """A `node:disk` or `node:dram` address; 400 for anything else (GPUs are reached by load)."""
    dev = parse_device(address, field)
    if dev.is_gpu:
        raise BadRequest(
            f"{address}: GPU tiers are reached with the load op, not {field.split('_')[0]} copies",
            code="unsupported_tier",
            details={"field": field},
        )
    return dev


def where(reg: Registry, model: str) -> str:
    """Where a model's copies are, in words (for error messages)."""
    locs = reg.model_locations(model)
    if not locs:
        return "it has no copies yet"
    return "it is on " + ", ".join(f"{loc.device} ({loc.state})" for loc in locs)


def is_ready(reg: Registry, model: str, device: str) -> bool:
    """True when a verified copy of `model` is on `device`."""
    loc = reg.locations.get((model, device))
    return loc is not None and loc.state == "ready"


def tier_free(reg: Registry, dev: Device) -> int | None:
    """Free bytes on a node's tier as its agent last reported them (None when unknown)."""
    node = reg.nodes.get(dev.node)
    if node is None:
        return None
    for tier in node.inventory.tiers:
        if tier.name == dev.tier:
            return tier.free
    return None


def known_size(reg: Registry, model: str) -> int:
    """The size of a model's verified copies (0 while none is known)."""
    sizes = [loc.size for loc in reg.model_locations(model) if loc.state == "ready" and loc.size]
    return max(sizes, default=0)


def check_room(reg: Registry, dev: Device, size: int) -> None:
    """507 when `size` bytes clearly do not fit on `dev` (checked before anything is written)."""
    free = tier_free(reg, dev)
    if size and free is not None and size > free:
        raise InsufficientSpace(
            f"{dev} has {free} bytes free, {size} needed; nothing was written",
            details={"needed": size, "free": free, "device": str(dev)},
        )


def incoming(reg: Registry, model: str, device: str) -> bool:
    """A copy being written by a download or fetch (it will be able to serve peers)."""
    op = reg.open_writer(model, device)
    return op is not None and op.kind in ("download", "fetch")


def partial_holder(reg: Registry, model: str, device: str) -> bool:
    """True when a copy is being written by a download or fetch that peers can read from
    while it runs (its agent serves the ranges already written)."""
    op = reg.open_writer(model, device)
    if op is None or op.kind not in ("download", "fetch") or op.progress.done <= 0:
        return False  # bytes flowing means the plan peers read is written
    source = getattr(op.args, "source_url", "")
    return not str(source).startswith("file://")


def source_label(source: Source) -> str:
    """How a copy's source is recorded: `hf://org/repo@rev`, the URL, or `file://path`."""
    match source:
        case HubSource():
            return str(source)
        case HttpSource(url=url):
            return url
        case FileSource(path=path):
            return f"file://{path}"


def same_source(wanted: Source, loc: Location) -> bool:
    """True when a copy holds the bytes `wanted` names: the same repo (and the same revision,
    by name or by the commit it resolved to), or the same URL. A local path names different
    bytes on every node, so a `file://` download never takes a peer's copy."""
    if not loc.source or isinstance(wanted, FileSource):
        return False
    match wanted:
        case HubSource(repo_id=repo, revision=rev):
            try:
                held = parse_source(loc.source)
            except BadRequest:
                return False
            return (
                isinstance(held, HubSource) and held.repo_id == repo and rev in (held.revision, loc.revision)
            )
        case HttpSource(url=url):
            return loc.source == url
    return False


@dataclass(frozen=True)
class Holder:
    """A copy another node can fetch from: its node, data server and tier."""

    node_id: str
    url: str
    tier: str
    device: str
    partial: bool


def peer_holders(
    reg: Registry,
    connected: Container[str],
    model: str,
    target_node: str,
    first: str | None = None,
    source: Source | None = None,
) -> list[Holder]:
    """Copies of `model` on other online nodes with a data server: `first` (a device) leads,
    then ready copies before copies still arriving, dram before disk. With `source`, only
    copies of those very bytes."""
    found: list[tuple[tuple[bool, bool, bool, str], Holder]] = []
    for loc in reg.model_locations(model):
        node_id, _, tier = loc.device.partition(":")
        node = reg.nodes.get(node_id)
        if tier not in STORAGE_TIERS or node is None or node_id == target_node:
            continue
        if node.status != "online" or not node.data_url or node_id not in connected:
            continue
        if source is not None and not same_source(source, loc):
            continue
        partial = loc.state != "ready"
        if partial and not partial_holder(reg, model, loc.device):
            continue
        holder = Holder(node_id, node.data_url, tier, loc.device, partial)
        found.append(((loc.device != first, partial, tier != "dram", loc.device), holder))
    found.sort(key=lambda item: item[0])
    return [h for _, h in found]


def local_source(reg: Registry, model: str, dev: Device, source: str | None) -> Device:
    """The copy on a GPU's node to load from: the one named, else dram before disk."""
    if source is not None:
        src = parse_device(source, "source_device")
        if src.node != dev.node or src.is_gpu or not is_ready(reg, model, str(src)):
            raise Conflict(f"{model} cannot be loaded from {src}: {where(reg, model)}", code="not_held")
        return src
    for tier in ("dram", "disk"):
        if is_ready(reg, model, f"{dev.node}:{tier}"):
            return Device(dev.node, tier)
    raise Conflict(
        f"{model} is not on {dev.node}'s dram or disk: {where(reg, model)}; copy it there first",
        code="not_held",
    )


# ---------------------------------------------------------------- services

LIVE_SERVICE = frozenset({"starting", "ready", "unhealthy", "restarting"})
"""Service states that mean it runs, or is about to (not failed, stopping or stopped)."""


def live_services(reg: Registry, model: str | None = None) -> list[Service]:
    """The live services (of one model, or all), with those a `serve` op is starting that the
    agent has not reported yet (as `starting`), sorted by id."""
    found = {
        sid: svc
        for sid, svc in reg.services.items()
        if svc.state in LIVE_SERVICE and model in (None, svc.model)
    }
    for op in reg.open_ops():
        args = op.args
        if isinstance(args, ServeArgs) and model in (None, args.model_name):
            sid = service_id(args.model_name, args.device)
            if sid not in found and sid not in reg.services:
                found[sid] = Service(
                    service_id=sid,
                    model=args.model_name,
                    device=args.device,
                    backend=args.backend,
                    port=args.port,
                    state="starting",
                    config=args.config,
                )
    return [found[sid] for sid in sorted(found)]


def describe_service(svc: Service) -> str:
    """A service in words: `m@node1:gpu0 (builtin on port 8080, ready)`."""
    return f"{svc.service_id} ({svc.backend} on port {svc.port}, {svc.state})"


def backed_services(
    reg: Registry, model: str, removed: Collection[str], arriving: str | None = None
) -> list[Service]:
    """The live services of `model` that would lose the copy they serve from if its copies on
    the devices `removed` went (`arriving`: a copy that a move writes as its source goes).

    A service serves from the copy on its own device: a `disk`/`dram` copy, or on a GPU the
    resident weights for the builtin backend (other backends load their own). A service on a
    GPU also reads its node's `dram` or `disk` copy (configuration, tokenizer, and the weights
    again after a restart), so it loses that when the last of them goes."""
    gone = set(removed)
    hit = []
    for svc in live_services(reg, model):
        node, _, tier = svc.device.partition(":")
        if not tier.startswith("gpu"):
            if svc.device in gone:
                hit.append(svc)
            continue
        if svc.device in gone and svc.backend == "builtin":
            hit.append(svc)
            continue
        stored = [f"{node}:{t}" for t in STORAGE_TIERS if is_ready(reg, model, f"{node}:{t}")]
        if arriving is not None and arriving.partition(":")[0] == node:
            stored.append(arriving)
        if stored and all(dev in gone for dev in stored):
            hit.append(svc)
    return hit


def port_holder(reg: Registry, node: str, port: int, sid: str) -> Service | None:
    """Another live service on `node` that listens on `port`, if any."""
    for svc in live_services(reg):
        if svc.port == port and svc.service_id != sid and svc.device.partition(":")[0] == node:
            return svc
    return None


def check_gpu_share(reg: Registry, model: str, dev: Device, backend: str) -> None:
    """Conflict (409 `insufficient_gpu_memory`) when a server that loads the weights itself
    (`backend`, a command template such as vLLM) cannot get room for them on GPU `dev`, even
    after gswarm's resident copy of `model` there is handed over to it. What else holds the GPU:
    other models' copies on it, other servers' shares (`Service.gpu_memory`), and what the node's
    last inventory says is taken; the agent checks again, live, before it starts anything."""
    node = reg.nodes.get(dev.node)
    gpu = next((g for g in node.inventory.gpus if g.index == dev.gpu_index), None) if node else None
    if gpu is None:
        return
    copies = {
        loc.device.split(":")[1]: loc.size
        for loc in reg.model_locations(model)
        if loc.device.partition(":")[0] == dev.node and loc.state == "ready"
    }
    needed = copies.get("dram") or copies.get("disk") or 0
    own = copies.get(dev.tier, 0)
    held: dict[str, int] = {
        f"{loc.model} resident": loc.size
        for (m, d), loc in reg.locations.items()
        if d == str(dev) and m != model and loc.state not in ("failed", "deleting")
    }
    held |= {
        f"service {sid}": svc.gpu_memory
        for sid, svc in reg.services.items()
        if svc.device == str(dev) and svc.gpu_memory and svc.state not in ("failed", "stopped")
    }
    free = min(gpu.memory_free + own, gpu.memory_total - sum(held.values()))
    share = int(gpu_memory_utilization(gpu.memory_total, free) * gpu.memory_total)
    if needed > share:
        holders = ", ".join(f"{k} ({b} bytes)" for k, b in sorted(held.items()))
        raise Conflict(
            f"{backend} for {model} on {dev} needs {needed} bytes of GPU memory for its weights; "
            f"{share} bytes can be given ({max(0, free)} free of {gpu.memory_total}, less headroom)"
            + (f"; held by {holders}" if holders else ""),
            code="insufficient_gpu_memory",
            details={"needed": needed, "free": max(0, free), "share": share, "total": gpu.memory_total},
        )
