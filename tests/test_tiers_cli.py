"""Tier ops through the real CLI and agent processes: a killed agent resumes its download,
and the user's commands (download, show, copy, move, rm, delete) work as written."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from tests.conftest import BIG_FILE_BYTES, Cli, tree_bytes, wait_for
from tests.hubserver import HubRepo, ThreadedHubServer

pytestmark = pytest.mark.timeout(120)


async def test_killed_agent_resumes_its_download(
    head: HeadServer, cli: Cli, hub: Any, tmp_path: Path, tiny_repo_dir: Path
) -> None:
    hub.rate_limit = 25 << 20
    env = {"HF_ENDPOINT": hub.url}
    token = head.head.tokens.join_token
    disk = tmp_path / "w1-disk"
    args = ["client", head.url, "--node-id", "w1", "--token", token, "--disk-dir", str(disk)]
    agent = cli.spawn(*args, env=env, name="agent")
    reg = head.head.registry
    await wait_for(lambda: "w1" in reg.nodes and reg.nodes["w1"].connected, timeout=15)
    async with GswarmClient(head.url, head.head.tokens.api_token) as c:
        op = await c.download("tiny", "https://huggingface.co/org/tiny", "w1:disk")
        await wait_for(lambda: reg.ops[op.op_id].progress.done > 35 << 20, timeout=30)
        agent.signal(signal.SIGKILL)
        agent.p.wait()
        await asyncio.sleep(0.6)  # let bytes in flight drain from the server's counters
        served_before = hub.bytes_served["model.safetensors"]
        assert (disk / ".partial" / "tiny" / ".gswarm-download.json").exists()
        hub.rate_limit = None

        cli.spawn(*args, env=env, name="agent2")
        final = await c.wait_op(op.op_id, timeout=60)
        assert final.state == "succeeded", final.error
        assert final.attempts == 2  # the head sent the op again to the new agent process
    served_after = hub.bytes_served["model.safetensors"] - served_before
    assert served_after <= BIG_FILE_BYTES - (25 << 20), (served_before, served_after)
    assert tree_bytes(disk / "tiny") == tree_bytes(tiny_repo_dir)  # verified, every byte


@pytest.fixture
def threaded_hub(tiny_repo_dir: Path) -> Iterator[ThreadedHubServer]:
    server = ThreadedHubServer([HubRepo.from_dir("org/tiny", tiny_repo_dir)])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _locations(cli: Cli, url: str, model: str) -> dict[str, str]:
    r = cli.run("show", model, "--json", "--head-url", url)
    assert r.returncode == 0, r.stderr
    return {loc["device"]: loc["state"] for loc in json.loads(r.stdout)["locations"]}


def test_cli_download_copy_move_rm(cli: Cli, threaded_hub: ThreadedHubServer, tiny_repo_dir: Path) -> None:
    _head, url = cli.start_head()
    env = {"HF_ENDPOINT": threaded_hub.url}
    cli.spawn("client", url, "--node-id", "node1", env=env, name="agent")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = cli.run("nodes", "--json", "--head-url", url)
        if any(n["status"] == "online" for n in json.loads(r.stdout or "[]")):
            break
        time.sleep(0.2)

    r = cli.run("download", "tiny", "https://huggingface.co/org/tiny", "node1:disk", "--head-url", url)
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout
    assert _locations(cli, url, "tiny") == {"node1:disk": "ready"}
    r = cli.run("show", "tiny", "--head-url", url)
    assert "node1:disk" in r.stdout and "ready" in r.stdout and "MB" in r.stdout

    r = cli.run("download", "tiny", "org/tiny", "node1:disk", "--head-url", url)
    assert r.returncode == 0 and "already there" in r.stdout

    r = cli.run("copy", "tiny", "node1:disk", "node1:dram", "--head-url", url)
    assert r.returncode == 0, r.stderr
    assert _locations(cli, url, "tiny") == {"node1:disk": "ready", "node1:dram": "ready"}
    r = cli.run("rm", "tiny", "node1:dram", "--head-url", url)
    assert r.returncode == 0, r.stderr
    r = cli.run("move", "tiny", "node1:disk", "node1:dram", "--head-url", url)
    assert r.returncode == 0, r.stderr
    assert _locations(cli, url, "tiny") == {"node1:dram": "ready"}
    assert tree_bytes(cli.tmp_path / "dram" / "tiny") == tree_bytes(tiny_repo_dir)
    r = cli.run("list", "--head-url", url)
    assert "node1:dram" in r.stdout

    r = cli.run("move", "tiny", "node1:disk", "node1:dram", "--head-url", url)
    assert r.returncode == 1 and "node1:dram (ready)" in r.stderr and "Traceback" not in r.stderr

    r = cli.run("download", "nope", "org/absent", "node1:disk", "--head-url", url)
    assert r.returncode == 1 and "not found" in r.stdout + r.stderr

    r = cli.run("download", "tiny2", "org/tiny", "node1:disk", "--detach", "--head-url", url)
    op_id = r.stdout.strip()
    assert r.returncode == 0 and len(op_id) == 16
    r = cli.run("ops", "--json", "--head-url", url)
    assert op_id in [op["op_id"] for op in json.loads(r.stdout)]

    r = cli.run("delete", "tiny", "--head-url", url)
    assert r.returncode == 0, r.stderr
    r = cli.run("show", "tiny", "--head-url", url)
    assert r.returncode == 1


def test_ctrl_c_leaves_the_op_running_without_a_terminal(cli: Cli, threaded_hub: ThreadedHubServer) -> None:
    """Ctrl-C during a download: with no terminal to ask, the op keeps running and the CLI says
    how to follow or cancel it; `events` follows every change live."""
    _head, url = cli.start_head()
    cli.spawn("client", url, "--node-id", "n1", env={"HF_ENDPOINT": threaded_hub.url}, name="agent")
    deadline = time.monotonic() + 15
    while (
        time.monotonic() < deadline and '"online"' not in cli.run("nodes", "--json", "--head-url", url).stdout
    ):
        time.sleep(0.2)
    follower = cli.spawn(
        "events", "--json", "--since", "0", "--topic", "op", "--head-url", url, name="events"
    )
    threaded_hub.call(setattr, threaded_hub.server, "rate_limit", 10 << 20)
    dl = cli.spawn("download", "tiny", "org/tiny", "n1:disk", "--head-url", url, name="download")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ops = json.loads(cli.run("ops", "--json", "--head-url", url).stdout)
        if ops and ops[0]["progress"]["done"] > 0:
            break
        time.sleep(0.2)
    dl.signal(signal.SIGINT)
    assert dl.p.wait(10) == 130
    assert "keeps running" in dl.output() and "Traceback" not in dl.output()
    op = json.loads(cli.run("ops", "--json", "--head-url", url).stdout)[0]
    assert op["state"] == "running"
    assert cli.run("cancel", op["op_id"], "--head-url", url).returncode == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and '"op.cancelled"' not in follower.output():
        time.sleep(0.2)
    kinds = [json.loads(line)["kind"] for line in follower.output().splitlines() if line.startswith("{")]
    assert kinds[0] == "op.created" and "op.progress" in kinds and "op.cancelled" in kinds
