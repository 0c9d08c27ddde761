"""Process and op machinery of the benchmarks: child processes, a cluster (head, agents, servers)
started through the real command lines on 127.0.0.1, op submission and watching, the main-loop
wrapper, and the anchor servers. Measurement and the report table are in measure.py.

- `Proc`/`Processes`: children in their own sessions, stdout and stderr in log files, readiness
  by polling a log for a pattern, stopped by their own ids (what they started and left behind
  too), whatever happens: `Processes.stop_all`, and an atexit safety net.
- `Cluster`: `python -m gswarm head` on port 0 (URL from its log, tokens from its state dir),
  `python -m gswarm client` agents (join token in the environment, not on the command line)
  waited for until online, helper servers that print their URL (`tests/hubserver.py`, the
  anchor servers below), a `GswarmClient` and an `OpWatcher`; `async with` stops it all.
- `OpWatcher`: follows `/ws/events?topic=op`; when each op's end arrived (perf_counter, stamped
  before decoding) and, with `progress`, each op's distinct progress messages with the head's
  time. `run_op` submits through the client and waits for the end: the op and its seconds.
- `run_main`: asyncio.run with SIGTERM handled like Ctrl-C, through the same clean-up.

Roles (this file run as a script; each prints its URL on stdout, then serves until SIGTERM):
`harness.py files DIR`, the plain file server (aiohttp `FileResponse`, sendfile in 1 MiB
chunks: gswarm's data server without the grant check), anchor of node-to-node copies;
`harness.py echo`, a bare aiohttp websocket echo (`/ws`), anchor of the control plane.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout's gswarm, in this process as in the children
    sys.path.insert(0, str(ROOT))

from measure import BenchError, proc_cpu_seconds, proc_rss_kb  # noqa: E402

from gswarm.client import GswarmClient  # noqa: E402
from gswarm.ops import Op  # noqa: E402
from gswarm.protocol import Event, subscriber_message_decoder  # noqa: E402

HOST = "127.0.0.1"
HARNESS = str(Path(__file__).resolve())
HUBSERVER = ROOT / "tests" / "hubserver.py"
START_TIMEOUT = 60.0


def log(text: str) -> None:
    """A progress line on stderr (reports go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def code_root() -> Path:
    """The checkout whose gswarm the children run: this one, or `$GSWARM_BENCH_CODE`."""
    return Path(os.environ.get("GSWARM_BENCH_CODE") or ROOT)


def bench_env(tmp: Path) -> dict[str, str]:
    """The environment of every child: no GSWARM_* settings, tokens or proxies from outside;
    the checkout first on PYTHONPATH (or `$GSWARM_BENCH_CODE`, another checkout's root, so the
    same driver measures an older gswarm: before/after pairs); Hugging Face state under `tmp`, quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSWARM_")}
    for var in (
        "HF_TOKEN",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        env.pop(var, None)
    path = [str(code_root()), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return env | {
        "PYTHONPATH": os.pathsep.join(path),
        "NO_PROXY": HOST,
        "no_proxy": HOST,
        "HF_HOME": str(tmp / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "400",
    }


def gswarm_version() -> str:
    """The gswarm commit measured, and whether gswarm/ had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(code_root()), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "gswarm")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in gswarm/" if dirty else "")


# ---------------------------------------------------------------- processes

_LIVE: set[Proc] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort: SIGKILL every child still running."""
    for proc in list(_LIVE):
        proc.kill()


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of `root`."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            children.setdefault(st[0], []).append((int(entry), st[1]))
    out: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


class Proc:
    """A child process in its own session (a terminal's Ctrl-C reaches only the benchmark),
    stdout and stderr in log files unless `stdout` says otherwise. `term=False`: stopped by
    closing its stdin (a role that reads commands there), SIGKILL only after `grace`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logs: Path,
        env: dict[str, str],
        group: str = "",
        stdin: int = subprocess.DEVNULL,
        stdout: int | None = None,
        term: bool = True,
        grace: float = 10.0,
    ) -> None:
        self.name = name
        self.group = group or name
        self.term = term
        self.grace = grace
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=out if stdout is None else stdout,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def cpu(self) -> float:
        """CPU seconds used so far."""
        return proc_cpu_seconds(self.pid)

    def rss_kb(self) -> int:
        """Resident memory now, KiB."""
        return proc_rss_kb(self.pid)

    def tail(self, n: int = 20) -> str:
        """The last lines of its stderr, for error messages."""
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _look(self, regex: re.Pattern[str], stream: str) -> re.Match[str] | None:
        path = self.err_path if stream == "err" else self.out_path
        match = regex.search(path.read_text(errors="replace"))
        if match is None and not self.alive:
            raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
        return match

    async def wait_for(
        self, pattern: str, stream: str = "err", timeout: float = START_TIMEOUT
    ) -> re.Match[str]:
        """Poll its log (`err` or `out`) until `pattern` shows up; BenchError if it exits first
        or the time runs out."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = await asyncio.to_thread(self._look, regex, stream)
            if match:
                return match
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.name} did not start within {timeout:g} s:\n{self.tail()}")

    def wait_for_sync(
        self, pattern: str, stream: str = "err", timeout: float = START_TIMEOUT
    ) -> re.Match[str]:
        """`wait_for` for code without an event loop."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = self._look(regex, stream)
            if match:
                return match
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not start within {timeout:g} s:\n{self.tail()}")

    def stop(self) -> None:
        """Close its stdin, SIGTERM (if `term`), SIGKILL after the grace period; then SIGKILL
        what it started and left behind (an agent's workers). Only these processes, by id."""
        kids = descendants(self.pid) if self.alive else []
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.alive:
            if self.term:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {self.grace:g} s: killing it")
                self.kill()
                self.popen.wait(5.0)
        for pid, started in kids:
            st = _proc_stat(pid)
            if st is not None and st[1] == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL, if it still runs."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()


