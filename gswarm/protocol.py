"""Every message on the wire, as msgspec Structs, with decoders built once.

Three families:
- registry entities (Model, Node, Location, Op) as they appear in REST answers and events;
- the agent socket: `AgentMessage` (agent -> head) and `HeadMessage` (head -> agent) unions,
  tagged by a `type` field;
- events (`Event`) and notices on the subscriber socket.

Every field added later gets a default, so an agent one version apart still talks.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

import msgspec

from gswarm.devices import MODEL_NAME_RE, STORAGE_TIERS
from gswarm.states import JOB_TERMINAL, ActionState, JobState, LocationState, NodeStatus, ServiceState
from gswarm.workflow import ActionFields

# ---------------------------------------------------------------- inventory


class TierInfo(msgspec.Struct):
    """One storage tier on a node: where it lives and how full it is."""

    name: str
    path: str
    capacity: int
    free: int


class GpuInfo(msgspec.Struct):
    """One GPU as the node sees it (from NVML, or simulated)."""

    index: int
    name: str
    uuid: str
    memory_total: int
    memory_free: int
    utilization: int = 0
    simulated: bool = False


class Inventory(msgspec.Struct):
    """What a node has: identity, addresses, tiers, GPUs, memory."""

    hostname: str = ""
    addresses: list[str] = msgspec.field(default_factory=list)
    cpu_count: int = 0
    memory_total: int = 0
    memory_available: int = 0
    tiers: list[TierInfo] = msgspec.field(default_factory=list)
    gpus: list[GpuInfo] = msgspec.field(default_factory=list)
    gpu_error: str = ""


class Holding(msgspec.Struct):
    """A copy of a model on one tier of a node: published, or (in a `partials` list) the
    unfinished work a failed or interrupted write left, with the bytes it takes."""

    model: str
    tier: str
    path: str
    size: int
    files: int = 0
    source: str = ""
    revision: str = ""


# ---------------------------------------------------------------- caps on what an agent reports

MAX_NAME_CHARS = 255
"""A hostname, an address, a tier or GPU name, a GPU uuid, a GPU holding's path."""
MAX_PATH_CHARS = 4096
"""A tier's or a holding's path."""
MAX_TEXT_CHARS = 2048
"""`gpu_error`, a holding's source and revision."""
MAX_ADDRESSES = 64
MAX_TIERS = 16
MAX_GPUS = 256
MAX_HOLDINGS = 10_000
"""Published copies and partial copies, each list."""
MAX_SERVICES = 1_000


def _too_long(what: str, value: str, cap: int) -> str | None:
    if len(value) > cap:
        return f"{what} has {len(value)} characters (at most {cap})"
    return None


def inventory_problem(inv: Inventory) -> str | None:
    """Why the head refuses an agent's inventory (a cap broken), or None when it is fine."""
    counts = (
        ("addresses", len(inv.addresses), MAX_ADDRESSES),
        ("tiers", len(inv.tiers), MAX_TIERS),
        ("gpus", len(inv.gpus), MAX_GPUS),
    )
    for what, n, cap in counts:
        if n > cap:
            return f"inventory lists {n} {what} (at most {cap})"
    checks = [("hostname", inv.hostname, MAX_NAME_CHARS), ("gpu_error", inv.gpu_error, MAX_TEXT_CHARS)]
    checks += [("an address", a, MAX_NAME_CHARS) for a in inv.addresses]
    for t in inv.tiers:
        checks += [("a tier name", t.name, MAX_NAME_CHARS), ("a tier path", t.path, MAX_PATH_CHARS)]
    for g in inv.gpus:
        checks += [("a GPU name", g.name, MAX_NAME_CHARS), ("a GPU uuid", g.uuid, MAX_NAME_CHARS)]
    for what, value, cap in checks:
        problem = _too_long(what, value, cap)
        if problem is not None:
            return "inventory: " + problem
    return None


def holdings_problem(inv: Inventory, holdings: Sequence[Holding], partial: bool = False) -> str | None:
    """Why the head refuses an agent's list of copies, or None: too many, a model name that is
    not one, a tier the node does not report (a `gpuN` of a GPU it does not have), or a path
    outside that tier's directory (published copies are `<tier>/<model>`, partial ones
    `<tier>/.partial/<model>`)."""
    what = "partial copies" if partial else "holdings"
    if len(holdings) > MAX_HOLDINGS:
        return f"{len(holdings)} {what} (at most {MAX_HOLDINGS})"
    tiers = {t.name: t.path for t in inv.tiers if t.name in STORAGE_TIERS}
    gpus = {f"gpu{g.index}" for g in inv.gpus}
    for h in holdings:
        if not MODEL_NAME_RE.fullmatch(h.model) or h.model in (".", ".."):
            return f"{what}: {h.model[:80]!r} is not a model name"
        if h.size < 0:
            return f"{what}: {h.model} has a negative size"
        for field, value, cap in (
            ("source", h.source, MAX_TEXT_CHARS),
            ("revision", h.revision, MAX_TEXT_CHARS),
        ):
            problem = _too_long(f"the {field} of {h.model}", value, cap)
            if problem is not None:
                return f"{what}: {problem}"
        if h.tier in gpus and not partial:
            problem = _too_long(f"the path of {h.model}", h.path, MAX_NAME_CHARS)
            if problem is not None:
                return f"{what}: {problem}"
            continue
        root = tiers.get(h.tier)
        if root is None:
            return f"{what}: {h.model} on tier {h.tier[:40]!r}, which this node does not report"
        if len(h.path) > MAX_PATH_CHARS or not _inside(h.path, root, h.model, partial):
            return f"{what}: {h.model} at {h.path[:200]!r}, outside tier {h.tier} ({root})"
    return None


