"""Runs ops on the agent: one task per op, cancellation, coalesced progress, and an outbox
of final results that lives until the head acknowledges them.

An op kind is one async handler registered with `@op_handler("kind")`; it gets an
`OpContext` (for progress and the agent's parts) and the op's args, and returns its result.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gswarm.errors import GswarmError
from gswarm.protocol import (
    Accepted,
    AgentMessage,
    Command,
    Failed,
    Holding,
    OpError,
    Progress,
    Succeeded,
)

if TYPE_CHECKING:
    from gswarm.agent.main import Agent

log = logging.getLogger(__name__)


class OpResult:
    """What a handler may return besides its result dict: fresh holdings for the head."""

    def __init__(self, result: dict[str, Any], holdings: list[Holding] | None = None) -> None:
        self.result = result
        self.holdings = holdings


Handler = Callable[["OpContext", dict[str, Any]], Awaitable[dict[str, Any] | OpResult]]
HANDLERS: dict[str, Handler] = {}


def op_handler(kind: str) -> Callable[[Handler], Handler]:
    """Register the agent-side handler of an op kind."""

    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return register


class OpContext:
    """Handed to a handler: the op's identity, the agent, and progress reporting."""

    def __init__(
        self, agent: Agent, op_id: str, kind: str, send: Callable[[AgentMessage], None] | None = None
    ) -> None:
        self.agent = agent
        self._send = send
        self.op_id = op_id
        self.kind = kind
        self.done = 0
        self.total = 0
        self.message = ""
        self.dirty = False
        self.peer = ""
        """The node a copy came from, when it came from a peer."""
        self.progress_source: Callable[[], int] | None = None
        """Set by handlers whose worker threads count bytes; polled on every tick."""
        self._rate_mark: tuple[float, int] = (time.monotonic(), 0)
        self.rate = 0.0

    def progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Record progress; the executor sends it, coalesced, at most every interval. A new
        phase (a new message) goes out at once, so even a short phase is seen."""
        self.done = done
        if total is not None:
            self.total = total
        self.dirty = True
        if message is not None and message != self.message:
            self.message = message
            if self._send is not None:
                self._send(self.snapshot())

    def snapshot(self) -> Progress:
        """The progress message to send now, with a smoothed rate."""
        if self.progress_source is not None:
            self.done = self.progress_source()
        now = time.monotonic()
        t0, d0 = self._rate_mark
        if now - t0 >= 0.5:
            inst = (self.done - d0) / (now - t0)
            self.rate = inst if self.rate == 0 else 0.5 * self.rate + 0.5 * inst
            self._rate_mark = (now, self.done)
        self.dirty = False
        return Progress(
            op_id=self.op_id,
            done=self.done,
            total=self.total,
            rate=round(self.rate, 1),
            message=self.message,
        )


class Executor:
    """Every op this agent runs or has finished but not yet had acknowledged."""

    def __init__(self, agent: Agent, send: Callable[[AgentMessage], None], interval: float):
        self._agent = agent
        self._send = send
        self._interval = interval
        self.running: dict[str, tuple[asyncio.Task[None], OpContext]] = {}
        self.outbox: dict[str, Succeeded | Failed] = {}
        self._acked: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the progress ticker."""
        self._ticker = asyncio.create_task(self._tick(), name="progress-ticker")

    async def close(self) -> None:
        """Cancel every op and the ticker, and wait for them."""
        tasks = [t for t, _ in self.running.values()]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, cmd: Command) -> None:
        """Start an op, unless it is a duplicate delivery."""
        if cmd.op_id in self.running or cmd.op_id in self._acked:
            return
        if cmd.op_id in self.outbox:
            self._send(self.outbox[cmd.op_id])
            return
        ctx = OpContext(self._agent, cmd.op_id, cmd.kind, self._send)
        task = asyncio.create_task(self._run(cmd, ctx), name=f"op-{cmd.kind}-{cmd.op_id}")
        self.running[cmd.op_id] = (task, ctx)

    def cancel(self, op_id: str) -> None:
        """Stop an op's work (its result says `cancelled`)."""
        entry = self.running.get(op_id)
        if entry is not None:
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
        try:
            handler = HANDLERS.get(cmd.kind)
            if handler is None:
                raise GswarmError(f"this agent has no handler for op kind {cmd.kind!r}", code="unsupported")
            coro = handler(ctx, cmd.args)
            out = await (asyncio.wait_for(coro, cmd.timeout) if cmd.timeout else coro)
            if isinstance(out, OpResult):
                msg = Succeeded(op_id=cmd.op_id, result=out.result, holdings=out.holdings)
            else:
                msg = Succeeded(op_id=cmd.op_id, result=out)
        except asyncio.CancelledError:
            msg = Failed(op_id=cmd.op_id, error=OpError("cancelled", "cancelled"))
        except TimeoutError:
            msg = Failed(op_id=cmd.op_id, error=OpError("timed_out", f"timed out after {cmd.timeout:g} s"))
        except GswarmError as exc:
            msg = Failed(op_id=cmd.op_id, error=OpError(exc.code, exc.message))
        except Exception as exc:
            log.exception("op %s (%s) failed", cmd.op_id, cmd.kind)
            msg = Failed(op_id=cmd.op_id, error=OpError("internal", f"{type(exc).__name__}: {exc}"))
        if ctx.dirty:
            self._send(ctx.snapshot())
        self.running.pop(cmd.op_id, None)
        self.outbox[cmd.op_id] = msg
        self._send(msg)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for _, ctx in list(self.running.values()):
                if ctx.dirty or (ctx.progress_source is not None and ctx.progress_source() != ctx.done):
                    self._send(ctx.snapshot())
