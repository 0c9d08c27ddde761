"""What a hostile agent (or head) cannot do: flood the head with heartbeats or huge reports,
claim copies outside its tiers, grow the event log without end, stall a transfer that was told
to stop; partial copies are visible and removable; one head per state dir."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from gswarm.head.state import StateDirInUse
from gswarm.ops import DownloadArgs
from gswarm.protocol import Notice
from tests.conftest import AgentRunner, Cli, fast_settings, wait_for

pytestmark = pytest.mark.timeout(120)


def _db_events(state_dir: Path) -> int:
    conn = sqlite3.connect(state_dir / "gswarm.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


# ---------------------------------------------------------------- flood (item 5)


async def test_event_log_keeps_a_window(tmp_path: Path) -> None:
    settings = fast_settings(events_kept=100, event_ring=10, replay_page_bytes=16 << 10)
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await server.start()
    try:
        async with GswarmClient(server.url, server.head.tokens.api_token) as c:
            for i in range(400):
                await c.register_model(f"m{i}", "llm", metadata={"pad": "x" * 500})
            await wait_for(lambda: _db_events(tmp_path / "state") <= 100 + 10, timeout=10)
            # GET /events pages are bounded in bytes; paging on reaches the newest event.
            page = await c.request("GET", "/events", params={"since": "0", "limit": "10000"})
            body = json.loads(page)
            assert len(page) < 2 * (16 << 10) and body["more"] is True
            assert body["events"][0]["seq"] > 200  # the oldest are gone
            since, got = 0, 0
            while True:
                body = json.loads(await c.request("GET", "/events", params={"since": str(since)}))
                got += len(body["events"])
                if not body["more"]:
                    break
                since = body["events"][-1]["seq"]
            assert 90 <= got <= 110
            # The websocket replay pages too, and ends in order with the newest.
            seqs: list[int] = []
            async for msg in c.events(since=0):
                if isinstance(msg, Notice):
                    assert msg.code == "live"
                    break
                seqs.append(msg.seq)
            assert seqs == sorted(seqs) and seqs[-1] == server.head.bus.last_seq and len(seqs) >= 90
    finally:
        await server.stop()


async def test_event_log_forgets_old_events(tmp_path: Path) -> None:
    settings = fast_settings(events_max_age=1.0)
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await server.start()
    try:
        async with GswarmClient(server.url, server.head.tokens.api_token) as c:
            for i in range(20):
                await c.register_model(f"old{i}", "llm")
            await wait_for(lambda: _db_events(tmp_path / "state") >= 20)

            async def pruned() -> bool:
                await c.register_model(f"new{time.monotonic_ns()}", "llm")
                return _db_events(tmp_path / "state") < 10

            await wait_for(pruned, timeout=10, interval=0.3)
    finally:
        await server.stop()


# ---------------------------------------------------------------- transfers stop when told (item 6)


def _fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gswarm-fetch")]


async def test_throttled_download_stops_within_a_second_of_cancel(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    agent = await agents.start(head, "w1")
    op = await client.download("tiny", "org/tiny", "w1:disk", bandwidth_limit=64 << 10)
    await wait_for(
        lambda: head.head.registry.ops[op.op_id].progress.done > 0 and _fetch_threads(), timeout=30
    )
    t0 = time.monotonic()
    assert (await client.cancel_op(op.op_id)).state == "cancelled"
    await wait_for(lambda: not _fetch_threads() and op.op_id not in agent.executor.running, timeout=1.0)
    print(f"\nthrottled download stopped {time.monotonic() - t0:.3f} s after cancel")
    assert not agent.stores["disk"].partial_dir("tiny").exists()


@pytest.mark.parametrize("limit", [1, 0, (64 << 10) - 1, (1 << 40) + 1, -1])
async def test_agent_refuses_a_bandwidth_limit_out_of_bounds(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, limit: int
) -> None:
    """A hostile (or older) head sends a limit out of bounds: the op fails at once, clearly."""
    await agents.start(head, "w1")
    args = DownloadArgs(model_name="tiny", source_url="org/tiny", tier="disk", bandwidth_limit=limit)
    op = await head.head.dispatcher.submit("w1", args, 30)
    final = await asyncio.wait_for(client.wait_op(op.op_id), 10)
    assert final.state == "failed" and final.error is not None
    assert final.error.code == "invalid_field" and "64 KiB/s to 1 TiB/s" in final.error.message
    assert hub.bytes_served.get("model.safetensors", 0) == 0


async def test_sigterm_during_a_throttled_download_exits_quickly(
    head: HeadServer, client: GswarmClient, cli: Cli, hub: Any
) -> None:
    env = {"HF_ENDPOINT": hub.url, "GSWARM_TOKEN": head.head.tokens.join_token}
    agent = cli.spawn("client", head.url, "--node-id", "n1", env=env, name="agent")
    await wait_for(lambda: "n1" in head.head.agents, timeout=20)
    op = await client.download("tiny", "org/tiny", "n1:disk", bandwidth_limit=64 << 10)
    await wait_for(lambda: head.head.registry.ops[op.op_id].progress.done > 0, timeout=30)
    t0 = time.monotonic()
    agent.signal(signal.SIGTERM)
    code = await asyncio.to_thread(agent.p.wait, 10)
    print(f"\nagent exited {time.monotonic() - t0:.2f} s after SIGTERM mid throttled download")
    assert code == 0 and time.monotonic() - t0 < 5, agent.output()
    assert not head.head.registry.ops[op.op_id].terminal  # it resumes with the next run


# ---------------------------------------------------------------- partial copies (item 7)


# ---------------------------------------------------------------- one head per state dir (item 9)


async def test_second_head_on_the_same_state_dir_is_refused(head: HeadServer, tmp_path: Path) -> None:
    second = HeadServer(tmp_path / "state", "127.0.0.1", 0, fast_settings())
    with pytest.raises(StateDirInUse) as exc:
        await second.start()
    message = exc.value.message
    assert f"pid {os.getpid()}" in message and f"port {head.port}" in message, message
    # The first head is unaffected.
    async with GswarmClient(head.url, head.head.tokens.api_token) as c:
        await c.register_model("still-here", "llm")


async def test_second_head_process_exits_naming_the_first(cli: Cli) -> None:
    first, url = await asyncio.to_thread(cli.start_head)
    port = url.rsplit(":", 1)[1]
    second = cli.spawn("head", "--host", "127.0.0.1", "--port", "0", name="head2")
    code = await asyncio.to_thread(second.p.wait, 20)
    assert code != 0
    out = second.output()
    assert "in use by another head" in out and f"pid {first.p.pid}" in out and f"port {port}" in out, out
    assert "Traceback" not in out
    assert first.p.poll() is None
    # Once the first stops, a head starts there again.
    assert await asyncio.to_thread(first.stop) == 0
    again, _ = await asyncio.to_thread(cli.start_head)
    assert again.p.poll() is None
