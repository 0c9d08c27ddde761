"""Ops from the registry to the agents and back: submit, deliver, track, cancel, time out.

An op kind's args and result are typed in `gswarm.ops`; what its result changes in the
registry (a new location, fresh inventory) is its result hook, one entry of the table the
head is built with (`head.results.RESULT_HOOKS`). An agent's result that does not decode as
its kind's Result fails the op with `bad_result`; it never reaches a hook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from gswarm.errors import Conflict
from gswarm.ops import Op, OpArgs, OpResult, UnknownKind, decode_result
from gswarm.protocol import (
    Accepted,
    Ack,
    Cancel,
    Command,
    Event,
    Failed,
    Holding,
    OpError,
    OpProgress,
    Progress,
    Succeeded,
    encode,
)
from gswarm.states import OpState

if TYPE_CHECKING:
    from gswarm.head.state import Head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How an op ended: its typed result, or its error; fresh holdings when the agent sent them."""

    result: OpResult | None = None
    error: OpError | None = None
    holdings: list[Holding] | None = None
    partial: Holding | None = None
    """What a failed write left on its node (kept to resume)."""

    @property
    def ok(self) -> bool:
        """True when the op succeeded."""
        return self.error is None


ResultHook = Callable[["Head", Op, Outcome], list[Event]]
"""What an op's ending changes in the registry; its events are committed with the ending."""


class Dispatcher:
    """Owns the life of every op once created."""

    def __init__(self, head: Head, hooks: dict[str, ResultHook]) -> None:
        self._head = head
        self._hooks = hooks

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
        node_id: str,
        args: OpArgs,
        timeout: float | None = None,
        on_created: Callable[[Op], list[Event]] | None = None,
    ) -> Op:
        """Create an op for an online node and push it to its agent at once. `on_created`
        records what the op is about to change (a location being written) before it can end."""
        self.require_online(node_id)
        op, events = self._head.registry.create_op(node_id, args, timeout or self._head.settings.op_timeout)
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
        raw = msgspec.Raw(encode(op.args))
        await conn.send(Command(op_id=op.op_id, kind=op.kind, args=raw, timeout=op.timeout))

    async def cancel(self, op_id: str, reason: str = "cancelled by request") -> Op:
        """Cancel an op: recorded at once, and the agent told to stop its work."""
        op = self._head.registry.get_op(op_id)
        if op.terminal:
            raise Conflict(
                f"op {op_id} has already ended ({op.state})",
                code="op_finished",
                details={"state": op.state},
            )
        self.finish(op, Outcome(error=OpError(code="cancelled", message=reason)))
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
                if op is not None and not op.terminal and op.node_id == node_id:
                    self.finish(op, self._outcome(op, msg))
                # The agent forgets a result once acknowledged: only a committed one may be.
                self._head.spawn(self._ack_when_stored(node_id, msg.op_id), name="ack")

    async def _ack_when_stored(self, node_id: str, op_id: str) -> None:
        await self._head.store.flushed()
        conn = self._head.agents.get(node_id)
        if conn is not None:
            await conn.send(Ack(op_id=op_id))

    @staticmethod
    def _outcome(op: Op, msg: Succeeded | Failed) -> Outcome:
        if isinstance(msg, Failed):
            return Outcome(error=msg.error, holdings=msg.holdings, partial=msg.partial)
        try:
            return Outcome(result=decode_result(op.kind, msg.result), holdings=msg.holdings)
        except (UnknownKind, msgspec.ValidationError, msgspec.DecodeError) as exc:
            return Outcome(error=OpError("bad_result", f"the agent's result does not fit a {op.kind}: {exc}"))

    def finish(self, op: Op, outcome: Outcome) -> None:
        """End an op (its hook's registry changes committed with it); a second ending is ignored."""
        reg = self._head.registry
        if op.terminal:
            return
        events: list[Event] = []
        hook = self._hooks.get(op.kind)
        if hook is not None:
            try:
                events.extend(hook(self._head, op, outcome))
            except Exception as exc:  # a bad report must not take the socket down
                log.exception("result hook for %s failed", op.kind)
                outcome = Outcome(error=OpError("internal", f"head: {exc}"))
        if outcome.error is None:
            events.extend(reg.op_finished(op.op_id, "succeeded", result=outcome.result))
        else:
            state: OpState = "cancelled" if outcome.error.code == "cancelled" else "failed"
            events.extend(reg.op_finished(op.op_id, state, result=outcome.result, error=outcome.error))
        self._head.commit(events)

    async def sweep(self) -> None:
        """Fail ops past their deadline (and tell their agents to stop)."""
        now = time.time()
        for op in self._head.registry.open_ops():
            if op.timeout and now - op.created_at > op.timeout:
                error = OpError("timed_out", f"op did not finish within {op.timeout:g} s")
                self.finish(op, Outcome(error=error))
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
