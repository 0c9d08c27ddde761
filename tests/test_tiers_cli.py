"""Tier ops through the CLI: a killed agent process resumes its download, the user's commands
(download, show, copy, move, rm, delete) work as written, and Ctrl-C on a real `download`
process leaves the op running."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from tests.conftest import BIG_FILE_BYTES, AgentRunner, Cli, tree_bytes, wait_for

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
        # Every GET of the weights the killed process had open has ended: the count is final.
        gets = ("GET", "model.safetensors")
        await wait_for(
            lambda: sum((r.method, r.filename) == gets for r in hub.requests) == hub.request_counts[gets],
            timeout=10,
        )
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


async def _locations(cli: Cli, url: str, model: str) -> dict[str, str]:
    r = await cli.ainvoke("show", model, "--json", "--head-url", url)
    assert r.returncode == 0, r.stderr
    return {loc["device"]: loc["state"] for loc in json.loads(r.stdout)["locations"]}


async def test_cli_download_copy_move_rm(
    head: HeadServer, agents: AgentRunner, cli: Cli, hub: Any, tiny_repo_dir: Path
) -> None:
    url = head.url
    node = await agents.start(head, "node1")

    source = "https://huggingface.co/org/tiny"
    r = await cli.ainvoke("download", "tiny", source, "node1:disk", "--head-url", url)
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout
    assert await _locations(cli, url, "tiny") == {"node1:disk": "ready"}
    r = await cli.ainvoke("show", "tiny", "--head-url", url)
    assert "node1:disk" in r.stdout and "ready" in r.stdout and "MB" in r.stdout

    r = await cli.ainvoke("download", "tiny", "org/tiny", "node1:disk", "--head-url", url)
    assert r.returncode == 0 and "already there" in r.stdout

    r = await cli.ainvoke("copy", "tiny", "node1:disk", "node1:dram", "--head-url", url)
    assert r.returncode == 0, r.stderr
    assert await _locations(cli, url, "tiny") == {"node1:disk": "ready", "node1:dram": "ready"}
    r = await cli.ainvoke("rm", "tiny", "node1:dram", "--head-url", url)
    assert r.returncode == 0, r.stderr
    r = await cli.ainvoke("move", "tiny", "node1:disk", "node1:dram", "--head-url", url)
    assert r.returncode == 0, r.stderr
    assert await _locations(cli, url, "tiny") == {"node1:dram": "ready"}
    assert tree_bytes(node.stores["dram"].model_dir("tiny")) == tree_bytes(tiny_repo_dir)
    r = await cli.ainvoke("list", "--head-url", url)
    assert "node1:dram" in r.stdout

    # A failed op, end to end through a real process: exit status 1, one line, no traceback.
    r = await cli.arun("move", "tiny", "node1:disk", "node1:dram", "--head-url", url)
    assert r.returncode == 1 and "node1:dram (ready)" in r.stderr and "Traceback" not in r.stderr

    r = await cli.ainvoke("download", "nope", "org/absent", "node1:disk", "--head-url", url)
    assert r.returncode == 1 and "not found" in r.stdout + r.stderr

    r = await cli.ainvoke("download", "tiny2", "org/tiny", "node1:disk", "--detach", "--head-url", url)
    op_id = r.stdout.strip()
    assert r.returncode == 0 and len(op_id) == 16
    r = await cli.ainvoke("ops", "--json", "--head-url", url)
    assert op_id in [op["op_id"] for op in json.loads(r.stdout)]

    r = await cli.ainvoke("delete", "tiny", "--head-url", url)
    assert r.returncode == 0, r.stderr
    r = await cli.ainvoke("show", "tiny", "--head-url", url)
    assert r.returncode == 1
    await wait_for(lambda: not node.executor.running, timeout=30)  # tiny2 ends before teardown


async def test_ctrl_c_leaves_the_op_running_without_a_terminal(
    head: HeadServer, agents: AgentRunner, cli: Cli, hub: Any
) -> None:
    """Ctrl-C during a download: with no terminal to ask, the op keeps running and the CLI says
    how to follow or cancel it; `events` follows every change live."""
    url = head.url
    await agents.start(head, "n1")
    follower = cli.spawn(
        "events", "--json", "--since", "0", "--topic", "op", "--head-url", url, name="events"
    )
    hub.rate_limit = 10 << 20
    dl = cli.spawn("download", "tiny", "org/tiny", "n1:disk", "--head-url", url, name="download")
    reg = head.head.registry
    await wait_for(lambda: any(o.progress.done > 0 for o in reg.ops.values()), timeout=20)
    dl.signal(signal.SIGINT)
    assert await asyncio.to_thread(dl.p.wait, 10) == 130
    assert "keeps running" in dl.output() and "Traceback" not in dl.output()
    op = json.loads((await cli.ainvoke("ops", "--json", "--head-url", url)).stdout)[0]
    assert op["state"] == "running"
    assert (await cli.ainvoke("cancel", op["op_id"], "--head-url", url)).returncode == 0
    await wait_for(lambda: '"op.cancelled"' in follower.output(), timeout=10)
    kinds = [json.loads(line)["kind"] for line in follower.output().splitlines() if line.startswith("{")]
    assert kinds[0] == "op.created" and "op.progress" in kinds and "op.cancelled" in kinds
