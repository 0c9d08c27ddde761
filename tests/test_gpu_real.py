"""On a machine with an NVIDIA GPU (and the serve extra): the inventory comes from NVML, and a
model is loaded into real GPU memory and served from it. Elsewhere these tests skip."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from gswarm.agent.gpu import GpuProbe
from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, free_port
from tests.test_serving_torch import _post, llm_hub, tiny_llm  # noqa: F401 (fixtures)


def _gpus() -> int:
    return len(GpuProbe().read())


pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(_gpus() == 0, reason="no NVIDIA GPU visible through NVML on this machine"),
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
        reason="needs torch and transformers (the serve extra)",
    ),
]


async def test_nvml_inventory_load_and_serve_on_gpu0(
    head: HeadServer,
    agents: AgentRunner,
    client: GswarmClient,
    llm_hub: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    agent = await agents.start(head, "g1")
    gpus = (await client.get_node("g1")).inventory.gpus
    assert gpus and not gpus[0].simulated and gpus[0].memory_total > 0 and gpus[0].uuid.startswith("GPU-")
    assert (await client.download("tiny-llm", "org/tiny-llm", "g1:dram", wait=True)).state == "succeeded"
    op = await client.load("tiny-llm", "g1:gpu0", wait=True)
    assert op.state == "succeeded", op.error
    assert op.result is not None and op.result.path == "cuda:0"
    port = free_port()
    assert (await client.serve("tiny-llm", "g1:gpu0", port, wait=True)).state == "succeeded"
    body = await _post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hello", "max_tokens": 4})
    assert body["usage"]["completion_tokens"] > 0
    assert (await client.stop_service("tiny-llm", "g1:gpu0", wait=True)).state == "succeeded"
    assert agent.gpu_pool.resident.get(0, {}) == {}
