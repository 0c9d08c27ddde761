"""Simulated agents of bench/control_plane.py: many real websocket clients of the head in one
process, each connected with the same options as `gswarm/agent/session.py` (permessage-deflate
offered unless told `none`), each sending a valid `Hello`, answering every command with
`Accepted` and `Succeeded` (a probe's result carries the inventory), and sending a `Heartbeat`
every interval the head's `Welcome` gives.

    python bench/control_plane_agents.py WS_URL deflate|none   (join token in BENCH_CONTROL_PLANE_JOIN_TOKEN)

It takes JSON-line commands on stdin and answers each with one JSON line on stdout:
`{"cmd": "connect", "ids": [...], "concurrency": C, "rate": R}` (connect these agents, at most R
per second, C handshakes at a time; answers ok/failed/seconds), `{"cmd": "stats"}` (counters),
`{"cmd": "quit"}`; it closes every socket and exits at `quit` or the end of its stdin.

The benchmark's side (below the role): `start_workers` starts the worker processes through the
harness, `grow_agents` connects more agents and waits until the head counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from harness import Cluster, Head, Proc
from measure import BenchError, raise_nofile_limit
from websockets.asyncio.client import ClientConnection, connect

from gswarm import PROTOCOL_VERSION
from gswarm.protocol import (
    Accepted,
    Ack,
    Command,
    Heartbeat,
    Hello,
    Inventory,
    Succeeded,
    Welcome,
    encode,
    head_message_decoder,
    to_builtins,
)

HOST = "127.0.0.1"
SCRIPT = str(Path(__file__).resolve())
TOKEN_ENV = "BENCH_CONTROL_PLANE_JOIN_TOKEN"
HELLO_TIMEOUT = 10.0  # the head's default hello timeout


def sim_inventory(node_id: str) -> Inventory:
    """A minimal but valid inventory; the same in Hello, heartbeats and probe results."""
    return Inventory(
        hostname=node_id,
        addresses=[HOST],
        cpu_count=2,
        memory_total=8 << 30,
        memory_available=4 << 30,
    )


@dataclass
class WorkerCounters:
    """What one agent worker process has done."""

    connected: int = 0
    commands: int = 0
    acks: int = 0
    heartbeats: int = 0
    drops: int = 0
    errors: list[str] = field(default_factory=list)

    def note_error(self, text: str) -> None:
        """Keep the first few error texts."""
        if len(self.errors) < 5:
            self.errors.append(text)


class AgentWorker:
    """Many simulated agents in one process, each a real websocket client of the head."""

    def __init__(self, url: str, token: str, compression: str | None) -> None:
        self.url = url
        self.token = token
        self.compression = compression
        self.counters = WorkerCounters()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.credentials: dict[str, str] = {}  # what each node's Welcome issued (its reconnects need it)

    async def connect_many(self, ids: Sequence[str], concurrency: int, rate: float) -> dict[str, Any]:
        """Start agents at most `rate` per second, `concurrency` handshakes at a time; wait for all."""
        started = time.monotonic()
        gate = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()
        ready: list[asyncio.Future[bool]] = []
        for node_id in ids:
            fut: asyncio.Future[bool] = loop.create_future()
            ready.append(fut)
            await gate.acquire()
            self.tasks[node_id] = asyncio.create_task(self._agent(node_id, fut, gate))
            await asyncio.sleep(1.0 / rate)
        results = await asyncio.gather(*ready)
        ok = sum(1 for r in results if r)
        return {"ok": ok, "failed": len(results) - ok, "seconds": time.monotonic() - started}

    async def _agent(self, node_id: str, ready: asyncio.Future[bool], gate: asyncio.Semaphore) -> None:
        released = False

        def release(result: bool) -> None:
            nonlocal released
            if not released:
                released = True
                gate.release()
                if not ready.done():
                    ready.set_result(result)

        try:
            for attempt in range(3):
                try:
                    await self._session(node_id, release)
                except Exception as exc:  # any failure: count it, retry a failed connect
                    if released:  # it was connected: a drop, not a failed connect
                        self.counters.drops += 1
                        self.counters.note_error(f"{node_id} dropped: {exc!r}")
                        return
                    self.counters.note_error(f"{node_id} connect attempt {attempt + 1}: {exc!r}")
                    await asyncio.sleep(0.5 * (attempt + 1))
                else:  # the head closed a socket it had welcomed
                    self.counters.drops += 1
                    self.counters.note_error(f"{node_id} closed by the head")
                    return
        finally:
            release(False)

    async def _session(self, node_id: str, release: Callable[[bool], None]) -> None:
        inventory = sim_inventory(node_id)
        inv_builtins = to_builtins(inventory)
        async with connect(
            self.url,
            open_timeout=HELLO_TIMEOUT,
            ping_interval=5.0,  # as gswarm/agent/session.py: settings.ws_ping_interval
            ping_timeout=10.0,
            close_timeout=2,
            max_size=8 << 20,
            compression=self.compression,
        ) as ws:
            hello = Hello(
                node_id=node_id,
                token=self.token,
                credential=self.credentials.get(node_id, ""),
                protocol_version=PROTOCOL_VERSION,
                instance_id=uuid.uuid4().hex,
                agent_version="bench",
                inventory=inventory,
            )
            await ws.send(encode(hello).decode())
            welcome = head_message_decoder.decode(await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT))
            if not isinstance(welcome, Welcome):
                raise BenchError(f"{node_id}: expected welcome, got {type(welcome).__name__}")
            if welcome.credential:
                self.credentials[node_id] = welcome.credential
            self.counters.connected += 1
            release(True)
            beat = asyncio.create_task(self._heartbeats(ws, inventory, welcome.heartbeat_interval))
            try:
                await self._serve(ws, inv_builtins)
            finally:
                self.counters.connected -= 1
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)

    async def _serve(self, ws: ClientConnection, inv_builtins: dict[str, Any]) -> None:
        async for raw in ws:
            msg = head_message_decoder.decode(raw)
            if isinstance(msg, Command):
                self.counters.commands += 1
                await ws.send(encode(Accepted(op_id=msg.op_id)).decode())
                body = {"inventory": inv_builtins, "holdings": []} if msg.kind == "probe" else {}
                result = msgspec.Raw(encode(body))
                await ws.send(encode(Succeeded(op_id=msg.op_id, result=result)).decode())
            elif isinstance(msg, Ack):
                self.counters.acks += 1

    async def _heartbeats(self, ws: ClientConnection, inventory: Inventory, interval: float) -> None:
        data = encode(Heartbeat(inventory=inventory)).decode()
        await asyncio.sleep(random.uniform(0.0, interval))
        while True:
            await ws.send(data)
            self.counters.heartbeats += 1
            await asyncio.sleep(interval)

    async def close_all(self) -> None:
        """Close every agent's socket (bounded)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=15.0)