class Processes:
    """Every child of one benchmark (or one cluster), so that each one is stopped."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.env = env
        self.list: list[Proc] = []

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, **kw: Any) -> Proc:
        """Start a process (see Proc for the keywords) and remember it for stopping."""
        proc = Proc(name, argv, self.logs, env or self.env, **kw)
        self.list.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        """The ids of every process started."""
        return [p.pid for p in self.list]

    def cpu_by_group(self) -> dict[str, float]:
        """CPU seconds so far of the live processes, summed per group."""
        groups: dict[str, float] = {}
        for p in self.list:
            if p.alive:
                groups[p.group] = groups.get(p.group, 0.0) + p.cpu()
        return groups

    async def stop_all(self) -> None:
        """Agents first (all at once), then the head, then the rest."""
        for group in ("agents", "head", None):
            procs = [p for p in self.list if group is None or p.group == group]
            await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        self.list = []


# ---------------------------------------------------------------- ops


def check_op(op: Op, what: str) -> Op:
    """The op, if it succeeded; BenchError otherwise."""
    if op.state != "succeeded":
        raise BenchError(f"{what} {op.state}: {op.error.message if op.error is not None else op.state}")
    return op


def op_seconds(op: Op) -> float:
    """An op's time on the head's clock: started (accepted by the agent) -> finished."""
    start = op.started_at or op.created_at
    return (op.finished_at or start) - start


async def run_op(call: Awaitable[Op], what: str, timeout: float) -> tuple[Op, float]:
    """Submit an op through the client (a call with `wait=True`) and wait for its end: the
    succeeded op and the seconds the call took; BenchError if it failed or ran past `timeout`."""
    t0 = time.perf_counter()
    try:
        op = await asyncio.wait_for(call, timeout)
    except TimeoutError:
        raise BenchError(f"{what}: no end within {timeout:g} s") from None
    return check_op(op, what), time.perf_counter() - t0


async def wait_op(client: GswarmClient, op_id: str, what: str, timeout: float) -> Op:
    """Follow a submitted op until it ends; the op, checked."""
    try:
        return check_op(await client.wait_op(op_id, timeout=timeout), what)
    except TimeoutError:
        raise BenchError(f"{what}: no end within {timeout:g} s") from None


class OpWatcher:
    """Follows `/ws/events?topic=op`. For every op: when its `op.succeeded`/`op.failed` event
    arrived here (perf_counter, read before decoding); with `progress`, also each distinct
    "state: message" with the head's timestamp of its first appearance (progress is coalesced
    by the head to one event per op per 0.2 s). Without `progress`, other events are not even
    decoded: the watcher of a latency benchmark stays as light as a bare subscriber."""

    ENDS = ("op.succeeded", "op.failed")

    def __init__(self, head_url: str, api_token: str, progress: bool = True) -> None:
        self.url = head_url.replace("http://", "ws://", 1) + "/ws/events"
        self.token = api_token
        self.progress = progress
        self.seen: dict[str, list[tuple[float, str]]] = {}
        self._complete: set[str] = set()
        self._ended: dict[str, tuple[float, str]] = {}
        self._waiting: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe and wait for the head's 'live' notice."""
        self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"})
        ws = await self._session.ws_connect(self.url, params={"topic": "op", "token": self.token})
        first = await asyncio.wait_for(ws.receive(), START_TIMEOUT)
        if first.type != aiohttp.WSMsgType.TEXT or '"live"' not in first.data:
            raise BenchError(f"event socket: expected the live notice, got {first.data!r}")
        self.task = asyncio.create_task(self._read(ws))

    async def stop(self) -> None:
        """Stop following."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            now = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data: str = msg.data
            if not self.progress and '"op.succeeded"' not in data and '"op.failed"' not in data:
                continue  # op.created / op.running: skip the decode
            ev = subscriber_message_decoder.decode(data)
            if not isinstance(ev, Event):
                continue
            if self.progress:
                self._note(ev)
            if ev.kind in self.ENDS:
                fut = self._waiting.pop(ev.key, None)
                if fut is not None and not fut.done():
                    fut.set_result((now, ev.kind))
                else:
                    self._ended[ev.key] = (now, ev.kind)

    def _note(self, ev: Event) -> None:
        progress = ev.data.get("progress") or {}
        text = f"{ev.data.get('state', '?')}: {progress.get('message', '')}"
        seen = self.seen.setdefault(ev.key, [])
        if not seen or seen[-1][1] != text:
            seen.append((ev.ts, text))
        total = int(progress.get("total") or 0)
        if total and int(progress.get("done") or 0) >= total and ev.key not in self._complete:
            self._complete.add(ev.key)
            seen.append((ev.ts, "(every byte counted)"))

    async def ended(self, op_id: str, timeout: float) -> tuple[float, str]:
        """When (perf_counter) and how (`op.succeeded`/`op.failed`) the op ended;
        TimeoutError if not within `timeout`."""
        if op_id in self._ended:
            return self._ended.pop(op_id)
        if self.task is not None and self.task.done():
            raise BenchError("the event subscriber is gone")
        fut: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        self._waiting[op_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(op_id, None)

    def first(self, op_id: str, needle: str) -> float | None:
        """Head time of the first message of an op containing `needle`."""
        return next((ts for ts, text in self.seen.get(op_id, []) if needle in text), None)

    def phases(self, op_id: str, since: float) -> list[tuple[float, str]]:
        """An op's messages as (seconds after `since`, message)."""
        return [(ts - since, text) for ts, text in self.seen.get(op_id, [])]

    def fetch_parts(self, op: Op) -> tuple[float, float]:
        """(transfer seconds, verify seconds) of a fetch/download op, from its events
        (progress is coalesced to 200 ms, so each is +-0.2 s)."""
        start = op.started_at or op.created_at
        end = op.finished_at or start
        verify = self.first(op.op_id, "verifying")
        if verify is None:
            return end - start, 0.0
        return verify - start, end - verify


