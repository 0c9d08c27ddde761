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

import aiohttp
import pytest

from gswarm import PROTOCOL_VERSION
from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from gswarm.head.state import StateDirInUse
from gswarm.ops import DownloadArgs
from gswarm.protocol import Event, Notice
from tests.conftest import BIG_FILE_BYTES, AgentRunner, Cli, fast_settings, tree_bytes, wait_for

pytestmark = pytest.mark.timeout(120)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _inventory(free: int = 1 << 30, hostname: str = "fake") -> dict[str, Any]:
    return {
        "hostname": hostname,
        "addresses": ["10.0.0.9"],
        "tiers": [{"name": "disk", "path": "/srv/gswarm", "capacity": 1 << 40, "free": free}],
    }


def _hello(head: HeadServer, node_id: str, **fields: Any) -> str:
    hello = {
        "type": "hello",
        "node_id": node_id,
        "token": head.head.tokens.join_token,
        "protocol_version": PROTOCOL_VERSION,
        "instance_id": "fake-" + node_id,
        "inventory": _inventory(),
        **fields,
    }
    return json.dumps(hello)


async def _refused(head: HeadServer, *frames: str) -> tuple[int | None, str]:
    """Send frames on a fresh agent socket; the close code and reason the head answers."""
    async with aiohttp.ClientSession() as s, s.ws_connect(head.url + "/ws/agent", max_msg_size=0) as ws:
        for frame in frames:
            await ws.send_str(frame)
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code, str(msg.extra or "")


def _db_max_seq(state_dir: Path) -> int:
    conn = sqlite3.connect(state_dir / "gswarm.db")
    try:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
    finally:
        conn.close()


def _db_events(state_dir: Path) -> int:
    conn = sqlite3.connect(state_dir / "gswarm.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


# ---------------------------------------------------------------- flood (item 5)


async def test_heartbeat_flood_is_dropped_and_the_agent_closed(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path: Path
) -> None:
    """A fake agent sends 100,000 heartbeats, each with different free space, as fast as it can:
    a handful become events, the agent is closed with 4429, another subscriber keeps up."""
    await agents.start(head, "good")
    seen: list[Event | Notice] = []

    async def follow() -> None:
        async for msg in client.events(since=None):
            seen.append(msg)

    follower = asyncio.create_task(follow())
    await wait_for(lambda: head.head.bus.subscriber_count >= 1)
    start_seq = head.head.bus.last_seq
    rss_before = _rss()
    frames = [
        json.dumps({"type": "heartbeat", "inventory": _inventory(free=(i % 2) << 39)}) for i in range(1000)
    ]
    t0 = time.monotonic()
    sent = 0
    async with aiohttp.ClientSession() as s, s.ws_connect(head.url + "/ws/agent") as ws:
        await ws.send_str(_hello(head, "flooder"))
        assert (await ws.receive_json(timeout=5))["type"] == "welcome"
        closed = asyncio.create_task(ws.receive())
        for i in range(100_000):
            if ws.closed or closed.done():
                break
            try:
                await ws.send_str(frames[i % len(frames)])
            except (ConnectionError, RuntimeError):
                break
            sent += 1
        msg = await asyncio.wait_for(closed, 15)
        elapsed = time.monotonic() - t0
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        assert ws.close_code == 4429 and "too many heartbeats" in str(msg.extra), (ws.close_code, msg)
    written = head.head.bus.last_seq - start_seq
    growth = _rss() - rss_before
    dropped = (await client.info())["heartbeats_dropped"]
    print(
        f"\nflood: {sent} heartbeats sent in {elapsed:.2f} s, {dropped} dropped, {written} events "
        f"written, head RSS {rss_before / 2**20:.0f} -> {_rss() / 2**20:.0f} MiB"
    )
    updates = [e for e in await client.list_events(start_seq, ["node"]) if e.key == "flooder"]
    assert written <= 10 and len(updates) <= 5, [e.kind for e in updates]
    assert dropped > 0 and growth < 64 << 20
    # The other subscriber was not dropped, and follows what happens next.
    await client.register_model("after-flood", "llm")
    await wait_for(lambda: any(isinstance(m, Event) and m.key == "after-flood" for m in seen))
    assert head.head.bus.dropped_count == 0 and not any(
        isinstance(m, Notice) and m.code == "dropped" for m in seen
    )
    assert (await client.probe("good", wait=True)).state == "succeeded"
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)


async def test_reconnecting_again_and_again_writes_no_events(head: HeadServer, client: GswarmClient) -> None:
    start_seq = head.head.bus.last_seq
    credential: dict[str, str] = {}  # the first Hello enrols; the others present the credential
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.ws_connect(head.url + "/ws/agent") as ws:
                await ws.send_str(_hello(head, "bouncer", **credential))
                welcome = await ws.receive_json(timeout=5)
                assert welcome["type"] == "welcome"
                if not credential:
                    credential = {"token": "", "credential": welcome["credential"]}
    events = [e.kind for e in await client.list_events(start_seq, ["node"]) if e.key == "bouncer"]
    assert events[:1] == ["node.registered"] and len(events) <= 3, events


