"""Tiers on a node: downloads from the test Hub, a URL or a path; copy and move between disk
and dram; delete; locations; and the bad input around them."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gswarm.client import GswarmClient
from gswarm.errors import BadRequest, Conflict, InsufficientSpace, NotFound
from gswarm.head.app import HeadServer
from tests.conftest import BIG_FILE_BYTES, AgentRunner, free_port, tree_bytes, wait_for

pytestmark = pytest.mark.timeout(90)


async def test_download_from_hub_publishes_verified_copy(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tiny_repo_dir: Path
) -> None:
    agent = await agents.start(head, "w1")
    op = await client.download("tiny", "https://huggingface.co/org/tiny", "w1:disk")
    assert op.state == "queued"
    model = await client.get_model("tiny")
    assert [(loc.device, loc.state) for loc in model.locations] == [("w1:disk", "downloading")]
    final = await client.wait_op(op.op_id, timeout=60)
    assert final.state == "succeeded", final.error
    copy_dir = agent.stores["disk"].model_dir("tiny")
    assert tree_bytes(copy_dir) == tree_bytes(tiny_repo_dir)
    manifest = json.loads((copy_dir / ".gswarm-manifest.json").read_text())
    big = next(f for f in manifest["files"] if f["path"] == "model.safetensors")
    assert big["sha256"] == hashlib.sha256((tiny_repo_dir / "model.safetensors").read_bytes()).hexdigest()
    model = await client.get_model("tiny")
    (loc,) = model.locations
    assert (loc.device, loc.state, loc.path) == ("w1:disk", "ready", str(copy_dir))
    assert loc.size == sum(len(b) for b in tree_bytes(tiny_repo_dir).values())
    assert model.type == "unknown" and model.source_url == "https://huggingface.co/org/tiny"
    # Progress was streamed as bytes, and nothing partial is left behind.
    progress = [e.data["progress"] for e in await client.list_events(0, ["op"]) if e.key == op.op_id]
    assert progress[-1]["total"] >= BIG_FILE_BYTES
    assert not any((agent.stores["disk"].root / ".partial").iterdir())


@pytest.mark.parametrize(
    "source", ["hf://org/tiny@main", "org/tiny", "https://huggingface.co/org/tiny/tree/main"]
)
async def test_hub_source_forms_and_patterns(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, source: str
) -> None:
    agent = await agents.start(head, "w1")
    op = await client.download("tiny", source, "w1:dram", allow_patterns=["*.json"], wait=True)
    assert op.state == "succeeded", op.error
    assert sorted(tree_bytes(agent.stores["dram"].model_dir("tiny"))) == ["config.json", "tokenizer.json"]


async def test_plain_url_and_file_sources(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tiny_repo_dir: Path
) -> None:
    agent = await agents.start(head, "w1")
    url = f"{hub.url}/org/tiny/resolve/main/model.safetensors"
    op = await client.download("weights", url, "w1:disk", wait=True)
    assert op.state == "succeeded", op.error
    got = agent.stores["disk"].model_dir("weights") / "model.safetensors"
    assert got.read_bytes() == (tiny_repo_dir / "model.safetensors").read_bytes()

    op = await client.download("local", f"file://{tiny_repo_dir}", "w1:dram", wait=True)
    assert op.state == "succeeded", op.error
    assert tree_bytes(agent.stores["dram"].model_dir("local")) == tree_bytes(tiny_repo_dir)


async def test_disk_dram_disk_round_trip_keeps_every_byte(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    agent = await agents.start(head, "w1")
    assert (await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)).state == "succeeded"
    op = await client.move("m", "w1:disk", "w1:dram", wait=True)
    assert op.state == "succeeded", op.error
    assert not agent.stores["disk"].model_dir("m").exists()
    assert [loc.device for loc in (await client.get_model("m")).locations] == ["w1:dram"]
    op = await client.copy("m", "w1:dram", "w1:disk", verify="sha256", wait=True)
    assert op.state == "succeeded", op.error
    assert tree_bytes(agent.stores["disk"].model_dir("m")) == tree_bytes(tiny_repo_dir)
    assert tree_bytes(agent.stores["dram"].model_dir("m")) == tree_bytes(tiny_repo_dir)
    locs = {loc.device: loc.state for loc in (await client.get_model("m")).locations}
    assert locs == {"w1:disk": "ready", "w1:dram": "ready"}
    # move --keep-source leaves the source in place
    op = await client.move("m", "w1:disk", "w1:dram", keep_source=True, wait=True)
    assert op.state == "succeeded"


async def test_delete_a_copy_and_the_model(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    agent = await agents.start(head, "w1")
    await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
    await client.copy("m", "w1:disk", "w1:dram", wait=True)
    op = await client.delete_location("m", "w1:dram", wait=True)
    assert op.state == "succeeded"
    assert not agent.stores["dram"].model_dir("m").exists()
    assert [loc.device for loc in (await client.get_model("m")).locations] == ["w1:disk"]
    with pytest.raises(NotFound):
        await client.delete_location("m", "w1:dram")
    result = await client.delete_model("m")
    assert result["deleted"] == "m"
    assert not agent.stores["disk"].model_dir("m").exists()
    with pytest.raises(NotFound):
        await client.get_model("m")


async def test_existing_copy_succeeds_at_once(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    await agents.start(head, "w1")
    await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
    again = await client.download("m", f"file://{tiny_repo_dir}", "w1:disk")
    assert again.state == "succeeded" and again.result is not None and again.result.already_present


async def test_same_download_twice_joins_the_running_op(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    await agents.start(head, "w1")
    hub.rate_limit = 40 << 20
    first = await client.download("tiny", "org/tiny", "w1:disk")
    second = await client.download("tiny", "org/tiny", "w1:disk")
    assert second.op_id == first.op_id
    hub.rate_limit = None
    assert (await client.wait_op(first.op_id, timeout=60)).state == "succeeded"
    assert hub.bytes_served["model.safetensors"] == BIG_FILE_BYTES


async def test_cancel_mid_download_publishes_nothing(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    agent = await agents.start(head, "w1")
    hub.rate_limit = 20 << 20
    op = await client.download("tiny", "org/tiny", "w1:disk")
    await wait_for(lambda: head.head.registry.ops[op.op_id].progress.done > 1 << 20, timeout=20)
    await client.cancel_op(op.op_id)
    await wait_for(lambda: op.op_id not in agent.executor.running, timeout=10)
    store = agent.stores["disk"]
    assert not store.model_dir("tiny").exists()
    assert not store.partial_dir("tiny").exists()
    assert (await client.get_model("tiny")).locations == []


# ---------------------------------------------------------------- bad input


async def test_offline_or_unknown_node_is_409(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    with pytest.raises(Conflict) as exc:
        await client.download("m", "org/tiny", "ghost:disk")
    assert exc.value.code == "node_offline"
    await agents.start(head, "w1")
    await agents.stop("w1")
    await wait_for(lambda: head.head.registry.nodes["w1"].status == "offline", timeout=5)
    with pytest.raises(Conflict) as exc:
        await client.download("m", "org/tiny", "w1:disk")
    assert exc.value.code == "node_offline"
    assert await client.list_ops() == []


@pytest.mark.parametrize(
    ("model", "source", "device", "code"),
    [
        ("m", "org/tiny", "w1:floppy", "invalid_device"),
        ("m", "org/tiny", "w1", "invalid_device"),
        ("../x", "org/tiny", "w1:disk", "invalid_name"),
        ("m", "ftp://host/x", "w1:disk", "invalid_source"),
        ("m", "hf://../../etc", "w1:disk", "invalid_source"),
        ("m", "org/tiny", "w1:gpu0", "unsupported_tier"),
    ],
)
async def test_bad_requests_are_400(
    head: HeadServer,
    agents: AgentRunner,
    client: GswarmClient,
    model: str,
    source: str,
    device: str,
    code: str,
) -> None:
    await agents.start(head, "w1")
    with pytest.raises(BadRequest) as exc:
        await client.download(model, source, device)
    assert exc.value.code == code


async def test_url_answering_404_fails_the_op_with_the_status(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    await agents.start(head, "w1")
    op = await client.download("m", f"{hub.url}/org/tiny/resolve/main/missing.bin", "w1:disk", wait=True)
    assert op.state == "failed" and op.error is not None
    assert "404" in op.error.message
    assert (await client.get_model("m")).locations == []


async def test_repo_that_does_not_exist(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    await agents.start(head, "w1")
    op = await client.download("m", "org/no-such-repo", "w1:disk", wait=True)
    assert op.state == "failed" and op.error is not None
    assert op.error.code == "repo_not_found" and "org/no-such-repo" in op.error.message


async def test_unreachable_hub_is_named_with_what_to_set_and_logged_in_one_line(
    head: HeadServer,
    agents: AgentRunner,
    client: GswarmClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No Hub answers (a closed port stands for a network without it): the op names the Hub it
    tried and what to set, with its own code; the agent logs one line, no traceback."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    await agents.start(head, "w1")
    op = await client.download("m", "org/tiny", "w1:disk", wait=True)
    assert op.state == "failed" and op.error is not None
    assert op.error.code == "source_unreachable"
    message = op.error.message
    assert message.startswith(f"cannot reach the Hub at {endpoint} (connection refused): "), message
    assert "HF_ENDPOINT" in message and "HF_TOKEN" in message and "Errno" not in message
    assert "Traceback" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if op.op_id in r.getMessage()]
    assert line.endswith(message) and "source_unreachable" in line


async def test_unreachable_url_names_its_host(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    await agents.start(head, "w1")
    url = f"http://127.0.0.1:{port}/weights/model.safetensors"
    op = await client.download("m", url, "w1:disk", wait=True)
    assert op.state == "failed" and op.error is not None and op.error.code == "source_unreachable"
    assert op.error.message == f"cannot reach 127.0.0.1:{port} (connection refused) to fetch {url}"
    assert "Traceback" not in caplog.text


async def test_gated_repo_asks_for_hf_token(
    head: HeadServer,
    agents: AgentRunner,
    client: GswarmClient,
    hub: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A repo the Hub answers 401/403 for: the op says to set HF_TOKEN (or that the one set may
    not read it), for a repo and for a plain URL on the Hub alike; with the token it downloads."""
    from tests.hubserver import HubRepo

    hub.add_repo(HubRepo("org/gated", {"config.json": b"{}"}, token="hf_right"))
    await agents.start(head, "w1")
    url = f"{hub.url}/org/gated/resolve/main/config.json"
    for source in ("org/gated", url):
        op = await client.download("m", source, "w1:disk", wait=True)
        assert op.state == "failed" and op.error is not None, source
        assert op.error.code == "source_forbidden", op.error
        assert re.search(r"set HF_TOKEN\b.* where the agent runs", op.error.message), op.error.message
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    for source in ("org/gated", url):
        op = await client.download("m", source, "w1:disk", wait=True)
        assert op.error is not None and op.error.code == "source_forbidden", source
        assert "the HF_TOKEN set where the agent runs may not read it" in op.error.message
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    for name, source in (("m", "org/gated"), ("n", url)):
        op = await client.download(name, source, "w1:dram", wait=True)
        assert op.state == "succeeded", op.error
    assert "Traceback" not in caplog.text


