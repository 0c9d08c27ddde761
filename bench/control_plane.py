"""Control-plane benchmark: one real head, N simulated agents, op round trips and idle cost.

    python bench/control_plane.py [--agents 1,100,1000] [--ops 300] [--quick]

What it measures, all in one run on this machine:

(a) op round trip for each N: `POST /nodes/{id}/probe` -> head -> agent (`Accepted`,
    `Succeeded`) -> head -> `op.succeeded` event at a `/ws/events` subscriber; p50/p90/p99/max;
(b) the anchor: a bare aiohttp websocket echo round trip (same count, 300-byte JSON), measured
    at the start and again just before each N, and the ratio gswarm p50 / echo p50; plus
    `GET /health` on the head, the floor of any REST call;
(c) head RSS and CPU with the largest N of agents connected, idle and heartbeating.

Processes: the head is started through the real CLI (`python -m gswarm head`) on 127.0.0.1
with a temporary state dir; the simulated agents are real websocket clients (the `websockets`
library, connected with the same options as `gswarm/agent/session.py`) in `--workers`
separate processes; the echo server is one more process. This process only measures.
Everything it writes lives in a temporary directory that is removed at the end, and every
process it started is stopped, also on Ctrl-C or an error.

Internal roles (run by the benchmark itself): `control_plane.py _agents ...` is an agent
worker that takes JSON-line commands on stdin; `control_plane.py _echo` is the echo server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import resource
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

from gswarm import PROTOCOL_VERSION
from gswarm.protocol import (
    Accepted,
    Ack,
    Command,
    Event,
    Heartbeat,
    Hello,
    Inventory,
    Succeeded,
    Welcome,
    encode,
    head_message_decoder,
    subscriber_message_decoder,
    to_builtins,
)

HOST = "127.0.0.1"
SCRIPT = str(Path(__file__).resolve())
TOKEN_ENV = "BENCH_CONTROL_PLANE_JOIN_TOKEN"
HEARTBEAT_INTERVAL = 5.0  # the default; the head hands it to the agents in Welcome
HELLO_TIMEOUT = 10.0  # the head's default hello timeout
ECHO_MESSAGE_BYTES = 300
OP_TIMEOUT = 10.0  # one op round trip that takes longer than this counts as lost
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_P50_RATIO = 2.0
TARGET_P99_MS = 10.0
TARGET_KB_PER_AGENT = 50.0
TARGET_HEARTBEAT_CPU_PCT = 10.0


class BenchError(RuntimeError):
    """The benchmark could not go on (a process failed to start, agents did not connect, ...)."""


# ---------------------------------------------------------------- statistics and /proc


@dataclass
class Latency:
    """Percentiles of a list of round-trip times, in milliseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        """Percentiles (nearest rank) of samples given in seconds."""
        if not seconds:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        ms = sorted(s * 1000.0 for s in seconds)

        def rank(p: float) -> float:
            return ms[min(len(ms) - 1, max(0, math.ceil(p / 100.0 * len(ms)) - 1))]

        return cls(len(ms), rank(50), rank(90), rank(99), ms[-1], statistics.fmean(ms))


def proc_rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, in seconds (/proc/PID/stat)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU use of some processes over a wall-clock window, as percent of one core."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = list(pids)
        self._wall = time.monotonic()
        self._cpu = [proc_cpu_seconds(p) for p in self._pids]

    def cpu_seconds(self) -> list[float]:
        """CPU seconds used by each process since the meter was made."""
        return [proc_cpu_seconds(p) - c for p, c in zip(self._pids, self._cpu, strict=True)]

    def percent(self) -> list[float]:
        """Percent of one core used by each process since the meter was made."""
        wall = time.monotonic() - self._wall
        return [100.0 * (proc_cpu_seconds(p) - c) / wall for p, c in zip(self._pids, self._cpu, strict=True)]