async def test_a_huge_hostname_is_refused(head: HeadServer, client: GswarmClient, tmp_path: Path) -> None:
    state = tmp_path / "state"
    size_before = sum(p.stat().st_size for p in state.iterdir())
    huge = "h" * (7 << 20)
    code, reason = await _refused(head, _hello(head, "bighost", inventory=_inventory(hostname=huge)))
    assert code == 4400 and "hostname has 7340032 characters" in reason, reason
    assert "bighost" not in head.head.registry.nodes
    # In a heartbeat after a good Hello too.
    code, reason = await _refused(
        head,
        _hello(head, "bighost2"),
        json.dumps({"type": "heartbeat", "inventory": _inventory(hostname=huge)}),
    )
    assert code == 4400 and "heartbeat refused" in reason, reason
    assert head.head.registry.nodes["bighost2"].hostname == "fake"
    await client.register_model("flush", "llm")  # the writer has written what came before
    await wait_for(lambda: _db_events(tmp_path / "state") > 0)
    assert sum(p.stat().st_size for p in state.iterdir()) - size_before < 1 << 20


@pytest.mark.parametrize(
    ("field", "holding", "why"),
    [
        ("holdings", {"model": "m", "tier": "disk", "path": "/etc", "size": 1}, "outside tier disk"),
        ("holdings", {"model": "m", "tier": "disk", "path": "/srv/gswarm/../etc", "size": 1}, "outside"),
        ("holdings", {"model": "m", "tier": "dram", "path": "/dev/shm/m", "size": 1}, "does not report"),
        ("holdings", {"model": "m", "tier": "gpu3", "path": "cuda:3", "size": 1}, "does not report"),
        ("holdings", {"model": "../x", "tier": "disk", "path": "/srv/gswarm/../x", "size": 1}, "not a model"),
        ("partials", {"model": "m", "tier": "disk", "path": "/srv/gswarm/m", "size": 1}, "outside tier disk"),
    ],
)
async def test_copies_outside_the_nodes_tiers_are_refused(
    head: HeadServer, field: str, holding: dict[str, Any], why: str
) -> None:
    code, reason = await _refused(head, _hello(head, "liar", **{field: [holding]}))
    assert code == 4400 and why in reason, reason
    assert not head.head.registry.locations
    # Reported later, outside any op, it is refused the same way.
    code, reason = await _refused(
        head, _hello(head, "liar2"), json.dumps({"type": "holdings", "holdings": [], field: [holding]})
    )
    assert code == 4400 and "holdings refused" in reason and why in reason, reason
    assert not head.head.registry.locations


async def test_caps_on_counts(head: HeadServer) -> None:
    many = {**_inventory(), "addresses": [f"10.0.{i // 256}.{i % 256}" for i in range(65)]}
    code, reason = await _refused(head, _hello(head, "many", inventory=many))
    assert code == 4400 and "65 addresses (at most 64)" in reason, reason
    holdings = [
        {"model": f"m{i}", "tier": "disk", "path": f"/srv/gswarm/m{i}", "size": 1} for i in range(10_001)
    ]
    code, reason = await _refused(head, _hello(head, "many", holdings=holdings))
    assert code == 4400 and "10001 holdings" in reason, reason


async def test_a_good_report_still_lands(head: HeadServer, client: GswarmClient) -> None:
    held = {"model": "m", "tier": "disk", "path": "/srv/gswarm/m", "size": 5}
    left = {"model": "p", "tier": "disk", "path": "/srv/gswarm/.partial/p", "size": 7}
    async with aiohttp.ClientSession() as s, s.ws_connect(head.url + "/ws/agent") as ws:
        await ws.send_str(_hello(head, "honest", holdings=[held], partials=[left]))
        assert (await ws.receive_json(timeout=5))["type"] == "welcome"
        m = await client.get_model("m")
        p = await client.get_model("p")
        assert [(loc.device, loc.state, loc.size) for loc in m.locations] == [("honest:disk", "ready", 5)]
        assert [(loc.device, loc.state, loc.size) for loc in p.locations] == [("honest:disk", "partial", 7)]


async def test_event_log_keeps_a_window(tmp_path: Path) -> None:
    settings = fast_settings(events_kept=100, event_ring=10, replay_page_bytes=16 << 10)
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await server.start()
    try:
        async with GswarmClient(server.url, server.head.tokens.api_token) as c:
            for i in range(400):
                await c.register_model(f"m{i}", "llm", metadata={"pad": "x" * 500})
            # Written up to the newest event (the writer is a thread of its own), and pruned.
            last = server.head.bus.last_seq
            await wait_for(
                lambda: _db_max_seq(tmp_path / "state") >= last and _db_events(tmp_path / "state") <= 110,
                timeout=10,
            )
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