async def test_not_enough_space_fails_before_any_byte(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    agent = await agents.start(head, "w1", quotas={"disk": 10 << 20})
    op = await client.download("tiny", "org/tiny", "w1:disk", wait=True)
    assert op.state == "failed" and op.error is not None
    assert op.error.code == "insufficient_space"
    assert hub.bytes_served["model.safetensors"] == 0
    store = agent.stores["disk"]
    assert not store.model_dir("tiny").exists() and not store.partial_dir("tiny").exists()
    # Once the size is known (a copy elsewhere), the head refuses with 507 before any op.
    await agents.start(head, "w2")
    assert (await client.download("tiny", "org/tiny", "w2:dram", wait=True)).state == "succeeded"
    await client.probe("w1", wait=True)
    with pytest.raises(InsufficientSpace):
        await client.download("tiny", "org/tiny", "w1:disk")


def _fill(path: Path) -> None:
    """Write zeros to `path` until its filesystem is full."""
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root"
)
async def test_disk_filling_up_mid_download_is_507_and_keeps_what_arrived(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tmp_path: Path
) -> None:
    # The node's disk tier is a 96 MiB filesystem: room for the 70 MiB model when the download
    # starts, then something else on the node fills it while the bytes arrive.
    disk = tmp_path / "nodes" / "w1" / "disk"
    disk.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        agent = await agents.start(head, "w1")
        hub.rate_limit = 20 << 20
        op = await client.download("tiny", "org/tiny", "w1:disk")
        await wait_for(lambda: head.head.registry.ops[op.op_id].progress.done > 4 << 20, timeout=20)
        await asyncio.to_thread(_fill, disk / "someone-else.bin")
        done = await client.wait_op(op.op_id, timeout=30)
        assert done.state == "failed" and done.error is not None
        assert done.error.code == "insufficient_space", done.error
        assert "no space left writing" in done.error.message
        store = agent.stores["disk"]
        assert not store.model_dir("tiny").exists()
        assert store.partial_dir("tiny").exists()  # kept: a retry resumes
        (loc,) = (await client.get_model("tiny")).locations
        assert (loc.device, loc.state) == ("w1:disk", "partial") and loc.size > 4 << 20
        # Space comes back; the same download resumes and completes.
        (disk / "someone-else.bin").unlink()
        again = await client.download("tiny", "org/tiny", "w1:disk", wait=True)
        assert again.state == "succeeded"
        assert (store.model_dir("tiny") / "model.safetensors").stat().st_size == BIG_FILE_BYTES
    finally:
        await agents.stop_all()
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(disk)], check=False)