def _inside(path: str, root: str, model: str, partial: bool) -> bool:
    expected = posixpath.join(root, ".partial", model) if partial else posixpath.join(root, model)
    return posixpath.normpath(path) == posixpath.normpath(expected)


# ---------------------------------------------------------------- registry entities


class Model(msgspec.Struct):
    """A registered model."""

    name: str
    type: str
    source_url: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: float = 0.0


class Location(msgspec.Struct):
    """One copy of a model on one device."""

    model: str
    device: str
    state: LocationState
    size: int = 0
    path: str = ""
    updated_at: float = 0.0
    op_id: str | None = None
    source: str = ""
    """Where the copy's bytes first came from (`hf://org/repo@rev`, a URL); '' when unknown."""
    revision: str = ""


class ModelView(msgspec.Struct):
    """A model as REST answers show it: the registration plus every known copy."""

    name: str
    type: str
    source_url: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: float = 0.0
    locations: list[Location] = msgspec.field(default_factory=list)


class Service(msgspec.Struct):
    """A running inference server for a model on a device."""

    service_id: str
    model: str
    device: str
    backend: str
    port: int
    url: str = ""
    state: ServiceState = "starting"
    pid: int = 0
    restarts: int = 0
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    error: str = ""
    log_tail: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    gpu_memory: int = 0
    """Bytes of its GPU's memory set aside for a command-template backend (vLLM's
    `--gpu-memory-utilization` times the GPU's memory); 0 for the builtin backend, whose
    weights are the resident copy, and off a GPU."""


def service_id(model: str, device: str) -> str:
    """The id of the service of a model on a device."""
    return f"{model}@{device}"


class Node(msgspec.Struct):
    """A machine known to the head, with the agent's latest report."""

    node_id: str
    status: NodeStatus = "offline"
    hostname: str = ""
    addresses: list[str] = msgspec.field(default_factory=list)
    agent_version: str = ""
    data_url: str = ""
    inventory: Inventory = msgspec.field(default_factory=Inventory)
    holdings: list[Holding] = msgspec.field(default_factory=list)
    connected: bool = False
    backends: list[str] = msgspec.field(default_factory=list)
    registered_at: float = 0.0
    status_since: float = 0.0
    last_seen: float = 0.0
    legacy: dict[str, Any] = msgspec.field(default_factory=dict)


class NodeRemoved(msgspec.Struct):
    """What `DELETE /nodes/{node_id}` forgot: the node, its credential, and what was on it."""

    node_id: str
    was_online: bool = False
    """True when a forced removal closed the agent's socket."""
    ops_failed: list[str] = msgspec.field(default_factory=list)
    """Open ops of the node, failed with `node_removed`."""
    locations: list[str] = msgspec.field(default_factory=list)
    """Copies on the node's devices that the registry no longer lists (`model@node:tier`)."""
    services: list[str] = msgspec.field(default_factory=list)


class OpProgress(msgspec.Struct):
    """How far an op has come: units done of total (bytes where it moves bytes)."""

    done: int = 0
    total: int = 0
    rate: float = 0.0
    message: str = ""


class OpError(msgspec.Struct):
    """Why an op failed."""

    code: str
    message: str


class JobAction(msgspec.Struct):
    """One action of a job and how it is going."""

    job_id: str
    id: str
    index: int
    action: str
    spec: ActionFields
    depends_on: list[str] = msgspec.field(default_factory=list)
    retries: int = 0
    timeout: float | None = None
    continue_on_error: bool = False
    state: ActionState = "pending"
    op_ids: list[str] = msgspec.field(default_factory=list)
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""


class Job(msgspec.Struct):
    """A workflow: a DAG of actions, each run as one or more ops."""

    job_id: str
    name: str
    description: str = ""
    state: JobState = "pending"
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    actions: list[JobAction] = msgspec.field(default_factory=list)

    @property
    def terminal(self) -> bool:
        """True once the job has ended."""
        return self.state in JOB_TERMINAL


# ---------------------------------------------------------------- agent -> head