def machine_jiffies() -> tuple[int, int]:
    """Busy and steal time of the whole machine so far, in clock ticks (/proc/stat, all CPUs)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class MachineMeter:
    """How much CPU the rest of the machine used while the benchmark ran (a noise indicator)."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._busy, self._steal = machine_jiffies()
        self._ours: dict[int, float] = {}
        self.load_start = os.getloadavg()[0]

    def track(self, pids: Sequence[int]) -> None:
        """Count these processes as ours from now on."""
        for pid in pids:
            self._ours.setdefault(pid, proc_cpu_seconds(pid))

    def others_percent(self) -> tuple[float, float]:
        """CPU used by processes not ours, and steal, as percent of one core, since the start."""
        wall = time.monotonic() - self._wall
        busy, steal = machine_jiffies()
        ours = sum(proc_cpu_seconds(pid) - c for pid, c in self._ours.items())
        others = (busy - self._busy) / CLK_TCK - ours
        return 100.0 * max(0.0, others) / wall, 100.0 * (steal - self._steal) / CLK_TCK / wall


def raise_nofile_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (at most the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def cpu_model() -> str:
    """The CPU model name as lscpu/procfs report it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------- role: simulated agents


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
                protocol_version=PROTOCOL_VERSION,
                instance_id=uuid.uuid4().hex,
                agent_version="bench",
                inventory=inventory,
            )
            await ws.send(encode(hello).decode())
            welcome = head_message_decoder.decode(await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT))
            if not isinstance(welcome, Welcome):
                raise BenchError(f"{node_id}: expected welcome, got {type(welcome).__name__}")
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
                result = {"inventory": inv_builtins} if msg.kind == "probe" else {}
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
                c = worker.counters
                answer(
                    {
                        "connected": c.connected,
                        "commands": c.commands,
                        "acks": c.acks,
                        "heartbeats": c.heartbeats,
                        "drops": c.drops,
                        "errors": c.errors,
                    }
                )
            elif cmd["cmd"] == "quit":
                break
    finally:
        await worker.close_all()


# ---------------------------------------------------------------- role: echo server


async def echo_main() -> None:
    """A bare aiohttp websocket echo server on 127.0.0.1; prints its port; stops at stdin EOF."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    server: Any = site._server
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await reader.read()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- orchestration: processes


class Processes:
    """Every child process of the benchmark, so that each one is stopped whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    async def spawn(self, name: str, *argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
        """Start a child in its own session (a terminal's Ctrl-C reaches only this process)."""
        proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    async def stop_all(self) -> None:
        """Agent workers first (they close their sockets), then the rest: SIGTERM, then SIGKILL."""
        for name, proc in self.procs:
            if name.startswith("agents") and proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(b'{"cmd": "quit"}\n')
                    proc.stdin.close()
        for name, proc in self.procs:
            if name.startswith("agents"):
                await self._stop(proc, 20.0, signal_first=False)
        for name, proc in self.procs:
            if name == "echo" and proc.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.close()
            await self._stop(proc, 15.0, signal_first=not name.startswith("agents"))

    @staticmethod
    async def _stop(proc: asyncio.subprocess.Process, grace: float, signal_first: bool) -> None:
        if proc.returncode is not None:
            return
        if signal_first:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def kill_leftovers(self) -> None:
        """Last resort outside the event loop: SIGKILL any child still running."""
        for _, proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)


@dataclass
class HeadProc:
    """The head under test."""

    proc: asyncio.subprocess.Process
    url: str
    api_token: str
    join_token: str
    log: Path

    @property
    def pid(self) -> int:
        """The head's process id."""
        return self.proc.pid


def _log_tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def start_head(procs: Processes, tmp: Path, profile: bool) -> HeadProc:
    """Start `python -m gswarm head` on 127.0.0.1, port 0; wait for 'listening on', read tokens."""
    state = tmp / "state"
    log = tmp / "head.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSWARM_")}
    env.update(GSWARM_HEARTBEAT_INTERVAL=str(HEARTBEAT_INTERVAL), COLUMNS="240")
    argv = [sys.executable]
    if profile:
        argv += ["-m", "cProfile", "-o", str(tmp / "head.prof")]
    argv += ["-m", "gswarm", "head", "--host", HOST, "--port", "0", "--state-dir", str(state)]
    with log.open("wb") as logf:
        proc = await procs.spawn(
            "head", *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, env=env
        )
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        m = re.search(r"listening on (http://[0-9.]+:\d+)", log.read_text(errors="replace"))
        if m:
            tokens = json.loads((state / "tokens.json").read_text())
            return HeadProc(proc, m.group(1), tokens["api_token"], tokens["join_token"], log)
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise BenchError(f"the head did not start:\n{_log_tail(log)}")


