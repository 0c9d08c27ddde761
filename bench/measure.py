"""Measurement for the benchmarks: timers and medians, CPU and RSS of processes from /proc, the
machine's other load, the page cache, per-run samples, and the report table (gswarm against its
anchor). Nothing here starts processes or imports gswarm (see harness.py for that), so the
subprocess roles of a benchmark can import it and stay light."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import math
import mmap
import os
import platform
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
GIB = 1 << 30
GB = 1e9


class BenchError(RuntimeError):
    """The benchmark cannot go on (a process died, an op failed, no space, ...)."""


# ---------------------------------------------------------------- /proc: processes and the machine


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds (/proc/PID/stat); 0 when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def children_cpu() -> float:
    """CPU seconds of this process's ended and reaped children (cp, curl, ... runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    """CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_jiffies() -> tuple[int, int]:
    """Busy time (steal excluded) and steal time of the whole machine so far, in clock ticks
    (/proc/stat, all CPUs)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy, steal included (idle and iowait out)."""
    busy, steal = machine_jiffies()
    return (busy + steal) / CLK_TCK


class CpuMeter:
    """CPU use of some processes over a wall-clock window."""

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
        return [100.0 * s / wall for s in self.cpu_seconds()]


class MachineMeter:
    """How much CPU the rest of the machine used while the benchmark ran (a noise indicator)."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._busy, self._steal = machine_jiffies()
        self._ours: dict[int, float] = {}
        self.load_start = os.getloadavg()[0]

    def track(self, pids: Iterable[int]) -> None:
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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """CPU model, cores, Python and the date, for the head of a report."""
    return (
        f"machine: {cpu_model()}, {NCPU} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def raise_nofile_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards `wanted` (at most the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# ---------------------------------------------------------------- timers and statistics


def median(xs: Iterable[float]) -> float:
    """The median, NaN for no samples."""
    values = list(xs)
    return statistics.median(values) if values else float("nan")


def gbps(nbytes: float, seconds: float) -> float:
    """Bytes over seconds in GB/s (10^9)."""
    return nbytes / seconds / GB if seconds > 0 else float("nan")


@dataclass
class Stats:
    """Samples of one measure (seconds), with median, min and max."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median (NaN without samples)."""
        return median(self.samples)

    @property
    def min(self) -> float:
        """The smallest sample."""
        return min(self.samples, default=float("nan"))

    @property
    def max(self) -> float:
        """The largest sample."""
        return max(self.samples, default=float("nan"))


def time_n(fn: Callable[[], object], n: int, warmup: int = 0) -> Stats:
    """Wall seconds of `n` calls of `fn`, after `warmup` untimed ones."""
    stats = Stats()
    for i in range(warmup + n):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            stats.samples.append(time.perf_counter() - t0)
    return stats


Timing = tuple[float, float, float]
"""(wall, user, system) seconds."""


def time_call(fn: Callable[[], object], who: int = resource.RUSAGE_SELF) -> Timing:
    """Run `fn` once: wall time and the user and system CPU of `who` (RUSAGE_SELF, or
    RUSAGE_CHILDREN for a command `fn` runs to its end)."""
    before = resource.getrusage(who)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(who)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


@dataclass
class Latency:
    """Percentiles (nearest rank) of round-trip times, in milliseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        """Percentiles of samples given in seconds."""
        if not seconds:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        ms = sorted(s * 1000.0 for s in seconds)

        def rank(p: float) -> float:
            return ms[min(len(ms) - 1, max(0, math.ceil(p / 100.0 * len(ms)) - 1))]

        return cls(len(ms), rank(50), rank(90), rank(99), ms[-1], statistics.fmean(ms))


def rotate(items: Sequence[Any], round_no: int) -> list[Any]:
    """`items` starting at `round_no` (mod len): who goes first changes every round."""
    k = round_no % len(items)
    return [*items[k:], *items[:k]]


def round_label(i: int, warmup: int) -> str:
    """'warm-up N' or 'run N' for the i-th round."""
    return f"warm-up {i + 1}" if i < warmup else f"run {i + 1 - warmup}"


async def run_command(
    argv: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[float, str]:
    """Run a command to its end: (wall seconds from exec to exit, stdout). BenchError when it
    fails; killed when it runs past `timeout` (or the caller is cancelled)."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return elapsed, out.decode(errors="replace")


