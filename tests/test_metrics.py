"""`/metrics`: what a Prometheus scrape shows after real ops (a download from the Hub, a copy from
a peer, a copy between tiers, a failed op, a job, a service), and who may scrape it (the api token
on the head's port; anyone on the open metrics port)."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from gswarm import __version__
from gswarm.agent.serving import ServingConfig, Template
from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, Cli, fast_settings, free_port, tree_bytes, wait_for

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SERVING = ServingConfig(
    templates={
        "pyhttp": Template(
            command=[sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"], health="/"
        )
    },
    health_interval=0.3,
)


async def _get(url: str, token: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def _parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape(head: HeadServer) -> Samples:
    status, content_type, text = await _get(f"{head.url}/metrics", head.head.tokens.api_token)
    assert status == 200 and content_type.startswith("text/plain"), text
    return _parse(text)


def _v(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when there is no such series (a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def metrics_head(tmp_path: Path) -> AsyncIterator[HeadServer]:
    """A head with an open metrics port (any free one)."""
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, fast_settings(metrics_port=0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_scrape_counts_what_the_cluster_did(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, tiny_repo_dir: Path
) -> None:
    await agents.start(head, "w1", serving_config=SERVING, simulate_gpus="1:64M")
    await agents.start(head, "w2")
    size = sum(len(b) for b in tree_bytes(tiny_repo_dir).values())

    op = await client.download("tiny", "org/tiny", "w1:disk", prefer_peer=False, wait=True)
    assert op.state == "succeeded", op.error
    op = await client.download("tiny", "org/tiny", "w1:disk", wait=True)  # already there: no bytes
    assert op.state == "succeeded" and op.result is not None and op.result.already_present
    op = await client.copy("tiny", "w1:disk", "w2:dram", wait=True)  # from a peer
    assert op.state == "succeeded" and op.result is not None and op.result.from_peer == "w1", op.error
    op = await client.copy("tiny", "w1:disk", "w1:dram", wait=True)  # between tiers
    assert op.state == "succeeded", op.error
    op = await client.download("missing", "org/missing", "w2:disk", wait=True)
    assert op.state == "failed"
    job = await client.submit_job("name: hc\nactions:\n  - action: health_check\n    node: w1\n")
    await wait_for(lambda: head.head.registry.jobs[job.job_id].state == "succeeded", timeout=20)
    op = await client.serve("tiny", "w1:disk", free_port(), backend="pyhttp", wait=True)
    assert op.state == "succeeded", op.error

    m = await _scrape(head)
    assert _v(m, "gswarm_ops_total", kind="download", outcome="succeeded") == 2
    assert _v(m, "gswarm_ops_total", kind="download", outcome="failed") == 1
    assert _v(m, "gswarm_ops_total", kind="fetch", outcome="succeeded") == 1
    assert _v(m, "gswarm_ops_total", kind="copy", outcome="succeeded") == 1
    assert _v(m, "gswarm_ops_total", kind="health_check", outcome="succeeded") == 1
    assert _v(m, "gswarm_op_duration_seconds_count", kind="download", outcome="succeeded") == 2
    assert _v(m, "gswarm_op_duration_seconds_sum", kind="download", outcome="succeeded") > 0
    assert _v(m, "gswarm_op_duration_seconds_bucket", kind="download", outcome="failed", le="+Inf") == 1
    # Each copy's bytes once, by where they came from and the node that wrote them.
    assert _v(m, "gswarm_bytes_moved_total", kind="hub", node="w1") == size
    assert _v(m, "gswarm_bytes_moved_total", kind="peer", node="w2") == size
    assert _v(m, "gswarm_bytes_moved_total", kind="tier", node="w1") == size
    assert _v(m, "gswarm_bytes_moved_total", kind="hub", node="w2") == 0  # the failed download
    # The cluster as it is now.
    assert _v(m, "gswarm_nodes", status="online") == 2 and _v(m, "gswarm_nodes", status="offline") == 0
    assert _v(m, "gswarm_agents_connected") == 2
    assert _v(m, "gswarm_node_online", node="w1") == 1
    assert _v(m, "gswarm_models") == 2
    assert _v(m, "gswarm_locations", tier="disk", state="ready") == 1
    assert _v(m, "gswarm_locations", tier="dram", state="ready") == 2
    assert _v(m, "gswarm_locations", tier="disk", state="failed") == 0
    assert _v(m, "gswarm_location_bytes", tier="dram", state="ready") == 2 * size
    assert _v(m, "gswarm_node_gpus", node="w1") == 1 and _v(m, "gswarm_node_gpus", node="w2") == 0
    assert _v(m, "gswarm_gpu_memory_total_bytes", node="w1", gpu="gpu0") == 64 << 20
    for node in ("w1", "w2"):
        for tier in ("disk", "dram"):
            capacity = _v(m, "gswarm_tier_capacity_bytes", node=node, tier=tier)
            assert 0 < _v(m, "gswarm_tier_free_bytes", node=node, tier=tier) <= capacity
    assert _v(m, "gswarm_jobs", state="succeeded") == 1 and _v(m, "gswarm_jobs", state="running") == 0
    assert _v(m, "gswarm_services", state="ready") == 1
    assert _v(m, "gswarm_event_subscribers_dropped_total") == 0
    assert _v(m, "gswarm_store_write_seconds_count") > 0
    assert _v(m, "gswarm_head_info", version=__version__) == 1

    await client.stop_service("tiny", "w1:disk", wait=True)
    await agents.stop("w2")
    await wait_for(lambda: head.head.registry.nodes["w2"].status == "offline", timeout=10)
    m = await _scrape(head)
    assert _v(m, "gswarm_nodes", status="online") == 1 and _v(m, "gswarm_nodes", status="offline") == 1
    assert _v(m, "gswarm_node_online", node="w2") == 0
    assert _v(m, "gswarm_agents_connected") == 1
    assert _v(m, "gswarm_services", state="ready") == 0
    assert _v(m, "gswarm_ops_total", kind="stop", outcome="succeeded") == 1


async def test_a_cancelled_download_is_counted_as_cancelled_and_moves_no_bytes(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    await agents.start(head, "w1")
    hub.rate_limit = 10 << 20
    op = await client.download("tiny", "org/tiny", "w1:disk")
    reg = head.head.registry
    await wait_for(lambda: reg.ops[op.op_id].progress.done > 1 << 20, timeout=20)
    m = await _scrape(head)
    assert _v(m, "gswarm_ops_open", kind="download", state="running") == 1
    assert _v(m, "gswarm_locations", tier="disk", state="downloading") == 1
    await client.cancel_op(op.op_id)
    m = await _scrape(head)
    assert _v(m, "gswarm_ops_total", kind="download", outcome="cancelled") == 1
    assert _v(m, "gswarm_op_duration_seconds_count", kind="download", outcome="cancelled") == 1
    assert _v(m, "gswarm_ops_open", kind="download", state="running") == 0
    assert _v(m, "gswarm_bytes_moved_total", kind="hub", node="w1") == 0


async def test_the_head_port_needs_the_api_token(head: HeadServer) -> None:
    status, _, text = await _get(f"{head.url}/metrics")
    assert status == 401 and '"code":"unauthorized"' in text.replace(" ", "")
    status, _, _ = await _get(f"{head.url}/metrics", "wrong")
    assert status == 403
    status, _, text = await _get(f"{head.url}/metrics", head.head.tokens.api_token)
    assert status == 200 and "gswarm_nodes" in text


async def test_the_open_metrics_port_needs_no_token(metrics_head: HeadServer) -> None:
    url = metrics_head.metrics_url
    assert url is not None and metrics_head.metrics_port != metrics_head.port
    status, content_type, text = await _get(url)
    assert status == 200 and content_type.startswith("text/plain")
    m = _parse(text)
    assert _v(m, "gswarm_nodes", status="online") == 0 and _v(m, "gswarm_agents_connected") == 0
    # Only /metrics there: the REST routes stay behind the head's port and its token.
    base = url.removesuffix("/metrics")
    status, _, text = await _get(f"{base}/models")
    assert status == 404 and '"error"' in text
    # The head's own port still asks for the token.
    status, _, _ = await _get(f"{metrics_head.url}/metrics")
    assert status == 401


async def test_openmetrics_when_asked_for(head: HeadServer) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{head.url}/metrics",
            headers={
                "Authorization": f"Bearer {head.head.tokens.api_token}",
                "Accept": "application/openmetrics-text; version=1.0.0",
            },
        ) as r,
    ):
        text = await r.text()
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_head_metrics_port_from_the_command_line(cli: Cli) -> None:
    port = free_port()
    proc = cli.spawn("head", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(port), name="head")
    proc.wait_output(rf"metrics for anyone at http://127\.0\.0\.1:{port}/metrics")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert _v(_parse(text), "gswarm_nodes", status="offline") == 0
    assert proc.stop() == 0


def test_metrics_port_in_use_is_a_clear_error(cli: Cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = cli.run("head", "--host", "127.0.0.1", "--port", "0", env={"GSWARM_METRICS_PORT": str(port)})
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port} (the metrics port)" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_grafana_example_uses_only_metrics_the_head_exports(head: HeadServer) -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "examples" / "grafana-gswarm.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bgswarm_[a-z_]+", e)}
    assert len(used) > 15
    status, _, text = await _get(f"{head.url}/metrics", head.head.tokens.api_token)
    assert status == 200
    exported = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        exported |= {family.name + s for s in suffixes}
    assert used <= exported, used - exported


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None,
    reason="needs torch and safetensors (the gpu extra): run `tox -e py`",
)
async def test_a_load_counts_bytes_moved_onto_a_gpu(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "weights"
    weights.mkdir()
    save_file({"w": torch.zeros(1 << 16)}, str(weights / "model.safetensors"))
    await agents.start(head, "w1", simulate_gpus="1:64M")
    op = await client.download("w", f"file://{weights}", "w1:dram", wait=True)
    assert op.state == "succeeded", op.error
    op = await client.load("w", "w1:gpu0", wait=True)
    assert op.state == "succeeded" and op.result is not None, op.error
    m = await _scrape(head)
    assert _v(m, "gswarm_ops_total", kind="load", outcome="succeeded") == 1
    assert _v(m, "gswarm_bytes_moved_total", kind="gpu", node="w1") == op.result.size > 0
    assert _v(m, "gswarm_locations", tier="gpu0", state="ready") == 1
    file_size = (weights / "model.safetensors").stat().st_size  # the tensors and their header
    assert _v(m, "gswarm_bytes_moved_total", kind="hub", node="w1") == file_size


async def test_the_open_metrics_port_speaks_tls_when_the_head_does(tmp_path: Path) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, fast_settings(metrics_port=0), cert_pem, key_pem)
    await server.start()
    try:
        url = server.metrics_url
        assert url is not None and url.startswith("https://")
        context = ssl.create_default_context()
        authority.configure_trust(context)
        async with aiohttp.ClientSession() as s, s.get(url, ssl=context) as r:
            assert r.status == 200 and "gswarm_nodes" in await r.text()
    finally:
        await server.stop()
