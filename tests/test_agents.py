"""Agents joining a head: inventory, probe ops end to end, refusals, liveness."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest

from gswarm import PROTOCOL_VERSION
from gswarm.agent.session import AgentRefused
from gswarm.client import GswarmClient
from gswarm.errors import Conflict
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, wait_for


async def test_agent_registers_with_inventory(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    await agents.start(head, "worker1")
    node = await client.get_node("worker1")
    assert node.status == "online" and node.connected
    inv = node.inventory
    assert inv.hostname == socket.gethostname()
    assert inv.cpu_count >= 1 and inv.memory_total > 0
    tiers = {t.name: t for t in inv.tiers}
    assert set(tiers) == {"disk", "dram"}
    assert tiers["disk"].capacity > 0 and 0 < tiers["disk"].free <= tiers["disk"].capacity
    # No NVIDIA hardware here: no GPUs, a reason, and no crash.
    assert inv.gpus == [] and "NVML" in inv.gpu_error
    info = await client.info()
    assert info["nodes_online"] == 1 and info["agents_connected"] == 1


async def test_simulated_gpus_are_marked(head: HeadServer, agents: AgentRunner, client: GswarmClient) -> None:
    await agents.start(head, "sim", simulate_gpus="2:8G")
    gpus = (await client.get_node("sim")).inventory.gpus
    assert [g.index for g in gpus] == [0, 1]
    assert all(g.simulated and g.memory_total == 8 << 30 for g in gpus)


async def test_probe_runs_end_to_end(head: HeadServer, agents: AgentRunner, client: GswarmClient) -> None:
    agent = await agents.start(head, "worker1")
    # A copy placed on the agent's disk by hand shows up through the probe.
    model_dir = agent.tiers["disk"] / "tiny"
    model_dir.mkdir(parents=True)
    (model_dir / "w.bin").write_bytes(b"x" * 10)
    manifest = {"model": "tiny", "files": [{"path": "w.bin", "size": 10}]}
    (model_dir / ".gswarm-manifest.json").write_text(json.dumps(manifest))

    seen: list[str] = []
    op = await client.probe("worker1")
    assert op.state == "queued"
    final = await client.wait_op(op.op_id, on_progress=lambda o: seen.append(o.state), timeout=10)
    assert final.state == "succeeded"
    assert final.result is not None and final.result.holdings[0].model == "tiny"
    model = await client.get_model("tiny")
    assert [(loc.device, loc.state, loc.size) for loc in model.locations] == [("worker1:disk", "ready", 10)]
    kinds = [e.kind for e in await client.list_events(0, ["op"])]
    assert kinds[:1] == ["op.created"] and "op.running" in kinds and kinds[-1] == "op.succeeded"


async def test_op_for_offline_node_is_refused(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    await agents.start(head, "worker1")
    await agents.stop("worker1")
    await wait_for(lambda: head.head.registry.nodes["worker1"].status == "offline", timeout=5)
    with pytest.raises(Conflict) as exc:
        await client.probe("worker1")
    assert exc.value.code == "node_offline"
    assert await client.list_ops() == []


async def test_second_agent_with_same_node_id_is_refused(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    await agents.start(head, "worker1")
    twin = agents.make(head.url, head.head.tokens.join_token, "worker1")
    with pytest.raises(AgentRefused, match="already online"):
        await asyncio.wait_for(twin.run(), 10)
    node = await client.get_node("worker1")
    assert node.status == "online" and agents.agents["worker1"].session.connected.is_set()


async def test_wrong_join_token_is_refused(head: HeadServer, agents: AgentRunner) -> None:
    intruder = agents.make(head.url, "wrong-token", "evil")
    with pytest.raises(AgentRefused, match="unauthorized"):
        await asyncio.wait_for(intruder.run(), 10)
    assert "evil" not in head.head.registry.nodes


async def _raw_agent_socket(head: HeadServer, first: str | bytes) -> tuple[int | None, str]:
    async with aiohttp.ClientSession() as s, s.ws_connect(head.url + "/ws/agent") as ws:
        if isinstance(first, bytes):
            await ws.send_bytes(first)
        else:
            await ws.send_str(first)
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        return ws.close_code, str(msg.extra or "")


async def test_bad_frames_close_the_socket_with_a_reason(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    code, reason = await _raw_agent_socket(head, "not json at all")
    assert code == 4400 and "invalid message" in reason
    code, reason = await _raw_agent_socket(head, json.dumps({"type": "heartbeat", "inventory": {}}))
    assert code == 4401 and "first message must be hello" in reason
    code, reason = await _raw_agent_socket(head, b"\x00\x01")
    assert code == 4400
    hello = {
        "type": "hello",
        "node_id": "x",
        "token": head.head.tokens.join_token,
        "protocol_version": PROTOCOL_VERSION + 1,
        "instance_id": "i",
    }
    code, reason = await _raw_agent_socket(head, json.dumps(hello))
    assert code == 4426 and "incompatible protocol" in reason
    # The head is unaffected: a real agent still joins and works.
    await agents.start(head, "worker1")
    op = await client.probe("worker1", wait=True)
    assert op.state == "succeeded"


async def test_garbage_after_hello_closes_only_that_agent(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    await agents.start(head, "good")
    hello = {
        "type": "hello",
        "node_id": "bad",
        "token": head.head.tokens.join_token,
        "protocol_version": PROTOCOL_VERSION,
        "instance_id": "i",
    }
    async with aiohttp.ClientSession() as s, s.ws_connect(head.url + "/ws/agent") as ws:
        await ws.send_str(json.dumps(hello))
        welcome = await ws.receive_json(timeout=5)
        assert welcome["type"] == "welcome"
        await ws.send_str('{"type": "progress", "op_id": 5}')
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4400
    assert (await client.probe("good", wait=True)).state == "succeeded"


async def test_node_goes_offline_and_back_online(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    await agents.start(head, "worker1")
    await agents.stop("worker1")
    await wait_for(lambda: head.head.registry.nodes["worker1"].status == "offline", timeout=5)
    await agents.start(head, "worker1")
    await wait_for(lambda: head.head.registry.nodes["worker1"].status == "online", timeout=5)
    kinds = [e.kind for e in await client.list_events(0, ["node"])]
    assert kinds[0] == "node.registered" and "node.offline" in kinds and kinds[-1] == "node.online"