async def test_full_target_on_copy_is_507(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    agent = await agents.start(head, "w1", quotas={"dram": 1 << 20})
    await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
    with pytest.raises(InsufficientSpace):
        await client.copy("m", "w1:disk", "w1:dram")
    assert not agent.stores["dram"].model_dir("m").exists()
    assert [loc.device for loc in (await client.get_model("m")).locations] == ["w1:disk"]


async def test_source_device_without_the_model_is_409_naming_where_it_is(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    await agents.start(head, "w1")
    await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
    with pytest.raises(Conflict) as exc:
        await client.move("m", "w1:dram", "w1:disk")
    assert exc.value.code == "not_held" and "w1:disk (ready)" in exc.value.message


async def test_repo_file_names_that_escape_are_refused(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile Hub lists a file named ../../escape.txt: nothing is written outside."""
    agent = await agents.start(head, "w1")

    async def info(request: web.Request) -> web.Response:
        siblings = [{"rfilename": "../../escape.txt", "size": 3}]
        return web.json_response({"id": "evil/repo", "sha": "a" * 40, "siblings": siblings})

    async def resolve(request: web.Request) -> web.Response:
        return web.Response(body=b"bad")

    app = web.Application()
    app.router.add_get("/api/models/evil/repo", info)
    app.router.add_get("/api/models/evil/repo/revision/{rev}", info)
    app.router.add_route("*", "/evil/repo/resolve/{tail:.*}", resolve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        op = await client.download("evil", "evil/repo", "w1:disk", wait=True)
    finally:
        await runner.cleanup()
    assert op.state == "failed" and op.error is not None and op.error.code == "unsafe_path"
    root = agent.stores["disk"].root
    assert not (root.parent / "escape.txt").exists() and not (root / "escape.txt").exists()
    assert not list(root.parent.parent.rglob("escape.txt"))


async def test_holdings_reconciled_on_reconnect(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    agent = await agents.start(head, "w1")
    await client.download("m", f"file://{tiny_repo_dir}", "w1:dram", wait=True)
    await agents.stop("w1")
    # The dram copy is lost (a reboot), and a copy the head never heard of appears on disk.
    agent.stores["dram"].remove("m")
    other = agent.stores["disk"].model_dir("found")
    other.mkdir(parents=True)
    (other / "w.bin").write_bytes(b"12345")
    (other / ".gswarm-manifest.json").write_text(
        json.dumps({"model": "found", "files": [{"path": "w.bin", "size": 5}]})
    )
    await agents.start(head, "w1")
    await wait_for(lambda: head.head.registry.locations.get(("found", "w1:disk")) is not None)
    assert (await client.get_model("m")).locations == []
    assert [(loc.device, loc.size) for loc in (await client.get_model("found")).locations] == [("w1:disk", 5)]


async def test_download_twice_concurrently_different_devices(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    await agents.start(head, "w1")
    a, b = await asyncio.gather(
        client.download("tiny", "org/tiny", "w1:disk", wait=True),
        client.download("tiny", "org/tiny", "w1:dram", wait=True),
    )
    assert a.state == b.state == "succeeded"
    locs = {loc.device for loc in (await client.get_model("tiny")).locations}
    assert locs == {"w1:disk", "w1:dram"}
