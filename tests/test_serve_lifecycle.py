"""Serving's life cycle without surprises: `serve` again answers with the running service,
another port or backend on that device is a 409 naming it; removing what a service serves
from (`rm`, `move`, `delete`) is a 409 naming it unless forced, and the CLI asks on a
terminal; `logs` reads every backend's log and `logs --follow` follows it; `health` is a
line of words. Template backends (small Python HTTP servers) need no torch; the builtin
backend's logs do (`tox -e py`)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gswarm.agent.main import Agent
from gswarm.agent.serving import ServingConfig, Template
from gswarm.client import GswarmClient
from gswarm.errors import BadRequest, Conflict, NotFound
from gswarm.head.app import HeadServer
from gswarm.ops import LOG_CHUNK_BYTES, DeleteResult, ServeResult
from tests.conftest import AgentRunner, Cli, fast_settings, free_port, running_hub, wait_for
from tests.test_serving_torch import tiny_llm  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(120)

SLOW = (
    "import runpy, sys, time; time.sleep(1.5); "
    "sys.argv = ['http.server', sys.argv[1], '--bind', '127.0.0.1']; "
    "runpy.run_module('http.server', run_name='__main__')"
)
"""An HTTP server that takes 1.5 s to start."""

BRIEF = (
    "import http.server, os, sys, threading; "
    "srv = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler); "
    "threading.Timer(2.0, lambda: os._exit(1)).start(); srv.serve_forever()"
)
"""An HTTP server that dies after 2 s."""

QUIET = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health":
            print("got", self.path, file=sys.stderr, flush=True)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
"""An HTTP server that logs every request but its health checks: its log grows only when asked."""

HTTP = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]

CONFIG = ServingConfig(
    templates={
        "pyhttp": Template(command=HTTP, health="/"),
        "pyhttp2": Template(command=HTTP, health="/"),
        "slow": Template(command=[sys.executable, "-c", SLOW, "{port}"], health="/"),
        "brief": Template(command=[sys.executable, "-c", BRIEF, "{port}"], health="/"),
        "quiet": Template(command=[sys.executable, "-c", QUIET, "{port}"], health="/health"),
    },
    health_interval=0.3,
    max_restarts=0,
    stop_grace=3,
)


@pytest.fixture
async def node(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, tiny_repo_dir: Path
) -> AsyncIterator[Agent]:
    agent = await agents.start(head, "w1", serving_config=CONFIG, simulate_gpus="1:1G")
    op = await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)
    assert op.state == "succeeded", op.error
    yield agent


async def _get(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status


async def _serve(client: GswarmClient, device: str, backend: str = "pyhttp", model: str = "m") -> int:
    port = free_port()
    op = await client.serve(model, device, port, backend=backend, wait=True)
    assert op.state == "succeeded", op.error
    return port


async def _gs(cli: Cli, head: HeadServer, *args: str) -> subprocess.CompletedProcess[str]:
    """A gsmodel command, in this process, against the test's head."""
    return await cli.ainvoke(*args, env={"GSWARM_HEAD_URL": head.url})


def _locations(head: HeadServer, model: str = "m") -> dict[str, str]:
    reg = head.head.registry
    return {loc.device: loc.state for loc in reg.model_locations(model)} if model in reg.models else {}


# ---------------------------------------------------------------- serve is idempotent


