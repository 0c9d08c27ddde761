"""Tier benchmark: disk -> dram copies against `cp -r`, and Hub downloads against
`huggingface_hub.snapshot_download` and `curl`, with the head's CPU measured meanwhile.

    python bench/tiers.py [--copy-gib 2] [--download-gib 1] [--runs 3] [--warmup 1] [--quick]

What it measures, all in one run on this machine:

(a) copy: a model of several files (safetensors-like random shards and a config.json) is
    seeded onto the agent's disk tier by a gswarm download from `file://` (not timed); then,
    alternating, `POST /copy?wait=true` disk -> dram (end to end, REST call to the op's end)
    and `cp -r` of the same published files to a fresh directory on /dev/shm. Both run warm:
    the source is read once before the first run and stays in the page cache. The dram copy
    and the `cp` directory are removed between runs (not timed).
(b) download: a second model is served by the test Hub server (`tests/hubserver.py`, in its
    own process, files hashed before it prints its URL); per round, `POST /download?wait=true`
    of `hf://REPO` onto the disk tier under a fresh model name (removed afterwards), then
    `snapshot_download(REPO, endpoint=URL, local_dir=FRESH)` in a subprocess (the time of the
    call itself, measured inside it, after the import), then `curl` of every file's `/resolve`
    URL, once sequentially (one curl process, one connection) and once with `--parallel`.
    Every destination is a fresh directory on the same disk; `sync` (not timed) runs before
    each timed run so no run pays for another's dirty pages.
    Each benchmark starts with --warmup untimed rounds of every tool (first touches of fresh
    memory, in a VM above all, make a first run slow for whichever tool comes first).
(c) the head's CPU (utime + stime from /proc/PID/stat) during every gswarm transfer, as % of
    one core; the agent's and the Hub server's CPU too, to see where the time goes. A
    subscriber follows the op events meanwhile (as the CLI does), which gives the phases.

Verdicts: the copy against `cp -r` (>= 0.95x its speed); the download against
`snapshot_download` (>= 2x) and against the faster of the two curl modes (>= 0.5x); the
head's CPU in its worst timed run (< 5% of a core). Busy time of the machine that no process
of the benchmark accounts for is reported as `other`; a warning says when there was much of
it (another workload makes every number noisy). Exit status: 0 all targets met, 1 one
missed, 2 the benchmark failed, 130 interrupted.

Processes: the head (`python -m gswarm head`), one agent (`python -m gswarm client`, its
disk tier in the temporary directory, its dram tier under /dev/shm) and the Hub server are
started through their real command lines on 127.0.0.1. Everything written lives in two
temporary directories (one on disk, one on /dev/shm) that are removed at the end, and every
process started is stopped, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
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
from typing import Any, TypeVar

import msgspec

from gswarm.client import GswarmClient
from gswarm.config import Tokens
from gswarm.protocol import Event, Op

T = TypeVar("T")

HOST = "127.0.0.1"
NODE = "bench"
REPO_ID = "bench/tiers-model"
ROOT = Path(__file__).resolve().parent.parent
HUBSERVER = ROOT / "tests" / "hubserver.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
GB = 1e9
BLOCK = 16 << 20
SHARDS = 4
HEADER_BYTES = 256
START_TIMEOUT = 60.0
RUN_TIMEOUT = 300.0
SHM = Path("/dev/shm")

TARGET_CP_RATIO = 0.95
TARGET_SNAPSHOT_RATIO = 2.0
TARGET_CURL_RATIO = 0.5
TARGET_HEAD_CPU_PCT = 5.0
NOISY_OTHER_PCT = 25.0
PHASES_TITLE = "  gswarm phases (head time of each op event; progress is sent at most every 0.2 s):"


class BenchError(RuntimeError):
    """The benchmark could not go on (a process failed, an op failed, no space, ...)."""


# ---------------------------------------------------------------- model files


def write_shard(path: Path, size: int) -> None:
    """A safetensors-like file of exactly `size` bytes: 8-byte header length, a JSON header
    padded to HEADER_BYTES, one U8 tensor of random bytes (written in blocks)."""
    body = size - 8 - HEADER_BYTES
    if body <= 0:
        raise BenchError(f"shard size {size} too small")
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "weight": {"dtype": "U8", "shape": [body], "data_offsets": [0, body]},
        }
    ).encode()
    with open(path, "wb") as fh:
        fh.write(HEADER_BYTES.to_bytes(8, "little"))
        fh.write(header.ljust(HEADER_BYTES, b" "))
        left = body
        while left:
            n = min(BLOCK, left)
            fh.write(os.urandom(n))
            left -= n


def make_model(directory: Path, total: int) -> list[tuple[str, int]]:
    """Write a model of `total` bytes (SHARDS shards and a config.json); its (name, size) list."""
    directory.mkdir(parents=True)
    config = json.dumps({"architectures": ["BenchModel"], "model_type": "bench", "torch_dtype": "uint8"})
    (directory / "config.json").write_text(config)
    rest = total - len(config)
    per = rest // SHARDS
    files = [("config.json", len(config))]
    for i in range(SHARDS):
        size = per if i < SHARDS - 1 else rest - per * (SHARDS - 1)
        name = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        write_shard(directory / name, size)
        files.append((name, size))
    return files


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files below `path`, hidden files and directories skipped."""
    total = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(os.lstat(os.path.join(root, n)).st_size for n in names if not n.startswith("."))
    return total