# ---------------------------------------------------------------- the cluster


@dataclass
class Head:
    """The head under test."""

    proc: Proc
    url: str
    api_token: str
    join_token: str


class Cluster:
    """A head, its agents and helper servers on 127.0.0.1, each started through its command
    line, everything written below `root`; `async with` stops them all at the end."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str] | None = None,
        client_timeout: float = 120.0,
        stop_grace: float = 10.0,
    ) -> None:
        self.root = root
        self.stop_grace = stop_grace
        self.env = env if env is not None else bench_env(root)
        self.procs = Processes(root / "logs", self.env)
        self.client_timeout = client_timeout
        self.head: Head | None = None
        self._client: GswarmClient | None = None
        self.watcher: OpWatcher | None = None

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> GswarmClient:
        """The API client of the head (after start_head)."""
        assert self._client is not None, "start the head first"
        return self._client

    async def start_head(self, env: dict[str, str] | None = None, python_args: Sequence[str] = ()) -> Head:
        """`python [python_args] -m gswarm head` on port 0 with a fresh state dir; its URL from
        the 'listening on' line of its log, its tokens from the state dir."""
        state = self.root / "head-state"
        argv = [sys.executable, *python_args, "-m", "gswarm", "head", "--host", HOST, "--port", "0"]
        env = {**self.env, **(env or {})}
        proc = self.procs.spawn("head", [*argv, "--state-dir", str(state)], env=env, grace=self.stop_grace)
        url = (await proc.wait_for(r"listening on (http://[0-9.]+:\d+)")).group(1)
        tokens = json.loads((state / "tokens.json").read_text())
        self.head = Head(proc, url, tokens["api_token"], tokens["join_token"])
        self._client = GswarmClient(url, self.head.api_token, timeout=self.client_timeout)
        return self.head

    async def start_agents(
        self,
        nodes: Iterable[str],
        disk_root: Path,
        dram_root: Path,
        *args: str,
        env: dict[str, str] | None = None,
        data_url: bool = False,
    ) -> dict[str, tuple[Path, Path]]:
        """`python -m gswarm client` for each node (tiers `disk_root/NODE-disk` and
        `dram_root/NODE-dram`, extra CLI `args`), then wait until every one is online (and
        announces its data server, with `data_url`); (disk dir, dram dir) of each node."""
        assert self.head is not None, "start the head first"
        dirs = {}
        for node in nodes:
            disk, dram = disk_root / f"{node}-disk", dram_root / f"{node}-dram"
            argv = [sys.executable, "-m", "gswarm", "client", self.head.url, "--node-id", node]
            self.procs.spawn(
                node,
                [*argv, "--disk-dir", str(disk), "--dram-dir", str(dram), *args],
                env={**self.env, **(env or {}), "GSWARM_TOKEN": self.head.join_token},
                group="agents",
                grace=self.stop_grace,
            )
            dirs[node] = (disk, dram)
        await self.wait_online(dirs, data_url)
        return dirs

    async def wait_online(
        self, nodes: Iterable[str], data_url: bool = False, timeout: float = START_TIMEOUT
    ) -> None:
        """Poll the head until every node is online; BenchError if a process exits first."""
        want = set(nodes)
        deadline = time.monotonic() + timeout
        while True:
            listed = await self.client.list_nodes()
            if want <= {n.node_id for n in listed if n.status == "online" and (n.data_url or not data_url)}:
                return
            dead = [p for p in self.procs.list if not p.alive]
            if dead:
                raise BenchError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"agents {sorted(want)} not online within {timeout:g} s")
            await asyncio.sleep(0.1)

    async def watch(self, progress: bool = True) -> OpWatcher:
        """Start following the op events (see OpWatcher)."""
        assert self.head is not None, "start the head first"
        self.watcher = OpWatcher(self.head.url, self.head.api_token, progress)
        await self.watcher.start()
        return self.watcher

    async def start_server(self, name: str, argv: Sequence[str], timeout: float = 600.0) -> str:
        """Start a server that prints its URL as a line of its stdout; the URL."""
        proc = self.procs.spawn(name, argv)
        return (await proc.wait_for(r"^(http://\S+)\s*$", stream="out", timeout=timeout)).group(1)

    async def start_hub(self, repo_dir: Path, repo_id: str, rate_limit: int | None = None) -> str:
        """The test Hub server (`tests/hubserver.py`) serving `repo_dir` as `repo_id`; its URL
        once every file is hashed."""
        argv = [sys.executable, str(HUBSERVER), "--dir", str(repo_dir), "--repo", repo_id, "--host", HOST]
        if rate_limit:
            argv += ["--rate-limit", str(rate_limit)]
        return await self.start_server("hub", argv)

    async def start_anchor(self, role: str, *args: str) -> str:
        """One of this file's anchor servers (`files DIR`, `echo`); its URL."""
        return await self.start_server(role, [sys.executable, HARNESS, role, *args], timeout=START_TIMEOUT)

    async def close(self) -> None:
        """Stop the watcher, the client and every process started."""
        if self.watcher is not None:
            await self.watcher.stop()
            self.watcher = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        await self.procs.stop_all()


