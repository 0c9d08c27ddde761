"""What a node exposes: file:// downloads read only below the roots its operator allowed (never
the agent's tiers or a head's state), the data server and services listen where they are told
(by default the address the head is reached from, and 127.0.0.1), `up` takes the agent's
options, and the default dram tier is per user and private."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import msgspec
import pytest

from gswarm.agent.file_roots import FileRoots
from gswarm.agent.serving import ServingConfig, Template
from gswarm.agent.stores import TierStore
from gswarm.client import GswarmClient
from gswarm.config import default_dram_dir, load_tokens
from gswarm.errors import Forbidden, GswarmError
from gswarm.head.app import HeadServer
from gswarm.ops import Op
from tests.conftest import AgentRunner, Cli, free_port, listening_hosts, tree_bytes, wait_for

pytestmark = pytest.mark.timeout(90)


def _refused(op: Op) -> bool:
    return op.state == "failed" and op.error is not None and op.error.code == "forbidden_source"


def _small_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "tiny"}')
    (root / "weights.bin").write_bytes(os.urandom(4096))
    return root


# ---------------------------------------------------------------- file:// roots


async def test_file_sources_are_refused_by_default(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path: Path
) -> None:
    """An agent given no root reads nothing: not /etc/passwd, not the head's tokens, not a repo."""
    agent = await agents.start(head, "w1", file_roots=[])
    tokens = head.head.state_dir / "tokens.json"
    assert tokens.exists()
    repo = _small_repo(tmp_path / "repo")
    for i, path in enumerate(["/etc/passwd", str(tokens), str(head.head.state_dir), str(repo)]):
        op = await client.download(f"m{i}", f"file://{path}", "w1:disk", wait=True)
        assert _refused(op), (path, op.error)
        assert op.error is not None and "--allow-file-root" in op.error.message
    for store in agent.stores.values():
        assert [h.model for h in store.holdings()] == []
        assert list((store.root / ".partial").iterdir()) == []
    assert all(m.locations == [] for m in await client.list_models())


async def test_an_allowed_root_works_but_never_the_heads_state_or_the_tiers(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path: Path
) -> None:
    """The root holds the repo, the head's state dir and the agent's tiers (all under tmp_path):
    the repo downloads; the state dir, the tiers and anything containing them, and `..`, do not."""
    agent = await agents.start(head, "w1", file_roots=[tmp_path])
    repo = _small_repo(tmp_path / "repo")
    op = await client.download("good", f"file://{repo}", "w1:disk", wait=True)
    assert op.state == "succeeded", op.error
    assert tree_bytes(agent.stores["disk"].model_dir("good")) == tree_bytes(repo)
    published = agent.stores["disk"].model_dir("good")
    refused = [
        head.head.state_dir / "tokens.json",
        head.head.state_dir,
        tmp_path,  # holds the tiers and the head's state
        published,  # the agent's own tier
        f"{repo}/../state/tokens.json",
        f"{repo}/..",
    ]
    for i, path in enumerate(refused):
        op = await client.download(f"bad{i}", f"file://{path}", "w1:dram", wait=True)
        assert _refused(op), (path, op.error)


async def test_a_symlink_out_of_the_root_is_refused(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path: Path
) -> None:
    root = tmp_path / "allowed"
    repo = _small_repo(root / "repo")
    await agents.start(head, "w1", file_roots=[root])
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "state").symlink_to(head.head.state_dir)
    leaky = _small_repo(root / "leaky")
    (leaky / "tokens.json").symlink_to(head.head.state_dir / "tokens.json")
    inside = _small_repo(root / "inside")
    (inside / "same.bin").symlink_to(repo / "weights.bin")  # a link within the root is fine
    for i, path in enumerate([root / "passwd", root / "state", root / "state" / "tokens.json", leaky]):
        op = await client.download(f"bad{i}", f"file://{path}", "w1:disk", wait=True)
        assert _refused(op), (path, op.error)
    assert (await client.download("ok", f"file://{inside}", "w1:disk", wait=True)).state == "succeeded"


def test_a_file_swapped_for_a_link_after_listing_is_refused_when_opened(tmp_path: Path) -> None:
    """The descriptor that reads a file is checked too: a name that pointed inside the root
    when it was listed but outside when it was opened reads nothing."""
    root = tmp_path / "root"
    root.mkdir()
    roots = FileRoots([root], [tmp_path / "tier"])
    (root / "f").write_text("x")
    assert roots.check(str(root / "f")) == (root / "f").resolve()
    (root / "f").unlink()
    (root / "f").symlink_to("/etc/passwd")
    fd = os.open(root / "f", os.O_RDONLY)
    try:
        with pytest.raises(Forbidden) as exc:
            roots.check_fd(fd, str(root / "f"))
        assert exc.value.code == "forbidden_source"
    finally:
        os.close(fd)


# ---------------------------------------------------------------- where things listen


