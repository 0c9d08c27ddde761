"""Token roles and node identity: the api token never joins, the join token only enrols a new
node id, each node reconnects with its own credential (kept 0600), its transfer key derives from
that credential, and removing a node revokes it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gswarm import PROTOCOL_VERSION, grants
from gswarm.agent.identity import CREDENTIAL_FILE
from gswarm.agent.main import Agent, AgentRefused
from gswarm.agent.stores import MANIFEST_NAME
from gswarm.client import GswarmClient
from gswarm.config import Settings
from gswarm.errors import Conflict, NotFound
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, Cli, wait_for

pytestmark = pytest.mark.timeout(60)


async def _refused(agent: Agent) -> str:
    """Run an agent the head must refuse; the reason it gives."""
    with pytest.raises(AgentRefused) as exc:
        await asyncio.wait_for(agent.run(), 15)
    return exc.value.message


async def _hello(head: HeadServer, **fields: Any) -> tuple[int | None, str, dict[str, Any] | None]:
    """Send one raw Hello: the close code and reason, or the Welcome when there was one."""
    hello = {"type": "hello", "protocol_version": PROTOCOL_VERSION, "instance_id": "raw", **fields}
    async with aiohttp.ClientSession() as s, s.ws_connect(head.url + "/ws/agent") as ws:
        await ws.send_str(json.dumps(hello))
        msg = await ws.receive(timeout=5)
        if msg.type == aiohttp.WSMsgType.TEXT:
            return None, "", json.loads(msg.data)
        return ws.close_code, str(msg.extra or ""), None


def _credential_file(agents: AgentRunner, node_id: str) -> Path:
    return agents.tmp_path / "nodes" / node_id / "disk" / CREDENTIAL_FILE


def _plant_copy(disk: Path, model: str, data: bytes) -> None:
    """A published copy on a node's disk, as a finished download leaves it."""
    (disk / model).mkdir(parents=True)
    (disk / model / "w.bin").write_bytes(data)
    manifest = {"model": model, "files": [{"path": "w.bin", "size": len(data)}]}
    (disk / model / MANIFEST_NAME).write_text(json.dumps(manifest))


async def _offline(head: HeadServer, node_id: str) -> None:
    await wait_for(lambda: head.head.registry.nodes[node_id].status == "offline", timeout=10)


async def test_api_token_is_not_a_join_token(head: HeadServer, agents: AgentRunner) -> None:
    api = head.head.tokens.api_token
    assert "wrong join token" in await _refused(agents.make(head.url, api, "evil"))
    code, reason, welcome = await _hello(head, node_id="evil", token=api)
    assert (code, welcome) == (4401, None) and "wrong join token" in reason
    assert "evil" not in head.head.registry.nodes and "evil" not in head.head.credentials


