"""Services without torch: command-template backends supervised by the agent (ready on
health, restart after a crash, logs, stop), the GPU tier's checks, and the bad input."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gswarm.agent.main import Agent
from gswarm.agent.serving import ServingConfig, Template
from gswarm.client import GswarmClient
from gswarm.errors import BadRequest, Conflict, InsufficientSpace, NotFound
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, free_port, wait_for

pytestmark = pytest.mark.timeout(90)

CONFIG = ServingConfig(
    templates={
        "pyhttp": Template(
            command=[sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"], health="/"
        ),
        "crasher": Template(
            command=[sys.executable, "-c", "print('boom: no such weights', flush=True); exit(3)"]
        ),
    },
    health_interval=0.3,
    max_restarts=2,
    stop_grace=3,
)


@pytest.fixture
async def node(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> AsyncIterator[Agent]:
    agent = await agents.start(head, "w1", serving_config=CONFIG, simulate_gpus="1:64M")
    op = await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
    assert op.state == "succeeded"
    yield agent


async def _get(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status


async def test_template_service_lifecycle(head: HeadServer, node: Agent, client: GswarmClient) -> None:
    port = free_port()
    op = await client.serve("m", "w1:disk", port, backend="pyhttp", wait=True)
    assert op.state == "succeeded", op.error
    (svc,) = await client.list_services()
    assert (svc.model, svc.device, svc.backend, svc.state) == ("m", "w1:disk", "pyhttp", "ready")
    assert svc.url.endswith(f":{port}") and await _get(f"http://127.0.0.1:{port}/") == 200

    # A process that dies is restarted.
    os.killpg(svc.pid, signal.SIGKILL)
    await wait_for(lambda: head.head.registry.services["m@w1:disk"].restarts == 1, timeout=15)
    await wait_for(lambda: head.head.registry.services["m@w1:disk"].state == "ready", timeout=15)
    assert head.head.registry.services["m@w1:disk"].pid != svc.pid
    assert await _get(f"http://127.0.0.1:{port}/") == 200

    text = await client.logs("m", "w1:disk")
    assert "GET / HTTP" in text

    health = await client.health_check("m", "w1:disk")
    assert health.state == "succeeded" and health.result is not None and health.result.healthy
    node_health = await client.health_check(node_id="w1")
    assert node_health.result is not None and node_health.result.services == {"m@w1:disk": True}

    op = await client.stop_service("m", "w1:disk", wait=True)
    assert op.state == "succeeded", op.error
    assert await client.list_services() == []
    with pytest.raises(aiohttp.ClientError):
        await _get(f"http://127.0.0.1:{port}/")
    with pytest.raises(NotFound):
        await client.stop_service("m", "w1:disk")


async def test_service_that_keeps_dying_is_marked_failed(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    port = free_port()
    assert (await client.serve("m", "w1:disk", port, backend="pyhttp", wait=True)).state == "succeeded"
    for n in range(CONFIG.max_restarts + 1):
        await wait_for(lambda: head.head.registry.services["m@w1:disk"].state == "ready", timeout=15)
        os.killpg(head.head.registry.services["m@w1:disk"].pid, signal.SIGKILL)
        await wait_for(lambda n=n: head.head.registry.services["m@w1:disk"].restarts >= min(n + 1, 2) or
                       head.head.registry.services["m@w1:disk"].state == "failed", timeout=15)  # fmt: skip
    await wait_for(lambda: head.head.registry.services["m@w1:disk"].state == "failed", timeout=15)
    svc = head.head.registry.services["m@w1:disk"]
    assert "not restarted again" in svc.error


async def test_backend_crashing_at_start_fails_with_its_log(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    op = await client.serve("m", "w1:disk", free_port(), backend="crasher", wait=True)
    assert op.state == "failed" and op.error is not None
    assert "exited (3)" in op.error.message and "boom: no such weights" in op.error.message
    assert await client.list_services() == []


async def test_serving_bad_input(head: HeadServer, node: Agent, client: GswarmClient) -> None:
    with pytest.raises(BadRequest) as bad:
        await client.serve("m", "w1:disk", 70000, backend="pyhttp")
    assert bad.value.code == "invalid_port"
    with pytest.raises(BadRequest) as bad:
        await client.serve("m", "w1:disk", free_port(), backend="nonesuch")
    assert bad.value.code == "unknown_backend" and "pyhttp" in bad.value.message
    with pytest.raises(Conflict) as conflict:
        await client.serve("m", "w1:dram", free_port(), backend="pyhttp")
    assert conflict.value.code == "not_held" and "w1:disk (ready)" in conflict.value.message
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        op = await client.serve("m", "w1:disk", taken.getsockname()[1], backend="pyhttp", wait=True)
    assert op.state == "failed" and op.error is not None and op.error.code == "port_in_use"
    with pytest.raises(NotFound):
        await client.stop_service("m", "w1:gpu0")


async def test_gpu_tier_checks(head: HeadServer, node: Agent, client: GswarmClient) -> None:
    with pytest.raises(BadRequest) as bad:
        await client.load("m", "w1:gpu3")
    assert bad.value.code == "invalid_device" and "gpu0" in bad.value.message
    # The model is 70 MB; the simulated GPU has 64 MiB.
    with pytest.raises(InsufficientSpace):
        await client.load("m", "w1:gpu0")
    # A model without safetensors: the error names what is there.
    src = node.tiers["disk"].parent / "plain"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"x" * 100)
    assert (await client.download("plain", f"file://{src}", "w1:dram", wait=True)).state == "succeeded"
    op = await client.load("plain", "w1:gpu0", wait=True)
    assert op.state == "failed" and op.error is not None
    assert op.error.code == "no_safetensors" and "weights.bin" in op.error.message
    assert [loc.device for loc in (await client.get_model("plain")).locations] == ["w1:dram"]
    with pytest.raises(Conflict) as conflict:
        await client.load("plain", "w1:gpu0", source_device="w1:disk")
    assert conflict.value.code == "not_held" and "w1:dram (ready)" in conflict.value.message


async def test_services_outlive_a_head_restart(
    tmp_path: Path, agents: AgentRunner, tiny_repo_dir: Path
) -> None:
    from tests.conftest import fast_settings

    settings = fast_settings()
    first = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await first.start()
    port = first.port
    await agents.start(first, "w1", serving_config=CONFIG)
    async with GswarmClient(first.url, first.head.tokens.api_token) as c:
        await c.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
        assert (await c.serve("m", "w1:disk", free_port(), backend="pyhttp", wait=True)).state == "succeeded"
    await first.stop()
    second = HeadServer(tmp_path / "state", "127.0.0.1", port, settings)
    await second.start()
    try:
        await wait_for(lambda: second.head.registry.nodes["w1"].connected, timeout=15)
        async with GswarmClient(second.url, second.head.tokens.api_token) as c:
            (svc,) = await c.list_services()
            assert svc.state == "ready" and svc.restarts == 0
    finally:
        await second.stop()