async def test_the_data_server_listens_where_the_head_is_reached(
    head: HeadServer, agents: AgentRunner, client: GswarmClient
) -> None:
    """The head is on 127.0.0.1: the data server listens there, not on every interface, unless
    told 0.0.0.0 (then peers are told the address the head is reached from)."""
    local = await agents.start(head, "w1")
    assert local.dataserver is not None
    assert listening_hosts(local.dataserver.port) == {"127.0.0.1"}
    assert (await client.get_node("w1")).data_url == f"http://127.0.0.1:{local.dataserver.port}"
    everywhere = await agents.start(head, "w2", data_host="0.0.0.0")
    assert everywhere.dataserver is not None
    assert listening_hosts(everywhere.dataserver.port) == {"0.0.0.0"}
    assert (await client.get_node("w2")).data_url == f"http://127.0.0.1:{everywhere.dataserver.port}"


SERVING = ServingConfig(
    templates={
        "pyhttp": Template(
            command=[sys.executable, "-m", "http.server", "{port}", "--bind", "{host}"], health="/"
        )
    },
    health_interval=0.3,
    stop_grace=3,
)


@pytest.mark.parametrize("host", [None, "0.0.0.0"], ids=["default", "exposed"])
async def test_services_listen_on_loopback_unless_the_operator_says_otherwise(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path: Path, host: str | None
) -> None:
    config = SERVING if host is None else msgspec.structs.replace(SERVING, host=host)
    await agents.start(head, "w1", serving_config=config)
    repo = _small_repo(tmp_path / "repo")
    assert (await client.download("m", f"file://{repo}", "w1:disk", wait=True)).state == "succeeded"
    port = free_port()
    op = await client.serve("m", "w1:disk", port, backend="pyhttp", wait=True)
    assert op.state == "succeeded", op.error
    assert listening_hosts(port) == {host or "127.0.0.1"}
    (svc,) = await client.list_services()
    assert svc.url == f"http://127.0.0.1:{port}" and svc.state == "ready"
    assert (await client.stop_service("m", "w1:disk", wait=True)).state == "succeeded"


# ---------------------------------------------------------------- up, the dram tier


async def test_up_takes_data_port_config_and_file_roots(cli: Cli, tmp_path: Path) -> None:
    """`up --data-port --config`: the data server on that port, on 127.0.0.1; the config's
    allow_file_roots allow a repo; /etc/passwd and the head's own state stay refused."""
    repo = _small_repo(tmp_path / "repo")
    config = tmp_path / "agent.yaml"
    config.write_text(f"allow_file_roots: [{repo}]\nserving:\n  max_restarts: 1\n")
    port, data_port = free_port(), free_port()
    args = ["--port", str(port), "--node-id", "local", "--data-port", str(data_port), "--config", str(config)]
    up = cli.spawn("up", *args, name="up")
    await wait_for(lambda: "up: head" in up.output(), timeout=20)
    tokens = load_tokens(tmp_path / "state")
    assert tokens is not None
    async with GswarmClient(f"http://127.0.0.1:{port}", tokens.api_token) as c:

        async def online() -> bool:
            nodes = await c.list_nodes()
            return any(n.node_id == "local" and n.status == "online" for n in nodes)

        await wait_for(online, timeout=20)
        assert (await c.get_node("local")).data_url == f"http://127.0.0.1:{data_port}"
        assert listening_hosts(data_port) == {"127.0.0.1"}
        assert (await c.download("ok", f"file://{repo}", "local:disk", wait=True)).state == "succeeded"
        for i, path in enumerate(["/etc/passwd", str(tmp_path / "state" / "tokens.json")]):
            assert _refused(await c.download(f"bad{i}", f"file://{path}", "local:disk", wait=True))
    assert await asyncio.to_thread(up.stop) == 0


async def test_a_bad_agent_config_is_one_line(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("allow_file_root: [/data]\n")  # a typo must not silently allow nothing
    r = await cli.ainvoke("up", "--port", str(free_port()), "--config", str(config))
    assert r.returncode == 1 and "allow_file_root" in r.stderr and "Traceback" not in r.stderr


def test_the_default_dram_dir_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GSWARM_DRAM_DIR", raising=False)
    assert default_dram_dir() == Path(f"/dev/shm/gswarm-{os.getuid()}")


def test_a_tier_dir_in_a_shared_directory_is_private_and_must_be_ours(tmp_path: Path) -> None:
    shared = tmp_path / "shm"
    shared.mkdir()
    shared.chmod(0o1777)  # like /dev/shm
    store = TierStore("dram", shared / f"gswarm-{os.getuid()}")
    store.ensure()
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    if os.getuid() != 0:
        return  # only root can make a directory that belongs to someone else
    squatted = shared / "gswarm-squatted"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    with pytest.raises(GswarmError) as exc:
        TierStore("dram", squatted).ensure()
    assert exc.value.code == "unsafe_tier_dir" and "65534" in exc.value.message


def test_the_cli_lists_the_exposure_options(cli: Cli) -> None:
    for command in ("up", "client"):
        r = cli.invoke(command, "--help")
        text = " ".join(r.stdout.split())
        for option in ("--data-port", "--data-host", "--config", "--allow-file-root", "--service-host"):
            assert option in text, (command, option)