async def agents_main(url: str, token: str, compression: str | None) -> None:
    """Agent worker: JSON-line commands on stdin, one JSON-line answer each on stdout."""
    raise_nofile_limit(65536)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = AgentWorker(url, token, compression)

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        while True:
            line = await reader.readline()
            if not line:
                break  # the benchmark went away
            cmd = json.loads(line)
            if cmd["cmd"] == "connect":
                answer(await worker.connect_many(cmd["ids"], cmd["concurrency"], cmd["rate"]))
            elif cmd["cmd"] == "stats":
                answer(asdict(worker.counters))
            elif cmd["cmd"] == "quit":
                break
    finally:
        await worker.close_all()


# ---------------------------------------------------------------- the benchmark's side


class WorkerProc:
    """One simulated-agent worker process and its JSON-line command pipe."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.ids: list[str] = []

    async def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one command, wait for its one-line answer."""
        stdin, stdout = self.proc.popen.stdin, self.proc.popen.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(cmd).encode() + b"\n")
        stdin.flush()
        try:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout)
        except TimeoutError:
            raise BenchError(f"{self.proc.name} did not answer {cmd['cmd']!r}:\n{self.proc.tail()}") from None
        if not line:
            raise BenchError(f"{self.proc.name} exited:\n{self.proc.tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer


def start_workers(cluster: Cluster, count: int, head: Head, compression: str) -> list[WorkerProc]:
    """Start the agent worker processes (the join token in their environment)."""
    ws_url = head.url.replace("http://", "ws://", 1) + "/ws/agent"
    return [
        WorkerProc(
            cluster.procs.spawn(
                f"agents-{i}",
                [sys.executable, SCRIPT, ws_url, compression],
                env={**cluster.env, TOKEN_ENV: head.join_token},
                group="agents",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                term=False,  # stopped by the end of its stdin: it closes its sockets first
                grace=20.0,
            )
        )
        for i in range(count)
    ]


async def head_counters(session: aiohttp.ClientSession, head: Head) -> dict[str, Any]:
    """`GET /` of the head."""
    async with session.get(f"{head.url}/") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def grow_agents(
    session: aiohttp.ClientSession,
    head: Head,
    workers: list[WorkerProc],
    current: int,
    target: int,
    rate: float,
) -> float:
    """Connect agents sim-<current+1>..sim-<target>, spread over the workers; wait until the head
    counts them all. Returns the seconds it took."""
    started = time.monotonic()
    ids = [f"sim-{i:04d}" for i in range(current + 1, target + 1)]
    per_worker: list[list[str]] = [[] for _ in workers]
    for i, node_id in enumerate(ids):
        per_worker[i % len(workers)].append(node_id)
    calls = []
    for worker, mine in zip(workers, per_worker, strict=True):
        if mine:
            worker.ids.extend(mine)
            cmd = {"cmd": "connect", "ids": mine, "concurrency": 32, "rate": rate / len(workers)}
            calls.append(worker.call(cmd, timeout=60.0 + len(mine) / max(rate / len(workers), 1.0)))
    answers = await asyncio.gather(*calls)
    failed = sum(a["failed"] for a in answers)
    if failed:
        errors = [await w.call({"cmd": "stats"}, 10.0) for w in workers]
        raise BenchError(f"{failed} agents failed to connect: {[e['errors'] for e in errors]}")
    deadline = time.monotonic() + 30.0
    while (await head_counters(session, head))["agents_connected"] < target:
        if time.monotonic() > deadline:
            raise BenchError(f"the head does not count {target} connected agents")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def worker_heartbeats(workers: list[WorkerProc]) -> int:
    """Heartbeats sent so far by all workers."""
    return sum([(await w.call({"cmd": "stats"}, 10.0))["heartbeats"] for w in workers])


def main(argv: Sequence[str]) -> int:
    """The role: WS_URL COMPRESSION, the join token in the environment."""
    url, compression = argv[:2]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(agents_main(url, os.environ[TOKEN_ENV], None if compression == "none" else compression))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
