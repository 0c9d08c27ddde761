"""The GPU tier and the builtin backend with a real (tiny) transformers model on a simulated
GPU: download -> load onto gpu0 -> serve -> completions -> the server process is killed and
comes back -> stop -> memory freed. Needs torch and transformers: `tox -e py` installs
them; elsewhere these tests skip."""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, free_port, listening_hosts, running_hub, wait_for

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
        reason="needs torch and transformers (the serve extra): run `tox -e py`",
    ),
]


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated once per run: pytest-xdist's workers share it (it takes seconds of CPU)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's directory, above each worker's own
    out = base / "tiny-llm"
    with (base / "tiny-llm.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker generates, the others wait for it
        if not out.exists():
            partial = base / "tiny-llm.partial"
            script = Path(__file__).with_name("make_tiny_llm.py")
            subprocess.run([sys.executable, str(script), str(partial)], check=True, timeout=180)
            partial.rename(out)
    return out


@pytest.fixture
async def llm_hub(tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    async with running_hub({"org/tiny-llm": tiny_llm}, monkeypatch) as server:
        yield server


async def _post(url: str, body: dict[str, Any]) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=60)) as r,
    ):
        assert r.status == 200, await r.text()
        if body.get("stream"):
            return [line for line in (await r.text()).splitlines() if line.startswith("data: ")]
        return await r.json()


async def test_load_serve_restart_stop_on_simulated_gpu(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, llm_hub: Any
) -> None:
    agent = await agents.start(head, "w1", simulate_gpus="1:1G")
    assert (await client.download("tiny-llm", "org/tiny-llm", "w1:dram", wait=True)).state == "succeeded"

    op = await client.load("tiny-llm", "w1:gpu0", wait=True)
    assert op.state == "succeeded", op.error
    assert op.result is not None and op.result.source_tier == "dram" and op.result.size > 0
    locs = {loc.device: loc.state for loc in (await client.get_model("tiny-llm")).locations}
    assert locs == {"w1:dram": "ready", "w1:gpu0": "ready"}
    probe = await client.probe("w1", wait=True)
    gpu = probe.result.inventory.gpus[0]
    assert gpu.simulated and gpu.memory_free == (1 << 30) - op.result.size

    port = free_port()
    op = await client.serve("tiny-llm", "w1:gpu0", port, wait=True)
    assert op.state == "succeeded", op.error
    base = f"http://127.0.0.1:{port}"
    completion = await _post(
        base + "/v1/completions", {"model": "tiny-llm", "prompt": "hello world", "max_tokens": 5}
    )
    assert completion["usage"]["completion_tokens"] > 0 and isinstance(completion["choices"][0]["text"], str)
    chat = await _post(
        base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    assert chat["choices"][0]["message"]["role"] == "assistant"
    chunks = await _post(base + "/v1/completions", {"prompt": "the quick", "max_tokens": 6, "stream": True})
    assert chunks[-1] == "data: [DONE]" and json.loads(chunks[0][6:])["object"] == "text_completion"

    # The server process (the GPU's worker) is killed: it comes back, weights reloaded.
    pid = head.head.registry.services["tiny-llm@w1:gpu0"].pid
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: head.head.registry.services["tiny-llm@w1:gpu0"].restarts == 1, timeout=30)
    await wait_for(lambda: head.head.registry.services["tiny-llm@w1:gpu0"].state == "ready", timeout=90)
    again = await _post(base + "/v1/completions", {"prompt": "hello", "max_tokens": 3})
    assert again["usage"]["completion_tokens"] > 0

    op = await client.stop_service("tiny-llm", "w1:gpu0", wait=True)
    assert op.state == "succeeded", op.error
    await wait_for(lambda: ("tiny-llm", "w1:gpu0") not in head.head.registry.locations, timeout=10)
    assert agent.gpu_pool.resident.get(0, {}) == {}
    gpus = (await client.probe("w1", wait=True)).result
    assert gpus is not None and gpus.inventory.gpus[0].memory_free == 1 << 30
    assert await client.list_services() == []

    # A loaded model is freed by rm; a worker that dies takes its locations with it.
    assert (await client.load("tiny-llm", "w1:gpu0", wait=True)).state == "succeeded"
    assert (await client.delete_location("tiny-llm", "w1:gpu0", wait=True)).state == "succeeded"
    assert agent.gpu_pool.resident.get(0, {}) == {}
    assert ("tiny-llm", "w1:gpu0") not in head.head.registry.locations
    assert (await client.load("tiny-llm", "w1:gpu0", wait=True)).state == "succeeded"
    os.kill(agent.gpu_pool.workers[0].pid, signal.SIGKILL)
    await wait_for(lambda: ("tiny-llm", "w1:gpu0") not in head.head.registry.locations, timeout=15)
    assert {loc.device for loc in (await client.get_model("tiny-llm")).locations} == {"w1:dram"}


async def test_builtin_on_the_cpu_from_dram(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, llm_hub: Any
) -> None:
    agent = await agents.start(head, "w1")
    assert (await client.download("tiny-llm", "hf://org/tiny-llm", "w1:dram", wait=True)).state == "succeeded"
    port = free_port()
    assert (await client.serve("tiny-llm", "w1:dram", port, wait=True)).state == "succeeded"
    assert listening_hosts(port) == {"127.0.0.1"}  # not every interface unless the operator says so
    body = await _post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "fox", "max_tokens": 4})
    assert body["model"] == "tiny-llm" and body["usage"]["completion_tokens"] > 0
    # warm_spare off (the tests' settings): no idle worker was started for a next serve.
    assert not agent.services.spare_ready and not list(agent.services.log_dir.glob("spare-cpu-worker*"))
    assert (await client.stop_service("tiny-llm", "w1:dram", wait=True)).state == "succeeded"
    await asyncio.sleep(0)