def run_main(main: Callable[[], Awaitable[int]], error_rc: int = 2) -> int:
    """Run `main` in a fresh event loop: its exit status; 130 on Ctrl-C, 143 on SIGTERM (both
    cancel it, so its clean-up runs), `error_rc` on BenchError."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background

    async def wrapper() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    try:
        return asyncio.run(wrapper())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated", file=sys.stderr)
        return 143
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return error_rc
    finally:
        _kill_leftovers()


# ---------------------------------------------------------------- roles: anchor servers


async def _serve(app: web.Application) -> None:
    """Serve `app` on 127.0.0.1, any port; print the URL; run until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    print(f"http://{HOST}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def files_app(root: Path) -> web.Application:
    """Every GET of a path below `root` (absolute) answered with a `FileResponse` (sendfile)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        path = (root / request.match_info["path"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, chunk_size=1 << 20)

    app = web.Application()
    app.router.add_get("/{path:.+}", handle)
    return app


def echo_app() -> web.Application:
    """A websocket at `/ws` that sends every text message back."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


def main(argv: Sequence[str]) -> int:
    """The roles: `files DIR` or `echo`."""
    if len(argv) == 2 and argv[0] == "files":
        asyncio.run(_serve(files_app(Path(argv[1]).resolve())))
    elif list(argv) == ["echo"]:
        asyncio.run(_serve(echo_app()))
    else:
        print("usage: harness.py files DIR | harness.py echo", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
