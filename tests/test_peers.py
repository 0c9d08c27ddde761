"""Between nodes: peer copies and moves, peer before Hub, the data server's grants, peers that
die or serve corrupt bytes, and replication."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gswarm import grants
from gswarm.client import GswarmClient
from gswarm.errors import Conflict
from gswarm.head.app import HeadServer
from tests.conftest import BIG_FILE_BYTES, AgentRunner, Cli, tree_bytes, wait_for

pytestmark = pytest.mark.timeout(120)


async def _seed(client: GswarmClient, source: Path, device: str, model: str = "m") -> None:
    op = await client.download(model, f"file://{source}", device, wait=True)
    assert op.state == "succeeded", op.error


async def test_copy_and_move_between_nodes(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    w1 = await agents.start(head, "w1")
    w2 = await agents.start(head, "w2")
    await _seed(client, tiny_repo_dir, "w1:disk")
    op = await client.copy("m", "w1:disk", "w2:dram", wait=True)
    assert op.state == "succeeded", op.error
    assert op.node_id == "w2" and op.result is not None and op.result.from_peer == "w1"
    assert tree_bytes(w2.stores["dram"].model_dir("m")) == tree_bytes(tiny_repo_dir)
    # the other way round
    await client.delete_location("m", "w1:disk", wait=True)
    op = await client.copy("m", "w2:dram", "w1:dram", wait=True)
    assert op.state == "succeeded", op.error
    assert tree_bytes(w1.stores["dram"].model_dir("m")) == tree_bytes(tiny_repo_dir)
    # a move: the source goes only after the target is verified
    op = await client.move("m", "w1:dram", "w2:disk", wait=True)
    assert op.state == "succeeded", op.error
    await wait_for(lambda: ("m", "w1:dram") not in head.head.registry.locations, timeout=10)
    assert not w1.stores["dram"].model_dir("m").exists()
    locs = {loc.device for loc in (await client.get_model("m")).locations}
    assert locs == {"w2:dram", "w2:disk"}
    events = [e for e in await client.list_events(0, ["op"]) if e.kind == "op.progress"]
    assert any("fetching from w1" in e.data["progress"]["message"] for e in events)


async def test_download_prefers_a_peer_over_the_hub(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tiny_repo_dir: Path
) -> None:
    await agents.start(head, "w1")
    w2 = await agents.start(head, "w2")
    assert (await client.download("tiny", "org/tiny", "w1:disk", wait=True)).state == "succeeded"
    served = hub.total_bytes_served
    op = await client.download("tiny", "org/tiny", "w2:disk", wait=True)
    assert op.state == "succeeded" and op.result is not None and op.result.from_peer == "w1"
    assert hub.total_bytes_served == served  # not one byte more from the Hub
    assert tree_bytes(w2.stores["disk"].model_dir("tiny")) == tree_bytes(tiny_repo_dir)
    op = await client.download("tiny", "org/tiny", "w2:dram", prefer_peer=False, wait=True)
    assert op.state == "succeeded" and op.result is not None and not op.result.from_peer
    assert hub.total_bytes_served > served


async def _get(url: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


async def test_data_server_grants_and_paths(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    w1 = await agents.start(head, "w1")
    await _seed(client, tiny_repo_dir, "w1:disk")
    await _seed(client, tiny_repo_dir, "w1:disk", model="other")
    secret = head.head.tokens.transfer_key
    key = grants.node_key(secret, "w1", head.head.credentials["w1"])
    assert w1.transfer_key == key  # each agent gets only its own node's key
    base = w1.data_url + "/models/m/disk"
    good = grants.mint(key, "m", "w1", "w2", 60)
    status, body = await _get(base + "/files/config.json", good)
    assert status == 200 and body == (tiny_repo_dir / "config.json").read_bytes()
    status, body = await _get(base + "/manifest", good)
    assert status == 200 and {f["path"] for f in json.loads(body)["files"]} >= {
        "config.json",
        "sub/notes.txt",
    }

    bad_tokens = {
        "missing": None,
        "garbage": "not-a-token",
        "expired": grants.mint(key, "m", "w1", "w2", -1),
        "other model": grants.mint(key, "other", "w1", "w2", 60),
        "other node": grants.mint(key, "m", "w9", "w2", 60),
        "wrong key": grants.mint("0" * 64, "m", "w1", "w2", 60),
        # What another agent holds: its own node's key, and the head's secret it never gets.
        "another node's key": grants.mint(head.head.node_key("w2"), "m", "w1", "w2", 60),
        "w1's key without its credential": grants.mint(
            grants.node_key(secret, "w1", ""), "m", "w1", "w2", 60
        ),
        "the head's secret": grants.mint(secret, "m", "w1", "w2", 60),
    }
    for why, token in bad_tokens.items():
        status, body = await _get(base + "/files/config.json", token)
        assert status == 403, why
        assert b"hidden_size" not in body, why
    for path in ["/files/..%2F..%2Fother%2Fconfig.json", "/files/.gswarm-manifest.json", "/files/nope.bin"]:
        status, body = await _get(base + path, good)
        assert status == 404, path
    status, _ = await _get(w1.data_url + "/models/m/gpu0/files/config.json", good)
    assert status == 404


async def test_source_without_the_model_is_409(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    await agents.start(head, "w1")
    await agents.start(head, "w2")
    await _seed(client, tiny_repo_dir, "w1:disk")
    with pytest.raises(Conflict) as exc:
        await client.copy("m", "w2:disk", "w1:dram")
    assert exc.value.code == "not_held" and "w1:disk" in exc.value.message


async def test_peer_dying_mid_transfer_hands_over_to_another_holder(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, cli: Cli, tiny_repo_dir: Path, tmp_path: Path
) -> None:
    """w1 is a real agent process, SIGKILLed while w3 pulls from it: w3 carries on from w2."""
    join = head.head.tokens.join_token
    w1 = cli.spawn(
        "client", head.url, "--node-id", "w1", "--token", join, "--disk-dir", str(tmp_path / "w1disk"),
        "--data-bandwidth", "20M", "--allow-file-root", str(tiny_repo_dir), name="w1",
    )  # fmt: skip
    reg = head.head.registry
    await wait_for(lambda: "w1" in reg.nodes and reg.nodes["w1"].connected, timeout=15)
    await agents.start(head, "w2")
    w3 = await agents.start(head, "w3")
    await _seed(client, tiny_repo_dir, "w1:disk")
    assert (await client.copy("m", "w1:disk", "w2:disk", wait=True)).state == "succeeded"
    op = await client.copy("m", "w1:disk", "w3:disk")
    await wait_for(lambda: reg.ops[op.op_id].progress.done > 10 << 20, timeout=20)
    w1.signal(signal.SIGKILL)  # the source dies mid-transfer
    final = await client.wait_op(op.op_id, timeout=60)
    assert final.state == "succeeded", final.error
    assert final.result is not None and final.result.from_peer == "w2"
    assert tree_bytes(w3.stores["disk"].model_dir("m")) == tree_bytes(tiny_repo_dir)


async def test_corruption_at_the_source_is_caught(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    w1 = await agents.start(head, "w1")
    w2 = await agents.start(head, "w2")
    await _seed(client, tiny_repo_dir, "w1:disk")
    weights = w1.stores["disk"].model_dir("m") / "model.safetensors"
    data = bytearray(weights.read_bytes())  # flip one byte after the manifest was written
    data[12345] ^= 0xFF
    weights.write_bytes(bytes(data))
    op = await client.copy("m", "w1:disk", "w2:disk", wait=True)
    assert op.state == "failed" and op.error is not None
    assert "model.safetensors" in op.error.message and "sha256" in op.error.message
    assert not w2.stores["disk"].model_dir("m").exists()
    # What arrived intact stays on w2, listed as a partial copy (a retry resumes, rm frees it).
    locs = {loc.device: loc.state for loc in (await client.get_model("m")).locations}
    assert locs == {"w1:disk": "ready", "w2:disk": "partial"}


async def test_replication_to_five_with_one_killed(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    nodes = ["w1", "w2", "w3", "w4", "w5", "w6"]
    for n in nodes:
        await agents.start(head, n, data_bandwidth=60 << 20)
    await _seed(client, tiny_repo_dir, "w1:disk")
    targets = [f"{n}:disk" for n in nodes[1:]]
    op = await client.replicate("m", targets, max_fanout=2)
    reg = head.head.registry
    victim = await wait_for(
        lambda: next(
            (
                o.node_id
                for o in reg.ops.values()
                if o.kind == "fetch" and not o.terminal and o.progress.done > 0
            ),
            None,
        ),
        timeout=20,
    )
    await agents.stop(victim)
    final = await client.wait_op(op.op_id, timeout=90)
    results = final.result.targets if final.result else {}
    assert set(results) == set(targets)
    ok = {t for t, r in results.items() if r.state == "succeeded"}
    assert ok == set(targets) - {f"{victim}:disk"}
    assert results[f"{victim}:disk"].state == "failed"
    assert (
        final.state == "failed" and final.error is not None and final.error.code == "replication_incomplete"
    )
    for t in ok:
        assert tree_bytes(agents.agents[t.split(":")[0]].stores["disk"].model_dir("m")) == tree_bytes(
            tiny_repo_dir
        )
    # A tree, not a star: some target was fed by another target.
    sources = {r.source for r in results.values() if r.state == "succeeded"}
    assert sources - {"w1", "w1:disk"}


async def test_replicate_all_nodes(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    for n in ["w1", "w2", "w3"]:
        await agents.start(head, n)
    await _seed(client, tiny_repo_dir, "w1:disk")
    op = await client.replicate("m", all_nodes="dram", wait=True)
    assert op.state == "succeeded", op.error
    locs = {loc.device for loc in (await client.get_model("m")).locations}
    assert locs == {"w1:disk", "w1:dram", "w2:dram", "w3:dram"}
    await asyncio.sleep(0)


async def test_replication_pipelines_through_targets_still_downloading(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    """With one peer per holder, copies form a chain; each target serves what it has while it
    still downloads, so the next one starts long before its source has finished."""
    for n in ["w1", "w2", "w3", "w4"]:
        await agents.start(head, n, data_bandwidth=35 << 20)
    await _seed(client, tiny_repo_dir, "w1:disk")
    op = await client.replicate("m", ["w2:disk", "w3:disk", "w4:disk"], max_fanout=1, wait=True)
    assert op.state == "succeeded", op.error
    results = op.result.targets if op.result else {}
    fed_by_target = [t for t, r in results.items() if r.source in ("w2", "w3", "w4")]
    assert fed_by_target, results
    reg = head.head.registry
    for t in fed_by_target:
        child = reg.ops[results[t].op_id]
        feeder = next(o for o in reg.ops.values() if o.kind == "fetch" and o.node_id == results[t].source)
        assert child.started_at is not None and feeder.finished_at is not None
        assert child.started_at < feeder.finished_at  # pipelined, not hop after hop
        node = agents.agents[t.split(":")[0]]
        assert tree_bytes(node.stores["disk"].model_dir("m")) == tree_bytes(tiny_repo_dir)


async def test_replicate_while_the_seed_is_still_downloading(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tiny_repo_dir: Path
) -> None:
    """Fetch from the Hub once and spread it at the same time: the Hub serves one copy."""
    for n in ["w1", "w2", "w3"]:
        await agents.start(head, n)
    hub.rate_limit = 60 << 20
    seed = await client.download("tiny", "org/tiny", "w1:disk")
    op = await client.replicate("tiny", ["w2:disk", "w3:disk"], wait=True)
    assert op.state == "succeeded", op.result
    assert (await client.wait_op(seed.op_id, timeout=30)).state == "succeeded"
    assert hub.bytes_served["model.safetensors"] == BIG_FILE_BYTES
    for n in ["w2", "w3"]:
        assert tree_bytes(agents.agents[n].stores["disk"].model_dir("tiny")) == tree_bytes(tiny_repo_dir)