async def test_bandwidth_limit_holds_for_a_local_source_too(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    """A file:// download under a limit keeps to it (it used to copy at disk speed)."""
    agent = await agents.start(head, "w1")
    op = await client.download("tiny", f"file://{tiny_repo_dir}", "w1:disk", bandwidth_limit=8 << 20)
    await wait_for(lambda: head.head.registry.ops[op.op_id].progress.done > 0, timeout=10)
    t0 = time.monotonic()
    await wait_for(lambda: time.monotonic() - t0 > 1.0)
    done = head.head.registry.ops[op.op_id].progress.done
    assert not head.head.registry.ops[op.op_id].terminal and done < 20 << 20, done
    assert (await client.cancel_op(op.op_id)).state == "cancelled"
    await wait_for(lambda: op.op_id not in agent.executor.running, timeout=1.0)


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


async def test_download_from_a_slow_source_stops_within_a_second_of_cancel(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    """No limit of ours, but the source trickles (64 KiB/s): a worker blocked reading its 4 MiB
    block is cut loose at once, not when the block has arrived (about a minute here)."""
    agent = await agents.start(head, "w1")
    hub.rate_limit = 64 << 10
    op = await client.download("tiny", "org/tiny", "w1:disk")
    await wait_for(
        lambda: head.head.registry.ops[op.op_id].progress.done > 0 and _fetch_threads(), timeout=30
    )
    assert (await client.cancel_op(op.op_id)).state == "cancelled"
    await wait_for(lambda: not _fetch_threads() and op.op_id not in agent.executor.running, timeout=1.0)
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


async def _leave_a_partial(head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any) -> str:
    """A download stopped mid-way, then resumed on a node whose disk quota leaves no room: it
    fails for space and keeps what arrived."""
    await agents.start(head, "w1")
    hub.rate_limit = 20 << 20
    op = await client.download("tiny", "org/tiny", "w1:disk")
    await wait_for(lambda: head.head.registry.ops[op.op_id].progress.done > 4 << 20, timeout=20)
    await agents.stop("w1")
    hub.rate_limit = None
    await agents.start(head, "w1", quotas={"disk": 1 << 20})
    final = await client.wait_op(op.op_id, timeout=30)
    assert final.state == "failed" and final.error is not None
    assert final.error.code == "insufficient_space", final.error
    return op.op_id


async def test_a_partial_copy_is_shown_and_rm_frees_it(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, cli: Cli
) -> None:
    await _leave_a_partial(head, agents, client, hub)
    partial = agents.agents["w1"].stores["disk"].partial_dir("tiny")
    assert partial.exists()
    (loc,) = (await client.get_model("tiny")).locations
    assert (loc.device, loc.state, loc.path) == ("w1:disk", "partial", str(partial))
    assert 4 << 20 <= loc.size < BIG_FILE_BYTES + (1 << 20)
    shown = await cli.ainvoke(
        "show", "tiny", "--head-url", head.url, env={"GSWARM_TOKEN": head.head.tokens.api_token}
    )
    assert shown.returncode == 0 and "partial" in shown.stdout and " MB" in shown.stdout, shown.stdout
    # A probe (the agent's fresh report) keeps it as it is.
    await client.probe("w1", wait=True)
    assert [x.state for x in (await client.get_model("tiny")).locations] == ["partial"]
    rm = await cli.ainvoke(
        "rm", "tiny", "w1:disk", "--head-url", head.url, env={"GSWARM_TOKEN": head.head.tokens.api_token}
    )
    assert rm.returncode == 0 and "freed" in rm.stdout, rm.stdout + rm.stderr
    assert not partial.exists()
    assert (await client.get_model("tiny")).locations == []


async def test_a_partial_copy_goes_with_delete_and_a_retry_resumes_it(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tiny_repo_dir: Path
) -> None:
    await _leave_a_partial(head, agents, client, hub)
    (loc,) = (await client.get_model("tiny")).locations
    assert loc.state == "partial"
    # Room again: the same download resumes from what is there.
    await agents.stop("w1")
    agent = await agents.start(head, "w1")
    served = hub.total_bytes_served
    again = await client.download("tiny", "org/tiny", "w1:disk", wait=True)
    assert again.state == "succeeded", again.error
    assert hub.total_bytes_served - served < BIG_FILE_BYTES - (2 << 20)
    assert tree_bytes(agent.stores["disk"].model_dir("tiny")) == tree_bytes(tiny_repo_dir)
    # And another partial goes with the model's delete.
    await client.delete_model("tiny")
    await agents.stop("w1")
    await _leave_a_partial(head, agents, client, hub)
    result = await client.delete_model("tiny")
    assert len(result["ops"]) == 1
    assert not agents.agents["w1"].stores["disk"].partial_dir("tiny").exists()


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
