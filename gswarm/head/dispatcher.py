"""Ops from the registry to the agents and back: submit, deliver, track, cancel, time out.

Adding an op kind takes one handler on the agent and one route on the head; when the
kind's result changes the registry (a new location, fresh inventory), the route also
registers a result hook here with `on_result`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gswarm.errors import Conflict
from gswarm.protocol import (
    Accepted,
    Ack,
    Cancel,
    Command,
    Event,
    Failed,
    Op,
    OpError,
    OpProgress,
    Progress,
    Succeeded,
)

if TYPE_CHECKING:
    from gswarm.head.app import Head

log = logging.getLogger(__name__)

ResultHook = Callable[[Op, Succeeded | Failed], list[Event]]


class Dispatcher:
    """Owns the life of every op once created."""

    def __init__(self, head: Head) -> None:
        self._head = head
        self._hooks: dict[str, ResultHook] = {}

    def on_result(self, kind: str, hook: ResultHook) -> None:
        """Call `hook` when an op of `kind` ends on its agent; its events are committed."""
        self._hooks[kind] = hook

    def require_online(self, node_id: str) -> None:
        """Conflict `node_offline` unless the node has a live agent connection."""
        node = self._head.registry.get_node(node_id)
        if node.status != "online" or self._head.agents.get(node_id) is None:
            raise Conflict(
                f"node {node_id!r} is offline: no agent connected, nothing was queued",
                code="node_offline",
                details={"node_id": node_id, "status": node.status},
            )

    async def submit(
        self,
        kind: str,
        node_id: str,
        args: dict[str, Any],
        timeout: float | None = None,
        on_created: Callable[[Op], list[Event]] | None = None,
    ) -> Op:
        """Create an op for an online node and push it to its agent at once. `on_created`
        records what the op is about to change (a location being written) before it can end."""
        self.require_online(node_id)
        op, events = self._head.registry.create_op(
            kind, node_id, args, timeout or self._head.settings.op_timeout
        )
        if on_created is not None:
            events.extend(on_created(op))
        self._head.commit(events)
        await self._deliver(op)
        return op

    async def _deliver(self, op: Op) -> None:
        conn = self._head.agents.get(op.node_id)
        if conn is None:
            return  # re-sent when the agent comes back
        self._head.registry.op_sent(op.op_id)
        await conn.send(Command(op_id=op.op_id, kind=op.kind, args=op.args, timeout=op.timeout))

    async def cancel(self, op_id: str, reason: str = "cancelled by request") -> Op:
        """Cancel an op: recorded at once, and the agent told to stop its work."""
        op = self._head.registry.get_op(op_id)
        if op.terminal:
            raise Conflict(
                f"op {op_id} has already ended ({op.state})",
                code="op_finished",
                details={"state": op.state},
            )
        self._finish(op, Failed(op_id=op_id, error=OpError(code="cancelled", message=reason)))
        conn = self._head.agents.get(op.node_id)
        if conn is not None:
            await conn.send(Cancel(op_id=op_id))
        return op

    async def agent_ready(self, node_id: str, running: list[str], finished: list[str]) -> None:
        """After a Hello: re-send what the agent lost, cancel what it should no longer run."""
        reg = self._head.registry
        conn = self._head.agents.get(node_id)
        if conn is None:
            return
        known = set(running) | set(finished)
        for op in reg.open_ops(node_id):
            if op.op_id not in known:
                await self._deliver(op)
        for op_id in running:
            known_op = reg.ops.get(op_id)
            if known_op is None or known_op.terminal:
                await conn.send(Cancel(op_id=op_id))

    async def handle(self, node_id: str, msg: Accepted | Progress | Succeeded | Failed) -> None:
        """Apply one op message from an agent."""
        reg = self._head.registry
        match msg:
            case Accepted(op_id=op_id):
                self._head.commit(reg.op_accepted(op_id))
            case Progress():
                progress = OpProgress(done=msg.done, total=msg.total, rate=msg.rate, message=msg.message)
                self._head.commit(reg.op_progress(msg.op_id, progress))
            case Succeeded() | Failed():
                op = reg.ops.get(msg.op_id)
                if op is not None and not op.terminal:
                    self._finish(op, msg)
                conn = self._head.agents.get(node_id)
                if conn is not None:
                    await conn.send(Ack(op_id=msg.op_id))

    def _finish(self, op: Op, msg: Succeeded | Failed) -> None:
        reg = self._head.registry
        events: list[Event] = []
        hook = self._hooks.get(op.kind)
        if hook is not None:
            try:
                events.extend(hook(op, msg))
            except Exception as exc:  # a bad report must not take the socket down
                log.exception("result hook for %s failed", op.kind)
                msg = Failed(op_id=op.op_id, error=OpError("internal", f"head: {exc}"))
        if isinstance(msg, Succeeded):
            events.extend(reg.op_finished(op.op_id, "succeeded", result=msg.result))
        else:
            state = "cancelled" if msg.error.code == "cancelled" else "failed"
            events.extend(reg.op_finished(op.op_id, state, error=msg.error))
        self._head.commit(events)

    async def sweep(self) -> None:
        """Fail ops past their deadline (and tell their agents to stop)."""
        now = time.time()
        for op in self._head.registry.open_ops():
            if op.timeout and now - op.created_at > op.timeout:
                error = OpError("timed_out", f"op did not finish within {op.timeout:g} s")
                self._finish(op, Failed(op_id=op.op_id, error=error))
                conn = self._head.agents.get(op.node_id)
                if conn is not None:
                    await conn.send(Cancel(op_id=op.op_id))

    async def wait(self, op_id: str, timeout: float) -> Op:
        """Wait until an op ends (or `timeout` passes) and return it."""
        op = self._head.registry.get_op(op_id)
        if op.terminal:
            return op
        fut = self._head.op_waiter(op_id)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            pass
        return self._head.registry.get_op(op_id)
