"""Op delivery: cancel, timeouts, at-least-once delivery and the outbox across disconnects."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gswarm.agent.executor import OpContext, op_handler
from gswarm.client import GswarmClient
from gswarm.config import Settings
from gswarm.errors import Conflict
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, wait_for

# A test-only op kind, registered through the same mechanism as the built-in ones: it
# reports progress and waits until the test opens its gate.
GATES: dict[str, asyncio.Event] = {}
STARTS: dict[str, int] = {}


@op_handler("test.gate")
async def gate_op(ctx: OpContext, args: dict[str, Any]) -> dict[str, Any]:
    name = args["gate"]
    STARTS[name] = STARTS.get(name, 0) + 1
    gate = GATES.setdefault(name, asyncio.Event())
    ctx.progress(1, 2, "waiting at the gate")
    await gate.wait()
    ctx.progress(2, 2, "through")
    return {"gate": name}


@pytest.fixture(autouse=True)
def _fresh_gates() -> None:
    GATES.clear()
    STARTS.clear()


async def test_progress_then_success(head: HeadServer, agents: AgentRunner, client: GswarmClient) -> None:
    await agents.start(head, "w1")
    op = await head.head.dispatcher.submit("test.gate", "w1", {"gate": "a"})
    running = await wait_for(
        lambda: head.head.registry.ops[op.op_id].progress.message == "waiting at the gate"
    )
    assert running
    assert (await client.get_op(op.op_id)).state == "running"
    GATES["a"].set()
    final = await client.wait_op(op.op_id, timeout=10)
    assert final.state == "succeeded" and final.result == {"gate": "a"}
    assert final.progress.done == 2


async def test_cancel_stops_the_work(head: HeadServer, agents: AgentRunner, client: GswarmClient) -> None:
    agent = await agents.start(head, "w1")
    op = await head.head.dispatcher.submit("test.gate", "w1", {"gate": "c"})
    await wait_for(lambda: op.op_id in agent.executor.running)
    cancelled = await client.cancel_op(op.op_id)
    assert cancelled.state == "cancelled"
    await wait_for(lambda: op.op_id not in agent.executor.running, timeout=5)
    await wait_for(lambda: not agent.executor.outbox, timeout=5)  # the head acked the result
    assert (await client.get_op(op.op_id)).state == "cancelled"
    with pytest.raises(Conflict):
        await client.cancel_op(op.op_id)


async def test_op_timeout_fails_and_stops_the_agent(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    agent = await agents.start(head, "w1")
    op = await head.head.dispatcher.submit("test.gate", "w1", {"gate": "t"}, timeout=0.5)
    final = await client.wait_op(op.op_id, timeout=10)
    assert final.state == "failed" and final.error is not None
    assert final.error.code == "timed_out"
    await wait_for(lambda: op.op_id not in agent.executor.running, timeout=5)


async def test_unknown_op_kind_fails_cleanly(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    await agents.start(head, "w1")
    op = await head.head.dispatcher.submit("no.such.kind", "w1", {})
    final = await client.wait_op(op.op_id, timeout=10)
    assert final.state == "failed" and final.error is not None and final.error.code == "unsupported"


async def test_op_finished_while_disconnected_is_reported_after_reconnect(
    tmp_path: Path, settings: Settings, agents: AgentRunner
) -> None:
    """Stop the head while an op runs, let the op finish, start the head again on the same
    port and state dir: the agent (never restarted) reconnects and its outbox delivers."""
    first = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await first.start()
    port = first.port
    agent = await agents.start(first, "w1")
    op = await first.head.dispatcher.submit("test.gate", "w1", {"gate": "d"})
    await wait_for(lambda: first.head.registry.ops[op.op_id].state == "running")
    await first.stop()
    await wait_for(lambda: not agent.session.connected.is_set(), timeout=5)

    GATES["d"].set()
    await wait_for(lambda: op.op_id in agent.executor.outbox, timeout=5)

    second = HeadServer(tmp_path / "state", "127.0.0.1", port, settings)
    await second.start()
    try:
        # Restarted head: the op is known (from SQLite) and still open until the agent reports.
        assert second.head.registry.ops[op.op_id].kind == "test.gate"
        async with GswarmClient(second.url, second.head.tokens.api_token) as c:
            final = await c.wait_op(op.op_id, timeout=15)
            assert final.state == "succeeded" and final.result == {"gate": "d"}
            assert (await c.get_node("w1")).status == "online"
        assert STARTS["d"] == 1  # finished once, not run again
        await wait_for(lambda: not agent.executor.outbox, timeout=5)
    finally:
        await second.stop()


async def test_queued_op_is_delivered_when_agent_returns_to_restarted_head(
    tmp_path: Path, settings: Settings, agents: AgentRunner
) -> None:
    """An op the agent lost (its process restarted) is sent again: at-least-once."""
    head = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await head.start()
    try:
        await agents.start(head, "w1")
        op = await head.head.dispatcher.submit("test.gate", "w1", {"gate": "r"})
        await wait_for(lambda: STARTS.get("r") == 1)
        await agents.stop("w1")  # the agent process dies with the op
        GATES["r"].set()
        await agents.start(head, "w1")  # a new agent process on the same node
        async with GswarmClient(head.url, head.head.tokens.api_token) as c:
            final = await c.wait_op(op.op_id, timeout=15)
        assert final.state == "succeeded"
        assert STARTS["r"] == 2 and head.head.registry.ops[op.op_id].attempts == 2
    finally:
        await head.stop()


async def test_ended_ops_beyond_the_limit_are_forgotten(tmp_path: Path, agents: AgentRunner) -> None:
    from tests.conftest import fast_settings

    settings = fast_settings(ops_kept=5)
    head = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await head.start()
    try:
        await agents.start(head, "w1")
        async with GswarmClient(head.url, head.head.tokens.api_token) as c:
            ids = [(await c.probe("w1", wait=True)).op_id for _ in range(12)]
            await wait_for(lambda: len(head.head.registry.ops) <= 5, timeout=5)
            kept = [op.op_id for op in await c.list_ops()]
            assert kept and set(kept) <= set(ids[-5:])  # the newest stay
    finally:
        await head.stop()
    again = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await again.start()
    try:
        assert len(again.head.registry.ops) <= 5
    finally:
        await again.stop()
