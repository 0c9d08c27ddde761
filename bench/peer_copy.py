"""Peer benchmark: node-to-node copies against curl from a plain file server, and replication
to many agents against separate Hub downloads, all on loopback.

    python bench/peer_copy.py [--copy-gib 2] [--repl-gib 1] [--agents 8] [--cap 100M] [--runs 3]
                              [--repl-runs N] [--warmup 1] [--quick] [--skip-copy] [--skip-repl]

What it measures, all in one run on this machine:

(a) copy between two agents: a model of several files (random bytes, written in blocks) is
    seeded onto node n1's disk tier by a gswarm download from `file://` (not timed); then,
    round by round: `POST /copy?wait=true` n1:disk -> n2:disk (end to end: the REST call to the
    op's end, i.e. manifest, transfer over n1's data server, sha256 verification, publish;
    the n2 copy is deleted between runs, not timed), and the anchor: `curl` fetching the same
    files (n1's published copy) from a plain file server on loopback into a fresh directory on
    the same disk, once sequentially (one curl process, one connection at a time) and once
    with `--parallel --parallel-max 8` (gswarm runs up to 8 range streams, one per core). The
    plain file server is a minimal aiohttp app in its own process (this file, role `_serve`)
    answering every GET with `web.FileResponse` (sendfile, 1 MiB chunks), the same machinery
    as gswarm's data server without the grant check; nginx is not assumed to be installed.
    `sync` (not timed) runs before every timed run; the source stays in the page cache. The
    order of the three rotates from round to round (see bench/README.md for why it matters).
(b) replication: N agents, each with its own disk tier and `--data-bandwidth CAP`, and the test
    Hub server (`tests/hubserver.py --rate-limit CAP`) serving a generated repo, so every uplink
    (the Hub's and each data server's) has the same cap and the Hub link is the bottleneck.
    A = the time to get the model onto all N nodes the gswarm way, from nowhere: a
    `POST /download?wait=true` from the Hub onto n1, then `POST /replicate?wait=true` with
    targets n1..nN:disk and `max_fanout` F (n1 is already there; the coordinator feeds
    n2..nN node to node; `/replicate` needs a ready copy to start from, so the Hub download
    cannot overlap it). Both calls are timed, together and apart, for F = 1 and F = 2.
    B = N separate downloads from the Hub at once (`prefer_peer: false`, fresh model names,
    so no peer is used), until the last finishes. The ratio A/B is reported per F, with the
    replicate op's per-target results (which source fed which target, when it started,
    transfer and verify seconds) and two bandwidth-only references (only the caps limit, CPU,
    disks and hashing are free): hop by hop (a target serves only once complete) and
    pipelined (a target serves what it has while it receives, as gswarm does since commit
    9007045; a tree of fanout F then runs at CAP / F).
(c) CPU: utime + stime of every process (head, agents, Hub or file server, curl) around each
    timed run, as a share of all the machine's cores, to tell a CPU limit from a wire limit.

Sizes: `--cap` accepts 100M (10^6), 100MiB (2^20), 1G... and is passed to both servers as a
plain byte count (gswarm reads `100M` as MiB, the Hub server as 10^6 bytes). Processes: the
head (`python -m gswarm head`), the agents (`python -m gswarm client`), the Hub server and
the file server are started through their command lines on 127.0.0.1; everything written
lives in one temporary directory that is removed at the end, and every process started is
stopped (by its own id), also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from gswarm.client import GswarmClient
from gswarm.config import Tokens
from gswarm.protocol import Event, Op

HOST = "127.0.0.1"
REPO_ID = "bench/peer-model"
ROOT = Path(__file__).resolve().parent.parent
HUBSERVER = ROOT / "tests" / "hubserver.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
GIB = 1 << 30
GB = 1e9
BLOCK = 16 << 20
COPY_SHARDS = 8
REPL_SHARDS = 4
CURL_PARALLEL = 8
START_TIMEOUT = 60.0

TARGET_COPY_RATIO = 0.9
TARGET_REPL_RATIO = 0.4

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


class BenchError(RuntimeError):
    """The benchmark cannot go on (a process died, an op failed, no space, ...)."""


def parse_rate(text: str) -> int:
    """`100M` -> 10^8, `100MiB` -> 100 * 2^20, `1.5G` -> 1.5 * 10^9, `5000` -> 5000."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 100M or 64MiB)")
    base = 1024 if m.group(3) else 1000
    value = int(float(m.group(1)) * base ** _POWERS[m.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be positive: {text!r}")
    return value


def log(text: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model files


def write_model(directory: Path, total: int, shards: int) -> list[tuple[str, int]]:
    """A model of `total` bytes: a small config.json and `shards` files of random bytes,
    written in blocks; returns (name, size) of every file."""
    directory.mkdir(parents=True)
    config = b'{"architectures": ["PeerBench"], "model_type": "bench"}\n'
    (directory / "config.json").write_bytes(config)
    files = [("config.json", len(config))]
    rest = total - len(config)
    per = rest // shards
    for i in range(shards):
        size = per if i < shards - 1 else rest - per * (shards - 1)
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with open(directory / name, "wb") as fh:
            left = size
            while left:
                n = min(BLOCK, left)
                fh.write(os.urandom(n))
                left -= n
        files.append((name, size))
    return files


def tree_bytes(path: Path) -> int:
    """Bytes of the visible regular files below `path` (names starting with '.' skipped)."""
    total = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(os.lstat(os.path.join(root, n)).st_size for n in names if not n.startswith("."))
    return total


def read_all(path: Path) -> None:
    """Read every file below `path` once, so it sits in the page cache."""
    buf = bytearray(BLOCK)
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


# ---------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc:
    """A child process in its own session, stdout and stderr going to log files."""

    def __init__(self, name: str, group: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.group = group
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def cpu(self) -> float:
        """CPU seconds used so far."""
        return cpu_seconds(self.popen.pid)

    def tail(self, n: int = 15) -> str:
        """The last lines of its stderr, for error messages."""
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def wait_for(self, path: Path, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until `pattern` appears in one of its logs; BenchError if it exits or times out."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(await asyncio.to_thread(path.read_text, errors="replace"))
            if match:
                return match
            if not self.alive:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.name} did not start within {timeout:g} s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s; this process only, by its id."""
        if not self.alive:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(5.0)


def children_cpu() -> float:
    """CPU seconds of this process's ended and reaped children (the curl runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_tool(argv: Sequence[str], timeout: float) -> float:
    """Run a command to its end; its wall seconds. BenchError on failure or timeout."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} exited with {proc.returncode}: {err.decode(errors='replace')[-1500:]}")
    return seconds


# ---------------------------------------------------------------- role: plain file server


async def serve_static(root: Path) -> None:
    """The anchor's file server: every GET of a path below `root` (absolute) answered with a
    `FileResponse` (sendfile); prints its URL on stdout, runs until SIGTERM or SIGINT."""
    base = root

    async def handle(request: web.Request) -> web.StreamResponse:
        path = (base / request.match_info["path"]).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, chunk_size=1 << 20)

    app = web.Application()
    app.router.add_get("/{path:.+}", handle)
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


# ---------------------------------------------------------------- measurements


@dataclass
class Sample:
    """One timed run."""

    seconds: float
    nbytes: int
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process group during the run."""
    parts: dict[str, float] = field(default_factory=dict)
    """Named parts of the time (seconds)."""
    op: Op | None = None
    lines: list[str] = field(default_factory=list)
    """Details worth printing (per-target results, ...)."""

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.nbytes / self.seconds / GB

    @property
    def cpu_share(self) -> float:
        """Every watched process's CPU as a share of all cores over the run (0..1)."""
        return sum(self.cpu.values()) / (self.seconds * NCPU)


@dataclass
class Series:
    """Every timed run of one contender."""

    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        """Median seconds."""
        return statistics.median(s.seconds for s in self.samples)

    @property
    def median_gbps(self) -> float:
        """Throughput at the median time."""
        return self.samples[0].nbytes / self.median_s / GB

    def median_sample(self) -> Sample:
        """The run closest to the median."""
        return min(self.samples, key=lambda s: abs(s.seconds - self.median_s))

    def median_part(self, name: str) -> float:
        """Median of one named part."""
        return statistics.median(s.parts.get(name, 0.0) for s in self.samples)

    def line(self) -> str:
        """Median, throughput, every run, CPU."""
        runs = ", ".join(f"{s.seconds:.2f}" for s in self.samples)
        groups: dict[str, float] = {}
        for s in self.samples:
            for k, v in s.cpu.items():
                groups[k] = groups.get(k, 0.0) + v
        wall = sum(s.seconds for s in self.samples)
        cpu = ", ".join(f"{k} {100 * v / wall:.0f}%" for k, v in sorted(groups.items()) if v / wall >= 0.005)
        busy = 100 * sum(groups.values()) / (wall * NCPU)
        return (
            f"  {self.name:<40} median {self.median_s:7.2f} s {self.median_gbps:6.2f} GB/s  "
            f"(runs {runs}; CPU {busy:.0f}% of {NCPU} cores: {cpu} [% of one core])"
        )


class OpWatcher:
    """Follows op events (as the CLI does): per op, each distinct (state, message) with the
    head's time of its first appearance."""

    def __init__(self, client: GswarmClient) -> None:
        self.client = client
        self.seen: dict[str, list[tuple[float, str]]] = {}
        self.live = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Follow in a background task."""
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        async for msg in self.client.events(topics=["op"]):
            if not isinstance(msg, Event):
                self.live.set()
                continue
            progress = msg.data.get("progress") or {}
            text = f"{msg.data.get('state', '?')}: {progress.get('message', '')}"
            seen = self.seen.setdefault(msg.key, [])
            if not seen or seen[-1][1] != text:
                seen.append((msg.ts, text))

    def first(self, op_id: str, needle: str) -> float | None:
        """Head time of the first message of an op containing `needle`."""
        return next((ts for ts, text in self.seen.get(op_id, []) if needle in text), None)


def hop_by_hop_time(n: int, fanout: int) -> float:
    """Bandwidth-only time of A, in units of (model size / cap), when copies spread hop by hop:
    one Hub download onto the first node (1 unit), then each holder's uplink shared equally by
    at most `fanout` transfers at once, each pending target given to the least-loaded holder,
    each target a holder once complete. Receivers, CPU, disks and hashing cost nothing."""
    t = 1.0
    load = [0]
    active: list[list[float]] = []  # [source index, bytes left (units)]
    pending = n - 1
    while pending or active:
        while pending:
            free = [i for i, busy in enumerate(load) if busy < fanout]
            if not free:
                break
            src = min(free, key=lambda i: load[i])
            load[src] += 1
            active.append([float(src), 1.0])
            pending -= 1
        rates = [1.0 / load[int(a[0])] for a in active]
        dt = min(a[1] / r for a, r in zip(active, rates, strict=True))
        t += dt
        for a, r in zip(active, rates, strict=True):
            a[1] -= r * dt
        for a in [a for a in active if a[1] <= 1e-9]:
            active.remove(a)
            load[int(a[0])] -= 1
            load.append(0)
    return t


def pipelined_time(n: int, fanout: int) -> float:
    """Bandwidth-only time of A, in units of (model size / cap), when every target serves
    what it has while it receives: the Hub download (1 unit), then a tree in which each uplink
    is shared by `fanout` children, so every node receives at cap / fanout (chain latency
    ignored). With one target only, the tree is one transfer at the full cap."""
    return 1.0 + (min(fanout, n - 1) if n > 1 else 0.0)


def gswarm_version() -> str:
    """The gswarm commit measured, and whether gswarm/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gswarm"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in gswarm/" if dirty else "")


# ---------------------------------------------------------------- the cluster


class Bench:
    """Processes, clients and the temporary directory of one benchmark run."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: list[Proc] = []
        self.client: GswarmClient | None = None
        self.overlap: Series | None = None
        self.watcher: OpWatcher | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GSWARM_")}
        for var in ("HF_TOKEN", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            self.env.pop(var, None)
        self.env |= {
            "NO_PROXY": HOST,
            "no_proxy": HOST,
            "HF_HOME": str(tmp / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "400",
        }

    def spawn(self, name: str, group: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start a process and remember it for stopping."""
        proc = Proc(name, group, argv, env or self.env, self.logs)
        self.procs.append(proc)
        return proc

    async def start_cluster(self, tag: str, agents: int, hub_url: str, cap: int | None) -> None:
        """A head and `agents` agents n1..nN (disk tiers under tmp/tag), all online."""
        state = self.tmp / tag / "head"
        head = self.spawn(
            f"{tag}-head",
            "head",
            [
                sys.executable,
                "-m",
                "gswarm",
                "head",
                "--host",
                HOST,
                "--port",
                "0",
                "--state-dir",
                str(state),
            ],
        )
        url = (await head.wait_for(head.err_path, r"listening on (http://\S+)")).group(1)
        tokens = msgspec.json.decode((state / "tokens.json").read_bytes(), type=Tokens)
        env = {**self.env, "HF_ENDPOINT": hub_url}
        for i in range(1, agents + 1):
            argv = [
                sys.executable,
                "-m",
                "gswarm",
                "client",
                url,
                "--node-id",
                f"n{i}",
                "--token",
                tokens.join_token,
                "--disk-dir",
                str(self.tmp / tag / f"n{i}-disk"),
                "--dram-dir",
                str(self.tmp / tag / f"n{i}-dram"),
            ]
            if cap:
                argv += ["--data-bandwidth", str(cap)]
            self.spawn(f"{tag}-n{i}", "agents", argv, env)
        self.client = GswarmClient(url, tokens.api_token, timeout=120.0)
        want = {f"n{i}" for i in range(1, agents + 1)}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            nodes = await self.client.list_nodes()
            if want <= {n.node_id for n in nodes if n.status == "online" and n.data_url}:
                break
            dead = [p for p in self.procs if not p.alive]
            if dead:
                raise BenchError(f"{dead[0].name} exited:\n{dead[0].tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"agents not online within {START_TIMEOUT:g} s")
            await asyncio.sleep(0.1)
        self.watcher = OpWatcher(self.client)
        self.watcher.start()
        await asyncio.wait_for(self.watcher.live.wait(), START_TIMEOUT)

    async def start_server(self, name: str, argv: list[str]) -> str:
        """Start a server that prints its URL as its first stdout line; the URL."""
        proc = self.spawn(name, name.partition("-")[2] or name, argv)
        return (await proc.wait_for(proc.out_path, r"^(http://\S+)\s*$", timeout=600.0)).group(1)

    async def stop_all(self) -> None:
        """Stop the watcher, the client and every process started (agents first, in parallel)."""
        if self.watcher is not None:
            await self.watcher.stop()
            self.watcher = None
        if self.client is not None:
            await self.client.close()
            self.client = None
        for group in ("agents", "head", None):
            procs = [p for p in self.procs if group is None or p.group == group]
            await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
        self.procs = []

    # ------------------------------------------------------------ timing helpers

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per process group (plus `curl`: reaped children)."""
        groups: dict[str, float] = {"curl": children_cpu()}
        for p in self.procs:
            if p.alive:
                groups[p.group] = groups.get(p.group, 0.0) + p.cpu()
        return groups

    async def timed(self, nbytes: int, fn: Callable[[Sample], Awaitable[None]]) -> Sample:
        """`sync` (untimed), then one timed call of `fn` (which may fill in the sample), with
        every process's CPU recorded around it."""
        await asyncio.to_thread(os.sync)
        sample = Sample(0.0, nbytes)
        before = self.cpu()
        t0 = time.perf_counter()
        await fn(sample)
        sample.seconds = time.perf_counter() - t0
        after = self.cpu()
        sample.cpu = {k: max(0.0, after[k] - before.get(k, 0.0)) for k in after}
        return sample

    @staticmethod
    def check(op: Op, what: str) -> Op:
        """The op, if it succeeded; BenchError otherwise."""
        if op.state != "succeeded":
            raise BenchError(f"{what} failed: {op.error.message if op.error else op.state}")
        return op

    def op_timeout(self, nbytes: int, rate: float) -> float:
        """A generous bound for an op moving `nbytes` at `rate` bytes/s."""
        return 120.0 + 4.0 * nbytes / rate

    def fetch_parts(self, op: Op) -> tuple[float, float]:
        """(transfer seconds, verify seconds) of a fetch/download op, from its events
        (progress is coalesced to 200 ms, so each is +-0.2 s)."""
        assert self.watcher is not None
        start = op.started_at or op.created_at
        end = op.finished_at or start
        verify = self.watcher.first(op.op_id, "verifying")
        if verify is None:
            return end - start, 0.0
        return verify - start, end - verify

    # ------------------------------------------------------------ (a) copy between two agents

    async def copy_bench(self) -> tuple[Series, Series, Series, int]:
        """gswarm n1:disk -> n2:disk against curl (sequential and parallel) from a file server."""
        args = self.args
        nbytes = int(args.copy_gib * GIB)
        src = self.tmp / "copy-src"
        t0 = time.perf_counter()
        files = await asyncio.to_thread(write_model, src, nbytes, COPY_SHARDS)
        log(f"(a) {nbytes / GIB:.2f} GiB in {len(files)} files written in {time.perf_counter() - t0:.1f} s")
        await self.start_cluster("a", 2, f"http://{HOST}:9", None)
        assert self.client is not None
        client = self.client
        model = "peer-copy"
        seed = self.check(
            await client.download(model, f"file://{src}", "n1:disk", wait=True), "seeding n1:disk"
        )
        held = Path(str((seed.result or {})["path"]))
        await asyncio.to_thread(shutil.rmtree, src)
        await asyncio.to_thread(read_all, held)
        url = await self.start_server("a-static", [sys.executable, __file__, "_serve", str(held)])
        log(f"(a) seeded n1:disk; file server {url} serves the same files")
        timeout = self.op_timeout(nbytes, 50e6)
        gs = Series("gswarm copy n1:disk -> n2:disk")
        seq = Series("curl, sequential")
        par = Series(f"curl --parallel (max {CURL_PARALLEL})")
        for i in range(args.warmup + args.runs):

            async def gswarm_copy(sample: Sample) -> None:
                op = await asyncio.wait_for(client.copy(model, "n1:disk", "n2:disk", wait=True), timeout)
                sample.op = self.check(op, "gswarm copy")

            async def run_gswarm() -> None:
                sample = await self.timed(nbytes, gswarm_copy)
                assert sample.op is not None
                size = int((sample.op.result or {}).get("size", -1))
                if size != nbytes:
                    raise BenchError(f"the copy reports {size} bytes, expected {nbytes}")
                await asyncio.sleep(0.3)  # the last progress events
                transfer, verify = self.fetch_parts(sample.op)
                sample.parts = {"transfer": transfer, "verify": verify}
                gs.samples.append(sample)
                self.check(await client.delete_location(model, "n2:disk", wait=True), "deleting n2:disk")

            async def run_curl(series: Series, parallel: bool, round_no: int = i) -> None:
                dest = self.tmp / f"curl-{round_no}"
                dest.mkdir()
                argv = ["curl", "-s", "-f", "--noproxy", "*"]
                if parallel:
                    argv += ["--parallel", "--parallel-max", str(CURL_PARALLEL)]
                for name, _ in files:
                    argv += ["-o", str(dest / name), f"{url}/{name}"]

                async def curl(sample: Sample) -> None:
                    await run_tool(argv, timeout)

                series.samples.append(await self.timed(nbytes, curl))
                got = await asyncio.to_thread(tree_bytes, dest)
                if got != nbytes:
                    raise BenchError(f"{series.name} wrote {got} bytes, expected {nbytes}")
                await asyncio.to_thread(shutil.rmtree, dest)

            # Each round rotates who goes first: what ran just before (and freed its 2 GiB of
            # page cache) changes what the next writer pays for fresh memory on this VM.
            contenders = [run_gswarm, lambda: run_curl(seq, False), lambda: run_curl(par, True)]
            for run in contenders[i % 3 :] + contenders[: i % 3]:
                await run()
            transfer, verify = gs.samples[-1].parts["transfer"], gs.samples[-1].parts["verify"]
            label = f"warm-up {i + 1}" if i < args.warmup else f"run {i + 1 - args.warmup}"
            log(
                f"(a) {label}: gswarm {gs.samples[-1].gbps:.2f} GB/s (transfer {transfer:.2f} s, "
                f"verify {verify:.2f} s), curl {seq.samples[-1].gbps:.2f}, "
                f"curl --parallel {par.samples[-1].gbps:.2f} GB/s"
            )
        await self.stop_all()
        for s in (gs, seq, par):
            s.samples = s.samples[args.warmup :]
        return gs, seq, par, nbytes

    # ------------------------------------------------------------ (b) replication

    async def repl_bench(self) -> tuple[list[tuple[int, Series]], Series, int]:
        """Download to n1 + replicate to n1..nN (per fanout) against N Hub downloads at once."""
        args = self.args
        nbytes = int(args.repl_gib * GIB)
        n = args.agents
        src = self.tmp / "repl-src"
        t0 = time.perf_counter()
        await asyncio.to_thread(write_model, src, nbytes, REPL_SHARDS)
        log(f"(b) {nbytes / GIB:.2f} GiB written in {time.perf_counter() - t0:.1f} s; starting the Hub")
        hub_url = await self.start_server(
            "b-hub",
            [
                sys.executable,
                str(HUBSERVER),
                "--dir",
                str(src),
                "--repo",
                REPO_ID,
                "--host",
                HOST,
                "--rate-limit",
                str(args.cap),
            ],
        )
        await asyncio.to_thread(read_all, src)
        await self.start_cluster("b", n, hub_url, args.cap)
        assert self.client is not None
        client = self.client
        log(f"(b) Hub {hub_url} and {n} agents up, every uplink capped at {args.cap / 1e6:g} MB/s")
        timeout = self.op_timeout(n * nbytes, args.cap)
        fanouts = (1, 2)
        tree = {f: Series(f"A: download n1 + replicate, fanout {f}") for f in fanouts}
        hub = Series(f"B: {n} Hub downloads at once")
        overlap = Series("A': download n1 and replicate at once (fanout 1)")
        targets = [f"n{i}:disk" for i in range(1, n + 1)]
        for r in range(args.repl_runs):
            oname = f"repl-overlap-{r}"

            async def at_once(sample: Sample, name: str = oname) -> None:
                # The workflow a user runs: one Hub download, spread while it still arrives.
                dl = await client.download(name, f"hf://{REPO_ID}", "n1:disk")
                op = await asyncio.wait_for(client.replicate(name, targets, max_fanout=1, wait=True), timeout)
                sample.op = self.check(op, "replicate")
                self.check(await asyncio.wait_for(client.wait_op(dl.op_id), timeout), "download onto n1")

            osample = await self.timed(n * nbytes, at_once)
            await asyncio.sleep(0.3)
            osample.lines = await self.replicate_lines(osample)
            overlap.samples.append(osample)
            await client.delete_model(oname)
            log(f"(b) run {r + 1}, download and replicate at once: {osample.seconds:.2f} s")
            for f in fanouts:
                name = f"repl-f{f}-{r}"

                async def spread(sample: Sample, name: str = name, f: int = f) -> None:
                    t = time.perf_counter()
                    dl = await asyncio.wait_for(
                        client.download(name, f"hf://{REPO_ID}", "n1:disk", wait=True), timeout
                    )
                    self.check(dl, "download onto n1")
                    sample.parts["download"] = time.perf_counter() - t
                    t = time.perf_counter()
                    op = await asyncio.wait_for(
                        client.replicate(name, targets, max_fanout=f, wait=True), timeout
                    )
                    sample.parts["replicate"] = time.perf_counter() - t
                    sample.op = self.check(op, "replicate")

                sample = await self.timed(n * nbytes, spread)
                await asyncio.sleep(0.3)
                sample.lines = await self.replicate_lines(sample)
                tree[f].samples.append(sample)
                await client.delete_model(name)
                log(
                    f"(b) run {r + 1}, fanout {f}: {sample.seconds:.2f} s (download "
                    f"{sample.parts['download']:.2f} s + replicate {sample.parts['replicate']:.2f} s), "
                    f"CPU {100 * sample.cpu_share:.0f}% of {NCPU} cores"
                )
            names = [f"hub-{r}-{i}" for i in range(1, n + 1)]

            async def separate(sample: Sample, names: list[str] = names) -> None:
                t = time.time()
                ops = await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            client.download(m, f"hf://{REPO_ID}", d, prefer_peer=False, wait=True)
                            for m, d in zip(names, targets, strict=True)
                        )
                    ),
                    timeout,
                )
                ends = []
                for op in ops:
                    self.check(op, f"download onto {op.node_id}")
                    if (op.result or {}).get("from_peer"):
                        raise BenchError(f"{op.node_id} fetched from a peer despite prefer_peer=false")
                    ends.append((op.finished_at or t) - t)
                sample.parts = {"first done": min(ends), "last done": max(ends)}

            sample = await self.timed(n * nbytes, separate)
            hub.samples.append(sample)
            for m in names:
                await client.delete_model(m)
            log(
                f"(b) run {r + 1}, {n} Hub downloads: {sample.seconds:.2f} s (first done at "
                f"{sample.parts['first done']:.2f} s), CPU {100 * sample.cpu_share:.0f}% of {NCPU} cores"
            )
        await self.stop_all()
        self.overlap = overlap
        return [(f, tree[f]) for f in fanouts], hub, nbytes

    async def replicate_lines(self, sample: Sample) -> list[str]:
        """Per target of a replicate op: source, start (after the op was created), seconds,
        transfer and verify parts."""
        assert self.client is not None and sample.op is not None
        op = sample.op
        results: dict[str, dict[str, Any]] = (op.result or {}).get("targets", {})
        rows = []
        for target, res in results.items():
            if res.get("already_present"):
                rows.append((0.0, f"    {target:<10} already there (the Hub download)"))
                continue
            child = await self.client.get_op(str(res["op_id"]))
            start = (child.started_at or child.created_at) - op.created_at
            transfer, verify = self.fetch_parts(child)
            rows.append(
                (
                    start,
                    f"    {target:<10} from {res.get('from', '?'):<10} start {start:6.2f} s  "
                    f"took {float(res.get('seconds', 0.0)):6.2f} s  (transfer {transfer:6.2f}, "
                    f"verify {verify:5.2f})",
                )
            )
        return [text for _, text in sorted(rows)]


# ---------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown CPU"


def report(
    args: argparse.Namespace,
    version: str,
    copy: tuple[Series, Series, Series, int] | None,
    repl: tuple[list[tuple[int, Series]], Series, int] | None,
    overlap: Series | None = None,
) -> bool:
    """Print the results and a markdown table of verdicts; True when every target is met."""
    print()
    print(
        f"machine: {cpu_model()}, {NCPU} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; gswarm {version}"
    )
    now = gswarm_version()
    if now != version:
        print(f"warning: gswarm changed during the run (now {now}); processes started later may differ")
    print(f"command: python bench/peer_copy.py {' '.join(sys.argv[1:])}".rstrip())
    print("CPU: utime+stime of the processes over the timed runs; per group in % of one core")
    rows: list[tuple[str, str, str, str]] = []
    ok = True
    if copy is not None:
        gs, seq, par, nbytes = copy
        print(
            f"\n(a) copy between two agents on loopback, {nbytes / GIB:.2f} GiB in {COPY_SHARDS + 1} files, "
            f"medians of {args.runs} after {args.warmup} warm-up"
        )
        for s in (gs, seq, par):
            print(s.line())
        tr, ve = gs.median_part("transfer"), gs.median_part("verify")
        print(
            f"  gswarm parts (median): transfer {tr:.2f} s ({nbytes / tr / GB:.2f} GB/s), "
            f"sha256 verify {ve:.2f} s, the rest {max(0.0, gs.median_s - tr - ve):.2f} s"
        )
        anchor = min(seq, par, key=lambda s: s.median_s)
        ratio = anchor.median_s / gs.median_s
        ok &= ratio >= TARGET_COPY_RATIO
        rows.append(
            (
                f"(a) copy {nbytes / GIB:g} GiB n1 -> n2 vs {anchor.name} (the faster curl)",
                f"{gs.median_s:.2f} s vs {anchor.median_s:.2f} s = {ratio:.2f}x",
                f">= {TARGET_COPY_RATIO}x",
                verdict(ratio >= TARGET_COPY_RATIO),
            )
        )
        other = par if anchor is seq else seq
        rows.append((f"(a) vs {other.name}", f"{other.median_s / gs.median_s:.2f}x", "", ""))
    if repl is not None:
        trees, hub, nbytes = repl
        unit = nbytes / args.cap
        print(
            f"\n(b) replication to {args.agents} agents, {nbytes / GIB:.2f} GiB in {REPL_SHARDS + 1} files, "
            f"every uplink capped at {args.cap / 1e6:g} MB/s (one model over one link: {unit:.1f} s), "
            f"medians of {args.repl_runs}; GB/s = bytes landed on all nodes / time"
        )
        for _, s in trees:
            print(s.line())
            print(
                f"    parts (median): download {s.median_part('download'):.2f} s + replicate "
                f"{s.median_part('replicate'):.2f} s"
            )
        print(hub.line())
        print(
            f"    first download done at {hub.median_part('first done'):.2f} s, last at "
            f"{hub.median_part('last done'):.2f} s (median)"
        )
        ideal_b = args.agents * unit
        print(
            f"  bandwidth-only bound of B: {ideal_b:.1f} s ({args.agents} x {unit:.1f} s over the Hub link)"
        )
        for f, s in trees:
            hop = hop_by_hop_time(args.agents, f) * unit
            pipe = pipelined_time(args.agents, f) * unit
            print(
                f"  bandwidth-only A, fanout {f}: hop by hop {hop:.1f} s (ratio {hop / ideal_b:.2f}), "
                f"pipelined {pipe:.1f} s (ratio {pipe / ideal_b:.2f}); measured {s.median_s:.2f} s "
                f"(ratio {s.median_s / hub.median_s:.2f})"
            )
        for f, s in trees:
            m = s.median_sample()
            print(
                f"  per-target results, fanout {f} (run of {m.seconds:.2f} s; "
                "start: seconds after the replicate call):"
            )
            print("\n".join(m.lines))
        best_fanout = min(trees, key=lambda t: t[1].median_s)[0]
        for f, s in trees:
            ratio = s.median_s / hub.median_s
            if f == best_fanout:
                ok &= ratio <= TARGET_REPL_RATIO
            rows.append(
                (
                    f"(b) {nbytes / GIB:g} GiB to {args.agents} agents, cap {args.cap / 1e6:g} MB/s: "
                    f"download + replicate (fanout {f}) vs {args.agents} Hub downloads",
                    f"{s.median_s:.2f} s vs {hub.median_s:.2f} s = {ratio:.2f}x",
                    f"<= {TARGET_REPL_RATIO}x",
                    verdict(ratio <= TARGET_REPL_RATIO),
                )
            )
    if repl is not None and overlap is not None and overlap.samples:
        _, hub, nbytes = repl
        print(overlap.line())
        print("\n".join(overlap.median_sample().lines))
        ratio = overlap.median_s / hub.median_s
        rows.append(
            (
                f"(b') {nbytes / GIB:g} GiB to {args.agents} agents, cap {args.cap / 1e6:g} MB/s: "
                f"download and replicate at once (fanout 1) vs {args.agents} Hub downloads",
                f"{overlap.median_s:.2f} s vs {hub.median_s:.2f} s = {ratio:.2f}x",
                f"<= {TARGET_REPL_RATIO}x",
                verdict(ratio <= TARGET_REPL_RATIO),
            )
        )
    print("\n| target | result | goal | verdict |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return ok


# ---------------------------------------------------------------- main


def check_space(args: argparse.Namespace, tmp: Path) -> None:
    """BenchError when the temporary directory's disk cannot hold what the runs write."""
    need_a = 0 if args.skip_copy else 3 * args.copy_gib * GIB  # n1, n2 (or curl's), slack
    need_b = 0 if args.skip_repl else (args.agents + 2) * args.repl_gib * GIB  # source, N copies
    need = max(need_a, need_b) + GIB
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise BenchError(f"{tmp} has {free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed")


async def amain(bench: Bench) -> bool:
    """Run the chosen benchmarks and report; True when every target is met. SIGTERM cancels
    the run like Ctrl-C does; either way every process started is stopped."""
    args = bench.args
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    copy_res: tuple[Series, Series, Series, int] | None = None
    repl_res: tuple[list[tuple[int, Series]], Series, int] | None = None
    version = await asyncio.to_thread(gswarm_version)
    try:
        check_space(args, bench.tmp)
        if not args.skip_copy:
            copy_res = await bench.copy_bench()
        if not args.skip_repl:
            repl_res = await bench.repl_bench()
    finally:
        await bench.stop_all()
    return report(args, version, copy_res, repl_res, bench.overlap)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copy-gib", type=float, default=2.0, help="model size of (a) [2]")
    parser.add_argument("--repl-gib", type=float, default=1.0, help="model size of (b) [1]")
    parser.add_argument("--agents", type=int, default=8, help="agents in (b) [8]")
    parser.add_argument(
        "--cap", type=parse_rate, default=parse_rate("100M"), help="every uplink's cap in (b), bytes/s [100M]"
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs of (a) [3]")
    parser.add_argument("--repl-runs", type=int, default=None, help="timed rounds of (b) [--runs]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of (a) first [1]")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 0.25 GiB, 0.125 GiB at 50M, 1 run, no warm-up"
    )
    parser.add_argument("--skip-copy", action="store_true", help="only (b)")
    parser.add_argument("--skip-repl", action="store_true", help="only (a)")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where on disk to work [system temp]")
    args = parser.parse_args(argv)
    if args.quick:
        args.copy_gib, args.repl_gib, args.cap, args.runs, args.warmup = 0.25, 0.125, parse_rate("50M"), 1, 0
        args.repl_runs = 1
    if args.repl_runs is None:
        args.repl_runs = args.runs
    if args.runs < 1 or args.repl_runs < 1 or args.warmup < 0:
        parser.error("--runs and --repl-runs must be at least 1, --warmup at least 0")
    if not 2 <= args.agents <= 64:
        parser.error("--agents must be between 2 and 64")
    if min(args.copy_gib, args.repl_gib) < 1 / 64:
        parser.error("models must be at least 1/64 GiB")
    if args.skip_copy and args.skip_repl:
        parser.error("nothing to do")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark: 0 when every target is met, 1 when one is missed, 2 on error."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"] and len(argv) == 2:
        asyncio.run(serve_static(Path(argv[1]).resolve()))
        return 0
    args = parse_args(argv)
    if shutil.which("curl") is None and not args.skip_copy:
        print("curl is needed for the anchor of (a)", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="gswarm-bench-peer-", dir=args.tmp_dir))
    bench = Bench(args, tmp)
    try:
        ok = asyncio.run(amain(bench))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in bench.procs:  # a safety net: stop_all has normally emptied this list
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