# ---------------------------------------------------------------- timed runs: samples and series


@dataclass
class Sample:
    """One timed run of one contender."""

    seconds: float
    nbytes: int
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process group during the run ("other": the machine's busy time that no
    group accounts for, when the probe reports "machine")."""
    parts: dict[str, float] = field(default_factory=dict)
    """Named parts of the time (seconds)."""
    phases: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since the request, progress message), from the op's events."""
    op: Any = None
    """The gswarm op of the run, if any."""
    lines: list[str] = field(default_factory=list)
    """Details worth printing."""

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.nbytes / self.seconds / GB

    @property
    def cpu_share(self) -> float:
        """Every group's CPU as a share of all cores over the run (0..1), "other" left out."""
        return sum(v for k, v in self.cpu.items() if k != "other") / (self.seconds * NCPU)


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

    def cpu_pct(self, group: str) -> float:
        """CPU of a group over all runs, as % of one core."""
        wall = sum(s.seconds for s in self.samples)
        return 100.0 * sum(s.cpu.get(group, 0.0) for s in self.samples) / wall if wall else 0.0

    def max_cpu_pct(self, group: str) -> float:
        """The largest per-run CPU share of a group, as % of one core."""
        return max((100.0 * s.cpu.get(group, 0.0) / s.seconds for s in self.samples), default=0.0)

    def drop(self, warmup: int) -> Series:
        """Forget the first `warmup` runs; returns itself."""
        self.samples = self.samples[warmup:]
        return self

    def line(self, digits: int = 2, width: int = 40) -> str:
        """Median, throughput, every run, and the CPU of each group (% of one core) with the
        busy share of all cores ("other" apart)."""
        runs = ", ".join(f"{s.seconds:.{digits}f}" for s in self.samples)
        groups = sorted({k for s in self.samples for k in s.cpu})
        cpu = ", ".join(f"{g} {self.cpu_pct(g):.0f}%" for g in groups if self.cpu_pct(g) >= 0.5)
        busy = sum(self.cpu_pct(g) for g in groups if g != "other") / NCPU
        return (
            f"  {self.name:<{width}} median {self.median_s:7.{digits}f} s {self.median_gbps:6.2f} GB/s  "
            f"(runs {runs}; CPU {busy:.0f}% of {NCPU} cores: {cpu} [% of one core])"
        )


CpuProbe = Callable[[], dict[str, float]]
"""CPU seconds so far per process group; a "machine" entry (machine_busy_seconds) makes
`timed` report the busy time no group accounts for as "other"."""


async def timed(
    nbytes: int,
    fn: Callable[[Sample], Awaitable[float | None]],
    probe: CpuProbe | None = None,
    sync: bool = True,
) -> Sample:
    """`sync` (untimed, so no run pays for another's dirty pages), then one timed call of `fn`,
    which may fill in the sample and may return its own, inner, duration; the CPU of every
    group `probe` reports is recorded around it."""
    if sync:
        await asyncio.to_thread(os.sync)
    sample = Sample(0.0, nbytes)
    before = probe() if probe is not None else {}
    t0 = time.perf_counter()
    inner = await fn(sample)
    seconds = time.perf_counter() - t0
    after = probe() if probe is not None else {}
    sample.seconds = inner if inner is not None else seconds
    sample.cpu = {k: max(0.0, after[k] - before.get(k, 0.0)) for k in after}
    if "machine" in sample.cpu:
        # Busy time no process of the benchmark accounts for: other users of the machine and
        # kernel threads (writeback among them). Much of it means noisy numbers.
        sample.cpu["other"] = max(0.0, sample.cpu.pop("machine") - sum(sample.cpu.values()))
    return sample


# ---------------------------------------------------------------- files and the page cache

BLOCK = 16 << 20
CONFIG = b'{"architectures": ["PeerBench"], "model_type": "bench"}\n'


