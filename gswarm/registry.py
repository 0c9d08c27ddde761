"""The cluster's state machine: models, nodes, locations, ops, services and jobs. No I/O.

Each mutation checks its preconditions (raising a GswarmError), changes the in-memory state
and returns the events that describe the change. Whoever calls it persists and publishes
those events; an event's `data` is the full new state of the entity it names, so the event
log alone is enough to rebuild the tables.

This is the only place that changes an entity's state: every state change goes through the
transition tables of `gswarm.states` and returns its event. Other modules read the tables
here but never assign to them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import msgspec

from gswarm.devices import STORAGE_TIERS, validate_model_name
from gswarm.errors import Conflict, NotFound
from gswarm.ops import CopyKey, Op, OpArgs, OpResult, kind_of
from gswarm.protocol import (
    Event,
    Holding,
    Inventory,
    Job,
    JobAction,
    Location,
    Model,
    ModelView,
    Node,
    OpError,
    OpProgress,
    Service,
    to_builtins,
)
from gswarm.states import (
    ACTION_MOVES,
    ACTION_TERMINAL,
    JOB_MOVES,
    LOCATION_MOVES,
    OP_MOVES,
    ActionState,
    JobState,
    LocationState,
    OpState,
    check_move,
)

# A heartbeat becomes a `node.updated` event only when free space moved by more than this
# fraction of capacity, or something else in the inventory changed: heartbeats of a thousand
# idle nodes must not flood subscribers.
_FREE_CHANGE_FRACTION = 0.01


def _inventory_changed(old: Inventory, new: Inventory) -> bool:
    if (old.hostname, old.addresses, len(old.tiers), len(old.gpus), old.gpu_error) != (
        new.hostname,
        new.addresses,
        len(new.tiers),
        len(new.gpus),
        new.gpu_error,
    ):
        return True
    for a, b in zip(old.tiers, new.tiers, strict=True):
        if a.capacity != b.capacity or abs(a.free - b.free) > a.capacity * _FREE_CHANGE_FRACTION:
            return True
    for ga, gb in zip(old.gpus, new.gpus, strict=True):
        if abs(ga.memory_free - gb.memory_free) > ga.memory_total * _FREE_CHANGE_FRACTION:
            return True
    return False


def location_key(model: str, device: str) -> str:
    """The event key of a location."""
    return f"{model}@{device}"


class Registry:
    """In-memory registry; every mutation returns its events."""

    def __init__(self) -> None:
        self.models: dict[str, Model] = {}
        self.nodes: dict[str, Node] = {}
        self.locations: dict[tuple[str, str], Location] = {}
        self.ops: dict[str, Op] = {}
        self._open: set[str] = set()
        self._writers: dict[CopyKey, str] = {}
        self.services: dict[str, Service] = {}
        self.jobs: dict[str, Job] = {}
        self.last_seq = 0

    # ------------------------------------------------------------ loading

    def load(
        self,
        models: Iterable[Model],
        nodes: Iterable[Node],
        locations: Iterable[Location],
        ops: Iterable[Op],
        last_seq: int,
        services: Iterable[Service] = (),
        jobs: Iterable[Job] = (),
    ) -> None:
        """Restore state read back from storage (no events)."""
        self.services = {s.service_id: s for s in services}
        self.jobs = {j.job_id: j for j in jobs}
        self.models = {m.name: m for m in models}
        self.nodes = {n.node_id: n for n in nodes}
        self.locations = {(loc.model, loc.device): loc for loc in locations}
        self.ops = {o.op_id: o for o in ops}
        self._open = {o.op_id for o in self.ops.values() if not o.terminal}
        self._writers = {key: i for i in sorted(self._open) for key in self.ops[i].writes()}
        self.last_seq = last_seq
        now = time.time()
        for node in self.nodes.values():
            # No connection survives a restart; an agent that comes back within the offline
            # window keeps its node online without a flap.
            node.connected = False
            node.last_seen = now

    def _event(self, kind: str, key: str, entity: Any) -> Event:
        self.last_seq += 1
        return Event(seq=self.last_seq, ts=time.time(), kind=kind, key=key, data=to_builtins(entity))

    # ------------------------------------------------------------ models

    def get_model(self, name: str) -> Model:
        """The model, or NotFound."""
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"model {name!r} is not registered", code="model_not_found") from None

    def register_model(
        self, name: str, type_: str, source_url: str | None, metadata: dict[str, Any]
    ) -> tuple[Model, list[Event]]:
        """Add a model; Conflict if the name is taken."""
        validate_model_name(name)
        if name in self.models:
            raise Conflict(f"model {name!r} is already registered", code="already_exists")
        model = Model(name=name, type=type_, source_url=source_url, metadata=metadata, created_at=time.time())
        self.models[name] = model
        return model, [self._event("model.registered", name, model)]

    def delete_model(self, name: str) -> list[Event]:
        """Remove a model and every location record of it from the registry."""
        model = self.get_model(name)
        events = [
            self._event("location.deleted", location_key(name, dev), loc)
            for (m, dev), loc in list(self.locations.items())
            if m == name
        ]
        for key in [k for k in self.locations if k[0] == name]:
            del self.locations[key]
        del self.models[name]
        events.append(self._event("model.deleted", name, model))
        return events

    def model_view(self, name: str) -> ModelView:
        """A model with every known copy (NotFound when not registered)."""
        m = self.get_model(name)
        return ModelView(
            name=m.name,
            type=m.type,
            source_url=m.source_url,
            metadata=m.metadata,
            created_at=m.created_at,
            locations=self.model_locations(name),
        )

    def model_locations(self, name: str) -> list[Location]:
        """Every known copy of a model."""
        return [loc for (m, _), loc in sorted(self.locations.items()) if m == name]

    # ------------------------------------------------------------ nodes

    def get_node(self, node_id: str) -> Node:
        """The node, or NotFound."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise NotFound(f"node {node_id!r} is not known", code="node_not_found") from None

    def node_connected(
        self,
        node_id: str,
        inventory: Inventory,
        holdings: list[Holding],
        agent_version: str,
        data_url: str,
        backends: list[str] | None = None,
    ) -> list[Event]:
        """An agent said Hello: the node is online with this inventory."""
        backends = backends or []
        now = time.time()
        node = self.nodes.get(node_id)
        events: list[Event] = []
        fresh = node is None
        if node is None:
            node = Node(node_id=node_id, registered_at=now, status_since=now)
            self.nodes[node_id] = node
        was_online = node.status == "online"
        # A reconnect that reports nothing new is no event: a reconnecting agent (or one that
        # reconnects on purpose, again and again) must not fill the log.
        changed = (
            _inventory_changed(node.inventory, inventory)
            or (node.agent_version, node.data_url, node.backends) != (agent_version, data_url, backends)
            or node.holdings != holdings
        )
        node.connected = True
        node.last_seen = now
        node.hostname = inventory.hostname
        node.addresses = inventory.addresses
        node.inventory = inventory
        node.holdings = holdings
        node.agent_version = agent_version
        node.data_url = data_url
        node.backends = backends
        if not was_online:
            node.status = "online"
            node.status_since = now
        if fresh or not was_online or changed:
            kind = "node.registered" if fresh else ("node.updated" if was_online else "node.online")
            events.append(self._event(kind, node_id, node))
        return events

    def node_heartbeat(self, node_id: str, inventory: Inventory) -> list[Event]:
        """Fresh figures from a connected agent; an event only when they really changed."""
        node = self.get_node(node_id)
        node.last_seen = time.time()
        changed = _inventory_changed(node.inventory, inventory)
        node.inventory = inventory
        events: list[Event] = []
        if node.status != "online":
            node.status = "online"
            node.status_since = node.last_seen
            events.append(self._event("node.online", node_id, node))
        elif changed:
            events.append(self._event("node.updated", node_id, node))
        return events

    def node_seen(self, node_id: str) -> None:
        """The node's agent said something (no event: liveness only)."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.last_seen = time.time()

    def node_holdings(self, node_id: str, holdings: list[Holding]) -> None:
        """The agent's latest list of published copies (the locations follow by reconciling)."""
        self.get_node(node_id).holdings = holdings

    def node_disconnected(self, node_id: str) -> None:
        """The agent's socket closed; the node goes offline only if it does not come back."""
        node = self.nodes.get(node_id)
        if node is not None:
            node.connected = False

    def node_offline(self, node_id: str, reason: str) -> list[Event]:
        """Mark a node offline (idempotent)."""
        node = self.get_node(node_id)
        if node.status == "offline":
            return []
        node.status = "offline"
        node.status_since = time.time()
        node.connected = False
        node.legacy["offline_reason"] = reason
        return [self._event("node.offline", node_id, node)]

    def stale_nodes(self, now: float, offline_after: float, grace: float) -> list[str]:
        """Online nodes that have gone silent, or lost their socket more than `grace` ago."""
        stale = []
        for node in self.nodes.values():
            if node.status != "online":
                continue
            silent = now - node.last_seen
            if silent > offline_after or (not node.connected and silent > grace and node.agent_version):
                stale.append(node.node_id)
        return stale

    def remove_node(self, node_id: str) -> tuple[list[str], list[str], list[Event]]:
        """Forget a node with the copies and services recorded on it (its open ops must have
        ended first); the location keys and service ids forgotten, and the events."""
        node = self.get_node(node_id)
        events: list[Event] = []
        services = [s.service_id for s in self.node_services(node_id)]
        for sid in services:
            events.extend(self.remove_service(sid))
        locations = []
        for model, device in [k for k in self.locations if k[1].partition(":")[0] == node_id]:
            locations.append(location_key(model, device))
            events.extend(self.remove_location(model, device))
        del self.nodes[node_id]
        events.append(self._event("node.deleted", node_id, node))
        return locations, services, events

    def legacy_register_node(
        self, node_id: str, hostname: str, ip_address: str, storage: dict[str, Any], gpus: int
    ) -> tuple[Node, list[Event]]:
        """`POST /nodes` of the original API: record a node before (or without) an agent."""
        now = time.time()
        node = self.nodes.get(node_id)
        fresh = node is None
        if node is None:
            node = Node(node_id=node_id, registered_at=now, status_since=now)
            self.nodes[node_id] = node
        node.hostname = hostname or node.hostname
        if ip_address and ip_address not in node.addresses:
            node.addresses = [ip_address, *node.addresses]
        node.legacy.update({"storage_devices": storage, "gpu_count": gpus})
        node.last_seen = now
        return node, [self._event("node.registered" if fresh else "node.updated", node_id, node)]

    def legacy_heartbeat(self, node_id: str) -> list[Event]:
        """`POST /nodes/{id}/heartbeat` of the original API."""
        node = self.get_node(node_id)
        node.last_seen = time.time()
        if node.status != "online":
            node.status = "online"
            node.status_since = node.last_seen
            return [self._event("node.online", node_id, node)]
        return []

    # ------------------------------------------------------------ ops

    def get_op(self, op_id: str) -> Op:
        """The op, or NotFound."""
        try:
            return self.ops[op_id]
        except KeyError:
            raise NotFound(f"op {op_id!r} does not exist", code="op_not_found") from None

    def create_op(self, node_id: str, args: OpArgs, timeout: float) -> tuple[Op, list[Event]]:
        """A new queued op for a node; it becomes the writer of the copies its args write."""
        op = Op(
            op_id=uuid.uuid4().hex[:16],
            kind=kind_of(args),
            node_id=node_id,
            args=args,
            created_at=time.time(),
            timeout=timeout,
        )
        self.ops[op.op_id] = op
        self._open.add(op.op_id)
        for key in op.writes():
            self._writers[key] = op.op_id
        return op, [self._event("op.created", op.op_id, op)]

    def open_writer(self, model: str, device: str) -> Op | None:
        """The open op writing (or deleting) this copy, if any."""
        op_id = self._writers.get((model, device))
        op = self.ops.get(op_id) if op_id is not None else None
        return op if op is not None and not op.terminal else None

    def _set_op_state(self, op: Op, state: OpState) -> None:
        check_move(f"op {op.op_id}", OP_MOVES, op.state, state)
        op.state = state

    def op_sent(self, op_id: str) -> None:
        """The command went out on the socket once more (no event: not a state change)."""
        self.ops[op_id].attempts += 1

    def op_accepted(self, op_id: str) -> list[Event]:
        """The agent started the op."""
        op = self.ops.get(op_id)
        if op is None or op.state != "queued":
            return []
        self._set_op_state(op, "running")
        op.started_at = time.time()
        return [self._event("op.running", op_id, op)]

    def op_progress(self, op_id: str, progress: OpProgress) -> list[Event]:
        """New progress figures for a running op."""
        op = self.ops.get(op_id)
        if op is None or op.terminal:
            return []
        if op.state == "queued":
            self._set_op_state(op, "running")
            op.started_at = time.time()
        op.progress = progress
        return [self._event("op.progress", op_id, op)]

    def op_finished(
        self,
        op_id: str,
        state: OpState,
        result: OpResult | None = None,
        error: OpError | None = None,
    ) -> list[Event]:
        """The op ended (succeeded, failed or cancelled); a late second ending is ignored."""
        op = self.ops.get(op_id)
        if op is None or op.terminal:
            return []
        self._set_op_state(op, state)
        op.finished_at = time.time()
        self._open.discard(op_id)
        for key in op.writes():
            if self._writers.get(key) == op_id:
                del self._writers[key]
        op.result = result
        op.error = error
        if state == "succeeded" and op.progress.total:
            op.progress.done = op.progress.total
        return [self._event(f"op.{state}", op_id, op)]

    def open_ops(self, node_id: str | None = None) -> list[Op]:
        """Ops not yet ended, for one node or all (from an index: the history can be long)."""
        return [
            op for op in (self.ops[i] for i in list(self._open)) if node_id is None or op.node_id == node_id
        ]

    def prune_ops(self, keep: int) -> list[str]:
        """Forget the oldest ended ops beyond `keep`; their ids, for the store to delete."""
        ended = len(self.ops) - len(self._open)
        if ended <= keep:
            return []
        doomed = sorted((o for o in self.ops.values() if o.terminal), key=lambda o: o.finished_at or 0)
        ids = [o.op_id for o in doomed[: ended - keep * 9 // 10]]  # some slack: not every sweep
        for op_id in ids:
            del self.ops[op_id]
        return ids

    # ------------------------------------------------------------ locations

    def set_location(
        self,
        model: str,
        device: str,
        state: LocationState,
        *,
        size: int | None = None,
        path: str | None = None,
        op_id: str | None = None,
        source: str | None = None,
        revision: str | None = None,
    ) -> list[Event]:
        """Create or update the record of one copy."""
        loc = self.locations.get((model, device))
        if loc is None:
            loc = Location(model=model, device=device, state=state)
            self.locations[(model, device)] = loc
        check_move(f"location {model}@{device}", LOCATION_MOVES, loc.state, state)
        loc.state = state
        if size is not None:
            loc.size = size
        if path is not None:
            loc.path = path
        if source is not None:
            loc.source = source
        if revision is not None:
            loc.revision = revision
        loc.op_id = op_id
        loc.updated_at = time.time()
        return [self._event("location.updated", location_key(model, device), loc)]

    def remove_location(self, model: str, device: str) -> list[Event]:
        """Forget one copy (idempotent)."""
        loc = self.locations.pop((model, device), None)
        if loc is None:
            return []
        return [self._event("location.deleted", location_key(model, device), loc)]

    # ------------------------------------------------------------ services

    def set_service(self, service: Service) -> list[Event]:
        """Record a service's new state."""
        service.updated_at = time.time()
        self.services[service.service_id] = service
        return [self._event("service.updated", service.service_id, service)]

    def remove_service(self, sid: str) -> list[Event]:
        """Forget a service (idempotent)."""
        service = self.services.pop(sid, None)
        if service is None:
            return []
        service.state = "stopped"
        return [self._event("service.deleted", sid, service)]

    def reconcile_services(self, node_id: str, services: list[Service]) -> list[Event]:
        """The agent is the truth about what it serves: adopt its list for this node."""
        events: list[Event] = []
        reported = {s.service_id for s in services}
        for old in self.node_services(node_id):
            if old.service_id not in reported:
                events.extend(self.remove_service(old.service_id))
        for svc in services:
            events.extend(self.set_service(svc))
        return events

    def reconcile_holdings(
        self, node_id: str, holdings: list[Holding], partials: list[Holding] | None = None
    ) -> list[Event]:
        """Make the locations on a node match what its agent reports holding, published copies
        (`ready`) and unfinished ones (`partial`, with the space they take). A copy that an
        open op is writing or deleting is left to that op: the agent's list has only published
        copies, so a copy being downloaded is missing from it and must not be dropped."""
        events: list[Event] = []
        held = {(h.model, f"{node_id}:{h.tier}"): h for h in holdings}
        unfinished = {key: h for h in partials or [] if (key := (h.model, f"{node_id}:{h.tier}")) not in held}
        for (model, device), loc in list(self.locations.items()):
            node, _, tier = device.partition(":")
            if node != node_id or (model, device) in held or self.open_writer(model, device) is not None:
                continue
            if (model, device) in unfinished and loc.state != "ready":
                continue
            if tier in STORAGE_TIERS or loc.state == "ready":
                events.extend(self.remove_location(model, device))
        for (model, device), h in held.items():
            current = self.locations.get((model, device))
            if current is not None and current.state == "ready" and current.size == h.size:
                continue
            if self.open_writer(model, device) is not None:
                continue  # published just now by the op writing it: its result says so
            if model not in self.models:
                _, evs = self.register_model(model, "unknown", None, {"discovered_on": node_id})
                events.extend(evs)
            events.extend(
                self.set_location(
                    model, device, "ready", size=h.size, path=h.path, source=h.source, revision=h.revision
                )
            )
        for (model, device), h in unfinished.items():
            current = self.locations.get((model, device))
            if current is not None and current.state == "partial" and current.size == h.size:
                continue
            if self.open_writer(model, device) is not None:
                continue  # the op writing it reports how it ends
            if model not in self.models:
                _, evs = self.register_model(model, "unknown", None, {"discovered_on": node_id})
                events.extend(evs)
            events.extend(self.set_location(model, device, "partial", size=h.size, path=h.path))
        return events

    def node_services(self, node_id: str) -> list[Service]:
        """The services on one node."""
        return [s for s in self.services.values() if s.device.partition(":")[0] == node_id]

    # ------------------------------------------------------------ jobs

    def get_job(self, job_id: str) -> Job:
        """The job, or NotFound."""
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id!r} does not exist", code="job_not_found") from None

    def _job_header(self, job: Job) -> Event:
        counts: dict[str, int] = {}
        for a in job.actions:
            counts[a.state] = counts.get(a.state, 0) + 1
        job.counts = counts
        header = msgspec.structs.replace(job, actions=[])
        return self._event("job.updated", job.job_id, header)

    def add_job(self, job: Job) -> list[Event]:
        """A new job with its actions."""
        job.created_at = time.time()
        self.jobs[job.job_id] = job
        events = [self._event("job.action", f"{job.job_id}/{a.id}", a) for a in job.actions]
        events.append(self._job_header(job))
        return events

    def set_job_state(self, job: Job, state: JobState, error: str | None = None) -> list[Event]:
        """The job's own state changes (start and end times follow)."""
        check_move(f"job {job.job_id}", JOB_MOVES, job.state, state)
        job.state = state
        if error is not None:
            job.error = error
        if state == "running" and job.started_at is None:
            job.started_at = time.time()
        if job.terminal:
            job.finished_at = time.time()
        return [self._job_header(job)]

    def update_action(
        self,
        job: Job,
        action: JobAction,
        state: ActionState,
        *,
        error: str | None = None,
        op_id: str | None = None,
    ) -> list[Event]:
        """One action's state changes (the job's counts with it); `op_id` is an op it started."""
        check_move(f"action {job.job_id}/{action.id}", ACTION_MOVES, action.state, state)
        now = time.time()
        action.state = state
        if error is not None:
            action.error = error
        if op_id is not None:
            action.op_ids = [*action.op_ids, op_id]
            action.started_at = action.started_at or now
        if state in ACTION_TERMINAL:
            action.finished_at = now
        return [self._event("job.action", f"{job.job_id}/{action.id}", action), self._job_header(job)]

    def action_attempt(self, action: JobAction) -> int:
        """Count one more attempt of an action (persisted with its next state change)."""
        action.attempts += 1
        return action.attempts
