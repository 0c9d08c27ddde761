"""Command-template backends (vLLM and the operator's own) share a GPU honestly: gswarm's
resident copy of the model is handed over (freed) before the server loads the weights itself,
the server starts from the node's fastest copy (dram before disk) with a
`--gpu-memory-utilization` that fits beside what else holds the GPU, and a server whose weights
cannot fit is refused with a 409 naming the memory needed and free.

The backend is tests/standin_openai.py started with vLLM's own command line (vLLM needs a real
GPU); the GPU is simulated (host memory). Loading a resident copy needs torch and safetensors
(`tox -e py`); without them those tests skip."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gswarm.agent.main import Agent
from gswarm.agent.serving import VLLM, ServingConfig, Template
from gswarm.client import GswarmClient
from gswarm.devices import gpu_memory_utilization
from gswarm.errors import Conflict
from gswarm.head.app import HeadServer
from gswarm.ops import ServeResult
from tests.conftest import AgentRunner, Cli, free_port, wait_for

pytestmark = pytest.mark.timeout(120)
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None,
    reason="loading a resident copy needs torch and safetensors: run `tox -e py`",
)

STANDIN = str(Path(__file__).with_name("standin_openai.py"))
GIB = 1 << 30
MIB = 1 << 20

CONFIG = ServingConfig(
    templates={
        # vLLM's own command line, with the stand-in in place of the `vllm` executable.
        "standin": Template(
            command=[sys.executable, STANDIN, *VLLM.command[1:]], gpu_command=VLLM.gpu_command, env=VLLM.env
        ),
        "dying": Template(
            command=[sys.executable, STANDIN, *VLLM.command[1:], "--exit-after", "1.5"],
            gpu_command=VLLM.gpu_command,
            env=VLLM.env,
        ),
    },
    health_interval=0.3,
    max_restarts=1,
    stop_grace=3,
)


def write_model(root: Path, nbytes: int) -> Path:
    """A model directory: a config and one safetensors file of `nbytes` of float32 weights."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    n = nbytes // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(bytes(4 * n))
    return root


@pytest.fixture
async def node(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Agent]:
    """Node w1 with one simulated 1 GiB GPU; `m` (32 MiB) on its disk and dram, `big` (64 MiB)
    and `small` (1 MiB) on its disk."""
    src = tmp_path_factory.mktemp("models")
    agent = await agents.start(head, "w1", serving_config=CONFIG, simulate_gpus="1:1G")
    for name, size, tiers in (("m", 32 * MIB, ("disk", "dram")), ("big", 64 * MIB, ("disk",)),
                              ("small", MIB, ("disk",))):  # fmt: skip
        write_model(src / name, size)
        for tier in tiers:
            op = await client.download(name, f"file://{src / name}", f"w1:{tier}", wait=True)
            assert op.state == "succeeded", op.error
    yield agent


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def gpu_free(head: HeadServer) -> int:
    return head.head.registry.nodes["w1"].inventory.gpus[0].memory_free


def test_vllm_command_line_is_vllm_serve() -> None:
    assert Path(VLLM.command[0]).name == "vllm"
    assert VLLM.command[1:] == [
        "serve", "{model_path}", "--served-model-name", "{model}", "--host", "{host}", "--port", "{port}",
    ]  # fmt: skip
    assert VLLM.gpu_command == ["--gpu-memory-utilization", "{gpu_memory_utilization}"]
    assert VLLM.env == {"CUDA_VISIBLE_DEVICES": "{gpu}"}


def test_gpu_memory_utilization_leaves_headroom() -> None:
    assert gpu_memory_utilization(80 * GIB, 80 * GIB) == 0.9  # vLLM's default on an empty GPU
    assert gpu_memory_utilization(80 * GIB, 40 * GIB) == 0.45  # half free: half, less 5 %
    assert gpu_memory_utilization(80 * GIB, 2 * GIB) == 0.0  # within the headroom: nothing
    assert gpu_memory_utilization(0, 0) == 0.0


