"""Runs ops on the agent: one task per op, cancellation, coalesced progress, an outbox of final
results that lives until the head acknowledges them, and a two-stage stop.

The executor knows no op kind: it decodes a command's args by kind (`gswarm.ops`) and hands
them to the agent's handler table (`agent.handlers.run_op`), which it is given.

Stopping (SIGTERM, Ctrl-C) happens in two stages, as arq and Kubernetes do: first no new op is
taken, then the running ones are cancelled as a *shutdown*: their handlers keep what they have
written (partial copies and resume state stay on disk) and no result is sent, so the head keeps
the op open and hands it to the agent's next run, which resumes. Only a user's cancel (or the
head's timeout) throws unfinished work away. A stop never loses more than a crash.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from gswarm.agent.context import OpContext, Reply
from gswarm.errors import GswarmError, expected
from gswarm.ops import OpArgs, OpResult, UnknownKind, decode_args
from gswarm.protocol import (
    Accepted,
    AgentMessage,
    Command,
    Failed,
    OpError,
    Succeeded,
    encode,
)

if TYPE_CHECKING:
    from gswarm.agent.main import Agent

log = logging.getLogger(__name__)

RunOp = Callable[[OpContext, OpArgs], Awaitable[OpResult | Reply]]
"""The handler table: runs one op's typed args, returns its typed result."""

STOP_GRACE = 8.0
"""Seconds running ops get to checkpoint when the agent stops (the whole stop stays under 10 s)."""


class Executor:
    """Every op this agent runs or has finished but not yet had acknowledged."""

    def __init__(
        self, agent: Agent, send: Callable[[AgentMessage], None], interval: float, run_op: RunOp
    ) -> None:
        self._agent = agent
        self._send = send
        self._interval = interval
        self._run_op = run_op
        self.running: dict[str, tuple[asyncio.Task[None], OpContext]] = {}
        self.outbox: dict[str, Succeeded | Failed] = {}
        self._acked: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._ticker: asyncio.Task[None] | None = None
        self.stopping = False

    def start(self) -> None:
        """Start the progress ticker."""
        self._ticker = asyncio.create_task(self._tick(), name="progress-ticker")

    async def close(self) -> None:
        """Stop in two stages: take no new op, then let running ops checkpoint (their work stays
        to resume) and wait for them, at most `STOP_GRACE` seconds."""
        self.stopping = True
        entries = list(self.running.values())
        for task, ctx in entries:
            ctx.shutting_down = True
            task.cancel()
        tasks = [t for t, _ in entries]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for task in late:
                log.warning("op task %s did not stop within %.0f s", task.get_name(), STOP_GRACE)
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)

    def submit(self, cmd: Command) -> None:
        """Start an op, unless it is a duplicate delivery (or the agent is stopping: the head
        hands it to the next run)."""
        if self.stopping or cmd.op_id in self.running or cmd.op_id in self._acked:
            return
        if cmd.op_id in self.outbox:
            self._send(self.outbox[cmd.op_id])
            return
        ctx = OpContext(self._agent, cmd.op_id, cmd.kind, self._send)
        task = asyncio.create_task(self._run(cmd, ctx), name=f"op-{cmd.kind}-{cmd.op_id}")
        self.running[cmd.op_id] = (task, ctx)

    def cancel(self, op_id: str) -> None:
        """Stop an op's work at the user's (or the head's) word: its unfinished work goes, and its
        result says `cancelled`."""
        entry = self.running.get(op_id)
        if entry is not None:
            entry[1].user_cancelled = True
            entry[0].cancel()

    def ack(self, op_id: str) -> None:
        """The head has the result: forget it, but remember the id against re-deliveries."""
        self.outbox.pop(op_id, None)
        self._acked[op_id] = None
        while len(self._acked) > 10_000:
            self._acked.popitem(last=False)

    def resend_outbox(self) -> None:
        """After a reconnect: every result the head has not acknowledged, again."""
        for msg in list(self.outbox.values()):
            self._send(msg)

    async def _run(self, cmd: Command, ctx: OpContext) -> None:
        msg: Succeeded | Failed
        self._send(Accepted(op_id=cmd.op_id))
        deadline = asyncio.timeout(cmd.timeout or None)
        try:
            try:
                args = decode_args(cmd.kind, cmd.args)
            except UnknownKind:
                raise GswarmError(
                    f"this agent has no handler for op kind {cmd.kind!r}", code="unsupported"
                ) from None
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise GswarmError(f"invalid {cmd.kind} args: {exc}", code="bad_args") from None
            async with deadline:
                out = await self._run_op(ctx, args)
            reply = out if isinstance(out, Reply) else Reply(out)
            msg = Succeeded(
                op_id=cmd.op_id, result=msgspec.Raw(encode(reply.result)), holdings=reply.holdings
            )
        except asyncio.CancelledError:
            if ctx.shutting_down and not ctx.user_cancelled:
                # The op stays open on the head, which hands it to the next run: no result.
                self.running.pop(cmd.op_id, None)
                raise
            log.info("op %s (%s) cancelled", cmd.op_id, cmd.kind)
            msg = Failed(op_id=cmd.op_id, error=OpError("cancelled", "cancelled"))
        except Exception as exc:
            msg = self._failed(cmd, ctx, exc, timed_out=isinstance(exc, TimeoutError) and deadline.expired())
        if ctx.dirty:
            self._send(ctx.snapshot())
        self.running.pop(cmd.op_id, None)
        self.outbox[cmd.op_id] = msg
        self._send(msg)

    def _failed(self, cmd: Command, ctx: OpContext, exc: Exception, timed_out: bool) -> Failed:
        """The result of an op that raised `exc`, logged in one line when the failure is one the
        world causes (`errors.expected`: a source unreachable, no space, bad args...), with its
        traceback only when it is a bug."""
        if timed_out:
            log.warning("op %s (%s) timed out after %g s", cmd.op_id, cmd.kind, cmd.timeout)
            return Failed(op_id=cmd.op_id, error=OpError("timed_out", f"timed out after {cmd.timeout:g} s"))
        error = expected(exc)
        if error is None:
            log.exception("op %s (%s) failed unexpectedly", cmd.op_id, cmd.kind)
            error = GswarmError(f"{type(exc).__name__}: {exc}")
        else:
            log.warning("op %s (%s) failed: %s: %s", cmd.op_id, cmd.kind, error.code, error.message)
        return Failed(op_id=cmd.op_id, error=OpError(error.code, error.message), partial=ctx.partial)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for _, ctx in list(self.running.values()):
                if ctx.dirty or (ctx.progress_source is not None and ctx.progress_source() != ctx.done):
                    self._send(ctx.snapshot())
