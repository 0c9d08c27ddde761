"""TLS: the head serves https and wss with a certificate from a CA made on the fly; the agent,
the SDK and the CLI verify it, and refuse a head they cannot verify."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from gswarm.agent.main import AgentRefused
from gswarm.client import GswarmClient, HeadUnreachable
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, Cli, tree_bytes, wait_for, wait_until


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1, as PEM files."""
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    authority.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_pem), append=True)
    cert.private_key_pem.write_to_path(str(key_pem))
    return authority, ca_pem, cert_pem, key_pem


@pytest.fixture
async def tls_head(
    tmp_path: Path, settings: object, ca: tuple[trustme.CA, Path, Path, Path]
) -> AsyncIterator[HeadServer]:
    _, _, cert, key = ca
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings, cert, key)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_agent_sdk_and_events_over_tls(
    tls_head: HeadServer, agents: AgentRunner, ca: tuple[trustme.CA, Path, Path, Path]
) -> None:
    _, ca_pem, _, _ = ca
    assert tls_head.url.startswith("https://")
    await agents.start(tls_head, "w1", ca=ca_pem)
    async with GswarmClient(tls_head.url, tls_head.head.tokens.api_token, ca=ca_pem) as c:
        await c.register_model("m", "llm")
        op = await c.probe("w1")
        final = await c.wait_op(op.op_id, timeout=10)  # follows /ws/events over wss
        assert final.state == "succeeded"
        assert [n.node_id for n in await c.list_nodes()] == ["w1"]


async def test_an_unverified_head_is_refused(
    tls_head: HeadServer, agents: AgentRunner, ca: tuple[trustme.CA, Path, Path, Path]
) -> None:
    async with GswarmClient(tls_head.url, tls_head.head.tokens.api_token) as c:
        with pytest.raises(HeadUnreachable) as exc:
            await c.list_models()
    assert exc.value.code == "untrusted_certificate" and "--ca" in exc.value.message
    # Another CA's certificate is no better than none.
    other = trustme.CA()
    wrong = Path(str(ca[1]) + ".other")
    other.cert_pem.write_to_path(str(wrong))
    agent = agents.make(tls_head.url, tls_head.head.tokens.join_token, "w1", ca=wrong)
    with pytest.raises(AgentRefused, match="does not trust"):
        await asyncio.wait_for(agent.run(), 10)
    assert "w1" not in tls_head.head.registry.nodes


async def test_plain_http_to_a_tls_head_gets_nothing(tls_head: HeadServer) -> None:
    async with GswarmClient(tls_head.url.replace("https://", "http://"), "x") as c:
        with pytest.raises(HeadUnreachable):
            await c.list_models()


async def test_cli_trusts_the_ca_from_the_environment(
    tls_head: HeadServer, cli: Cli, ca: tuple[trustme.CA, Path, Path, Path]
) -> None:
    token = tls_head.head.tokens.api_token
    env = {"GSWARM_HEAD_URL": tls_head.url, "GSWARM_TOKEN": token}
    refused = await cli.ainvoke("register", "m", "llm", env=env)
    assert refused.returncode == 1 and "--ca" in refused.stderr, refused.stderr
    ok = await cli.ainvoke("register", "m", "llm", env={**env, "GSWARM_CA": str(ca[1])})
    assert ok.returncode == 0, ok.stderr
    await wait_for(lambda: "m" in tls_head.head.registry.models)


def test_head_process_serves_tls_and_an_agent_process_joins(
    cli: Cli, ca: tuple[trustme.CA, Path, Path, Path]
) -> None:
    _, ca_pem, cert, key = ca
    head = cli.spawn(
        "head", "--host", "127.0.0.1", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    url = head.wait_output(r"listening on (https://\S+)").group(1)
    cli.spawn("client", url, "--node-id", "n1", "--ca", str(ca_pem), name="agent")

    def online() -> bool:
        r = cli.run("nodes", "--json", "--head-url", url, env={"GSWARM_CA": str(ca_pem)})
        assert r.returncode == 0, r.stderr
        return '"online"' in r.stdout

    wait_until(online, timeout=20)


async def test_data_servers_serve_peers_over_tls(
    head: HeadServer,
    agents: AgentRunner,
    client: GswarmClient,
    tiny_repo_dir: Path,
    ca: tuple[trustme.CA, Path, Path, Path],
) -> None:
    """Model bytes between nodes over https, verified against the private CA; a node that does
    not trust the CA cannot fetch."""
    _, ca_pem, cert, key = ca
    w1 = await agents.start(head, "w1", ca=ca_pem, data_tls=(cert, key))
    await agents.start(head, "w2", ca=ca_pem)
    await agents.start(head, "w3")  # trusts only the system's CAs
    assert w1.data_url.startswith("https://127.0.0.1:")
    await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
    refused = await client.copy("m", "w1:disk", "w3:disk", wait=True)
    assert refused.state == "failed" and refused.error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in refused.error.message, refused.error.message
    copied = await client.copy("m", "w1:disk", "w2:disk", wait=True)
    assert copied.state == "succeeded", copied.error
    assert tree_bytes(agents.agents["w2"].stores["disk"].model_dir("m")) == tree_bytes(tiny_repo_dir)