def read_all(path: Path) -> None:
    """Read every file below `path` once (to put it in the page cache)."""
    buf = bytearray(BLOCK)
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


# ---------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, idle and iowait out)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


class Proc:
    """A child process in its own session, its stdout and stderr in log files."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def cpu(self) -> float:
        """CPU seconds used so far."""
        return cpu_seconds(self.pid)

    def tail(self, n: int = 20) -> str:
        """The last lines of its stderr (for error messages)."""
        try:
            lines = self.err_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    async def wait_for(self, path: Path, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until `pattern` shows up in one of its log files; BenchError if it exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = await asyncio.to_thread(path.read_text, errors="replace")
            match = regex.search(text)
            if match:
                return match
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.name} did not start in {timeout:g} s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s; only this process, by its id."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(5.0)


async def run_timed(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run a command to its end; (wall seconds from exec to exit, stdout). BenchError on failure."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return elapsed, out.decode()


# ---------------------------------------------------------------- measurements


@dataclass
class Sample:
    """One timed run of one tool."""

    seconds: float
    nbytes: int
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds used by the watched processes during the run."""
    phases: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since the request, progress message) as the op's events told."""
    op: Op | None = None

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.nbytes / self.seconds / GB


@dataclass
class Series:
    """Every run of one tool."""

    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        """Median seconds."""
        return statistics.median(s.seconds for s in self.samples)

    @property
    def median_gbps(self) -> float:
        """Throughput of the median run."""
        return self.samples[0].nbytes / self.median_s / GB

    def cpu_pct(self, proc: str) -> float:
        """CPU of a process over all runs, as % of one core."""
        wall = sum(s.seconds for s in self.samples)
        return 100.0 * sum(s.cpu.get(proc, 0.0) for s in self.samples) / wall if wall else 0.0

    def max_cpu_pct(self, proc: str) -> float:
        """The largest per-run CPU share of a process, as % of one core."""
        return max((100.0 * s.cpu.get(proc, 0.0) / s.seconds for s in self.samples), default=0.0)


class OpWatcher:
    """Follows the op events (as the CLI does) and keeps, per op, each distinct progress
    message with the head's timestamp of its first appearance."""

    def __init__(self, client: GswarmClient) -> None:
        self.client = client
        self.seen: dict[str, list[tuple[float, str]]] = {}
        self.complete: set[str] = set()
        self.live = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start following in a background task."""
        self.task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        """Stop following."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

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
            total = int(progress.get("total") or 0)
            if total and int(progress.get("done") or 0) >= total and msg.key not in self.complete:
                self.complete.add(msg.key)
                seen.append((msg.ts, "(every byte counted)"))

    def phases(self, op_id: str, since: float) -> list[tuple[float, str]]:
        """An op's messages as (seconds after `since`, message)."""
        return [(ts - since, text) for ts, text in self.seen.get(op_id, [])]


