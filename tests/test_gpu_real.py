"""On a machine with an NVIDIA GPU (and the serve extra): the inventory comes from NVML, and a
model is loaded into real GPU memory and served from it. Elsewhere these tests skip."""

from __future__ import annotations

import importlib.util
import time
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


def _best_seconds(run: Any, rounds: int = 2) -> tuple[float, Any]:
    """The fastest of `rounds` runs of `run` (each ends with the device idle) and its last result."""
    import torch

    best, result = float("inf"), None
    for _ in range(rounds):
        result = None  # the previous round's tensors are freed first
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, result


def test_loader_rate_against_load_file_and_pinned_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ~1 GiB safetensors file onto cuda:0 three ways, GB/s printed (speed is not asserted): gswarm's
    loader, `load_file(device="cpu")` then `.to("cuda")` per tensor, and one pinned host buffer of the
    same byte count copied to the device (the ceiling). The loader's tensors must equal the file's."""
    import torch
    from safetensors.torch import load_file, save_file

    from gswarm.agent.weights import WeightLoader

    torch.empty(1, device="cuda:0")  # CUDA init off the clock
    gen = torch.Generator(device="cuda:0").manual_seed(0)
    want = {  # random bits (NaNs included: compared as bytes), 16 x 64 MiB in three dtypes
        f"layer{i}.w": torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, device="cuda:0", generator=gen)
        .cpu()
        .view((torch.bfloat16, torch.float16, torch.float32)[i % 3])
        .reshape(1024, -1)
        for i in range(16)
    }
    path = tmp_path / "big.safetensors"
    save_file(want, str(path))
    nbytes = sum(t.numel() * t.element_size() for t in want.values())

    ours_s, got = _best_seconds(lambda: WeightLoader("cuda:0").load([str(path)]))
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        g = got[name]
        assert g.device == torch.device("cuda:0") and g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.equal(g.cpu().reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    del got

    def load_file_then_to() -> dict[str, Any]:
        return {k: t.to("cuda:0") for k, t in load_file(str(path), device="cpu").items()}

    load_file_s, moved = _best_seconds(load_file_then_to)
    assert sum(t.numel() * t.element_size() for t in moved.values()) == nbytes
    del moved

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    pinned_s, _ = _best_seconds(lambda: dst.copy_(src, non_blocking=True), rounds=3)

    with capsys.disabled():
        print(f"\n{nbytes / 2**30:.2f} GiB onto {torch.cuda.get_device_name(0)}:")
        for what, seconds in (
            ("gswarm WeightLoader", ours_s),
            ('load_file(device="cpu") + .to("cuda")', load_file_s),
            ("pinned host buffer -> device copy", pinned_s),
        ):
            print(f"  {what}: {nbytes / seconds / 1e9:.2f} GB/s ({seconds:.3f} s)")