def write_model(
    directory: Path, total: int, shards: int, config: bytes = CONFIG, safetensors: bool = False
) -> list[tuple[str, int]]:
    """A model of `total` bytes: `config` as config.json and `shards` files of random bytes
    (written in blocks), each a safetensors file of one U8 tensor if `safetensors`; returns
    (name, size) of every file."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_bytes(config)
    files = [("config.json", len(config))]
    rest = total - len(config)
    per = rest // shards
    for i in range(shards):
        size = per if i < shards - 1 else rest - per * (shards - 1)
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with open(directory / name, "wb") as fh:
            left = size
            if safetensors:
                left -= _safetensors_header(fh, size)
            while left:
                n = min(BLOCK, left)
                fh.write(os.urandom(n))
                left -= n
        files.append((name, size))
    return files


def _safetensors_header(fh: Any, size: int, header_bytes: int = 256) -> int:
    """Write the 8-byte length and a JSON header padded to `header_bytes` for one U8 tensor
    filling the rest of a `size`-byte file; returns the bytes written."""
    body = size - 8 - header_bytes
    if body <= 0:
        raise BenchError(f"shard size {size} too small")
    meta = {
        "__metadata__": {"format": "pt"},
        "weight": {"dtype": "U8", "shape": [body], "data_offsets": [0, body]},
    }
    fh.write(header_bytes.to_bytes(8, "little"))
    fh.write(json.dumps(meta).encode().ljust(header_bytes, b" "))
    return 8 + header_bytes


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


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _LIBC = libc
    return _LIBC


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def cached_bytes(path: Path) -> tuple[int, int]:
    """(bytes of `path` in the page cache, size), read with mincore(2) on a shared mapping."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            resident = sum(b & 1 for b in bytes(vec))
        finally:
            libc.munmap(addr, size)
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


# ---------------------------------------------------------------- report


def fmt_s(x: float) -> str:
    """Seconds, in ms below one second; '-' for NaN."""
    if x != x:
        return "-"
    if x < 0.01:
        return f"{x * 1000:.3f} ms"
    if x < 1:
        return f"{x * 1000:.1f} ms"
    return f"{x:.3f} s"


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A markdown table; the columns numbered in `right` are right-aligned."""
    aligns = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Comparison:
    """One row of a report: gswarm against its anchor on one scenario."""

    scenario: str
    gswarm: str
    anchor: str
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    binding: bool = True
    """Whether the verdict counts towards the exit status."""


def compare(
    scenario: str,
    gswarm_s: float,
    anchor: str,
    anchor_s: float,
    *,
    speedup: bool = True,
    at_least: float | None = None,
    at_most: float | None = None,
    nbytes: int | None = None,
    binding: bool = True,
) -> Comparison:
    """A row from two median times. The ratio is anchor / gswarm (how many times faster gswarm
    is) when `speedup`, else gswarm / anchor (gswarm's time in units of the anchor's); the
    target is ratio >= `at_least` or ratio <= `at_most`. With `nbytes`, throughputs too."""
    ratio = anchor_s / gswarm_s if speedup else gswarm_s / anchor_s
    gs, an = fmt_s(gswarm_s), f"{anchor} {fmt_s(anchor_s)}"
    if nbytes:
        gs += f", {gbps(nbytes, gswarm_s):.2f} GB/s"
        an += f", {gbps(nbytes, anchor_s):.2f} GB/s"
    target, ok = "", None
    if at_least is not None:
        target, ok = f"≥ {at_least:g}×", ratio >= at_least
    elif at_most is not None:
        target, ok = f"≤ {at_most:g}×", ratio <= at_most
    return Comparison(scenario, gs, an, ratio, target, ok, binding)


def absolute(scenario: str, measured: str, target: str, ok: bool) -> Comparison:
    """A row with an absolute target and no anchor (head CPU, memory per agent, ...)."""
    return Comparison(scenario, measured, "", None, target, ok)


def comparison_table(rows: Sequence[Comparison]) -> str:
    """The report table: scenario, gswarm median, anchor median, ratio, target, result."""
    return md_table(
        ("scenario", "gswarm (median)", "anchor (median)", "ratio", "target", "result"),
        (
            (
                r.scenario,
                r.gswarm,
                r.anchor,
                "" if r.ratio is None else f"{r.ratio:.2f}×",
                r.target,
                "" if r.ok is None else verdict(r.ok),
            )
            for r in rows
        ),
        right=(3,),
    )


def all_met(rows: Sequence[Comparison]) -> bool:
    """True when every binding target of the rows is met."""
    return all(r.ok for r in rows if r.ok is not None and r.binding)
