"""The CLI as a user runs it: the original quick start, offline detection after SIGKILL, a head
restarted on the same state dir, clean SIGTERM, errors. Real processes where only a process
shows it (`head`, `client` and `up` starting, signals, exit statuses end to end); the other
commands run in-process (`cli.invoke`, `cli.ainvoke`) against a real head."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gswarm.client import GswarmClient
from gswarm.config import Settings
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, Cli, free_port, wait_for, wait_until


def _statuses(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert r.returncode == 0, r.stderr
    return {n["node_id"]: n["status"] for n in json.loads(r.stdout)}


def _node_status(cli: Cli, url: str, node: str) -> str:
    return _statuses(cli.invoke("nodes", "--json", "--head-url", url)).get(node, "absent")


async def _anode_status(cli: Cli, url: str, node: str) -> str:
    return _statuses(await cli.ainvoke("nodes", "--json", "--head-url", url)).get(node, "absent")


def test_original_quick_start(cli: Cli) -> None:
    """`gsmodel head --port P`, `gsmodel client URL --node-id worker1`, register, list:
    as the original README wrote them, no token typed."""
    port = free_port()
    head = cli.spawn("head", "--port", str(port), name="head")
    head.wait_output("listening on")
    url = f"http://localhost:{port}"
    agent = cli.spawn("client", url, "--node-id", "worker1", name="agent")
    env = {"GSWARM_HEAD_URL": url}
    wait_until(lambda: _node_status(cli, url, "worker1") == "online", timeout=15)

    r = cli.run(
        "register", "llama-7b", "llm", "--source-url",
        "https://huggingface.co/meta-llama/Llama-2-7b-hf", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "registered llama-7b" in r.stdout
    r = cli.invoke("list", env=env)
    assert r.returncode == 0 and "llama-7b" in r.stdout and "llm" in r.stdout
    r = cli.invoke("list", "--json", env=env)
    assert json.loads(r.stdout)[0]["source_url"] == "https://huggingface.co/meta-llama/Llama-2-7b-hf"
    r = cli.invoke("nodes", env=env)
    assert "worker1" in r.stdout and "online" in r.stdout
    r = cli.invoke("probe", "worker1", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"

    # SIGTERM stops both cleanly.
    assert agent.stop() == 0
    assert "agent stopped" in agent.output()
    assert head.stop() == 0
    assert "head stopped" in head.output()


async def test_errors_are_one_line_and_non_zero(head: HeadServer, cli: Cli) -> None:
    url = head.url
    r = await cli.arun("register", "../x", "llm", "--head-url", url)  # a real process, end to end
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "invalid model name" in r.stderr
    assert "Traceback" not in r.stderr
    r = await cli.ainvoke("register", "../x", "llm", "--head-url", url)  # the same in-process
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "invalid model name" in r.stderr
    r = await cli.ainvoke("show", "nope", "--head-url", url)
    assert r.returncode == 1 and "not registered" in r.stderr and "Traceback" not in r.stderr
    r = await cli.ainvoke("list", "--head-url", url, "--token", "wrong")
    assert r.returncode == 1 and "wrong token" in r.stderr
    r = await cli.ainvoke("list", "--head-url", "http://127.0.0.1:1")
    assert r.returncode == 1 and "cannot reach the head" in r.stderr and "Traceback" not in r.stderr
    r = await cli.ainvoke("probe", "ghost", "--head-url", url)
    assert r.returncode == 1 and "not known" in r.stderr


async def test_errors_name_the_commands_flags_not_the_apis_fields(
    head: HeadServer, agents: AgentRunner, cli: Cli
) -> None:
    """What a command sent is named as the command takes it (`--all-nodes`, `MODEL`), not as
    the REST body or query calls it (`all_nodes`, `model_name`)."""
    await agents.start(head, "w1")
    url = ["--head-url", head.url]
    expected = {
        ("replicate", "m", "--all-nodes", "gpu0"): "error: --all-nodes: invalid enum value 'gpu0'",
        ("replicate", "m", "w1:disk", "--max-fanout", "100"): "error: --max-fanout: expected `int` <= 64",
        ("download", "m", "org/x", "w1:disk", "--include", "x" * 2000): "error: --include: expected `str`",
        ("copy", "m", "w1:disk", "w1:dram", "--verify", "md5"): "error: --verify: invalid enum value 'md5'",
        ("health",): "error: give MODEL and DEVICE (a service), or --node",
        ("events", "--since", "-5", "--no-follow"): "error: --since '-5' is not an integer",
        ("logs", "m", "w1:disk", "--lines", "0"): "error: --lines '0' is not an integer",
        ("serve", "m", "w1:disk", "8000", "--config", "[1]"): "error: --config: expected `object`",
        ("nodes", "remove", "w1"): "error: node 'w1' is online: stop its agent first, or pass --force",
    }
    for args, start in expected.items():
        r = await cli.ainvoke(*args, *url)
        assert r.returncode == 1 and r.stderr.startswith(start), (args, r.stderr)
        assert not re.search(r"[a-z]+_[a-z]+|\$\.", r.stderr), (args, r.stderr)


async def test_sigkilled_agent_goes_offline_and_returns(head: HeadServer, cli: Cli) -> None:
    url = head.url
    agent = cli.spawn("client", url, "--node-id", "w1", name="agent")
    reg = head.head.registry
    await wait_for(lambda: "w1" in reg.nodes and reg.nodes["w1"].status == "online", timeout=15)
    assert await _anode_status(cli, url, "w1") == "online"
    agent.signal(signal.SIGKILL)
    start = time.monotonic()
    await wait_for(lambda: reg.nodes["w1"].status == "offline", timeout=15)
    assert time.monotonic() - start < 6
    assert await _anode_status(cli, url, "w1") == "offline"
    cli.spawn("client", url, "--node-id", "w1", name="agent2")
    await wait_for(lambda: reg.nodes["w1"].status == "online", timeout=15)
    assert await _anode_status(cli, url, "w1") == "online"
    r = await cli.ainvoke(
        "events", "--no-follow", "--since", "0", "--topic", "node", "--json",
        "--head-url", url,
    )  # fmt: skip
    kinds = [json.loads(line)["kind"] for line in r.stdout.splitlines()]
    assert kinds[0] == "node.registered" and "node.offline" in kinds and kinds[-1] == "node.online"


async def test_head_restart_keeps_registry_and_agents_return(
    tmp_path: Path, settings: Settings, agents: AgentRunner, cli: Cli
) -> None:
    """The head stops (what SIGTERM does: test_original_quick_start) and starts again on the same
    state dir and port; the agent, not restarted, comes back by itself."""
    head = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await head.start()
    try:
        url = head.url
        await agents.start(head, "w1")
        assert (await cli.ainvoke("register", "m1", "llm", "--head-url", url)).returncode == 0
        assert (await cli.ainvoke("register", "m2", "diffusion", "--head-url", url)).returncode == 0
        before = json.loads((await cli.ainvoke("list", "--json", "--head-url", url)).stdout)
        probe = json.loads((await cli.ainvoke("probe", "w1", "--json", "--head-url", url)).stdout)

        await head.stop()
        head = HeadServer(tmp_path / "state", "127.0.0.1", head.port, settings)
        await head.start()
        after = json.loads((await cli.ainvoke("list", "--json", "--head-url", url)).stdout)
        assert after == before and [m["name"] for m in after] == ["m1", "m2"]
        op = json.loads((await cli.ainvoke("ops", "--json", "--head-url", url)).stdout)[0]
        assert op["op_id"] == probe["op_id"] and op["state"] == "succeeded"
        # The agent was not restarted: it reconnects by itself (its node online all along, no
        # flap) and takes work again.
        assert await _anode_status(cli, url, "w1") == "online"
        reg = head.head.registry
        await wait_for(lambda: reg.nodes["w1"].connected, timeout=15)
        assert reg.nodes["w1"].status == "online"
        r = await cli.ainvoke("probe", "w1", "--json", "--head-url", url)
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"
        assert not agents.tasks["w1"].done()
    finally:
        await head.stop()


async def test_duplicate_node_id_agent_exits_with_reason(
    head: HeadServer, agents: AgentRunner, cli: Cli
) -> None:
    await agents.start(head, "w1")
    r = await cli.arun("client", head.url, "--node-id", "w1", timeout=30)  # a real agent process
    assert r.returncode == 2
    assert "already online" in r.stderr and "Traceback" not in r.stderr


def test_up_runs_head_and_local_agent(cli: Cli) -> None:
    port = free_port()
    up = cli.spawn("up", "--port", str(port), "--node-id", "local", name="up")
    up.wait_output("up: head")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _node_status(cli, url, "local") == "online", timeout=15)
    r = cli.invoke("token", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["api_token"].startswith("gsw_api_")
    assert up.stop() == 0
    assert "stopped" in up.output()


async def test_sync_client(head: HeadServer) -> None:
    """The SDK's blocking wrapper, from a thread with no event loop of its own."""
    from gswarm.client import SyncClient
    from gswarm.config import load_tokens

    tokens = load_tokens(head.head.state_dir)
    assert tokens is not None

    def use() -> None:
        sdk = SyncClient(head.url, tokens.api_token)
        sdk.register_model("m1", "llm", source_url="hf://org/m1")
        assert [m.name for m in sdk.list_models()] == ["m1"]
        assert sdk.health()["status"] == "ok"

    await asyncio.to_thread(use)


