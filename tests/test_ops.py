"""Op delivery: cancel, timeouts, at-least-once delivery and the outbox across disconnects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from gswarm.agent.context import OpContext, Reply
from gswarm.agent.executor import Executor
from gswarm.agent.handlers import run_op
from gswarm.client import GswarmClient
from gswarm.config import Settings
from gswarm.errors import Conflict
from gswarm.head.app import HeadServer
from gswarm.ops import HealthCheckArgs, HealthCheckResult, OpArgs, OpResult
from gswarm.protocol import Command
from tests.conftest import AgentRunner, wait_for

# The agents here run the real handler table, wrapped: a health check of service "gate:NAME"
# reports progress and waits until the test opens its gate; every other op runs as usual.
GATES: dict[str, asyncio.Event] = {}
STARTS: dict[str, int] = {}


async def gated(ctx: OpContext, args: OpArgs) -> OpResult | Reply:
    if not (isinstance(args, HealthCheckArgs) and args.service_id.startswith("gate:")):
        return await run_op(ctx, args)
    name = args.service_id[5:]
    STARTS[name] = STARTS.get(name, 0) + 1
    gate = GATES.setdefault(name, asyncio.Event())
    ctx.progress(1, 2, "waiting at the gate")
    await gate.wait()
    ctx.progress(2, 2, "through")
    return HealthCheckResult(healthy=True, service_id=args.service_id)


def gate(name: str) -> HealthCheckArgs:
    return HealthCheckArgs(service_id=f"gate:{name}")


@pytest.fixture(autouse=True)
def _fresh_gates() -> None:
    GATES.clear()
    STARTS.clear()


async def test_progress_then_success(head: HeadServer, agents: AgentRunner, client: GswarmClient) -> None:
    await agents.start(head, "w1", run_op=gated)
    op = await head.head.dispatcher.submit("w1", gate("a"))
    running = await wait_for(
        lambda: head.head.registry.ops[op.op_id].progress.message == "waiting at the gate"
    )
    assert running
    assert (await client.get_op(op.op_id)).state == "running"
    GATES["a"].set()
    final = await client.wait_op(op.op_id, timeout=10)
    assert final.state == "succeeded" and final.result == HealthCheckResult(healthy=True, service_id="gate:a")
    assert final.progress.done == 2


async def test_cancel_stops_the_work(head: HeadServer, agents: AgentRunner, client: GswarmClient) -> None:
    agent = await agents.start(head, "w1", run_op=gated)
    op = await head.head.dispatcher.submit("w1", gate("c"))
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
    agent = await agents.start(head, "w1", run_op=gated)
    op = await head.head.dispatcher.submit("w1", gate("t"), timeout=0.5)
    final = await client.wait_op(op.op_id, timeout=10)
    assert final.state == "failed" and final.error is not None
    assert final.error.code == "timed_out"
    await wait_for(lambda: op.op_id not in agent.executor.running, timeout=5)


async def test_unknown_op_kind_or_bad_args_fail_cleanly(head: HeadServer, agents: AgentRunner) -> None:
    """A command from a newer (or hostile) head: an unknown kind, or args that don't fit."""
    agent = agents.make(head.url, head.head.tokens.join_token, "w1")
    sent: list[object] = []
    executor = Executor(agent, sent.append, 0.1, run_op)
    executor.submit(Command(op_id="k1", kind="no.such.kind", args=msgspec.Raw(b"{}")))
    executor.submit(Command(op_id="k2", kind="logs", args=msgspec.Raw(b'{"lines": "many"}')))
    await wait_for(lambda: {"k1", "k2"} <= set(executor.outbox))
    codes = {k: executor.outbox[k].error.code for k in ("k1", "k2")}
    assert codes == {"k1": "unsupported", "k2": "bad_args"}
    assert [type(m).__name__ for m in sent].count("Failed") == 2


async def test_op_finished_while_disconnected_is_reported_after_reconnect(
    tmp_path: Path, settings: Settings, agents: AgentRunner
) -> None:
    """Stop the head while an op runs, let the op finish, start the head again on the same
    port and state dir: the agent (never restarted) reconnects and its outbox delivers."""
    first = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await first.start()
    port = first.port
    agent = await agents.start(first, "w1", run_op=gated)
    op = await first.head.dispatcher.submit("w1", gate("d"))
    await wait_for(lambda: first.head.registry.ops[op.op_id].state == "running")
    await first.stop()
    await wait_for(lambda: not agent.session.connected.is_set(), timeout=5)

    GATES["d"].set()
    await wait_for(lambda: op.op_id in agent.executor.outbox, timeout=5)

    second = HeadServer(tmp_path / "state", "127.0.0.1", port, settings)
    await second.start()
    try:
        # Restarted head: the op is known (from SQLite) and still open until the agent reports.
        assert second.head.registry.ops[op.op_id].kind == "health_check"
        async with GswarmClient(second.url, second.head.tokens.api_token) as c:
            final = await c.wait_op(op.op_id, timeout=15)
            assert final.state == "succeeded"
            assert final.result == HealthCheckResult(healthy=True, service_id="gate:d")
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
        await agents.start(head, "w1", run_op=gated)
        op = await head.head.dispatcher.submit("w1", gate("r"))
        await wait_for(lambda: STARTS.get("r") == 1)
        await agents.stop("w1")  # the agent process dies with the op
        GATES["r"].set()
        await agents.start(head, "w1", run_op=gated)  # a new agent process on the same node
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
        await agents.start(head, "w1", run_op=gated)
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
