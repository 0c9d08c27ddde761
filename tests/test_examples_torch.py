"""The original README's two job examples, unchanged, run end to end against real agents (on
simulated GPUs) and the test suite's Hub, whose huggingface.co URLs resolve through
HF_ENDPOINT; then the README's three examples one after another, as listed. Every repo is the
same tiny generated causal LM: the builtin backend serves transformers language models.
Needs torch and transformers (`tox -e py`)."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from gswarm.ops import ServeResult
from gswarm.protocol import Job
from tests.conftest import AgentRunner, running_hub, wait_for
from tests.test_serving_torch import tiny_llm  # noqa: F401 (fixture)

EXAMPLES = Path(__file__).parents[1] / "examples"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


pytestmark = [
    # The examples serve on fixed ports: whatever else comes to serve on them runs in this worker.
    pytest.mark.xdist_group("ports-8080-8082"),
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
        reason="needs torch and transformers (the serve extra): run `tox -e py`",
    ),
    pytest.mark.skipif(
        not (_port_free(8080) and _port_free(8081) and _port_free(8082)),
        reason="the examples serve on ports 8080, 8081 and 8082",
    ),
]


@pytest.fixture
async def example_hub(tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:  # noqa: F811
    repos = {
        "meta-llama/Llama-2-7b-hf": tiny_llm,
        "stabilityai/stable-diffusion-2-1": tiny_llm,
        "Qwen/Qwen2.5-0.5B-Instruct": tiny_llm,
    }
    async with running_hub(repos, monkeypatch) as server:
        yield server


async def _run(client: GswarmClient, name: str) -> Job:
    job = await client.submit_job((EXAMPLES / name).read_text())

    async def done() -> Job | None:
        j = await client.get_job(job.job_id)
        return j if j.terminal else None

    final: Job = await wait_for(done, timeout=240, interval=0.2)
    assert final.state == "succeeded", [(a.id, a.state, a.error) for a in final.actions]
    return final


async def _complete(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        body = {"prompt": "hello", "max_tokens": 4}
        async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            assert r.status == 200
            result: dict[str, Any] = await r.json()
            return result


async def test_the_examples_as_the_readme_lists_them_then_each_from_nothing(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, example_hub: Any
) -> None:
    """One cluster for both ways a user runs the examples (its GPU workers start once).

    First as the README lists them, nothing stopped or deleted in between: a serve that is
    already running answers with the running service, a download or load already done is done.
    Then, everything stopped and deleted, the original examples from nothing: a move onto a GPU
    keeps the files it serves from, and the two downloads of the multi-model job overlap."""
    await agents.start(head, "node1", simulate_gpus="1:2G")
    await agents.start(head, "node2", simulate_gpus="1:2G")
    for name in ("deploy-llama.json", "multi-model.yaml", "replicate-and-serve.yaml"):
        await _run(client, name)
    services = {svc.service_id: (svc.port, svc.state) for svc in await client.list_services()}
    assert services == {
        "llama-7b@node1:gpu0": (8080, "ready"),
        "stable-diffusion@node2:gpu0": (8081, "ready"),
        "qwen2.5-0.5b@node1:gpu0": (8082, "ready"),
    }
    for port, model in ((8080, "llama-7b"), (8081, "stable-diffusion"), (8082, "qwen2.5-0.5b")):
        assert (await _complete(port))["model"] == model

    again = await _run(client, "deploy-llama.json")  # and once more: nothing to do
    serve_op = await client.get_op(again.actions[-1].op_ids[-1])
    assert isinstance(serve_op.result, ServeResult) and serve_op.result.already_running
    for svc in await client.list_services():
        await client.stop_service(svc.model, svc.device, wait=True)
    for model in await client.list_models():
        await client.delete_model(model.name)

    deploy = await _run(client, "deploy-llama.json")
    assert [a.action for a in deploy.actions] == ["download", "move", "serve"]
    assert (await _complete(8080))["usage"]["completion_tokens"] > 0
    locations = {loc.device for loc in (await client.get_model("llama-7b")).locations}
    assert locations == {"node1:disk", "node1:gpu0"}  # a move onto a GPU keeps the files it serves from
    await client.stop_service("llama-7b", "node1:gpu0", wait=True)
    await client.delete_model("llama-7b")  # the second example starts from nothing
    example_hub.rate_limit = 1 << 20  # slow enough that the two downloads visibly overlap

    multi = await _run(client, "multi-model.yaml")
    a = {x.id: x for x in multi.actions}
    d1, d2 = a["1-download"], a["2-download"]
    assert d1.started_at and d2.started_at and d1.finished_at and d2.finished_at
    assert d2.started_at < d1.finished_at and d1.started_at < d2.finished_at  # both at once
    assert (await _complete(8080))["model"] == "llama-7b"
    assert (await _complete(8081))["model"] == "stable-diffusion"
    for svc in await client.list_services():
        await client.stop_service(svc.model, svc.device, wait=True)