async def test_events_into_a_pipe_that_closes_ends_quietly(head: HeadServer, cli: Cli) -> None:
    """`gswarm events | head -2`: the reader leaves; at its next line the command stops with no
    error line (as `tail -f | head` does)."""
    for i in range(3):
        r = await cli.ainvoke("register", f"m{i}", "llm", "--head-url", head.url)
        assert r.returncode == 0, r.stderr
    env = {**cli.env, "GSWARM_TOKEN": head.head.tokens.api_token}
    pipeline = f"{sys.executable} -m gswarm events --json --since 0 --head-url {head.url} | head -2"
    proc = await asyncio.create_subprocess_exec(
        "bash", "-o", "pipefail", "-c", pipeline, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        await wait_for(lambda: proc.returncode is not None or head.head.bus.subscriber_count > 0, timeout=20)
        r = await cli.ainvoke("register", "later", "llm", "--head-url", head.url)  # one more line
        assert r.returncode == 0, r.stderr
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert len(out.decode().splitlines()) == 2, out
    assert proc.returncode == 0 and b"error" not in err and b"Traceback" not in err, err


def test_help_names_values_as_people_write_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `<bool>`, `<str>` or `<list[str]>` in any command's help: a flag shows no value, an
    option names its own (`--include GLOB`), an argument its name (`MODEL`). (Every command's
    help from one build of the command tree: a `cli.invoke` each would rebuild it.)"""
    import typer

    from gswarm.cli import app

    monkeypatch.setenv("COLUMNS", "100")
    command = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = []

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(command, ())
    assert ("nodes", "remove") in paths and ("jobs", "show") in paths and len(paths) > 30
    helps: dict[tuple[str, ...], str] = {}
    for path in paths:
        assert command.main([*path, "--help"], prog_name="gsmodel", standalone_mode=False) == 0
        helps[path] = text = capsys.readouterr().out
        assert "Usage: gsmodel" in text, path
        assert not re.search(r"<[a-z][\w\[\], ]*>", text, re.IGNORECASE), (path, text)
        assert re.search(r"--help +Show this message", text), (path, text)
    assert re.search(r"--include +GLOB +Only files", helps["download",])
    assert re.search(r"\* +MODEL +Model name", helps["download",])
    assert re.search(r"--keep-source +Keep the source copy", helps["move",])
    assert re.search(r"--all-nodes +disk\|dram ", helps["replicate",])


async def test_ops_and_nodes_fit_80_columns_one_line_a_row(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, cli: Cli
) -> None:
    """In an 80-column terminal (a real process, as a user runs it) every op and every node
    takes one line of at most 80 characters: long cells are cut, low-value columns go, nothing
    wraps onto a second line."""
    await agents.start(head, "node-1", simulate_gpus="2:16G")
    await agents.start(head, "node-2")
    await client.probe("node-1", wait=True)
    for node in ("node-1", "node-2"):
        url = f"http://127.0.0.1:{free_port()}/weights/model.safetensors"
        await client.download(f"model-on-{node}", url, f"{node}:disk", wait=True)
    ops = await client.list_ops()
    narrow = {"COLUMNS": "80"}
    r_ops, r_nodes = await asyncio.gather(
        cli.arun("ops", "--head-url", head.url, env=narrow),
        cli.arun("nodes", "--head-url", head.url, env=narrow),
    )
    for r, keys in ((r_ops, [op.op_id for op in ops]), (r_nodes, ["node-1", "node-2"])):
        assert r.returncode == 0, r.stderr
        lines = r.stdout.rstrip("\n").split("\n")
        assert all(len(line) <= 80 for line in lines), r.stdout
        assert len(lines) == 2 + len(keys), r.stdout  # header, rule, a line a row
        for key, line in zip(keys, lines[2:], strict=True):
            assert line.startswith(key), r.stdout
    for op, line in zip(ops, r_ops.stdout.split("\n")[2:], strict=False):
        assert op.kind in line and op.node_id in line and op.state in line, line
        if op.error is not None:
            assert "cannot reach 127.0.0.1:" in line and line.rstrip().endswith("…"), line
    assert "2x simulated GPU" in r_nodes.stdout and "online" in r_nodes.stdout
