"""Serving benchmark: time from `serve` to the first completion per tier, and load throughput.

    python bench/serve.py [--size small|medium|large] [--runs 3] [--no-cuda] [--json FILE]

What it measures, all in one run on this machine:

(a) time to first completion: from `POST /serve` (`client.serve(..., wait=False)`) until the
    first `POST /v1/completions` (max_tokens 1) on the new server answers 200, polled every
    50 ms, for the builtin backend on
      - `n1:disk`, page cache evicted first (`fdatasync` + `posix_fadvise(DONTNEED)` on every
        file of the copy, checked with `mincore`): a cold read from the disk;
      - `n1:disk`, page cache warm (the files read once before): what a recently used disk
        copy costs;
      - `n1:dram` (tmpfs);
      - `n1:gpu0` (a simulated GPU: host memory, the real GPU code path) after an explicit
        `load`, which is untimed here and reported in (b).
    The service is stopped (`stop`, wait) after each run. Each round runs the four once, in
    that order; the table gives medians over `--runs` rounds, and every sample.
(b) `load` dram -> simulated gpu0: bytes / seconds of the op (accepted -> succeeded)
    and as seen by the client (REST call with `wait=true`), against the anchor: plain
    `safetensors.torch.load_file(path, device="cpu")` of the same file from dram in a fresh
    subprocess (only the call is timed); in the same process, for scale, reading every weight
    once after it (`t.sum()`) and one real copy of the file into a preallocated buffer
    (`readinto`). The first load, which starts the gpu0 worker process, is reported apart.
(c) where the time goes: the worker's steps replayed one by one in a fresh process on the
    dram copy (process start + `import torch`, weight load, `import transformers` + model
    module, tokenizer, gswarm's `build_model`, first and second 1-token generate).
(d) with CUDA (`torch.cuda.is_available()` in this Python): dram -> real gpu0 `load` in GB/s
    (a second agent without `--simulate-gpus`) against, in the same run, the pinned-memory
    host-to-device copy rate torch reaches (target >= 0.8x) and
    `safetensors.torch.load_file(device="cuda")` in a fresh process (target >= 2x). Without
    CUDA it prints "skipped: no CUDA".

The model is a random Llama-architecture checkpoint (safetensors, one file) with a small BPE
tokenizer, generated offline in a subprocess: `small` (~13 MB), `medium` (~410 MB fp32) or
`large` (~1.6 GB bf16, meant for GPU machines). The head and the agents are started through the
real CLI (`python -m gswarm head|client`) on 127.0.0.1 with temporary state, disk and dram
directories (the head listens on 127.0.0.1 and every request goes there; gswarm itself binds
the agents' data servers and the builtin servers to 0.0.0.0, which this script cannot change);
everything is removed at the end, and every process this benchmark started (with the worker
processes its agents started) is stopped, also on Ctrl-C or an error. This process
never imports torch: everything that does runs in a subprocess of this script (internal roles
`_make`, `_anchor`, `_phases`, `_h2d`, `_cuda_check`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import json
import mmap
import os
import platform
import re
import resource
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used, so the subprocess roles start as light as a worker
    from gswarm.client import GswarmClient
    from gswarm.protocol import Op

HOST = "127.0.0.1"
SCRIPT = str(Path(__file__).resolve())
MODEL = "bench-llm"
PROMPT = "hello world"
POLL = 0.05  # seconds between completion attempts
SERVE_TIMEOUT = 300.0  # one serve, until its first completion
OP_TIMEOUT = 600.0  # one download or load
ROLE_TIMEOUT = 600.0  # one helper subprocess
STOP_GRACE = 20.0  # SIGTERM -> SIGKILL for the head and agents
TARGET_PINNED = 0.8
TARGET_LOAD_FILE = 2.0

SIZES: dict[str, dict[str, Any]] = {
    "small": {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 4, "dtype": "float32"},
    "medium": {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "dtype": "float32"},
    "large": {"hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 16, "dtype": "bfloat16"},
}


class BenchError(RuntimeError):
    """The benchmark could not measure what it was asked to."""


def log(msg: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    """The median, NaN for no samples."""
    return statistics.median(xs) if xs else float("nan")


def gbps(nbytes: float, seconds: float) -> float:
    """Bytes over seconds in GB/s (10^9)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- page cache


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def cached_bytes(path: Path) -> tuple[int, int]:
    """(bytes of `path` in the page cache, size), read with mincore(2) on a shared mapping."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            resident = sum(b & 1 for b in bytes(vec))
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)
    return min(size, resident * mmap.PAGESIZE), size


def cached_fraction(root: Path) -> float:
    """The fraction of the bytes of every file under `root` that is in the page cache."""
    done = total = 0
    for p in _files(root):
        c, s = cached_bytes(p)
        done, total = done + c, total + s
    return done / total if total else 1.0


def evict(root: Path) -> None:
    """Drop every file under `root` from the page cache (written back first)."""
    for p in _files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(root: Path) -> None:
    """Read every file under `root` once, so it sits in the page cache."""
    for p in _files(root):
        with open(p, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass


def read_rate(path: Path) -> tuple[float, int]:
    """(seconds, bytes) of reading a file into a preallocated, pre-faulted buffer: one copy."""
    size = path.stat().st_size
    buf = bytearray(size)  # zero-filled: its pages are faulted in before the clock starts
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        t0 = time.perf_counter()
        done = 0
        while done < size:
            n = f.readinto(view[done : done + (64 << 20)])
            if not n:
                break
            done += n
        seconds = time.perf_counter() - t0
    return seconds, done


# ---------------------------------------------------------------- processes


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
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry), st[1]))
    out: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


@dataclass
class Proc:
    """A head or agent process this benchmark started, with its log file."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after the grace period; then SIGKILL what it started and left behind."""
        kids = descendants(self.proc.pid) if self.proc.returncode is None else []
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE)
            except TimeoutError:
                log(f"{self.name} did not stop in {STOP_GRACE:g} s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for pid, started in kids:
            st = _proc_stat(pid)
            if st is not None and st[1] == started:  # the same process, not a reused pid
                log(f"{self.name} left process {pid} behind: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def start_proc(name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> Proc:
    """Start a long-running process in its own session, output to a log file."""
    out = await asyncio.to_thread(open, log_path, "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, "COLUMNS": "400", **env},
            start_new_session=True,
        )
    finally:
        out.close()
    return Proc(name, proc, log_path)


async def wait_log(p: Proc, pattern: str, timeout: float) -> re.Match[str]:
    """Wait until the process's log matches `pattern`."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(p.log_path.read_text(errors="replace"))
        if m:
            return m
        if p.proc.returncode is not None:
            raise BenchError(f"{p.name} exited ({p.proc.returncode}):\n{p.log_tail()}")
        await asyncio.sleep(0.05)
    raise BenchError(f"{p.name} did not log {pattern!r} within {timeout:g} s:\n{p.log_tail()}")


async def run_role(*args: str, timeout: float = ROLE_TIMEOUT) -> dict[str, Any]:
    """Run `serve.py ROLE ARGS` in a fresh process; its last stdout line, parsed as JSON."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SCRIPT, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(err.decode(errors="replace").splitlines()[-20:])
        raise BenchError(f"{args[0]} failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def timed_phases(model_dir: Path, timeout: float = ROLE_TIMEOUT) -> dict[str, float]:
    """The worker's steps replayed in a fresh process; the parent times start + `import torch`."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "_phases",
        str(model_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), timeout)
        started = time.perf_counter() - t0
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0 or ready.strip() != b"ready":
        raise BenchError(f"_phases failed ({proc.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    phases: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return {"start + import torch": started, **phases}


# ---------------------------------------------------------------- results


@dataclass
class ServeSample:
    """One serve, until its first completion."""

    mode: str
    device: str
    ttfc: float  # POST /serve -> first 200 of /v1/completions
    serve_op: float  # the serve op, created -> finished (succeeds once /health answers)
    attempts: int  # completion requests sent
    cached_before: float | None = None  # page-cached fraction of the copy's files at POST /serve
    cached_after: float | None = None


@dataclass
class LoadSample:
    """One `load` op onto a GPU."""

    bytes: int
    op_seconds: float  # head clock: the agent accepted it -> it succeeded
    wall_seconds: float  # client side: the REST call with wait=true

    @property
    def op_gbps(self) -> float:
        """Throughput of the op."""
        return gbps(self.bytes, self.op_seconds)

    @property
    def wall_gbps(self) -> float:
        """Throughput as the client sees it."""
        return gbps(self.bytes, self.wall_seconds)


@dataclass
class Results:
    """Everything one run measured."""

    machine: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, float] = field(default_factory=dict)
    reads: dict[str, float] = field(default_factory=dict)  # GB/s of one copy of the model file
    serves: list[ServeSample] = field(default_factory=list)
    first_load: LoadSample | None = None
    loads: list[LoadSample] = field(default_factory=list)
    anchor_cpu: list[dict[str, float]] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    cuda: dict[str, Any] = field(default_factory=dict)


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of every descendant it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, Python and library versions, date."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / (1 << 30), 1),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "gswarm": _version("gswarm"),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
    }


# ---------------------------------------------------------------- the cluster


class Cluster:
    """One head and its agents on 127.0.0.1, all started through the CLI."""

    def __init__(self, root: Path, dram_root: Path) -> None:
        self.root = root
        self.dram_root = dram_root
        self.procs: list[Proc] = []
        self.url = ""
        self.api_token = ""
        self.join_token = ""

    async def start_head(self) -> None:
        """Start the head on a free port and read its tokens."""
        state = self.root / "head-state"
        argv = [sys.executable, "-m", "gswarm", "head", "--host", HOST, "--port", "0"]
        p = await start_proc("head", [*argv, "--state-dir", str(state)], self.root / "head.log", {})
        self.procs.append(p)
        self.url = (await wait_log(p, r"listening on (http://[0-9.]+:\d+)", 60)).group(1)
        tokens = json.loads((state / "tokens.json").read_text())
        self.api_token, self.join_token = tokens["api_token"], tokens["join_token"]

    async def start_agent(
        self, client: GswarmClient, node: str, simulate_gpus: str | None
    ) -> tuple[Path, Path]:
        """Start an agent with its own disk and dram dirs; wait until it is online."""
        disk, dram = self.root / f"{node}-disk", self.dram_root / f"{node}-dram"
        argv = [sys.executable, "-m", "gswarm", "client", self.url, "--node-id", node]
        argv += ["--disk-dir", str(disk), "--dram-dir", str(dram)]
        if simulate_gpus:
            argv += ["--simulate-gpus", simulate_gpus]
        p = await start_proc(
            f"agent {node}", argv, self.root / f"{node}.log", {"GSWARM_TOKEN": self.join_token}
        )
        self.procs.append(p)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if p.proc.returncode is not None:
                raise BenchError(f"agent {node} exited ({p.proc.returncode}):\n{p.log_tail()}")
            nodes = {n.node_id: n for n in await client.list_nodes()}
            if node in nodes and nodes[node].status == "online":
                return disk, dram
            await asyncio.sleep(0.1)
        raise BenchError(f"agent {node} did not come online within 60 s:\n{p.log_tail()}")

    async def stop(self) -> None:
        """Stop the agents (they stop their services and workers), then the head."""
        for p in reversed(self.procs):
            try:
                await p.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {p.name}: {type(exc).__name__}: {exc}")
        self.procs.clear()


def _check(op: Op, what: str) -> Op:
    if op.state != "succeeded":
        msg = op.error.message if op.error is not None else op.state
        raise BenchError(f"{what} {op.state}: {msg}")
    return op


async def wait_terminal(client: GswarmClient, op_id: str, timeout: float) -> Op:
    """Poll an op until it has ended."""
    deadline = time.monotonic() + timeout
    while True:
        op = await client.get_op(op_id)
        if op.terminal:
            return op
        if time.monotonic() > deadline:
            raise BenchError(f"op {op_id} ({op.kind}) still {op.state} after {timeout:g} s")
        await asyncio.sleep(0.05)


async def timed_load(client: GswarmClient, device: str) -> LoadSample:
    """One `load` onto `device` (dram is the fastest copy), timed."""
    t0 = time.perf_counter()
    op = _check(await client.load(MODEL, device, wait=True), f"load {device}")
    wall = time.perf_counter() - t0
    assert op.result is not None and op.finished_at is not None
    started = op.started_at or op.created_at
    return LoadSample(int(op.result["size"]), op.finished_at - started, wall)


async def unload(client: GswarmClient, device: str) -> None:
    """Free a model's GPU memory."""
    _check(await client.delete_location(MODEL, device, wait=True), f"unload {device}")


async def first_completion(client: GswarmClient, mode: str, device: str) -> ServeSample:
    """POST /serve, then poll /v1/completions every 50 ms until it answers 200; stop the service."""
    import aiohttp

    port = free_port()
    url = f"http://{HOST}:{port}/v1/completions"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
    deadline = time.monotonic() + SERVE_TIMEOUT
    last = ""
    attempts = 0
    async with aiohttp.ClientSession() as http:
        t0 = time.perf_counter()
        op = await client.serve(MODEL, device, port, wait=False)
        try:
            while True:
                attempts += 1
                try:
                    remaining = max(1.0, deadline - time.monotonic())
                    timeout = aiohttp.ClientTimeout(total=remaining)
                    async with http.post(url, json=body, timeout=timeout) as r:
                        text = await r.text()
                        if r.status == 200:
                            ttfc = time.perf_counter() - t0
                            if not json.loads(text).get("choices"):
                                raise BenchError(f"{device}: a completion without choices: {text[:200]}")
                            break
                        last = f"HTTP {r.status}: {text[:200]}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if attempts % 20 == 0:
                    op = await client.get_op(op.op_id)
                    if op.terminal and op.state != "succeeded":
                        _check(op, f"serve {device}")
                if time.monotonic() > deadline:
                    raise BenchError(f"serve {device}: no completion within {SERVE_TIMEOUT:g} s ({last})")
                await asyncio.sleep(POLL)
            op = _check(await wait_terminal(client, op.op_id, SERVE_TIMEOUT), f"serve {device}")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(client.stop_service(MODEL, device, wait=True))
    serve_op = (op.finished_at or op.created_at) - op.created_at
    return ServeSample(mode, device, ttfc, serve_op, attempts)


# ---------------------------------------------------------------- the benchmark


async def bench(args: argparse.Namespace, res: Results, root: Path, dram_root: Path) -> None:
    """Everything, in the given temporary directories; every process stopped at the end."""
    cluster = Cluster(root, dram_root)
    try:
        await _bench(args, res, root, cluster)
    finally:
        await asyncio.shield(cluster.stop())


async def _bench(args: argparse.Namespace, res: Results, root: Path, cluster: Cluster) -> None:
    from gswarm.client import GswarmClient

    src = root / "model-src"
    log(f"generating the {args.size} model")
    t0 = time.perf_counter()
    res.model = await run_role("_make", str(src), args.size)
    res.setup["generate model"] = time.perf_counter() - t0
    size = int(res.model["file_bytes"])
    log(f"model: {res.model['params'] / 1e6:.1f} M params, {size / 1e6:.1f} MB ({res.model['dtype']})")

    await cluster.start_head()
    async with GswarmClient(cluster.url, cluster.api_token, timeout=60) as client:
        sim = f"1:{max(8 << 30, 2 * size) >> 20}M"
        disk, dram = await cluster.start_agent(client, "n1", sim)
        for tier in ("disk", "dram"):
            t0 = time.perf_counter()
            _check(
                await client.download(MODEL, f"file://{src}", f"n1:{tier}", model_type="llm", wait=True),
                f"download to n1:{tier}",
            )
            res.setup[f"download file:// -> n1:{tier}"] = time.perf_counter() - t0
        disk_copy, dram_copy = disk / MODEL, dram / MODEL
        dram_file = dram_copy / "model.safetensors"
        await asyncio.to_thread(evict, disk_copy)  # the first read is cold, the second cached
        for name, path in (
            ("disk, evicted", disk_copy),
            ("disk, page-cached", disk_copy),
            ("dram", dram_copy),
        ):
            secs, n = await asyncio.to_thread(read_rate, path / "model.safetensors")
            res.reads[name] = gbps(n, secs)

        log("first load onto n1:gpu0 (starts the gpu0 worker)")
        res.first_load = await timed_load(client, "n1:gpu0")
        await unload(client, "n1:gpu0")

        for r in range(args.runs):
            log(f"round {r + 1}/{args.runs}: disk (evicted)")
            evict(disk_copy)
            before = cached_fraction(disk_copy)
            s = await first_completion(client, "disk, page cache evicted", "n1:disk")
            s.cached_before, s.cached_after = before, cached_fraction(disk_copy)
            res.serves.append(s)

            log(f"round {r + 1}/{args.runs}: disk (page-cached)")
            warm(disk_copy)
            before = cached_fraction(disk_copy)
            s = await first_completion(client, "disk, page-cached", "n1:disk")
            s.cached_before, s.cached_after = before, cached_fraction(disk_copy)
            res.serves.append(s)

            log(f"round {r + 1}/{args.runs}: dram")
            res.serves.append(await first_completion(client, "dram (tmpfs)", "n1:dram"))

            log(f"round {r + 1}/{args.runs}: load + gpu0 (simulated)")
            res.loads.append(await timed_load(client, "n1:gpu0"))
            res.serves.append(await first_completion(client, "gpu0 (simulated), after load", "n1:gpu0"))

            log(f"round {r + 1}/{args.runs}: anchors")
            res.anchor_cpu.append(await run_role("_anchor", str(dram_file), "cpu"))
            res.phases.append(await timed_phases(dram_copy))

        if args.no_cuda:
            res.cuda = {"skipped": "--no-cuda"}
        else:
            await _bench_cuda(args, res, client, cluster, src)


async def _bench_cuda(
    args: argparse.Namespace, res: Results, client: GswarmClient, cluster: Cluster, src: Path
) -> None:
    check = await run_role("_cuda_check")
    if not check["available"]:
        res.cuda = {"skipped": f"no CUDA (torch {check['torch']}: torch.cuda.is_available() is False)"}
        log(f"cuda: skipped: {res.cuda['skipped']}")
        return
    res.cuda["device_name"] = check["name"]
    log(f"cuda: {check['name']}; starting agent n2 without --simulate-gpus")
    _, dram = await cluster.start_agent(client, "n2", None)
    node = await client.get_node("n2")
    if not node.inventory.gpus:
        res.cuda = {"skipped": "CUDA works, but agent n2 reports no GPUs (nvidia-ml-py / NVML missing?)"}
        return
    _check(
        await client.download(MODEL, f"file://{src}", "n2:dram", model_type="llm", wait=True),
        "download to n2:dram",
    )
    dram_file = dram / MODEL / "model.safetensors"
    size = dram_file.stat().st_size
    first = await timed_load(client, "n2:gpu0")
    await unload(client, "n2:gpu0")
    loads: list[LoadSample] = []
    h2d: list[dict[str, float]] = []
    load_file: list[dict[str, float]] = []
    for r in range(args.runs):
        log(f"cuda round {r + 1}/{args.runs}")
        loads.append(await timed_load(client, "n2:gpu0"))
        await unload(client, "n2:gpu0")
        load_file.append(await run_role("_anchor", str(dram_file), "cuda"))
        h2d.append(await run_role("_h2d", str(max(size, 256 << 20))))
    res.cuda.update(
        {
            "first_load": asdict(first),
            "loads": [asdict(s) for s in loads],
            "gswarm_gbps": median([s.op_gbps for s in loads]),
            "gswarm_wall_gbps": median([s.wall_gbps for s in loads]),
            "pinned_gbps": median([h["pinned_gbps"] for h in h2d]),
            "pageable_gbps": median([h["pageable_gbps"] for h in h2d]),
            "load_file_gbps": median([gbps(a["bytes"], a["seconds"]) for a in load_file]),
            "h2d": h2d,
            "load_file": load_file,
        }
    )


# ---------------------------------------------------------------- report


def _fmt(x: float, unit: str = "s") -> str:
    if x != x:  # NaN
        return "-"
    if unit == "s" and x < 1:
        return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"
    return f"{x:.2f} {unit}"


def report(res: Results, args: argparse.Namespace) -> str:
    """The results as markdown, ready for bench/README.md."""
    m, mod = res.machine, res.model
    out: list[str] = []
    out.append(f"### Serving: time to first completion and load throughput ({m['date']})\n")
    out.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"safetensors {m['safetensors']}; dram dir on {m['dram_dir_fs']}; "
        f"GPU: {res.cuda.get('device_name') or 'none'}. In the serve table gpu0 is a simulated GPU "
        "(host memory, the real GPU code path).\n"
    )
    out.append(f"Command: `{m['command']}`\n")
    if "others_cpu_percent" in m:
        out.append(
            f"Other processes on the machine used {m['others_cpu_percent']:.0f} % of its CPU during "
            "the run (machine busy time minus this benchmark's own processes).\n"
        )
    out.append(
        f"Model: random Llama ({args.size}): hidden {mod['hidden']}, {mod['layers']} layers, "
        f"{mod['params'] / 1e6:.1f} M params, {mod['dtype']}, one safetensors file of "
        f"{mod['file_bytes'] / 1e6:.1f} MB; BPE tokenizer of {mod['vocab']} tokens.\n"
    )
    out.append(
        "Time to first completion = `POST /serve` (wait=false) -> first `POST /v1/completions` "
        "(max_tokens 1) answered 200, polled every 50 ms; the service is stopped between runs. "
        f"Medians of {args.runs} round{'s' if args.runs > 1 else ''} "
        "(disk evicted, disk cached, dram, load + gpu0, in that order).\n"
    )
    out.append(
        "| serve on | time to first completion | serve op (to /health) | page-cached at start | samples |"
    )
    out.append("| --- | ---: | ---: | ---: | --- |")
    modes = list(dict.fromkeys(s.mode for s in res.serves))
    for mode in modes:
        ss = [s for s in res.serves if s.mode == mode]
        cached = [s.cached_before for s in ss if s.cached_before is not None]
        resident = "n/a (resident)" if ss[0].device.split(":")[1].startswith("gpu") else "n/a (tmpfs)"
        cached_s = f"{100 * median(cached):.0f} %" if cached else resident
        samples = ", ".join(f"{s.ttfc:.2f}" for s in ss)
        out.append(
            f"| {ss[0].device} — {mode} | **{_fmt(median([s.ttfc for s in ss]))}** | "
            f"{_fmt(median([s.serve_op for s in ss]))} | {cached_s} | {samples} |"
        )
    out.append("")
    if any(s.mode.startswith("disk, page cache") for s in res.serves):
        out.append(
            "Disk eviction: before each evicted run every file of the disk copy got `fdatasync` + "
            "`posix_fadvise(POSIX_FADV_DONTNEED)`; the page-cached fraction is measured with "
            "`mincore(2)` right before `POST /serve`.\n"
        )

    out.append("Load dram -> simulated gpu0 (the `load` op, untimed in the table above):\n")
    out.append("| what | median time | median throughput | samples (GB/s) |")
    out.append("| --- | ---: | ---: | --- |")
    anchor = [gbps(a["bytes"], a["seconds"]) for a in res.anchor_cpu]
    rows: list[tuple[str, list[float], list[float]]] = [
        ("gswarm `load` op (head: accepted -> succeeded)", [s.op_seconds for s in res.loads],
         [s.op_gbps for s in res.loads]),
        ("gswarm `load` as the client sees it (REST, wait=true)", [s.wall_seconds for s in res.loads],
         [s.wall_gbps for s in res.loads]),
        ("anchor: `safetensors.torch.load_file(device=\"cpu\")`, fresh process",
         [a["seconds"] for a in res.anchor_cpu], anchor),
        ("(the same, then every weight read once: `t.sum()`)",
         [a["seconds"] + a["touch_seconds"] for a in res.anchor_cpu],
         [gbps(a["bytes"], a["seconds"] + a["touch_seconds"]) for a in res.anchor_cpu]),
        ("(one real copy: `readinto` a preallocated buffer from dram)",
         [a["copy_seconds"] for a in res.anchor_cpu],
         [gbps(a["copy_bytes"], a["copy_seconds"]) for a in res.anchor_cpu]),
    ]  # fmt: skip
    for name, secs, rates in rows:
        out.append(
            f"| {name} | {_fmt(median(secs))} | {_fmt(median(rates), 'GB/s')} | "
            f"{', '.join(f'{x:.2f}' for x in rates)} |"
        )
    if res.first_load is not None:
        fl = res.first_load
        out.append(
            f"| first load (starts the gpu0 worker process) | {_fmt(fl.op_seconds)} | "
            f"{_fmt(fl.op_gbps, 'GB/s')} | |"
        )
    ratio = median([s.op_gbps for s in res.loads]) / median(anchor) if anchor else float("nan")
    out.append(f"\nRatio gswarm load / anchor (`load_file`): **{ratio:.2f}x**.\n")
    copy = median([gbps(a["copy_bytes"], a["copy_seconds"]) for a in res.anchor_cpu])
    if median([s.op_gbps for s in res.loads]) > copy:
        out.append(
            "Both the `load` op and `load_file` beat one memory copy of the file: on the CPU "
            "(simulated GPU) safetensors hands out tensors that map the file (copy-on-write "
            "`mmap`), so nothing is copied at load time and the pages are faulted in when the "
            "weights are first used (in the first forward pass). These figures measure "
            "mapping, not moving bytes.\n"
        )
    if res.reads:
        reads = ", ".join(f"{k} {v:.2f} GB/s" for k, v in res.reads.items())
        out.append(f"One copy of the model file into memory (`readinto`, in this process): {reads}.\n")

    if res.phases:
        out.append(
            "Where the time goes: the dram worker's steps replayed one by one in a fresh process "
            "on the dram copy (medians):\n"
        )
        out.append("| step | median |")
        out.append("| --- | ---: |")
        keys = list(res.phases[0])
        for k in keys:
            out.append(f"| {k} | {_fmt(median([p[k] for p in res.phases]))} |")
        total_keys = [k for k in keys if not k.startswith("(")]
        total = median([sum(p[k] for k in total_keys) for p in res.phases])
        dram = [s.ttfc for s in res.serves if s.device.endswith(":dram")]
        out.append(
            f"| **sum of the steps above** (without the parenthesised ones) | **{_fmt(total)}** |\n"
            f"| measured: dram time to first completion | {_fmt(median(dram))} |\n"
        )

    out.append("CUDA (real GPU):\n")
    c = res.cuda
    if "skipped" in c:
        out.append(f"skipped: {c['skipped']}\n")
    else:
        pin, lf, g = c["pinned_gbps"], c["load_file_gbps"], c["gswarm_gbps"]
        out.append(f"Device: {c['device_name']}\n")
        out.append("| what | median GB/s | ratio | target |")
        out.append("| --- | ---: | ---: | --- |")
        out.append(f"| gswarm `load` dram -> gpu0 (op) | {g:.2f} | | |")
        out.append(f"| gswarm `load` (client wall) | {c['gswarm_wall_gbps']:.2f} | | |")
        first = LoadSample(**c["first_load"])
        out.append(f"| (first load: starts the worker, CUDA init) | {first.op_gbps:.2f} | | |")
        ok_pin = "met" if g / pin >= TARGET_PINNED else "NOT met"
        ok_lf = "met" if g / lf >= TARGET_LOAD_FILE else "NOT met"
        out.append(
            f"| anchor: torch pinned H2D copy | {pin:.2f} | gswarm/pinned {g / pin:.2f}x | "
            f">= {TARGET_PINNED}x: {ok_pin} |"
        )
        out.append(f"| (torch pageable H2D copy) | {c['pageable_gbps']:.2f} | | |")
        out.append(
            f'| `safetensors.torch.load_file(device="cuda")`, fresh process | {lf:.2f} | '
            f"gswarm/load_file {g / lf:.2f}x | >= {TARGET_LOAD_FILE}x: {ok_lf} |"
        )
        out.append("")
    setup = ", ".join(f"{k} {v:.1f} s" for k, v in res.setup.items())
    out.append(f"Setup (not part of the results): {setup}.")
    return "\n".join(out)


# ---------------------------------------------------------------- subprocess roles


def role_make(out: str, size: str) -> dict[str, Any]:
    """Write a random Llama checkpoint (one safetensors file) and a BPE tokenizer into `out`."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import (  # type: ignore[import-not-found, unused-ignore]
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SIZES[size]
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = "the quick brown fox jumps over the lazy dog; hello world, serve me a completion"
    tok.train_from_iterator([corpus] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    dtype = getattr(torch, spec["dtype"])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in skeleton.state_dict().items():
        if t.dim() == 1:  # norms
            tensors[name] = torch.ones(t.shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(dtype)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config.dtype = spec["dtype"]
    config.save_pretrained(out)
    fast.save_pretrained(out)
    return {
        **spec,
        "vocab": len(fast),
        "params": sum(t.numel() for t in tensors.values()),
        "file_bytes": os.path.getsize(os.path.join(out, "model.safetensors")),
    }


def role_anchor(path: str, device: str) -> dict[str, Any]:
    """Time `safetensors.torch.load_file(path, device)` alone (imports and CUDA init excluded)."""
    import torch
    from safetensors.torch import load_file

    if device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tensors = load_file(path, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    if device == "cpu":
        # CPU tensors from safetensors may be views of a file mapping, faulted in on first use:
        # time reading every weight once, and one real copy of the file into memory.
        torch.ones(16).sum()  # the first op's one-time setup stays off the clock
        t0 = time.perf_counter()
        for t in tensors.values():
            t.sum()
        out["touch_seconds"] = time.perf_counter() - t0
        out["copy_seconds"], out["copy_bytes"] = read_rate(Path(path))
    return out


def role_phases(model_dir: str) -> dict[str, Any]:
    """Replay a CPU worker's steps (load, build, tokenizer, generate), each timed."""
    import importlib

    import torch

    print("ready", flush=True)  # the parent times process start + `import torch` up to here
    from safetensors import safe_open

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    tensors = {}
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensors[key] = f.get_tensor(key)
    times["weight load (safe_open, as gpu_worker._load)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from transformers import AutoConfig, AutoTokenizer

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    times["import transformers + modeling module"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    AutoTokenizer.from_pretrained(model_dir)
    times["tokenizer load (first)"] = time.perf_counter() - t0

    from gswarm.agent.builtin_server import build_model

    t0 = time.perf_counter()
    model, tokenizer = build_model(model_dir, tensors, "cpu")
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    AutoTokenizer.from_pretrained(model_dir)
    tok_again = time.perf_counter() - t0
    times["build_model without its tokenizer load (skeleton, assign, rotary)"] = build - tok_again
    times["(build_model's own tokenizer load, second in this process)"] = tok_again

    def generate() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            enc = tokenizer(PROMPT, return_tensors="pt")
            model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - t

    times["first generate, 1 token"] = generate()
    times["(second generate, 1 token)"] = generate()
    return times


def role_h2d(nbytes: str) -> dict[str, Any]:
    """Host-to-device copy rates of torch: pinned and pageable source, best of 5 after a warm-up."""
    import torch

    n = int(nbytes)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    rates: dict[str, float] = {}
    for name, pinned in (("pinned_gbps", True), ("pageable_gbps", False)):
        src = torch.ones(n, dtype=torch.uint8).pin_memory() if pinned else torch.ones(n, dtype=torch.uint8)
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rates[name] = gbps(n, best)
        del src
    return {**rates, "bytes": n}


def role_cuda_check() -> dict[str, Any]:
    """Whether this Python's torch sees a CUDA device."""
    import torch

    ok = bool(torch.cuda.is_available())
    return {"available": ok, "torch": torch.__version__, "name": torch.cuda.get_device_name(0) if ok else ""}


ROLES: dict[str, Callable[..., dict[str, Any]]] = {
    "_make": role_make,
    "_anchor": role_anchor,
    "_phases": role_phases,
    "_h2d": role_h2d,
    "_cuda_check": role_cuda_check,
}


# ---------------------------------------------------------------- main


def _run_main(coro: Awaitable[None]) -> int:
    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await coro

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    except asyncio.CancelledError:
        log("terminated: everything started was stopped")
        return 143
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the benchmark, print the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ROLES:
        print(json.dumps(ROLES[argv[0]](*argv[1:])), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium", help="model size [medium]")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported [3]")
    parser.add_argument("--no-cuda", action="store_true", help="skip the real-GPU section")
    parser.add_argument("--json", type=Path, help="also write every sample to this JSON file")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    res = Results(machine=machine_info())
    dram_parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    res.machine["dram_dir_fs"] = "tmpfs (/dev/shm)" if dram_parent else "not tmpfs (no /dev/shm)"
    with (
        tempfile.TemporaryDirectory(prefix="gswarm-bench-serve-") as tmp,
        tempfile.TemporaryDirectory(prefix="gswarm-bench-serve-", dir=dram_parent) as shm,
    ):
        wall0, busy0, own0 = time.monotonic(), machine_busy_seconds(), own_cpu_seconds()
        rc = _run_main(bench(args, res, Path(tmp), Path(shm)))
        wall = time.monotonic() - wall0
        others = machine_busy_seconds() - busy0 - (own_cpu_seconds() - own0)
        res.machine["others_cpu_percent"] = max(0.0, 100 * others / wall / (os.cpu_count() or 1))
    if rc == 0:
        print(report(res, args))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(res), indent=2, default=str))
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        log(f"failed: {exc}")
        sys.exit(1)