async def test_enrolment_issues_a_private_credential_the_head_keeps_only_hashed(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    w1 = await agents.start(head, "w1")
    path = _credential_file(agents, "w1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = json.loads(path.read_bytes())
    assert kept["node_id"] == "w1" and kept["credential"].startswith("gsw_node_")
    digest = grants.credential_hash(kept["credential"])
    assert head.head.credentials == {"w1": digest}
    # The transfer key is bound to the credential, and the head's copy is only its hash.
    assert w1.transfer_key == grants.node_key(head.head.tokens.transfer_key, "w1", digest)
    await client.probe("w1", wait=True)
    await head.head.store.put_credential("w1", digest)  # all queued writes are committed now
    state = head.head.state_dir
    everything = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())
    assert kept["credential"].encode() not in everything
    assert kept["credential"].encode() not in await client.request("GET", "/nodes/w1")
    assert kept["credential"] not in json.dumps([e.data for e in await client.list_events(0)])
    # It comes back with its credential, without the join token.
    await agents.stop("w1")
    again = agents.make(head.url, "", "w1")
    agents.tasks["w1"] = asyncio.create_task(again.run())
    await wait_for(again.session.connected.is_set)
    assert again.transfer_key == w1.transfer_key
    assert json.loads(path.read_bytes()) == kept  # not issued twice


async def test_join_token_cannot_take_over_an_enrolled_node(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path: Path
) -> None:
    await agents.start(head, "w1")
    join = head.head.tokens.join_token
    # While it is online, and while it is down: the join token alone is refused, no Welcome.
    code, reason, welcome = await _hello(head, node_id="w1", token=join)
    assert (code, welcome) == (4401, None) and "must present its credential" in reason
    await agents.stop("w1")
    await _offline(head, "w1")
    elsewhere = tmp_path / "impostor"
    impostor = Agent(head.url, "w1", join, elsewhere / "disk", elsewhere / "dram", agents.settings)
    assert "must present its credential" in await _refused(impostor)
    assert impostor.transfer_key == ""
    code, reason, welcome = await _hello(head, node_id="w1", token=join, credential="gsw_node_guess")
    assert (code, welcome) == (4401, None) and "wrong credential" in reason
    assert head.head.registry.nodes["w1"].status == "offline"
    # The real node comes back afterwards and works.
    await agents.start(head, "w1")
    assert (await client.probe("w1", wait=True)).state == "succeeded"
    # A second process of it, even with its credential, is refused while it is online.
    twin = agents.make(head.url, join, "w1")
    assert "already online" in await _refused(twin)
    assert (await client.get_node("w1")).status == "online"


async def test_removed_node_loses_its_grants_and_its_agent(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    _plant_copy(agents.tmp_path / "nodes" / "w1" / "disk", "m", b"weights")
    w1 = await agents.start(head, "w1")
    assert ("m", "w1:disk") in head.head.registry.locations
    old_key = w1.transfer_key
    grant = grants.mint(old_key, "m", "w1", "w2", 600)

    async def fetch(url: str, token: str) -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(url + "/models/m/disk/files/w.bin", headers={"Authorization": f"Bearer {token}"}) as r,
        ):
            return r.status, await r.read()

    assert await fetch(w1.data_url, grant) == (200, b"weights")
    with pytest.raises(Conflict) as exc:
        await client.remove_node("w1")
    assert exc.value.code == "node_online"
    removed = await client.remove_node("w1", force=True)
    assert removed.node_id == "w1" and removed.was_online and removed.locations == ["m@w1:disk"]
    assert (await client.get_model("m")).locations == []
    task = agents.tasks.pop("w1")
    with pytest.raises(AgentRefused, match="removed"):
        await asyncio.wait_for(task, 15)
    assert "w1" not in head.head.credentials
    assert [n.node_id for n in await client.list_nodes()] == []
    with pytest.raises(NotFound):
        await client.get_node("w1")
    # Its agent, started again with its now revoked credential, is refused for good.
    stale = agents.make(head.url, head.head.tokens.join_token, "w1")
    assert "no credential on this head" in await _refused(stale)
    # Enrolled afresh (the operator deleted the credential file): a new key; old grants fail.
    _credential_file(agents, "w1").unlink()
    w1 = await agents.start(head, "w1")
    assert w1.transfer_key != old_key
    status, body = await fetch(w1.data_url, grant)
    assert status == 403 and b"weights" not in body
    assert await fetch(w1.data_url, grants.mint(w1.transfer_key, "m", "w1", "w2", 60)) == (200, b"weights")


async def test_removal_survives_a_head_restart(
    tmp_path: Path, settings: Settings, agents: AgentRunner
) -> None:
    first = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await first.start()
    try:
        await agents.start(first, "w1")
        await agents.start(first, "w2")
        await agents.stop("w1")
        await _offline(first, "w1")
        async with GswarmClient(first.url, first.head.tokens.api_token) as c:
            assert not (await c.remove_node("w1")).was_online
        await agents.stop("w2")
    finally:
        await first.stop()
    second = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await second.start()
    try:
        assert set(second.head.credentials) == {"w2"} and "w1" not in second.head.registry.nodes
        assert "no credential on this head" in await _refused(agents.make(second.url, "", "w1"))
        await agents.start(second, "w2")  # its credential survived the restart
    finally:
        await agents.stop_all()
        await second.stop()


async def test_nodes_remove_via_cli_and_rest_forgets_original_api_nodes(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, cli: Cli
) -> None:
    token = head.head.tokens.api_token
    for node_id in ("old1", "old2"):
        await client.request("POST", "/nodes", {"node_id": node_id, "hostname": node_id})
    args = ("--head-url", head.url, "--token", token)
    r = await cli.ainvoke("nodes", "remove", "old1", *args)
    assert r.returncode == 0 and "removed node old1" in r.stdout, r.stderr
    r = await cli.ainvoke("nodes", "remove", "old1", *args)
    assert r.returncode == 1 and "not known" in r.stderr and "Traceback" not in r.stderr
    r = await cli.ainvoke("nodes", "remove", "old2", "--json", *args)
    assert r.returncode == 0 and json.loads(r.stdout)["node_id"] == "old2"
    r = await cli.ainvoke("nodes", "--json", *args)
    assert r.returncode == 0 and json.loads(r.stdout) == []
    # An online agent: 409 by REST and CLI until --force, which closes its socket.
    await agents.start(head, "w1")
    async with (
        aiohttp.ClientSession() as s,
        s.delete(head.url + "/nodes/w1", headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "node_online"
    r = await cli.ainvoke("nodes", "remove", "w1", *args)
    assert r.returncode == 1 and "online" in r.stderr
    r = await cli.ainvoke("nodes", "remove", "w1", "--force", *args)
    assert r.returncode == 0 and "agent was disconnected" in r.stdout, r.stderr
    await wait_for(lambda: agents.tasks["w1"].done(), timeout=10)
    async with (
        aiohttp.ClientSession() as s,
        s.delete(head.url + "/nodes/bad%20id", headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        assert resp.status == 400 and "error" in await resp.json()


async def test_nodes_from_before_credentials_enrol_once(
    tmp_path: Path, settings: Settings, agents: AgentRunner
) -> None:
    """A head upgraded over state from before node credentials: its nodes have none, and their
    agents none either. The first Hello with the join token enrols such a node (once)."""
    state = tmp_path / "state"
    first = HeadServer(state, "127.0.0.1", 0, settings)
    await first.start()
    try:
        await agents.start(first, "w1")
        await agents.stop("w1")
    finally:
        await first.stop()
    with sqlite3.connect(state / "gswarm.db") as db:  # what an older head left: no credentials
        db.execute("DROP TABLE node_credentials")
    _credential_file(agents, "w1").unlink()
    second = HeadServer(state, "127.0.0.1", 0, settings)
    await second.start()
    try:
        assert "w1" in second.head.registry.nodes and second.head.credentials == {}
        w1 = await agents.start(second, "w1")
        assert _credential_file(agents, "w1").exists() and "w1" in second.head.credentials
        assert w1.transfer_key == second.head.node_key("w1")
        await agents.stop("w1")
        join = second.head.tokens.join_token
        code, reason, _ = await _hello(second, node_id="w1", token=join)
        assert code == 4401 and "must present its credential" in reason  # the window has closed
        await agents.start(second, "w1")
    finally:
        await agents.stop_all()
        await second.stop()


async def test_removing_a_node_fails_its_open_ops(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    release = asyncio.Event()

    async def stalls(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stalls)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        await agents.start(head, "w1")
        op = await client.download("slow", f"http://127.0.0.1:{port}/w.bin", "w1:disk")
        removed = await client.remove_node("w1", force=True)
        assert removed.ops_failed == [op.op_id]
        release.set()  # the agent, refused, ends its work and stops by itself
        with pytest.raises(AgentRefused, match="removed"):
            await asyncio.wait_for(agents.tasks.pop("w1"), 15)
        final = await client.get_op(op.op_id)
        assert final.state == "failed" and final.error is not None and final.error.code == "node_removed"
        assert (await client.get_model("slow")).locations == []
        assert [o.op_id for o in await client.list_ops(state="running")] == []
    finally:
        release.set()
        await agents.stop_all()
        await runner.cleanup()