class WorkerProc:
    """One agent worker process and its command pipe."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.ids: list[str] = []

    async def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one command, wait for its one-line answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"{self.name} did not answer {cmd['cmd']!r}:\n{_log_tail(self.log)}") from None
        if not line:
            raise BenchError(f"{self.name} exited:\n{_log_tail(self.log)}")
        answer: dict[str, Any] = json.loads(line)
        return answer


async def start_workers(
    procs: Processes, tmp: Path, count: int, head: HeadProc, compression: str
) -> list[WorkerProc]:
    """Start the agent worker processes."""
    ws_url = head.url.replace("http://", "ws://", 1) + "/ws/agent"
    workers = []
    for i in range(count):
        log = tmp / f"agents-{i}.log"
        with log.open("wb") as logf:
            proc = await procs.spawn(
                f"agents-{i}",
                sys.executable,
                SCRIPT,
                "_agents",
                ws_url,
                compression,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=logf,
                env={**os.environ, TOKEN_ENV: head.join_token},  # not on the command line
            )
        workers.append(WorkerProc(f"agents-{i}", proc, log))
    return workers


async def start_echo(procs: Processes, tmp: Path) -> str:
    """Start the echo server process; returns its websocket URL."""
    log = tmp / "echo.log"
    with log.open("wb") as logf:
        proc = await procs.spawn(
            "echo",
            sys.executable,
            SCRIPT,
            "_echo",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=logf,
        )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30.0)
    except TimeoutError:
        line = b""
    if not line.strip().isdigit():
        raise BenchError(f"the echo server did not start:\n{_log_tail(log)}")
    return f"ws://{HOST}:{int(line)}/ws"


# ---------------------------------------------------------------- orchestration: measurements


class OpWatcher:
    """Follows `/ws/events?topic=op` and notes when each op's `op.succeeded` arrived."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, str]] = {}
        self._waiting: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self, session: aiohttp.ClientSession, head: HeadProc) -> None:
        """Subscribe and wait for the head's 'live' notice."""
        ws_url = head.url.replace("http://", "ws://", 1) + "/ws/events"
        ws = await session.ws_connect(ws_url, params={"topic": "op", "token": head.api_token})
        first = await asyncio.wait_for(ws.receive(), 10.0)
        if first.type != aiohttp.WSMsgType.TEXT or '"live"' not in first.data:
            raise BenchError(f"event socket: expected the live notice, got {first.data!r}")
        self.task = asyncio.create_task(self._read(ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            now = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data: str = msg.data
            if '"op.succeeded"' not in data and '"op.failed"' not in data:
                continue  # op.created / op.running: skip the decode
            ev = subscriber_message_decoder.decode(data)
            if isinstance(ev, Event) and ev.kind in ("op.succeeded", "op.failed"):
                fut = self._waiting.pop(ev.key, None)
                if fut is not None and not fut.done():
                    fut.set_result((now, ev.kind))
                else:
                    self._seen[ev.key] = (now, ev.kind)

    async def wait(self, op_id: str, timeout: float) -> tuple[float, str]:
        """When (perf_counter) and how (`op.succeeded`/`op.failed`) the op ended."""
        if op_id in self._seen:
            return self._seen.pop(op_id)
        if self.task is not None and self.task.done():
            raise BenchError("the event subscriber is gone")
        fut: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        self._waiting[op_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(op_id, None)


@dataclass
class OpRun:
    """The op round trips at one N."""

    agents: int
    latency: Latency
    post: Latency
    lost: int
    failed: int
    seconds: float
    head_cpu_us_per_op: float
    echo: Latency | None = None
    """The bare echo measured just before this run: the anchor under the same conditions."""
    rss_kb_per_op: float = 0.0
    """Head RSS growth over the run, per op (op history kept in memory)."""


async def op_round_trips(
    session: aiohttp.ClientSession,
    head: HeadProc,
    watcher: OpWatcher,
    nodes: Sequence[str],
    ops: int,
    warmup: int,
    rng: random.Random,
) -> OpRun:
    """Sequential probes of random nodes: POST -> op.succeeded at the subscriber."""
    samples: list[float] = []
    posts: list[float] = []
    lost = failed = 0
    started = time.monotonic()
    meter: CpuMeter | None = None
    for i in range(warmup + ops):
        if i == warmup:
            meter = CpuMeter([head.pid])
        node = rng.choice(nodes)
        t0 = time.perf_counter()
        async with session.post(f"{head.url}/nodes/{node}/probe") as resp:
            body = await resp.read()
        t_post = time.perf_counter()
        if resp.status != 202:
            raise BenchError(f"POST /nodes/{node}/probe: {resp.status} {body[:300]!r}")
        op_id = msgspec.json.decode(body)["op_id"]
        try:
            t1, kind = await watcher.wait(op_id, OP_TIMEOUT)
        except TimeoutError:
            lost += 1
            continue
        if kind != "op.succeeded":
            failed += 1
        elif i >= warmup:
            samples.append(t1 - t0)
            posts.append(t_post - t0)
    assert meter is not None
    head_cpu_s = meter.cpu_seconds()[0]
    return OpRun(
        agents=len(nodes),
        latency=Latency.of(samples),
        post=Latency.of(posts),
        lost=lost,
        failed=failed,
        seconds=time.monotonic() - started,
        head_cpu_us_per_op=1e6 * head_cpu_s / ops,
    )


async def http_round_trips(
    session: aiohttp.ClientSession, head: HeadProc, count: int, warmup: int
) -> Latency:
    """Sequential keep-alive `GET /health` round trips to the head: the floor of any REST call."""
    samples = []
    for i in range(warmup + count):
        t0 = time.perf_counter()
        async with session.get(f"{head.url}/health") as resp:
            await resp.read()
        t1 = time.perf_counter()
        if resp.status != 200:
            raise BenchError(f"GET /health: {resp.status}")
        if i >= warmup:
            samples.append(t1 - t0)
    return Latency.of(samples)


async def echo_round_trips(session: aiohttp.ClientSession, url: str, count: int, warmup: int) -> Latency:
    """Sequential round trips of a ~300-byte JSON text message through the bare echo server."""
    shape: dict[str, Any] = {
        "type": "command",
        "op_id": uuid.uuid4().hex[:16],
        "kind": "probe",
        "args": {},
        "timeout": 21600.0,
        "pad": "",
    }
    shape["pad"] = "x" * (ECHO_MESSAGE_BYTES - len(json.dumps(shape)))
    message = json.dumps(shape)
    samples = []
    async with session.ws_connect(url) as ws:
        for i in range(warmup + count):
            t0 = time.perf_counter()
            await ws.send_str(message)
            msg = await asyncio.wait_for(ws.receive(), OP_TIMEOUT)
            t1 = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise BenchError(f"echo: unexpected frame {msg.type}")
            if i >= warmup:
                samples.append(t1 - t0)
    return Latency.of(samples)


async def head_counters(session: aiohttp.ClientSession, head: HeadProc) -> dict[str, Any]:
    """`GET /` of the head."""
    async with session.get(f"{head.url}/") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def grow_agents(
    session: aiohttp.ClientSession,
    head: HeadProc,
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


@dataclass
class IdleResult:
    """Head cost with agents connected and idle."""

    agents: int
    window: float
    rss0_kb: int
    cpu0_pct: float
    rss_before_kb: int
    before_agents: int
    rss_kb: int
    cpu_pct: float
    worker_cpu_pct: list[float]
    heartbeats: int

    @property
    def kb_per_agent(self) -> float:
        """Head memory per agent: RSS with the agents minus RSS before any agent connected."""
        return (self.rss_kb - self.rss0_kb) / self.agents

    @property
    def kb_per_agent_marginal(self) -> float:
        """RSS growth per agent from the previous N to this one (no op history in between)."""
        return (self.rss_kb - self.rss_before_kb) / max(1, self.agents - self.before_agents)


async def worker_heartbeats(workers: list[WorkerProc]) -> int:
    """Heartbeats sent so far by all workers."""
    total = 0
    for w in workers:
        total += (await w.call({"cmd": "stats"}, 10.0))["heartbeats"]
    return total


# ---------------------------------------------------------------- report


def _ms(x: float) -> str:
    return f"{x:.3f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    args: argparse.Namespace,
    echo: Latency,
    rest: Latency,
    runs: list[OpRun],
    idle: IdleResult | None,
    connect_seconds: dict[int, float],
    elapsed: float,
    noise: tuple[float, float, float],
    drops: int,
) -> str:
    """The results as plain-text tables (markdown-compatible)."""
    out = []
    out.append(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, websockets {importlib.metadata.version('websockets')}, "
        f"msgspec {msgspec.__version__}"
    )
    out.append(
        f"run: agents {args.agents}, {args.ops} ops per N after {args.warmup} warm-up, "
        f"{args.workers} agent worker processes, agent compression {args.compression}, "
        f"heartbeat {HEARTBEAT_INTERVAL:g} s, idle window {args.idle:g} s; {elapsed:.0f} s in all"
    )
    others, steal, load = noise
    out.append(
        f"machine noise: 1-min load {load:.2f} at start; other processes used {others:.0f} % of a core "
        f"and steal was {steal:.1f} % during the run; agent connections dropped: {drops}"
    )
    out.append("")
    out.append("(a)+(b) round trips in ms, sequential (one in flight at a time)")
    out.append("")
    out.append(
        "| what | agents | n | p50 | p90 | p99 | max | echo p50 | p50 / echo p50 | p50 / (2 × echo p50) |"
    )
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def row(what: str, agents: str, lat: Latency, anchor: Latency) -> str:
        return (
            f"| {what} | {agents} | {lat.n} | {_ms(lat.p50)} | {_ms(lat.p90)} | {_ms(lat.p99)} | "
            f"{_ms(lat.max)} | {_ms(anchor.p50)} | {lat.p50 / anchor.p50:.2f} | "
            f"{lat.p50 / (2 * anchor.p50):.2f} |"
        )

    out.append(row("bare aiohttp ws echo (anchor)", "-", echo, echo))
    out.append(row("head `GET /health` (REST floor)", "-", rest, echo))
    for r in runs:
        what = "probe op: POST → agent → `op.succeeded` event"
        out.append(row(what, str(r.agents), r.latency, r.echo or echo))
    out.append("")
    out.append(
        "Each op row is compared with a bare echo measured just before it (same machine load). "
        "p50 / (2 × echo p50) is the one-hop view: the op round trip crosses 4 one-way hops "
        "(REST request, head→agent, agent→head, head→subscriber), the echo 2."
    )
    out.append("")
    out.append("| op round trip, detail | " + " | ".join(f"N={r.agents}" for r in runs) + " |")
    out.append("| --- |" + " ---: |" * len(runs))
    out.append("| `POST` answered (202), p50 ms | " + " | ".join(_ms(r.post.p50) for r in runs) + " |")
    out.append("| head CPU per op, µs | " + " | ".join(f"{r.head_cpu_us_per_op:.0f}" for r in runs) + " |")
    out.append("| head RSS growth per op, KB | " + " | ".join(f"{r.rss_kb_per_op:.1f}" for r in runs) + " |")
    out.append("| ops lost / failed | " + " | ".join(f"{r.lost} / {r.failed}" for r in runs) + " |")
    if connect_seconds:
        out.append(
            "agents connected in: "
            + ", ".join(f"{n - prev} more to {n}: {s:.1f} s" for (n, s), prev in _with_prev(connect_seconds))
        )
    if idle is not None:
        out.append("")
        out.append(f"(c) head with {idle.agents} idle agents heartbeating, over {idle.window:.0f} s")
        out.append("")
        out.append("| measure | value |")
        out.append("| --- | ---: |")
        out.append(f"| head RSS, no agent yet | {idle.rss0_kb / 1024:.1f} MiB |")
        out.append(
            f"| head RSS, {idle.before_agents} agents (before growing) | "
            f"{idle.rss_before_kb / 1024:.1f} MiB |"
        )
        out.append(f"| head RSS, {idle.agents} agents idle | {idle.rss_kb / 1024:.1f} MiB |")
        out.append(f"| KB per agent (vs no agent) | {idle.kb_per_agent:.1f} |")
        out.append(
            f"| KB per agent (marginal, {idle.before_agents}→{idle.agents}) | "
            f"{idle.kb_per_agent_marginal:.1f} |"
        )
        out.append(f"| head CPU, no agent | {idle.cpu0_pct:.2f} % of a core |")
        out.append(f"| head CPU, {idle.agents} idle agents | {idle.cpu_pct:.2f} % of a core |")
        out.append(
            f"| heartbeats sent in the window | {idle.heartbeats} ({idle.heartbeats / idle.window:.0f}/s) |"
        )
        out.append(
            "| agent worker CPU (simulators, not the head) | "
            + ", ".join(f"{c:.1f} %" for c in idle.worker_cpu_pct)
            + " |"
        )
    out.append("")
    out.append("targets")
    out.append("")
    out.append("| target | measured | result |")
    out.append("| --- | ---: | :---: |")
    for r in runs:
        anchor = r.echo or echo
        ratio = r.latency.p50 / anchor.p50
        out.append(
            f"| p50 ≤ {TARGET_P50_RATIO:g}× bare echo, N={r.agents} | {ratio:.2f}× "
            f"({_ms(r.latency.p50)} vs {_ms(anchor.p50)} ms) | {_verdict(ratio <= TARGET_P50_RATIO)} |"
        )
    big = [r for r in runs if r.agents >= 1000]
    for r in big:
        out.append(
            f"| p99 ≤ {TARGET_P99_MS:g} ms, N={r.agents} | {_ms(r.latency.p99)} ms | "
            f"{_verdict(r.latency.p99 <= TARGET_P99_MS and r.lost == 0)} |"
        )
    if idle is not None:
        out.append(
            f"| ≤ {TARGET_KB_PER_AGENT:g} KB head memory per idle agent, N={idle.agents} | "
            f"{idle.kb_per_agent:.1f} KB | {_verdict(idle.kb_per_agent <= TARGET_KB_PER_AGENT)} |"
        )
        out.append(
            f"| heartbeats of {idle.agents} agents < {TARGET_HEARTBEAT_CPU_PCT:g} % of a core | "
            f"{idle.cpu_pct:.2f} % | {_verdict(idle.cpu_pct < TARGET_HEARTBEAT_CPU_PCT)} |"
        )
    if not big or idle is None or idle.agents < 1000:
        out.append("")
        out.append("(the p99, memory and CPU targets are defined at 1000 agents; pass --agents ...,1000)")
    return "\n".join(out)


def _with_prev(d: dict[int, float]) -> list[tuple[tuple[int, float], int]]:
    prev = 0
    out = []
    for n, s in d.items():
        out.append(((n, s), prev))
        prev = n
    return out


def print_profile(path: Path, top: int = 25) -> None:
    """The head's hottest functions by own time (from --profile)."""
    import pstats

    if not path.exists():
        print("(no profile written: the head did not exit cleanly)")
        return
    print(
        f"\nhead profile (cProfile, top {top} by own time; cProfile slows the head, "
        "so the figures above are not comparable):"
    )
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------- main


async def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> str:
    """Run the whole benchmark; returns the report."""
    started = time.monotonic()
    counts = sorted(set(args.agents))
    rng = random.Random(args.seed)

    def say(text: str) -> None:
        if not args.silent:
            print(text, file=sys.stderr, flush=True)

    machine = MachineMeter()
    machine.track([os.getpid()])
    echo_url = await start_echo(procs, tmp)
    head = await start_head(procs, tmp, args.profile)
    say(f"head {head.url} pid {head.pid}; echo {echo_url}")
    workers = await start_workers(procs, tmp, args.workers, head, args.compression)
    machine.track([proc.pid for _, proc in procs.procs])
    headers = {"Authorization": f"Bearer {head.api_token}"}
    timeout = aiohttp.ClientTimeout(total=30.0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        watcher = OpWatcher()
        await watcher.start(session, head)
        await head_counters(session, head)
        await asyncio.sleep(1.0)

        say(f"baseline: head with no agent, {args.baseline:g} s")
        meter = CpuMeter([head.pid])
        await asyncio.sleep(args.baseline)
        cpu0 = meter.percent()[0]
        rss0 = proc_rss_kb(head.pid)

        say(f"anchor: {args.ops} bare aiohttp echo round trips")
        echo = await echo_round_trips(session, echo_url, args.ops, args.warmup)
        say(f"REST floor: {args.ops} GET /health round trips")
        rest = await http_round_trips(session, head, args.ops, args.warmup)

        runs: list[OpRun] = []
        connect_seconds: dict[int, float] = {}
        idle: IdleResult | None = None
        current = 0
        rss_prev = rss0
        for n in counts:
            rss_prev = proc_rss_kb(head.pid)
            prev_n = current
            say(f"connecting agents: {current} -> {n}")
            connect_seconds[n] = await grow_agents(session, head, workers, current, n, args.connect_rate)
            current = n
            if n == counts[-1]:
                settle = min(HEARTBEAT_INTERVAL, args.idle)
                say(f"idle: {n} agents, settle {settle:g} s, measure {args.idle:g} s")
                await asyncio.sleep(settle)
                beats0 = await worker_heartbeats(workers)
                meter = CpuMeter([head.pid] + [w.proc.pid for w in workers])
                await asyncio.sleep(args.idle)
                pcts = meter.percent()
                beats = await worker_heartbeats(workers) - beats0
                idle = IdleResult(
                    agents=n,
                    window=args.idle,
                    rss0_kb=rss0,
                    cpu0_pct=cpu0,
                    rss_before_kb=rss_prev,
                    before_agents=prev_n,
                    rss_kb=proc_rss_kb(head.pid),
                    cpu_pct=pcts[0],
                    worker_cpu_pct=pcts[1:],
                    heartbeats=beats,
                )
            nodes = [node_id for w in workers for node_id in w.ids]
            say(f"ops: {args.warmup} warm-up + {args.ops} probes with {n} agents")
            echo_now = await echo_round_trips(session, echo_url, args.ops, args.warmup)
            rss_a = proc_rss_kb(head.pid)
            run = await op_round_trips(session, head, watcher, nodes, args.ops, args.warmup, rng)
            run.echo = echo_now
            run.rss_kb_per_op = (proc_rss_kb(head.pid) - rss_a) / (args.ops + args.warmup)
            runs.append(run)
            say(f"  p50 {runs[-1].latency.p50:.3f} ms, p99 {runs[-1].latency.p99:.3f} ms")

        stats = [await w.call({"cmd": "stats"}, 10.0) for w in workers]
        drops = sum(s["drops"] for s in stats)
        if drops:
            say(f"warning: {drops} agent connections dropped: {[s['errors'] for s in stats]}")
        if watcher.task is not None:
            watcher.task.cancel()
        others, steal = machine.others_percent()
    noise = (others, steal, machine.load_start)
    elapsed = time.monotonic() - started
    return report(args, echo, rest, runs, idle, connect_seconds, elapsed, noise, drops)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="control_plane.py",
        description="gswarm control-plane benchmark: op round trips, echo anchor, idle agent cost.",
    )
    p.add_argument(
        "--agents",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[1, 100, 1000],
        help="comma-separated agent counts, connected one after another [1,100,1000]",
    )
    p.add_argument(
        "--ops", type=int, default=None, help="measured ops per agent count [300; 100 with --quick]"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up ops before each measurement [20; 10 with --quick]"
    )
    p.add_argument("--idle", type=float, default=None, help="idle measurement window, s [30; 8 with --quick]")
    p.add_argument("--baseline", type=float, default=None, help="no-agent CPU window, s [5; 2 with --quick]")
    p.add_argument("--workers", type=int, default=2, help="agent worker processes [2]")
    p.add_argument("--connect-rate", type=float, default=250.0, help="new agent connections per second [250]")
    p.add_argument(
        "--compression",
        choices=["deflate", "none"],
        default="deflate",
        help="agents' permessage-deflate offer; deflate is what the real agent does [deflate]",
    )
    p.add_argument("--seed", type=int, default=1, help="seed for picking nodes [1]")
    p.add_argument("--quick", action="store_true", help="shorter run: fewer ops, shorter windows")
    p.add_argument(
        "--profile", action="store_true", help="run the head under cProfile and print its hot spots"
    )
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    quick = args.quick
    args.ops = args.ops if args.ops is not None else (100 if quick else 300)
    args.warmup = args.warmup if args.warmup is not None else (10 if quick else 20)
    args.idle = args.idle if args.idle is not None else (8.0 if quick else 30.0)
    args.baseline = args.baseline if args.baseline is not None else (2.0 if quick else 5.0)
    if not args.agents or min(args.agents) < 1 or max(args.agents) > 9999:
        p.error("--agents: counts between 1 and 9999")
    if args.ops < 1 or args.warmup < 0 or args.idle <= 0 or args.baseline <= 0 or args.workers < 1:
        p.error("--ops, --idle, --baseline and --workers must be positive")
    if args.connect_rate <= 0:
        p.error("--connect-rate must be positive")
    return args


async def _main_async(args: argparse.Namespace, procs: Processes) -> int:
    task = asyncio.current_task()
    if task is not None:  # SIGTERM: stop like Ctrl-C, through the same clean-up
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with tempfile.TemporaryDirectory(prefix="gswarm-bench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            text = await bench(args, tmp, procs)
        finally:
            await procs.stop_all()
        print(text)
        if args.profile:
            print_profile(tmp / "head.prof")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (and the internal worker roles)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_agents"]:
        url, compression = argv[1:3]
        token = os.environ[TOKEN_ENV]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(agents_main(url, token, None if compression == "none" else compression))
        return 0
    if argv[:1] == ["_echo"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(echo_main())
        return 0
    args = parse_args(argv)
    raise_nofile_limit(max(4096, 2 * max(args.agents) + 1024))
    procs = Processes()
    try:
        return asyncio.run(_main_async(args, procs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