async def test_serving_again_answers_with_the_running_service(
    head: HeadServer, node: Agent, client: GswarmClient, cli: Cli
) -> None:
    port = await _serve(client, "w1:disk")
    svc = head.head.registry.services["m@w1:disk"]

    again = await client.serve("m", "w1:disk", port, backend="pyhttp", wait=True)
    assert again.state == "succeeded", again.error
    assert isinstance(again.result, ServeResult) and again.result.already_running
    assert (again.result.pid, again.result.url, again.result.state) == (svc.pid, svc.url, "ready")
    headers = {"Authorization": f"Bearer {head.head.tokens.api_token}"}
    body = {"model_name": "m", "device": "w1:disk", "port": port, "backend": "pyhttp"}
    async with aiohttp.ClientSession(headers=headers) as s, s.post(head.url + "/serve", json=body) as r:
        assert r.status == 200 and (await r.json())["state"] == "succeeded"
    r2 = await _gs(cli, head, "serve", "m", "w1:disk", str(port), "--backend", "pyhttp")
    assert r2.returncode == 0, r2.stderr
    assert f"already running at {svc.url}" in r2.stdout

    # Another port, or another backend, on the same device: a conflict naming what runs.
    with pytest.raises(Conflict) as other_port:
        await client.serve("m", "w1:disk", free_port(), backend="pyhttp")
    assert other_port.value.code == "already_serving"
    assert f"m@w1:disk (pyhttp on port {port}, ready)" in other_port.value.message
    with pytest.raises(Conflict) as other_backend:
        await client.serve("m", "w1:disk", port, backend="pyhttp2")
    assert other_backend.value.code == "already_serving" and "asked: pyhttp2" in other_backend.value.message
    # The same port for another service on that node: a conflict naming the one holding it.
    with pytest.raises(Conflict) as taken:
        await client.serve("m", "w1:gpu0", port, backend="pyhttp")
    assert taken.value.code == "port_in_use" and "m@w1:disk (pyhttp" in taken.value.message
    r3 = await _gs(cli, head, "serve", "m", "w1:disk", str(free_port()), "--backend", "pyhttp")
    assert r3.returncode == 1 and "already served on w1:disk" in r3.stderr

    (still,) = await client.list_services()
    assert (still.pid, still.state, still.restarts) == (svc.pid, "ready", 0)


