"""Replication: spread one model to many devices, node to node.

`POST /replicate {model_name, targets | all_nodes, source_device?, max_fanout?}` creates a
head-side op (kind `replicate`, node `@head`) and a coordinator task. The coordinator starts a
`fetch` op on each target, taking as source the holder with the fewest peers in flight (never
more than `max_fanout` at once). A target serves what it has while it still downloads, so it
becomes a source as soon as its first bytes arrive: with the default fanout of 1 the copies
flow down a pipelined chain at the speed of one link; a larger fanout makes a tree of chains
(more resilient, each link shared). The seed may itself still be downloading. A failed fetch
is retried from another holder; the op ends with a result per target. A fetch goes out only
while its target and a peer to read from have live agents: a holder or target whose agent is
reconnecting (restarted, or this head was) is waited for until its node goes offline, and a
target with no copy on an online node fails saying so.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from aiohttp import web

from gswarm.api import ReplicateBody
from gswarm.devices import parse_device, validate_model_name
from gswarm.errors import BadRequest, Conflict, GswarmError
from gswarm.head.copies import marking, peer_sources, require_node
from gswarm.head.http import Submitted, read_json, submitted_response
from gswarm.head.policy import incoming, is_ready, partial_holder
from gswarm.head.state import HEAD_KEY, Head
from gswarm.ops import (
    HEAD_NODE,
    CopyArgs,
    FetchArgs,
    FetchResult,
    Op,
    ReplicateArgs,
    ReplicateResult,
    TargetOutcome,
)
from gswarm.protocol import Event, OpError, OpProgress

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


async def replicate(request: web.Request) -> web.Response:
    """`POST /replicate`: copy a model to many devices, each finished node feeding the next."""
    body = await read_json(request, ReplicateBody)
    return await submitted_response(request, await submit_replicate(request.app[HEAD_KEY], body))


async def submit_replicate(head: Head, body: ReplicateBody) -> Submitted:
    """Validate a replication, create its op and start its coordinator."""
    model = validate_model_name(body.model_name, "model_name")
    reg = head.registry
    reg.get_model(model)
    if not 1 <= body.max_fanout <= 64:
        raise BadRequest(
            "max_fanout must be between 1 and 64", code="invalid_field", details={"field": "max_fanout"}
        )
    targets = [str(parse_device(t, "targets")) for t in body.targets]
    if body.all_nodes:
        tier = body.all_nodes
        targets += [f"{n.node_id}:{tier}" for n in reg.nodes.values() if n.status == "online"]
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise BadRequest(
            "nothing to replicate to: give targets or all_nodes",
            code="invalid_field",
            details={"field": "targets", "fields": ["targets", "all_nodes"]},
        )
    for t in targets:
        dev = parse_device(t, "targets")
        if dev.is_gpu:
            raise BadRequest(f"{t}: replication goes to disk or dram", code="unsupported_tier")
        require_node(head, dev)
    # A copy still arriving (a download under way) may seed the spread: it serves what it has.
    holders = [
        loc.device
        for loc in reg.model_locations(model)
        if loc.state == "ready" or incoming(reg, model, loc.device)
    ]
    if body.source_device is not None:
        src = str(parse_device(body.source_device, "source_device"))
        if src not in holders:
            raise Conflict(f"{model} is not held on {src}", code="not_held", details={"locations": holders})
    elif not [h for h in holders if parse_device(h).tier in ("disk", "dram")]:
        raise Conflict(f"{model} has no copy to replicate from", code="not_held")
    args = ReplicateArgs(
        model_name=model,
        targets=targets,
        source_device=body.source_device,
        max_fanout=body.max_fanout,
        bandwidth_limit=body.bandwidth_limit,
    )
    op, events = reg.create_op(HEAD_NODE, args, body.timeout or head.settings.op_timeout)
    events.extend(reg.op_accepted(op.op_id))
    head.commit(events)
    head.spawn(Replication(head, op).run(), name=f"replicate-{op.op_id}")
    return Submitted(op)


class Replication:
    """The coordinator of one replicate op."""

    def __init__(self, head: Head, op: Op) -> None:
        assert isinstance(op.args, ReplicateArgs)
        self.head = head
        self.op = op
        self.args = op.args
        self.model = op.args.model_name
        self.fanout = op.args.max_fanout or 1
        self.bandwidth = op.args.bandwidth_limit
        self.results: dict[str, TargetOutcome] = {}
        self.load: collections.Counter[str] = collections.Counter()
        self.attempts: collections.Counter[str] = collections.Counter()
        self.failed_sources: dict[str, set[str]] = collections.defaultdict(set)

    def _holders(self) -> list[str]:
        """Devices that can feed a target: ready copies, then copies still arriving (a target
        serves what it has while it downloads, so copies spread as a pipeline)."""
        reg = self.head.registry
        first = self.args.source_device
        found = [
            loc.device
            for loc in reg.model_locations(self.model)
            if parse_device(loc.device).tier in ("disk", "dram")
            and self._online(loc.device)
            and (loc.state == "ready" or partial_holder(reg, self.model, loc.device))
        ]
        found.sort(key=lambda d: (d != first, reg.locations[(self.model, d)].state != "ready", self.load[d]))
        return found

    async def run(self) -> None:
        """Drive fetch ops until every target is done or has failed for good."""
        reg = self.head.registry
        targets = list(self.args.targets)
        pending = collections.deque(t for t in targets if not self._ready(t))
        for t in targets:
            if self._ready(t):
                self.results[t] = TargetOutcome(state="succeeded", already_present=True)
        active: dict[str, tuple[str, str]] = {}  # child op id -> (target, source)
        try:
            while pending or active:
                if reg.get_op(self.op.op_id).terminal:
                    for child in list(active):
                        if not reg.get_op(child).terminal:
                            await self.head.dispatcher.cancel(child, "replication cancelled")
                    return
                await self._start_some(pending, active)
                self._progress(len(targets))
                if not active:
                    if pending and (self._sources_coming() or self._reconnecting(pending)):
                        # The seed copy has not sent its first bytes yet, or an agent this needs
                        # is reconnecting (restarted, or this head was).
                        await asyncio.sleep(0.1)
                        continue
                    break
                await self._wait_any(active, 0.1 if pending else 5.0)
                await self._give_up_on_lost_targets(active)
                for child in [c for c in active if reg.get_op(c).terminal]:
                    target, source = active.pop(child)
                    if source:
                        self.load[source] -= 1
                    self._settle(reg.get_op(child), target, source, pending)
        except asyncio.CancelledError:
            raise  # the head is stopping: the op stays open and resumes after the restart
        except Exception:
            log.exception("replication %s failed", self.op.op_id)
        self._finish(targets)

    async def _give_up_on_lost_targets(self, active: dict[str, tuple[str, str]]) -> None:
        """A target whose node went offline is not waited for: the rest carries on without it."""
        reg = self.head.registry
        for child, (target, _) in list(active.items()):
            node = reg.nodes.get(target.partition(":")[0])
            if node is not None and node.status == "offline" and not reg.get_op(child).terminal:
                await self.head.dispatcher.cancel(
                    child, f"node {node.node_id} went offline during replication"
                )

    def _online(self, device: str) -> bool:
        """The device's node counts as online (it may be reconnecting, within its grace)."""
        node = self.head.registry.nodes.get(device.partition(":")[0])
        return node is not None and node.status == "online"

    def _connected(self, device: str) -> bool:
        """The device's node has a live agent connection: it can take an op or serve peers."""
        return device.partition(":")[0] in self.head.agents

    def _reconnecting(self, pending: collections.deque[str]) -> bool:
        """A pending target, or a holder, is online but has no agent connection yet: worth
        waiting for (a node that does not come back goes offline, which ends the wait)."""
        devices = [*pending, *self._holders()]
        return any(self._online(d) and not self._connected(d) for d in devices)

    def _sources_coming(self) -> bool:
        reg = self.head.registry
        return any(incoming(reg, self.model, loc.device) for loc in reg.model_locations(self.model))

    def _ready(self, device: str) -> bool:
        return is_ready(self.head.registry, self.model, device)

    async def _start_some(self, pending: collections.deque[str], active: dict[str, tuple[str, str]]) -> None:
        busy_nodes = {t.partition(":")[0] for t, _ in active.values()}
        for _ in range(len(pending)):
            target = pending.popleft()
            node = target.partition(":")[0]
            running = self.head.registry.open_writer(self.model, target)
            if running is not None:
                # Already being written (the seed download, another request): follow that op;
                # it takes no holder's slot.
                active[running.op_id] = (target, "")
                busy_nodes.add(node)
                continue
            if not self._online(target):
                self.results[target] = TargetOutcome(state="failed", error=f"node {node} is offline")
                continue
            holders = [h for h in self._holders() if h != target]
            sources = [
                h
                for h in holders
                if self.load[h] < self.fanout
                and h not in self.failed_sources[target]
                and (h.partition(":")[0] == node or self._connected(h))  # a peer must serve now
                and not (
                    h.partition(":")[0] == node and not self._ready(h)
                )  # a local copy needs a whole source
            ]
            if not any(h not in self.failed_sources[target] for h in holders):
                if self._sources_coming():
                    pending.append(target)  # a copy on its way will be able to serve it
                    continue
                error = "every holder failed to serve it" if holders else "no copy on an online node"
                self.results[target] = TargetOutcome(state="failed", error=error)
                continue
            if node in busy_nodes or not sources or not self._connected(target):
                pending.append(target)
                continue
            # A copy on the target's own node is a local copy, not a network transfer.
            source = next((h for h in sources if h.partition(":")[0] == node), sources[0])
            try:
                child = await self._fetch(target, source)
            except GswarmError as exc:
                self.results[target] = TargetOutcome(state="failed", error=exc.message)
                continue
            if child.terminal:
                self._settle(child, target, source, pending)
                continue
            active[child.op_id] = (target, source)
            self.load[source] += 1
            busy_nodes.add(node)

    async def _fetch(self, target: str, source: str) -> Op:
        head = self.head
        dev = parse_device(target)
        running = head.registry.open_writer(self.model, target)
        if running is not None:
            return running
        src = parse_device(source)
        mark = marking(head, self.model, target, "copying")
        if src.node == dev.node:
            local = CopyArgs(
                model_name=self.model, source_tier=src.tier, target_tier=dev.tier, parent_op=self.op.op_id
            )
            return await head.dispatcher.submit(dev.node, local, None, mark)
        fetch = FetchArgs(
            model_name=self.model,
            tier=dev.tier,
            peers=peer_sources(head, self.model, dev.node, first=source),
            bandwidth_limit=self.bandwidth,
            source_device=source,
            parent_op=self.op.op_id,
        )
        return await head.dispatcher.submit(dev.node, fetch, None, mark)

    async def _wait_any(self, active: dict[str, tuple[str, str]], timeout: float) -> None:
        """Until a fetch ends, or `timeout` passes (a target that has started receiving may
        feed the next one: look again soon while targets wait)."""
        waiters = [self.head.op_waiter(child) for child in active]
        waiters.append(self.head.op_waiter(self.op.op_id))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED, timeout=timeout)
        finally:
            for w in waiters:
                if not w.done():
                    w.cancel()

    def _settle(self, child: Op, target: str, source: str, pending: collections.deque[str]) -> None:
        if child.state == "succeeded":
            result = child.result
            peer = result.from_peer if isinstance(result, FetchResult) else ""
            self.results[target] = TargetOutcome(
                state="succeeded",
                op_id=child.op_id,
                source=peer or source or str(getattr(child.args, "source_url", "")),
                seconds=round((child.finished_at or 0) - (child.started_at or child.created_at), 3),
            )
            return
        self.attempts[target] += 1
        if source:
            self.failed_sources[target].add(source)
        message = child.error.message if child.error else child.state
        if child.state == "cancelled" or self.attempts[target] >= MAX_ATTEMPTS:
            self.results[target] = TargetOutcome(state="failed", op_id=child.op_id, error=message)
        else:
            pending.append(target)

    def _progress(self, total: int) -> None:
        done = sum(1 for r in self.results.values() if r.state == "succeeded")
        progress = OpProgress(done=done, total=total, message=f"{done}/{total} targets ready")
        op = self.head.registry.ops[self.op.op_id]
        if op.progress.done != done or not op.progress.total:
            self.head.commit(self.head.registry.op_progress(self.op.op_id, progress))

    def _finish(self, targets: list[str]) -> None:
        reg = self.head.registry
        for t in targets:
            self.results.setdefault(t, TargetOutcome(state="failed", error="not attempted"))
        self._progress(len(targets))
        failed = [t for t, r in self.results.items() if r.state != "succeeded"]
        result = ReplicateResult(targets=self.results)
        events: list[Event]
        if failed:
            error = OpError(
                "replication_incomplete",
                f"{len(failed)} of {len(targets)} targets failed: {', '.join(failed)}",
            )
            events = reg.op_finished(self.op.op_id, "failed", result=result, error=error)
        else:
            events = reg.op_finished(self.op.op_id, "succeeded", result=result)
        self.head.commit(events)


def resume(head: Head) -> None:
    """After a restart: pick up the coordinators of replications that had not ended."""
    for op in head.registry.open_ops(HEAD_NODE):
        if op.kind == "replicate":
            head.spawn(Replication(head, op).run(), name=f"replicate-{op.op_id}")


def setup(app: web.Application) -> None:
    """Attach the replicate route; replications a restart interrupted resume at start-up."""
    head = app[HEAD_KEY]
    head.on_started.append(lambda: resume(head))
    app.router.add_post("/replicate", replicate)