class Hello(msgspec.Struct, tag="hello", tag_field="type", omit_defaults=True):
    """First message of an agent: who it is, what it has, what it still runs or finished."""

    node_id: str
    token: str
    protocol_version: int
    instance_id: str
    agent_version: str = ""
    data_url: str = ""
    inventory: Inventory = msgspec.field(default_factory=Inventory)
    holdings: list[Holding] = msgspec.field(default_factory=list)
    partials: list[Holding] = msgspec.field(default_factory=list)
    """Unfinished copies on the node's tiers (kept to resume; removable with a delete)."""
    running: list[str] = msgspec.field(default_factory=list)
    finished: list[str] = msgspec.field(default_factory=list)
    services: list[Service] = msgspec.field(default_factory=list)
    backends: list[str] = msgspec.field(default_factory=list)
    credential: str = ""
    """The node's own credential, issued in the `Welcome` that enrolled it; empty to enrol
    (then `token` must be the join token)."""


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="type", omit_defaults=True):
    """Periodic fresh resource figures."""

    inventory: Inventory


class Accepted(msgspec.Struct, tag="accepted", tag_field="type"):
    """The agent has taken an op and started it."""

    op_id: str


class Progress(msgspec.Struct, tag="progress", tag_field="type", omit_defaults=True):
    """Coalesced progress of a running op."""

    op_id: str
    done: int = 0
    total: int = 0
    rate: float = 0.0
    message: str = ""


class Succeeded(msgspec.Struct, tag="succeeded", tag_field="type", omit_defaults=True):
    """An op finished; `result` is the kind's result Struct as JSON (see `gswarm.ops`)."""

    op_id: str
    result: msgspec.Raw = msgspec.Raw(b"{}")
    holdings: list[Holding] | None = None


class Failed(msgspec.Struct, tag="failed", tag_field="type", omit_defaults=True):
    """An op failed (code `cancelled` when it was cancelled)."""

    op_id: str
    error: OpError
    holdings: list[Holding] | None = None
    partial: Holding | None = None
    """What a failed write left on disk: kept so a retry resumes, listed as a `partial` copy."""


class HoldingsChanged(msgspec.Struct, tag="holdings", tag_field="type"):
    """What the node holds changed outside an op (a GPU worker died, say)."""

    holdings: list[Holding]
    partials: list[Holding] = msgspec.field(default_factory=list)
    """Unfinished copies on the node's tiers."""


class ServiceChanged(msgspec.Struct, tag="service", tag_field="type", omit_defaults=True):
    """A service changed state (started, healthy, restarting, failed, stopped)."""

    service: Service
    removed: bool = False


AgentMessage = Hello | Heartbeat | Accepted | Progress | Succeeded | Failed | HoldingsChanged | ServiceChanged

# ---------------------------------------------------------------- head -> agent


class Welcome(msgspec.Struct, tag="welcome", tag_field="type"):
    """The head accepted the agent."""

    node_id: str
    heartbeat_interval: float
    server_time: float
    transfer_key: str = ""
    """The key this node's data server checks transfer grants with (its own, see grants.py)."""
    credential: str = ""
    """Only when this Hello enrolled the node: its credential, to keep and present in every
    later Hello (the head keeps only a hash of it)."""


class Command(msgspec.Struct, tag="command", tag_field="type", omit_defaults=True):
    """Run an op. Delivered at least once; the agent ignores a duplicate op_id."""

    op_id: str
    kind: str
    args: msgspec.Raw = msgspec.Raw(b"{}")
    """The kind's args Struct as JSON (see `gswarm.ops`)."""
    timeout: float = 0.0


class Cancel(msgspec.Struct, tag="cancel", tag_field="type"):
    """Stop an op."""

    op_id: str


class Ack(msgspec.Struct, tag="ack", tag_field="type"):
    """The head has recorded the op's final result; the agent may forget it."""

    op_id: str


HeadMessage = Welcome | Command | Cancel | Ack

# ---------------------------------------------------------------- events


class Event(msgspec.Struct, tag="event", tag_field="type", omit_defaults=True):
    """An immutable record of a change. `seq` increases across the cluster."""

    seq: int
    ts: float
    kind: str
    key: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def topic(self) -> str:
        """The entity family: the part of `kind` before the dot (model, node, op, ...)."""
        return self.kind.partition(".")[0]


class Notice(msgspec.Struct, tag="notice", tag_field="type", omit_defaults=True):
    """A word to a subscriber: replay done, or why it is being dropped."""

    code: str
    message: str
    last_seq: int = 0


SubscriberMessage = Event | Notice

# ---------------------------------------------------------------- codecs, built once

encoder = msgspec.json.Encoder()
agent_message_decoder = msgspec.json.Decoder(AgentMessage)
head_message_decoder = msgspec.json.Decoder(HeadMessage)
subscriber_message_decoder = msgspec.json.Decoder(SubscriberMessage)
event_decoder = msgspec.json.Decoder(Event)


def encode(msg: Any) -> bytes:
    """JSON-encode any message or entity."""
    return encoder.encode(msg)


def to_builtins(obj: Any) -> Any:
    """Entity to plain dicts and lists (for events and REST answers)."""
    return msgspec.to_builtins(obj)
