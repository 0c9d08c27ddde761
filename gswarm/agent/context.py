"""What a handler gets for one op: the op's identity, the agent's parts, progress reporting,
and whether a cancellation is the user's (the copy goes) or a shutdown's (it stays to resume)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gswarm.ops import OpResult
from gswarm.protocol import AgentMessage, Holding, Progress

if TYPE_CHECKING:
    from gswarm.agent.main import Agent


@dataclass
class Reply:
    """A handler's result, with fresh holdings for the head when the op changed them."""

    result: OpResult
    holdings: list[Holding] | None = None


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
        self.user_cancelled = False
        """Cancelled by the user (or the head's timeout): unfinished work is thrown away."""
        self.shutting_down = False
        """Cancelled because the agent stops: unfinished work stays on disk to resume."""
        self.partial: Holding | None = None
        """Set by a write that failed and kept its unfinished copy; sent with the failure."""

    @property
    def keep_partial(self) -> bool:
        """True unless the user cancelled: a stop must never lose more than a crash."""
        return not self.user_cancelled

    def progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Record progress; the executor sends it, coalesced, at most every interval. A new
        phase (a new message) goes out at once, so even a short phase is seen, and starts its
        rate afresh: bytes a resumed download already had are not counted as moved now."""
        self.done = done
        if total is not None:
            self.total = total
        self.dirty = True
        if message is not None and message != self.message:
            self.message = message
            self._rate_mark = (time.monotonic(), done)
            self.rate = 0.0
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