@needs_torch
async def test_template_backend_takes_the_gpu_over(
    head: HeadServer, node: Agent, client: GswarmClient, cli: Cli
) -> None:
    assert (await client.load("m", "w1:gpu0", wait=True)).state == "succeeded"
    assert ("m", "w1:gpu0") in head.head.registry.locations
    resident = node.gpu_pool.resident[0]["m"]
    assert resident >= 32 * MIB

    port = free_port()
    token = head.head.tokens.api_token
    r = await cli.ainvoke("serve", "m", "w1:gpu0", str(port), "--backend", "standin",
                          "--head-url", head.url, "--token", token)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # Said by the CLI and in the op: the resident copy was freed, the server got 0.9 of the GPU,
    # and it started from the dram copy.
    said = " ".join(r.stdout.split())  # however the terminal wrapped it
    assert f"serving at http://127.0.0.1:{port}; from w1:dram; gswarm's resident copy freed" in said
    assert "--gpu-memory-utilization 0.90" in said
    (op,) = [o for o in head.head.registry.ops.values() if o.kind == "serve"]
    assert op.state == "succeeded", op.error
    assert isinstance(op.result, ServeResult)
    assert op.result.freed == resident
    assert op.result.source_tier == "dram"
    assert op.result.gpu_memory_utilization == 0.9
    assert "freeing gswarm's resident copy of m" in op.progress.message
    # The resident copy is gone, from the worker and from the registry; the worker with it.
    assert "m" not in node.gpu_pool.resident.get(0, {}) and 0 not in node.gpu_pool.workers
    await wait_for(lambda: ("m", "w1:gpu0") not in head.head.registry.locations)

    # The server got vLLM's command line: the dram copy, the served name, its share, the GPU.
    url = f"http://127.0.0.1:{port}"
    got = await _get(f"{url}/argv")
    assert got["argv"] == [
        "serve", str(node.stores["dram"].model_dir("m")), "--served-model-name", "m",
        "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.90",
    ]  # fmt: skip
    assert got["env"] == {"CUDA_VISIBLE_DEVICES": "0"}
    assert [m["id"] for m in (await _get(f"{url}/v1/models"))["data"]] == ["m"]
    (svc,) = await client.list_services()
    assert (svc.backend, svc.state, svc.gpu_memory) == ("standin", "ready", int(0.9 * GIB))
    # Its share is taken: the node's inventory says so.
    await wait_for(lambda: gpu_free(head) == GIB - int(0.9 * GIB))

    # Loading the model again while the server holds its own copy would hold it twice.
    with pytest.raises(Conflict) as conflict:
        await client.load("m", "w1:gpu0")
    assert conflict.value.code == "already_serving" and "standin" in conflict.value.message

    # Stopped, the share is given back.
    assert (await client.stop_service("m", "w1:gpu0", wait=True)).state == "succeeded"
    assert node.gpu_pool.reserved.get(0) == {}
    await wait_for(lambda: gpu_free(head) == GIB)


@needs_torch
async def test_template_backend_refused_when_the_weights_do_not_fit(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    op = await client.serve("m", "w1:gpu0", free_port(), backend="standin", wait=True)
    assert op.state == "succeeded", op.error
    assert isinstance(op.result, ServeResult) and op.result.freed == 0  # nothing was resident
    await wait_for(lambda: gpu_free(head) == GIB - int(0.9 * GIB))

    # 64 MiB of weights; 0.1 GiB is left, of which 0.05 GiB is headroom: refused, saying why.
    with pytest.raises(Conflict) as conflict:
        await client.serve("big", "w1:gpu0", free_port(), backend="standin")
    err = conflict.value
    assert err.code == "insufficient_gpu_memory"
    assert err.details["needed"] >= 64 * MIB and err.details["free"] == GIB - int(0.9 * GIB)
    assert "service m@w1:gpu0" in err.message and "needs" in err.message
    # The agent checks again, live, before it starts anything (here, bypassing the head).
    with pytest.raises(Conflict) as conflict:
        await node.gpu_pool.hand_over(0, "big", 64 * MIB, "big@w1:gpu0", lambda _: None)
    assert conflict.value.code == "insufficient_gpu_memory"
    assert node.gpu_pool.reserved[0] == {"m@w1:gpu0": int(0.9 * GIB)}

    # A resident copy of another model counts too, and is named.
    assert (await client.load("small", "w1:gpu0", wait=True)).state == "succeeded"
    with pytest.raises(Conflict) as conflict:
        await client.serve("big", "w1:gpu0", free_port(), backend="standin")
    assert "small resident" in conflict.value.message and "service m@w1:gpu0" in conflict.value.message

    # A small model's server gets the share that is left, once its own resident copy is freed.
    port = free_port()
    op = await client.serve("small", "w1:gpu0", port, backend="standin", wait=True)
    assert op.state == "succeeded", op.error
    assert isinstance(op.result, ServeResult)
    assert op.result.freed >= MIB and op.result.gpu_memory_utilization == 0.05
    assert op.result.source_tier == "disk"  # small has no dram copy
    got = await _get(f"http://127.0.0.1:{port}/argv")
    assert got["argv"][-2:] == ["--gpu-memory-utilization", "0.05"]
    assert got["argv"][1] == str(node.stores["disk"].model_dir("small"))


@needs_torch
async def test_template_backend_needs_a_copy_to_load_from(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    assert (await client.load("small", "w1:gpu0", wait=True)).state == "succeeded"
    assert (await client.delete_location("small", "w1:disk", wait=True)).state == "succeeded"
    # vLLM loads the weights itself: a resident copy alone is not enough (builtin would do).
    with pytest.raises(Conflict) as conflict:
        await client.serve("small", "w1:gpu0", free_port(), backend="standin")
    assert conflict.value.code == "not_held" and "dram or disk" in conflict.value.message
    assert node.gpu_pool.resident[0] == {"small": node.gpu_pool.resident[0]["small"]}  # untouched


async def test_a_server_that_keeps_dying_gives_its_share_back(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    op = await client.serve("small", "w1:gpu0", free_port(), backend="dying", wait=True)
    assert op.state == "succeeded", op.error
    assert node.gpu_pool.reserved[0] == {"small@w1:gpu0": int(0.9 * GIB)}
    await wait_for(lambda: head.head.registry.services["small@w1:gpu0"].state == "failed", timeout=30)
    assert head.head.registry.services["small@w1:gpu0"].gpu_memory == 0
    assert node.gpu_pool.reserved[0] == {}
    await wait_for(lambda: gpu_free(head) == GIB)