class Bench:
    """The processes, the client and the temporary directories of one benchmark run."""

    def __init__(self, args: argparse.Namespace, tmp: Path, shm: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.shm = shm
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: dict[str, Proc] = {}
        self.client: GswarmClient | None = None
        self.watcher: OpWatcher | None = None
        self.env = {
            **os.environ,
            "COLUMNS": "500",
            "HF_HOME": str(tmp / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        for var in ("GSWARM_TOKEN", "GSWARM_HEAD_URL", "HF_TOKEN", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            self.env.pop(var, None)
        self.env["NO_PROXY"] = self.env["no_proxy"] = HOST

    # ------------------------------------------------------------ lifecycle

    async def start_cluster(self, hub_url: str) -> None:
        """Start the head and one agent (its disk tier here, its dram tier on /dev/shm)."""
        state = self.tmp / "head-state"
        head = self.procs["head"] = Proc(
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
            self.env,
            self.logs,
        )
        match = await head.wait_for(head.err_path, r"listening on (http://\S+)")
        url = match.group(1)
        tokens = msgspec.json.decode((state / "tokens.json").read_bytes(), type=Tokens)
        agent_env = {**self.env, "HF_ENDPOINT": hub_url}
        self.procs["agent"] = Proc(
            "agent",
            [
                sys.executable,
                "-m",
                "gswarm",
                "client",
                url,
                "--node-id",
                NODE,
                "--token",
                tokens.join_token,
                "--disk-dir",
                str(self.tmp / "agent-disk"),
                "--dram-dir",
                str(self.shm / "agent-dram"),
            ],
            agent_env,
            self.logs,
        )
        self.client = GswarmClient(url, tokens.api_token, timeout=RUN_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            nodes = await self.client.list_nodes()
            if any(n.node_id == NODE and n.status == "online" for n in nodes):
                break
            if self.procs["agent"].popen.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the agent did not come online:\n{self.procs['agent'].tail()}")
            await asyncio.sleep(0.1)
        self.watcher = OpWatcher(self.client)
        self.watcher.start()
        await asyncio.wait_for(self.watcher.live.wait(), START_TIMEOUT)

    async def start_hub(self, repo_dir: Path) -> str:
        """Start the test Hub server serving `repo_dir`; its URL once every file is hashed."""
        hub = self.procs["hub"] = Proc(
            "hub",
            [sys.executable, str(HUBSERVER), "--dir", str(repo_dir), "--repo", REPO_ID, "--host", HOST],
            self.env,
            self.logs,
        )
        match = await hub.wait_for(hub.out_path, r"^(http://\S+)\s*$", timeout=RUN_TIMEOUT)
        return match.group(1)

    async def close(self) -> None:
        """Stop the watcher, the client and every process started."""
        if self.watcher is not None:
            await self.watcher.stop()
        if self.client is not None:
            await self.client.close()
        for name in ("agent", "head", "hub"):
            proc = self.procs.get(name)
            if proc is not None:
                await asyncio.to_thread(proc.stop)

    # ------------------------------------------------------------ timing helpers

    def _cpu(self) -> dict[str, float]:
        cpu = {name: p.cpu() for name, p in self.procs.items() if p.popen.poll() is None}
        # Children that have ended and been waited for: the cp, curl or snapshot_download run.
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["tool"] = usage.ru_utime + usage.ru_stime
        own = resource.getrusage(resource.RUSAGE_SELF)
        cpu["bench"] = own.ru_utime + own.ru_stime
        cpu["machine"] = machine_busy_seconds()
        return cpu

    async def measure(self, nbytes: int, fn: Callable[[], Awaitable[float | None]]) -> Sample:
        """Run `fn` once, timed, with the CPU of every process recorded around it; `fn` may
        return its own, inner, duration instead."""
        await asyncio.to_thread(os.sync)
        before = self._cpu()
        t0 = time.perf_counter()
        inner = await fn()
        seconds = time.perf_counter() - t0
        after = self._cpu()
        cpu = {k: after[k] - before[k] for k in before if k in after}
        # Busy time no process of this benchmark accounts for: other users of the machine and
        # kernel threads (writeback among them). Much of it means noisy numbers.
        cpu["other"] = max(0.0, cpu.pop("machine") - sum(cpu.values()))
        return Sample(inner if inner is not None else seconds, nbytes, cpu)

    def _check_op(self, op: Op, what: str) -> Op:
        if op.state != "succeeded":
            err = op.error.message if op.error is not None else op.state
            raise BenchError(f"{what} failed: {err}")
        return op

    async def gswarm_op(self, nbytes: int, what: str, call: Callable[[], Awaitable[Op]]) -> Sample:
        """One timed gswarm op (a REST call with ?wait=true), with its phases."""
        box: list[Op] = []
        started: list[float] = []

        async def run() -> None:
            started.append(time.time())
            box.append(self._check_op(await asyncio.wait_for(call(), RUN_TIMEOUT), what))

        sample = await self.measure(nbytes, run)
        op = sample.op = box[0]
        size = int((op.result or {}).get("size", -1))
        if size != nbytes:
            raise BenchError(f"{what}: the op reports {size} bytes, expected {nbytes}")
        await asyncio.sleep(0.3)  # let the last events arrive
        if self.watcher is not None:
            sample.phases = self.watcher.phases(op.op_id, started[0])
        return sample

    # ------------------------------------------------------------ (a) copy

    async def copy_bench(self, src: Path, nbytes: int) -> tuple[Series, Series]:
        """gswarm disk -> dram copies against `cp -r`, alternating."""
        assert self.client is not None
        client = self.client
        model = "bench-copy"
        seed = self._check_op(
            await client.download(model, f"file://{src}", f"{NODE}:disk", wait=True), "seeding the disk copy"
        )
        disk_copy = Path(str((seed.result or {})["path"]))
        await asyncio.to_thread(read_all, disk_copy)
        gs, cp = Series("gswarm copy disk->dram"), Series("cp -r")
        for i in range(self.args.warmup + self.args.runs):
            sample = await self.gswarm_op(
                nbytes,
                "gswarm copy",
                lambda: client.copy(model, f"{NODE}:disk", f"{NODE}:dram", wait=True),
            )
            gs.samples.append(sample)
            self._check_op(
                await client.delete_location(model, f"{NODE}:dram", wait=True), "deleting the dram copy"
            )
            dest = self.shm / f"fresh-{i}"

            async def run_cp(dest: Path = dest) -> float:
                seconds, _ = await run_timed(["cp", "-r", str(disk_copy), str(dest)])
                return seconds

            sample = await self.measure(nbytes, run_cp)
            got = await asyncio.to_thread(tree_bytes, dest)
            if got != nbytes:
                raise BenchError(f"cp copied {got} bytes, expected {nbytes}")
            cp.samples.append(sample)
            await asyncio.to_thread(shutil.rmtree, dest)
            self.progress(
                f"copy {self.run_name(i)}: gswarm {gs.samples[-1].gbps:.2f} GB/s, cp {sample.gbps:.2f} GB/s"
            )
        self._check_op(await client.delete_location(model, f"{NODE}:disk", wait=True), "deleting the seed")
        return self.drop_warmup(gs), self.drop_warmup(cp)

    # ------------------------------------------------------------ (b) download

    async def download_bench(self, hub_url: str, files: list[tuple[str, int]], nbytes: int) -> list[Series]:
        """gswarm downloads against snapshot_download and curl, round by round."""
        assert self.client is not None
        client = self.client
        gs = Series("gswarm download")
        snap = Series("snapshot_download")
        seq = Series("curl (sequential)")
        par = Series("curl --parallel")
        urls = [(name, f"{hub_url}/{REPO_ID}/resolve/main/{name}") for name, _ in files]
        snapshot_code = (
            "import sys, time\n"
            "from huggingface_hub import snapshot_download\n"
            "t = time.perf_counter()\n"
            "snapshot_download(sys.argv[1], endpoint=sys.argv[2], local_dir=sys.argv[3])\n"
            "print(time.perf_counter() - t)\n"
        )
        for i in range(self.args.warmup + self.args.runs):
            name = f"bench-dl-{i}"
            sample = await self.gswarm_op(
                nbytes,
                "gswarm download",
                functools.partial(client.download, name, f"hf://{REPO_ID}", f"{NODE}:disk", wait=True),
            )
            gs.samples.append(sample)
            await client.delete_model(name)

            dest = self.tmp / f"snapshot-{i}"

            async def run_snapshot(dest: Path = dest) -> float:
                _, out = await run_timed(
                    [sys.executable, "-c", snapshot_code, REPO_ID, hub_url, str(dest)], self.env
                )
                return float(out.strip().splitlines()[-1])

            snap.samples.append(await self.measure(nbytes, run_snapshot))
            await self._check_and_remove(dest, nbytes, "snapshot_download")

            for series, parallel in ((seq, False), (par, True)):
                dest = self.tmp / f"curl-{'par' if parallel else 'seq'}-{i}"
                dest.mkdir()
                argv = ["curl", "-s", "-f", "-L", "--noproxy", "*"]
                if parallel:
                    argv += ["--parallel", "--parallel-max", str(len(urls))]
                for rel, url in urls:
                    argv += ["-o", str(dest / rel), url]

                async def run_curl(argv: list[str] = argv) -> float:
                    seconds, _ = await run_timed(argv)
                    return seconds

                series.samples.append(await self.measure(nbytes, run_curl))
                await self._check_and_remove(dest, nbytes, series.name)
            self.progress(
                f"download {self.run_name(i)}: gswarm {gs.samples[-1].gbps:.2f}, snapshot_download "
                f"{snap.samples[-1].gbps:.2f}, curl {seq.samples[-1].gbps:.2f} / parallel "
                f"{par.samples[-1].gbps:.2f} GB/s"
            )
        return [self.drop_warmup(s) for s in (gs, snap, seq, par)]

    async def _check_and_remove(self, dest: Path, nbytes: int, what: str) -> None:
        got = await asyncio.to_thread(tree_bytes, dest)
        if got != nbytes:
            raise BenchError(f"{what} wrote {got} bytes to {dest}, expected {nbytes}")
        await asyncio.to_thread(shutil.rmtree, dest)

    def run_name(self, i: int) -> str:
        """'warm-up N' or 'run N' for the i-th round."""
        if i < self.args.warmup:
            return f"warm-up {i + 1}"
        return f"run {i + 1 - self.args.warmup}"

    def drop_warmup(self, series: Series) -> Series:
        """The series without its warm-up rounds."""
        series.samples = series.samples[self.args.warmup :]
        return series

    def progress(self, text: str) -> None:
        """A line of progress on stderr."""
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def phase_lines(series: Series) -> list[str]:
    """The phases of every gswarm run, from the op's events (200 ms coalescing applies)."""
    lines = []
    for i, s in enumerate(series.samples):
        steps = ", ".join(f"{t:+.2f}s {msg}" for t, msg in s.phases)
        op = s.op
        agent = ""
        if op is not None and op.started_at and op.finished_at:
            agent = f" [head: created->started {op.started_at - op.created_at:.3f}s, "
            agent += f"started->finished {op.finished_at - op.started_at:.3f}s]"
        lines.append(f"  run {i + 1}: {s.seconds:.3f}s{agent}: {steps}")
    return lines


def series_line(s: Series) -> str:
    """One line per series: median, GB/s, every run, CPU of the processes."""
    runs = ", ".join(f"{x.seconds:.3f}" for x in s.samples)
    cpu = ", ".join(
        f"{p} {s.cpu_pct(p):.0f}%"
        for p in ("head", "agent", "hub", "tool", "bench", "other")
        if s.cpu_pct(p) >= 0.5
    )
    return f"  {s.name:<24} median {s.median_s:7.3f} s  {s.median_gbps:6.2f} GB/s  (runs: {runs}; cpu: {cpu})"


def report(
    args: argparse.Namespace,
    copy: tuple[Series, Series] | None,
    download: list[Series] | None,
    copy_bytes: int,
    download_bytes: int,
) -> bool:
    """Print the results and the verdicts; True when every target is met."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    print()
    print(
        f"machine: {cpu_model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(f"command: python bench/tiers.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        "cpu: % of one core over the timed runs; tool = the cp, curl or snapshot_download process; "
        "other = busy time of the machine no process of the benchmark accounts for (kernel threads, "
        "other users)"
    )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    ok = True
    rows: list[tuple[str, str, str, str]] = []
    head_cpu: list[Series] = []
    if copy is not None:
        gs, cp = copy
        print(
            f"\n(a) copy disk -> dram, {copy_bytes / GIB:.2f} GiB in {SHARDS + 1} files, warm page cache, "
            f"medians of {args.runs} after {args.warmup} warm-up"
        )
        for s in (gs, cp):
            print(series_line(s))
        print(PHASES_TITLE)
        print("\n".join(phase_lines(gs)))
        ratio = cp.median_s / gs.median_s
        ok &= ratio >= TARGET_CP_RATIO
        rows.append(
            ("copy vs cp -r", f"{ratio:.3f}x", f">= {TARGET_CP_RATIO}x", verdict(ratio >= TARGET_CP_RATIO))
        )
        head_cpu.append(gs)
    if download is not None:
        gs, snap, seq, par = download
        print(
            f"\n(b) download from the local Hub server, {download_bytes / GIB:.2f} GiB in {SHARDS + 1} "
            "files, "
            f"to the same disk, sync before each run, medians of {args.runs} after {args.warmup} warm-up"
        )
        for s in download:
            print(series_line(s))
        print(PHASES_TITLE)
        print("\n".join(phase_lines(gs)))
        r_snap = snap.median_s / gs.median_s
        curl_best = min((seq, par), key=lambda s: s.median_s)
        r_curl = curl_best.median_s / gs.median_s
        ok &= r_snap >= TARGET_SNAPSHOT_RATIO and r_curl >= TARGET_CURL_RATIO
        rows.append(
            (
                "download vs snapshot_download",
                f"{r_snap:.3f}x",
                f">= {TARGET_SNAPSHOT_RATIO}x",
                verdict(r_snap >= TARGET_SNAPSHOT_RATIO),
            )
        )
        rows.append(
            (
                f"download vs {curl_best.name} (the faster curl)",
                f"{r_curl:.3f}x",
                f">= {TARGET_CURL_RATIO}x",
                verdict(r_curl >= TARGET_CURL_RATIO),
            )
        )
        for other in (seq, par):
            if other is not curl_best:
                rows.append((f"download vs {other.name}", f"{other.median_s / gs.median_s:.3f}x", "", ""))
        head_cpu.append(gs)
    if head_cpu:
        wall = sum(x.seconds for s in head_cpu for x in s.samples)
        cpu = sum(x.cpu.get("head", 0.0) for s in head_cpu for x in s.samples)
        pct = 100.0 * cpu / wall if wall else 0.0
        worst = max(s.max_cpu_pct("head") for s in head_cpu)
        ok &= worst < TARGET_HEAD_CPU_PCT
        rows.append(
            (
                "head CPU during gswarm transfers",
                f"{pct:.1f}% (worst run {worst:.1f}%)",
                f"< {TARGET_HEAD_CPU_PCT:g}% of a core",
                verdict(worst < TARGET_HEAD_CPU_PCT),
            )
        )
    every = [x for s in ([*copy] if copy else []) + (download or []) for x in s.samples]
    every_wall = sum(x.seconds for x in every)
    other_pct = 100.0 * sum(x.cpu.get("other", 0.0) for x in every) / every_wall if every_wall else 0.0
    if other_pct > NOISY_OTHER_PCT:
        print(
            f"\nWARNING: during the timed runs the machine was also busy with work outside this "
            f"benchmark ({other_pct:.0f}% of a core on average): the numbers are noisy, run again when idle"
        )
    print("\n| target | result | goal | verdict |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return ok


# ---------------------------------------------------------------- main


def plan_sizes(args: argparse.Namespace, tmp: Path) -> tuple[int, int]:
    """Bytes of the copy and download models, shrunk (and said so) when space is short."""
    copy_bytes = int(args.copy_gib * GIB)
    download_bytes = int(args.download_gib * GIB)
    shm_free = shutil.disk_usage(SHM).free
    # One model-sized copy on /dev/shm at a time (gswarm's or cp's), plus a margin.
    shm_fit = int((shm_free - (256 << 20)) * 0.9)
    if copy_bytes > shm_fit:
        print(
            f"/dev/shm has {shm_free / GIB:.2f} GiB free: copying {shm_fit / GIB:.2f} GiB "
            f"instead of {copy_bytes / GIB:.2f} GiB",
            file=sys.stderr,
        )
        copy_bytes = shm_fit
    disk_free = shutil.disk_usage(tmp).free
    # Source models, the seeded disk copy, one download destination, plus a margin.
    need = 2 * copy_bytes + 2 * download_bytes + (1 << 30)
    if need > disk_free:
        raise BenchError(f"{tmp} has {disk_free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed")
    if copy_bytes < 64 << 20:
        raise BenchError("too little room on /dev/shm for a meaningful copy benchmark")
    return copy_bytes, download_bytes


async def amain(args: argparse.Namespace, tmp: Path, shm: Path) -> bool:
    """Generate the models, run both benchmarks, report; True when every target is met."""
    bench = Bench(args, tmp, shm)
    copy_bytes, download_bytes = plan_sizes(args, tmp)
    copy_res: tuple[Series, Series] | None = None
    dl_res: list[Series] | None = None
    try:
        load = os.getloadavg()
        bench.progress(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        t0 = time.perf_counter()
        copy_src, hub_src = tmp / "src-copy", tmp / "src-hub"
        if not args.skip_copy:
            await asyncio.to_thread(make_model, copy_src, copy_bytes)
        hub_files: list[tuple[str, int]] = []
        if not args.skip_download:
            hub_files = await asyncio.to_thread(make_model, hub_src, download_bytes)
        bench.progress(f"model files written in {time.perf_counter() - t0:.1f} s; starting processes")
        hub_url = await bench.start_hub(hub_src) if not args.skip_download else "http://127.0.0.1:9"
        await bench.start_cluster(hub_url)
        bench.progress("head, agent and Hub server are up")
        if not args.skip_copy:
            copy_res = await bench.copy_bench(copy_src, copy_bytes)
            await asyncio.to_thread(shutil.rmtree, copy_src)
        if not args.skip_download:
            dl_res = await bench.download_bench(hub_url, hub_files, download_bytes)
    finally:
        await bench.close()
    return report(args, copy_res, dl_res, copy_bytes, download_bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the copied model [2]")
    parser.add_argument("--download-gib", type=float, default=1.0, help="size of the downloaded model [1]")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each tool [3]")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds of every tool before the timed ones [1]"
    )
    parser.add_argument("--quick", action="store_true", help="0.25 GiB models, 2 runs (a smoke test)")
    parser.add_argument("--skip-copy", action="store_true", help="only the download benchmark")
    parser.add_argument("--skip-download", action="store_true", help="only the copy benchmark")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where on disk to work [system temp]")
    args = parser.parse_args(argv)
    if args.quick:
        args.copy_gib, args.download_gib, args.runs = 0.25, 0.25, 2
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1, --warmup at least 0")
    if args.skip_copy and args.skip_download:
        parser.error("nothing to do")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every target is met, 1 when one is missed, 2 on error."""
    args = parse_args(argv)
    if not SHM.is_dir():
        print("no /dev/shm on this machine", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="gswarm-bench-tiers-", dir=args.tmp_dir))
    shm = Path(tempfile.mkdtemp(prefix="gswarm-bench-tiers-", dir=SHM))
    try:
        ok = asyncio.run(amain(args, tmp, shm))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
