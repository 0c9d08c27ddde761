"""The real CLI in subprocesses, as a user runs it: the original quick start, offline
detection after SIGKILL, a head restarted on the same state dir, clean SIGTERM, errors."""

from __future__ import annotations

import json
import signal
import time

from tests.conftest import Cli, free_port


def _node_status(cli: Cli, url: str, node: str) -> str:
    r = cli.run("nodes", "--json", "--head-url", url)
    assert r.returncode == 0, r.stderr
    return next((n["status"] for n in json.loads(r.stdout) if n["node_id"] == node), "absent")


def _wait_status(cli: Cli, url: str, node: str, status: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _node_status(cli, url, node) == status:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"{node} not {status} within {timeout} s")


def test_original_quick_start(cli: Cli) -> None:
    """`gsmodel head --port P`, `gsmodel client URL --node-id worker1`, register, list:
    as the original README wrote them, no token typed."""
    port = free_port()
    head = cli.spawn("head", "--port", str(port), name="head")
    head.wait_output("listening on")
    url = f"http://localhost:{port}"
    cli.spawn("client", url, "--node-id", "worker1", name="agent")
    env = {"GSWARM_HEAD_URL": url}
    _wait_status(cli, url, "worker1", "online", 15)

    r = cli.run(
        "register", "llama-7b", "llm", "--source-url",
        "https://huggingface.co/meta-llama/Llama-2-7b-hf", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "registered llama-7b" in r.stdout
    r = cli.run("list", env=env)
    assert r.returncode == 0 and "llama-7b" in r.stdout and "llm" in r.stdout
    r = cli.run("list", "--json", env=env)
    assert json.loads(r.stdout)[0]["source_url"] == "https://huggingface.co/meta-llama/Llama-2-7b-hf"
    r = cli.run("nodes", env=env)
    assert "worker1" in r.stdout and "online" in r.stdout
    r = cli.run("probe", "worker1", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"

    # SIGTERM stops both cleanly.
    assert cli.procs[1].stop() == 0
    assert head.stop() == 0
    assert "head stopped" in head.output()


def test_errors_are_one_line_and_non_zero(cli: Cli) -> None:
    _head, url = cli.start_head()
    r = cli.run("register", "../x", "llm", "--head-url", url)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "invalid model name" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli.run("show", "nope", "--head-url", url)
    assert r.returncode == 1 and "not registered" in r.stderr and "Traceback" not in r.stderr
    r = cli.run("list", "--head-url", url, "--token", "wrong")
    assert r.returncode == 1 and "wrong token" in r.stderr
    r = cli.run("list", "--head-url", "http://127.0.0.1:1")
    assert r.returncode == 1 and "cannot reach the head" in r.stderr and "Traceback" not in r.stderr
    r = cli.run("probe", "ghost", "--head-url", url)
    assert r.returncode == 1 and "not known" in r.stderr


def test_sigkilled_agent_goes_offline_and_returns(cli: Cli) -> None:
    _head, url = cli.start_head(GSWARM_OFFLINE_AFTER="3")
    agent = cli.spawn("client", url, "--node-id", "w1", name="agent")
    _wait_status(cli, url, "w1", "online", 15)
    agent.signal(signal.SIGKILL)
    took = _wait_status(cli, url, "w1", "offline", 15)
    assert took < 6
    cli.spawn("client", url, "--node-id", "w1", name="agent2")
    _wait_status(cli, url, "w1", "online", 15)
    r = cli.run("events", "--no-follow", "--since", "0", "--topic", "node", "--json", "--head-url", url)
    kinds = [json.loads(line)["kind"] for line in r.stdout.splitlines()]
    assert kinds[0] == "node.registered" and "node.offline" in kinds and kinds[-1] == "node.online"


def test_head_restart_keeps_registry_and_agents_return(cli: Cli) -> None:
    port = free_port()
    head, url = cli.start_head(port)
    cli.spawn("client", url, "--node-id", "w1", name="agent")
    _wait_status(cli, url, "w1", "online", 15)
    assert cli.run("register", "m1", "llm", "--head-url", url).returncode == 0
    assert cli.run("register", "m2", "diffusion", "--head-url", url).returncode == 0
    before = json.loads(cli.run("list", "--json", "--head-url", url).stdout)
    probe = json.loads(cli.run("probe", "w1", "--json", "--head-url", url).stdout)

    assert head.stop() == 0  # SIGTERM: clean exit
    _head2, _ = cli.start_head(port)
    after = json.loads(cli.run("list", "--json", "--head-url", url).stdout)
    assert after == before
    op = json.loads(cli.run("ops", "--json", "--head-url", url).stdout)[0]
    assert op["op_id"] == probe["op_id"] and op["state"] == "succeeded"
    # The agent was not restarted: it reconnects by itself and takes work again.
    _wait_status(cli, url, "w1", "online", 15)
    r = cli.run("probe", "w1", "--json", "--head-url", url)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"
    assert cli.procs[1].p.poll() is None


def test_duplicate_node_id_agent_exits_with_reason(cli: Cli) -> None:
    _head, url = cli.start_head()
    cli.spawn("client", url, "--node-id", "w1", name="agent")
    _wait_status(cli, url, "w1", "online", 15)
    r = cli.run("client", url, "--node-id", "w1", timeout=30)
    assert r.returncode == 2
    assert "already online" in r.stderr and "Traceback" not in r.stderr


def test_up_runs_head_and_local_agent(cli: Cli) -> None:
    port = free_port()
    up = cli.spawn("up", "--port", str(port), "--node-id", "local", name="up")
    up.wait_output("up: head")
    url = f"http://127.0.0.1:{port}"
    _wait_status(cli, url, "local", "online", 15)
    r = cli.run("token", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["api_token"].startswith("gsw_api_")
    assert up.stop() == 0


def test_sync_client(cli: Cli) -> None:
    """The SDK's blocking wrapper, against a head started through the CLI."""
    from gswarm.client import SyncClient
    from gswarm.config import load_tokens

    _head, url = cli.start_head()
    tokens = load_tokens(cli.tmp_path / "state")
    assert tokens is not None
    sdk = SyncClient(url, tokens.api_token)
    sdk.register_model("m1", "llm", source_url="hf://org/m1")
    assert [m.name for m in sdk.list_models()] == ["m1"]
    assert sdk.health()["status"] == "ok"