async def test_serving_again_while_it_starts_joins_its_op(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    port = free_port()
    first = await client.serve("m", "w1:disk", port, backend="slow")
    second = await client.serve("m", "w1:disk", port, backend="slow")
    assert second.op_id == first.op_id
    final = await client.wait_op(first.op_id, timeout=30)
    assert final.state == "succeeded", final.error
    third = await client.serve("m", "w1:disk", port, backend="slow")
    assert third.op_id != first.op_id
    assert isinstance(third.result, ServeResult) and third.result.already_running
    assert sum(op.kind == "serve" and op.state == "succeeded" for op in head.head.registry.ops.values()) == 2


async def test_serving_a_failed_service_again_starts_it_afresh(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    port = await _serve(client, "w1:disk", backend="brief")
    pid = head.head.registry.services["m@w1:disk"].pid
    await wait_for(lambda: head.head.registry.services["m@w1:disk"].state == "failed", timeout=20)
    op = await client.serve("m", "w1:disk", port, backend="brief", wait=True)
    assert op.state == "succeeded", op.error
    assert isinstance(op.result, ServeResult) and not op.result.already_running
    assert op.result.state == "ready" and op.result.pid != pid


# ---------------------------------------------------------------- removing what serves


async def test_removing_what_a_service_serves_from_needs_force(
    head: HeadServer, node: Agent, client: GswarmClient, tiny_repo_dir: Path
) -> None:
    port = await _serve(client, "w1:disk")

    with pytest.raises(Conflict) as rm:
        await client.delete_location("m", "w1:disk")
    assert rm.value.code == "serving" and rm.value.details == {"services": ["m@w1:disk"]}
    assert f"m@w1:disk (pyhttp on port {port}, ready)" in rm.value.message
    with pytest.raises(Conflict) as mv:
        await client.move("m", "w1:disk", "w1:dram")
    assert mv.value.code == "serving" and "m@w1:disk" in mv.value.message
    with pytest.raises(Conflict) as delete:
        await client.delete_model("m")
    assert delete.value.code == "serving" and "m@w1:disk" in delete.value.message
    # Nothing changed: the copy is there and the service runs.
    assert _locations(head) == {"w1:disk": "ready"}
    assert head.head.registry.services["m@w1:disk"].state == "ready"
    assert await _get(f"http://127.0.0.1:{port}/") == 200
    # A move that keeps its source takes nothing away.
    kept = await client.move("m", "w1:disk", "w1:dram", keep_source=True, wait=True)
    assert kept.state == "succeeded", kept.error

    # rm --force stops the service, then removes the copy.
    op = await client.delete_location("m", "w1:disk", force=True, wait=True)
    assert op.state == "succeeded", op.error
    assert await client.list_services() == [] and _locations(head) == {"w1:dram": "ready"}
    with pytest.raises(aiohttp.ClientError):
        await _get(f"http://127.0.0.1:{port}/")

    # move --force, from a copy that serves.
    port = await _serve(client, "w1:dram")
    op = await client.move("m", "w1:dram", "w1:disk", force=True, wait=True)
    assert op.state == "succeeded", op.error
    await wait_for(lambda: _locations(head) == {"w1:disk": "ready"}, timeout=10)
    assert await client.list_services() == []

    # delete --force stops every service of the model, says so, then deletes it.
    await _serve(client, "w1:disk")
    await _serve(client, "w1:gpu0", backend="pyhttp2")
    result = await client.delete_model("m", force=True)
    assert result["stopped_services"] == ["m@w1:disk", "m@w1:gpu0"]
    assert await client.list_services() == [] and "m" not in head.head.registry.models


async def test_a_gpu_service_needs_a_copy_on_its_node(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    """A service on a GPU reads its node's dram or disk copy (and restarts from it): removing
    one of two is fine, the last one is refused."""
    await _serve(client, "w1:gpu0")
    with pytest.raises(Conflict) as last:
        await client.delete_location("m", "w1:disk")
    assert last.value.code == "serving" and "m@w1:gpu0 (pyhttp" in last.value.message

    assert (await client.copy("m", "w1:disk", "w1:dram", wait=True)).state == "succeeded"
    assert (await client.delete_location("m", "w1:disk", wait=True)).state == "succeeded"
    # A move on the node leaves a copy there.
    assert (await client.move("m", "w1:dram", "w1:disk", wait=True)).state == "succeeded"
    await wait_for(lambda: _locations(head) == {"w1:disk": "ready"}, timeout=10)
    with pytest.raises(Conflict):
        await client.delete_location("m", "w1:disk")
    assert head.head.registry.services["m@w1:gpu0"].state == "ready"


def _on_a_terminal(cli: Cli, head: HeadServer, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a terminal as its stdin, the answer typed in advance."""
    master, slave = pty.openpty()
    try:
        os.write(master, answer.encode() + b"\n")
        return subprocess.run(
            [sys.executable, "-m", "gswarm", *args],
            stdin=slave,
            capture_output=True,
            text=True,
            env={**cli.env, "GSWARM_HEAD_URL": head.url},
            timeout=60,
        )
    finally:
        os.close(master)
        os.close(slave)


async def test_the_cli_asks_before_stopping_a_service(
    head: HeadServer, node: Agent, client: GswarmClient, cli: Cli, tiny_repo_dir: Path
) -> None:
    await _serve(client, "w1:disk")

    # Without a terminal: refused, saying what serves and how to force it.
    r = await _gs(cli, head, "rm", "m", "w1:disk")
    assert r.returncode == 1 and "m@w1:disk (pyhttp on port" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    # On a terminal: asked; no leaves everything as it was.
    no = await asyncio.to_thread(_on_a_terminal, cli, head, "n", "rm", "m", "w1:disk")
    assert no.returncode == 1, no.stderr
    assert "stop m@w1:disk and go on? [y/N]" in no.stderr and "nothing was changed" in no.stderr
    assert _locations(head) == {"w1:disk": "ready"}
    assert head.head.registry.services["m@w1:disk"].state == "ready"
    yes = await asyncio.to_thread(_on_a_terminal, cli, head, "y", "rm", "m", "w1:disk")
    assert yes.returncode == 0, yes.stderr
    assert "stopping m@w1:disk first" in yes.stderr and "rm m on w1:disk: done" in yes.stdout
    assert _locations(head) == {} and await client.list_services() == []

    # --force: no question, but it still says what it stops.
    assert (await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)).state == "succeeded"
    await _serve(client, "w1:disk")
    moved = await _gs(cli, head, "move", "m", "w1:disk", "w1:dram", "--force")
    assert moved.returncode == 0, moved.stderr
    assert "stopping m@w1:disk first" in moved.stderr and await client.list_services() == []
    await _serve(client, "w1:dram")
    deleted = await _gs(cli, head, "delete", "m", "--force")
    assert deleted.returncode == 0, deleted.stderr
    assert "stopped m@w1:dram" in deleted.stdout and "m" not in head.head.registry.models


# ---------------------------------------------------------------- logs


async def test_logs_follow_a_service_until_it_stops(
    head: HeadServer, node: Agent, client: GswarmClient, cli: Cli
) -> None:
    port = await _serve(client, "w1:disk", backend="quiet")
    await _get(f"http://127.0.0.1:{port}/before")
    env = {"GSWARM_HEAD_URL": head.url}
    follow = cli.spawn("logs", "m", "w1:disk", "--follow", env=env, name="follow")
    await asyncio.to_thread(follow.wait_output, "got /before")
    await _get(f"http://127.0.0.1:{port}/first")
    await asyncio.to_thread(follow.wait_output, "got /first")
    await _get(f"http://127.0.0.1:{port}/second")
    await asyncio.to_thread(follow.wait_output, "got /second")
    assert follow.p.poll() is None  # still following

    assert (await client.stop_service("m", "w1:disk", wait=True)).state == "succeeded"
    assert await asyncio.to_thread(follow.p.wait, 30) == 0
    out = follow.output()
    assert "m on w1:disk is no longer running" in out
    assert [line for line in out.splitlines() if line.startswith("got")] == [
        "got /before",
        "got /first",
        "got /second",
    ]


async def test_logs_by_offset_long_polled_and_bounded(
    head: HeadServer, node: Agent, client: GswarmClient
) -> None:
    port = await _serve(client, "w1:disk", backend="quiet")
    tail = await client.log_chunk("m", "w1:disk")
    assert tail.running and not tail.shared and tail.file == "m@w1_disk.log"
    start = tail.offset

    # Nothing new: at once without a timeout, after it with one.
    now = await client.log_chunk("m", "w1:disk", since_bytes=start)
    assert (now.log, now.offset, now.reset) == ("", start, False)
    t0 = time.monotonic()
    idle = await client.log_chunk("m", "w1:disk", since_bytes=start, timeout=1)
    assert idle.log == "" and time.monotonic() - t0 >= 0.9

    # A long poll answers as soon as the log grows.
    t0 = time.monotonic()
    poll = asyncio.create_task(client.log_chunk("m", "w1:disk", since_bytes=start, timeout=20))
    await _get(f"http://127.0.0.1:{port}/wake")
    got = await poll
    assert got.log == "got /wake\n" and got.offset == start + len(got.log)
    assert time.monotonic() - t0 < 15

    # Big output comes in bounded chunks, each cut on a whole character.
    path = node.services.log_path("m@w1:disk")
    text = "é€😀x" * 30_000  # 300,000 bytes of 1- to 4-byte characters
    with path.open("ab") as f:
        f.write(text.encode())
    offset, pieces = got.offset, []
    while True:
        chunk = await client.log_chunk("m", "w1:disk", since_bytes=offset)
        if not chunk.log:
            break
        assert len(chunk.log.encode()) <= LOG_CHUNK_BYTES and "\ufffd" not in chunk.log
        pieces.append(chunk.log)
        offset = chunk.offset
    assert len(pieces) >= 300_000 // LOG_CHUNK_BYTES and "".join(pieces) == text

    # An offset past the end (the log was replaced): from its start, saying so.
    again = await client.log_chunk("m", "w1:disk", since_bytes=offset + 10_000)
    assert again.reset and again.log.startswith("got /wake")

    # Bad offsets and waits are 400s; a service that never ran has no log.
    for params in ({"since_bytes": "-1"}, {"since_bytes": "x"}, {"since_bytes": "0", "timeout": "26"}):
        with pytest.raises(BadRequest) as bad:
            await client.request("GET", "/logs/m/w1:disk", params=params)
        assert bad.value.code == "invalid_query"
    with pytest.raises(NotFound) as missing:
        await client.log_chunk("m", "w1:dram")
    assert missing.value.code == "service_not_found"

    # A stopped service's log is still there; a follower ends.
    assert (await client.stop_service("m", "w1:disk", wait=True)).state == "succeeded"
    after = await client.log_chunk("m", "w1:disk", lines=1000)
    assert not after.running and after.offset == offset and after.log.endswith("é€😀x")
    assert len(after.log.encode()) <= LOG_CHUNK_BYTES and "\ufffd" not in after.log  # from a whole character
    chunks = [c async for c in client.follow_logs("m", "w1:disk", lines=1)]
    assert len(chunks) == 1 and not chunks[0].running


async def test_health_is_a_line_of_words(
    head: HeadServer, node: Agent, client: GswarmClient, cli: Cli
) -> None:
    await _serve(client, "w1:disk")
    one = await _gs(cli, head, "health", "m", "w1:disk")
    assert one.returncode == 0, one.stderr
    assert re.fullmatch(r"healthy: m@w1:disk is ready \(\d+\.\d ms\)\n", one.stdout), one.stdout
    whole = await _gs(cli, head, "health", "--node", "w1")
    assert whole.returncode == 0, whole.stderr
    assert re.fullmatch(
        r"healthy: 1 GPU; disk [\d.]+ [KMGT]?B free, dram [\d.]+ [KMGT]?B free; services: m@w1:disk ok\n",
        whole.stdout,
    ), whole.stdout
    assert "{" not in one.stdout + whole.stdout
    assert (await client.stop_service("m", "w1:disk", wait=True)).state == "succeeded"
    gone = await _gs(cli, head, "health", "m", "w1:disk")
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and "not served on w1:disk" in gone.stderr


# ---------------------------------------------------------------- the builtin backend (torch)

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs torch and transformers (the serve extra): run `tox -e py`",
)


@pytest.fixture
async def llm_hub(tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:  # noqa: F811
    async with running_hub({"org/tiny-llm": tiny_llm}, monkeypatch) as server:
        yield server


@needs_torch
@pytest.mark.timeout(300)
async def test_builtin_logs_on_a_gpu_and_on_the_cpu(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, cli: Cli, llm_hub: Any
) -> None:
    agents.settings = fast_settings(warm_spare=True)  # the CPU services below use the spare
    agent = await agents.start(head, "w1", simulate_gpus="1:1G")
    assert (await client.download("tiny-llm", "org/tiny-llm", "w1:dram", wait=True)).state == "succeeded"
    assert (await client.load("tiny-llm", "w1:gpu0", wait=True)).state == "succeeded"
    await _serve(client, "w1:gpu0", backend="builtin", model="tiny-llm")

    # The builtin server runs in the GPU's worker: its log is that worker's.
    r = await _gs(cli, head, "logs", "tiny-llm", "w1:gpu0")
    assert r.returncode == 0, r.stderr
    assert "loaded tiny-llm" in r.stdout and "serving tiny-llm on 127.0.0.1" in r.stdout
    assert "gpu0-worker.log" in r.stderr and "shared by the builtin services" in r.stderr

    # On the CPU: a worker of its own, then the warm spare, each writing the service's log.
    await _serve(client, "w1:dram", backend="builtin", model="tiny-llm")
    await wait_for(lambda: agent.services.spare_ready, timeout=120)
    assert (await client.copy("tiny-llm", "w1:dram", "w1:disk", wait=True)).state == "succeeded"
    await _serve(client, "w1:disk", backend="builtin", model="tiny-llm")
    dram = await client.log_chunk("tiny-llm", "w1:dram")
    disk = await client.log_chunk("tiny-llm", "w1:disk")
    assert "service tiny-llm@w1:dram" in dram.log and "w1:disk" not in dram.log and not dram.shared
    assert "service tiny-llm@w1:disk" in disk.log and "w1:dram" not in disk.log
    assert disk.file == "tiny-llm@w1_disk.log"

    # Removing the GPU copy the builtin server serves from: refused, then forced.
    with pytest.raises(Conflict) as refused:
        await client.delete_location("tiny-llm", "w1:gpu0")
    assert refused.value.code == "serving" and "tiny-llm@w1:gpu0 (builtin" in refused.value.message
    op = await client.delete_location("tiny-llm", "w1:gpu0", force=True, wait=True)
    assert op.state == "succeeded", op.error
    # Stopping the service may have unloaded the copy before the delete ran: either way it's gone.
    assert isinstance(op.result, DeleteResult)
    await wait_for(lambda: "w1:gpu0" not in _locations(head, "tiny-llm"), timeout=10)
    assert agent.gpu_pool.resident.get(0, {}) == {}
    assert {s.device for s in await client.list_services()} == {"w1:dram", "w1:disk"}
    # Its log outlives it.
    after = await client.log_chunk("tiny-llm", "w1:gpu0")
    assert after.shared and not after.running and "stopped service tiny-llm@w1:gpu0" in after.log
    for svc in await client.list_services():
        assert (await client.stop_service(svc.model, svc.device, wait=True)).state == "succeeded"
