"""Serving benchmark: time from `serve` to the first completion per tier, tokens/s with 1 and 8
concurrent clients, and load throughput.

    python bench/serve.py [--size small|medium|large] [--runs 3] [--tokens 32] [--requests 2]
                          [--threads N] [--no-cuda] [--json FILE] [--quick]

Scenarios and anchors, all in one run on this machine:

(a) time to first completion: from `POST /serve` (`client.serve(..., wait=False)`) until the
    first `POST /v1/completions` (max_tokens 1) on the new server answers 200, polled every
    50 ms, for the builtin backend on `n1:disk` with the page cache evicted (`fdatasync` +
    `posix_fadvise(DONTNEED)`, checked with `mincore`), `n1:disk` page-cached, `n1:dram`
    (tmpfs), and `n1:gpu0` (a simulated GPU: host memory, the real GPU code path) after an
    explicit, untimed `load`. The service is stopped after each run; each round runs the four
    in that order; medians over `--runs` rounds. Anchor: the same steps as a worker's (process
    start + `import torch`, weight load, `import transformers` + model module, tokenizer,
    gswarm's `build_model`, a transformers `generate` of one token) replayed one by one in a
    fresh process on the dram copy.
(b) `load` dram -> simulated gpu0: bytes / seconds of the op (accepted -> succeeded) and as
    the client sees it (REST call with `wait=true`). Anchor: `safetensors.torch.load_file(path,
    device="cpu")` of the same file from dram in a fresh process (only the call is timed); for
    scale, reading every weight once after it, and one plain copy of the file into a
    preallocated buffer (`readinto`). The first load (it starts the gpu0 worker) apart.
(d) tokens/s: the builtin backend on `n1:gpu0` (loaded, served, one warm-up completion), then
    1 and 8 clients at once, each sending `--requests` plain `POST /v1/completions` one after
    another (`max_tokens` `--tokens`, temperature 0, the same prompt); tokens/s = the answers'
    `usage.completion_tokens` over the wall time from the first request to the last answer.
    Anchor, in the same round: the same model driven directly with transformers `generate` in one
    fresh process (`from_pretrained` from the dram copy; 1 client = one prompt a call, 8 clients
    = a batch of 8 prompts a call, `--requests` calls each, after a warm-up call).
    `--threads N` sets OMP_NUM_THREADS for every process of the run (the workers and the anchor
    alike); on a small machine shared with other work, torch's two-thread default spends much of
    its time waiting at barriers for a descheduled thread, which swamps what is measured.
(c) with CUDA (`torch.cuda.is_available()` in this Python): dram -> real gpu0 `load` in GB/s (a
    second agent without `--simulate-gpus`) against torch's pinned host-to-device copy rate
    (target >= 0.8x), `load_file(device="cuda")` in a fresh process (target >= 2x) and, in a
    fresh process too, `load_file(device="cpu")` followed by `.to("cuda")` per tensor; without
    CUDA it prints "skipped: no CUDA".

The model is a random Llama-architecture checkpoint with a small BPE tokenizer, generated offline
in a subprocess: `small` (~13 MB), `medium` (~410 MB fp32) or `large` (~1.6 GB bf16, meant for
GPU machines). `--quick`: the small model, 1 round, 16 tokens, 1 request a client, no CUDA section (a smoke
test). Processes
(bench/harness.py): the head and agents through the CLI on 127.0.0.1 (gswarm binds the agents'
data servers and builtin servers to 0.0.0.0, which this script cannot change), with temporary
state, disk and dram directories; everything is removed and every process stopped (with the
worker processes the agents started) at the end. This process never imports torch: everything
that does runs in a subprocess (bench/serve_roles.py). Needs torch, safetensors and
transformers (`tox -e serve`'s packages).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from harness import HOST, Cluster, check_op, log, op_seconds, run_main, run_op, wait_op
from measure import (
    BenchError,
    Comparison,
    cached_fraction,
    children_cpu,
    comparison_table,
    cpu_model,
    evict,
    gbps,
    machine_busy_seconds,
    median,
    read_all,
    read_rate,
    run_command,
    self_cpu,
)
from serve_roles import PROMPT, SIZES

from gswarm.client import GswarmClient

ROLES = str(Path(__file__).resolve().parent / "serve_roles.py")
MODEL = "bench-llm"
POLL = 0.05  # seconds between completion attempts
SERVE_TIMEOUT = 300.0  # one serve, until its first completion
OP_TIMEOUT = 600.0  # one download or load
ROLE_TIMEOUT = 600.0  # one helper subprocess
TARGET_PINNED = 0.8
TARGET_LOAD_FILE = 2.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def run_role(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run `serve_roles.py ROLE ARGS` in a fresh process; its last stdout line, parsed as JSON."""
    _, out = await run_command([sys.executable, ROLES, *args], ROLE_TIMEOUT, env)
    lines = out.strip().splitlines()
    if not lines:
        raise BenchError(f"{args[0]} printed nothing")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def timed_phases(env: dict[str, str], model_dir: Path) -> dict[str, float]:
    """The worker's steps replayed in a fresh process; this one times start + `import torch`."""
    t0 = time.perf_counter()
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        sys.executable, ROLES, "_phases", str(model_dir), stdout=pipe, stderr=pipe, env=env
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), ROLE_TIMEOUT)
        started = time.perf_counter() - t0
        out, err = await asyncio.wait_for(proc.communicate(), ROLE_TIMEOUT)
    finally:
        if proc.returncode is None:
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
class ThroughputSample:
    """Clients completing at once against one server (or the anchor's calls), one level."""

    who: str  # "gswarm" (the builtin server) or "anchor" (transformers generate)
    clients: int
    requests: int  # completions answered
    tokens: int  # completion tokens generated
    seconds: float  # first request sent -> last answer
    latencies: list[float] = field(default_factory=list)  # per request (per call for the anchor)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second, all clients together."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


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
    throughput: list[ThroughputSample] = field(default_factory=list)
    cuda: dict[str, Any] = field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, Python and library versions, date."""

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / (1 << 30), 1),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("torch", "transformers", "safetensors", "gswarm")},
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "bench/serve.py", *sys.argv[1:]]),
    }


# ---------------------------------------------------------------- measurements


async def timed_load(client: GswarmClient, device: str) -> LoadSample:
    """One `load` onto `device` (dram is the fastest copy), timed."""
    op, wall = await run_op(client.load(MODEL, device, wait=True), f"load {device}", OP_TIMEOUT)
    assert op.result is not None
    return LoadSample(int(getattr(op.result, "size", 0)), op_seconds(op), wall)


async def unload(client: GswarmClient, device: str) -> None:
    """Free a model's GPU memory."""
    check_op(await client.delete_location(MODEL, device, wait=True), f"unload {device}")


async def first_completion(client: GswarmClient, mode: str, device: str) -> ServeSample:
    """POST /serve, then poll /v1/completions every 50 ms until it answers 200; stop the service."""
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
                    timeout = aiohttp.ClientTimeout(total=max(1.0, deadline - time.monotonic()))
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
                    if op.terminal:
                        check_op(op, f"serve {device}")
                if time.monotonic() > deadline:
                    raise BenchError(f"serve {device}: no completion within {SERVE_TIMEOUT:g} s ({last})")
                await asyncio.sleep(POLL)
            op = await wait_op(client, op.op_id, f"serve {device}", SERVE_TIMEOUT)
        finally:
            try:
                await asyncio.shield(client.stop_service(MODEL, device, wait=True))
            except Exception as exc:  # keep the first error
                log(f"stopping the {device} service: {exc}")
    return ServeSample(mode, device, ttfc, (op.finished_at or op.created_at) - op.created_at, attempts)


CLIENT_LEVELS = (1, 8)


async def completions_at_once(url: str, clients: int, requests: int, tokens: int) -> ThroughputSample:
    """`clients` clients at once, each sending `requests` plain completions one after another."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    latencies: list[float] = []
    generated = 0
    timeout = aiohttp.ClientTimeout(total=SERVE_TIMEOUT)

    async def one_client(http: aiohttp.ClientSession) -> None:
        nonlocal generated
        for _ in range(requests):
            t = time.perf_counter()
            async with http.post(url, json=body, timeout=timeout) as r:
                text = await r.text()
                if r.status != 200:
                    raise BenchError(f"completion: HTTP {r.status}: {text[:300]}")
            latencies.append(time.perf_counter() - t)
            usage = json.loads(text).get("usage") or {}
            if "completion_tokens" not in usage:
                raise BenchError(f"a completion without usage.completion_tokens: {text[:300]}")
            generated += int(usage["completion_tokens"])

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(http) for _ in range(clients)))
        seconds = time.perf_counter() - t0
    return ThroughputSample("gswarm", clients, clients * requests, generated, seconds, latencies)


async def bench_throughput(args: argparse.Namespace, res: Results, cluster: Cluster, model_dir: Path) -> None:
    """Tokens/s of the builtin server on n1:gpu0 with 1 and 8 clients, then the anchor's."""
    client = cluster.client
    device = "n1:gpu0"
    await run_op(client.load(MODEL, device, wait=True), f"load {device}", OP_TIMEOUT)
    port = free_port()
    await run_op(client.serve(MODEL, device, port, wait=True), f"serve {device}", SERVE_TIMEOUT)
    url = f"http://{HOST}:{port}/v1/completions"
    try:
        await completions_at_once(url, 1, 1, args.tokens)  # warm-up
        for clients in CLIENT_LEVELS:
            log(f"  {clients} client(s) x {args.requests} completions of {args.tokens} tokens")
            res.throughput.append(await completions_at_once(url, clients, args.requests, args.tokens))
    finally:
        try:
            await asyncio.shield(client.stop_service(MODEL, device, wait=True))
        except Exception as exc:  # keep the first error
            log(f"stopping the {device} service: {exc}")
    levels = ",".join(str(c) for c in CLIENT_LEVELS)
    log("  anchor: transformers generate in one process")
    anchor = await run_role(
        cluster.env, "_generate", str(model_dir), str(args.tokens), str(args.requests), levels
    )
    for lv in anchor["levels"]:
        res.throughput.append(
            ThroughputSample(
                "anchor", lv["clients"], lv["requests"], lv["tokens"], lv["seconds"], lv["latencies"]
            )
        )


async def bench(args: argparse.Namespace, res: Results, cluster: Cluster, dram_root: Path) -> None:
    """Everything, in the cluster's directories."""
    env, root = cluster.env, cluster.root
    src = root / "model-src"
    log(f"generating the {args.size} model")
    t0 = time.perf_counter()
    res.model = await run_role(env, "_make", str(src), args.size)
    res.setup["generate model"] = time.perf_counter() - t0
    size = int(res.model["file_bytes"])
    log(f"model: {res.model['params'] / 1e6:.1f} M params, {size / 1e6:.1f} MB ({res.model['dtype']})")

    await cluster.start_head()
    client = cluster.client
    sim = f"1:{max(8 << 30, 2 * size) >> 20}M"
    agent_args = ("--simulate-gpus", sim, "--allow-file-root", str(src))
    disk, dram = (await cluster.start_agents(["n1"], root, dram_root, *agent_args))["n1"]
    for tier in ("disk", "dram"):
        t0 = time.perf_counter()
        call = client.download(MODEL, f"file://{src}", f"n1:{tier}", model_type="llm", wait=True)
        await run_op(call, f"download to n1:{tier}", OP_TIMEOUT)
        res.setup[f"download file:// -> n1:{tier}"] = time.perf_counter() - t0
    disk_copy, dram_copy = disk / MODEL, dram / MODEL
    dram_file = dram_copy / "model.safetensors"
    await asyncio.to_thread(evict, disk_copy)  # the first read is cold, the second cached
    for name, path in (("disk, evicted", disk_copy), ("disk, page-cached", disk_copy), ("dram", dram_copy)):
        secs, n = await asyncio.to_thread(read_rate, path / "model.safetensors")
        res.reads[name] = gbps(n, secs)

    log("first load onto n1:gpu0 (starts the gpu0 worker)")
    res.first_load = await timed_load(client, "n1:gpu0")
    await unload(client, "n1:gpu0")

    for r in range(args.runs):
        for mode, prepare in (("disk, page cache evicted", evict), ("disk, page-cached", read_all)):
            log(f"round {r + 1}/{args.runs}: {mode}")
            prepare(disk_copy)
            before = cached_fraction(disk_copy)
            s = await first_completion(client, mode, "n1:disk")
            s.cached_before, s.cached_after = before, cached_fraction(disk_copy)
            res.serves.append(s)

        log(f"round {r + 1}/{args.runs}: dram")
        res.serves.append(await first_completion(client, "dram (tmpfs)", "n1:dram"))

        log(f"round {r + 1}/{args.runs}: load + gpu0 (simulated)")
        res.loads.append(await timed_load(client, "n1:gpu0"))
        res.serves.append(await first_completion(client, "gpu0 (simulated), after load", "n1:gpu0"))

        log(f"round {r + 1}/{args.runs}: anchors")
        res.anchor_cpu.append(await run_role(env, "_anchor", str(dram_file), "cpu"))
        res.phases.append(await timed_phases(env, dram_copy))

        log(f"round {r + 1}/{args.runs}: tokens/s, gpu0 (simulated) and the generate anchor")
        await bench_throughput(args, res, cluster, dram_copy)

    if args.no_cuda:
        res.cuda = {"skipped": "--no-cuda"}
    else:
        await bench_cuda(args, res, cluster, dram_root, src)


async def bench_cuda(
    args: argparse.Namespace, res: Results, cluster: Cluster, dram_root: Path, src: Path
) -> None:
    """dram -> real gpu0 loads against pinned host-to-device copies and `load_file("cuda")`."""
    env, client = cluster.env, cluster.client
    check = await run_role(env, "_cuda_check")
    if not check["available"]:
        res.cuda = {"skipped": f"no CUDA (torch {check['torch']}: torch.cuda.is_available() is False)"}
        log(f"cuda: skipped: {res.cuda['skipped']}")
        return
    res.cuda["device_name"] = check["name"]
    log(f"cuda: {check['name']}; starting agent n2 without --simulate-gpus")
    _, dram = (await cluster.start_agents(["n2"], cluster.root, dram_root, "--allow-file-root", str(src)))[
        "n2"
    ]
    if not (await client.get_node("n2")).inventory.gpus:
        res.cuda = {"skipped": "CUDA works, but agent n2 reports no GPUs (nvidia-ml-py / NVML missing?)"}
        return
    call = client.download(MODEL, f"file://{src}", "n2:dram", model_type="llm", wait=True)
    await run_op(call, "download to n2:dram", OP_TIMEOUT)
    dram_file = dram / MODEL / "model.safetensors"
    size = dram_file.stat().st_size
    first = await timed_load(client, "n2:gpu0")
    await unload(client, "n2:gpu0")
    loads: list[LoadSample] = []
    h2d: list[dict[str, float]] = []
    load_file: list[dict[str, float]] = []
    via_cpu: list[dict[str, float]] = []
    for r in range(args.runs):
        log(f"cuda round {r + 1}/{args.runs}")
        loads.append(await timed_load(client, "n2:gpu0"))
        await unload(client, "n2:gpu0")
        load_file.append(await run_role(env, "_anchor", str(dram_file), "cuda"))
        via_cpu.append(await run_role(env, "_anchor", str(dram_file), "cpu-to-cuda"))
        h2d.append(await run_role(env, "_h2d", str(max(size, 256 << 20))))
    res.cuda.update(
        {
            "first_load": asdict(first),
            "loads": [asdict(s) for s in loads],
            "gswarm_gbps": median([s.op_gbps for s in loads]),
            "gswarm_wall_gbps": median([s.wall_gbps for s in loads]),
            "pinned_gbps": median([h["pinned_gbps"] for h in h2d]),
            "pageable_gbps": median([h["pageable_gbps"] for h in h2d]),
            "load_file_gbps": median([gbps(a["bytes"], a["seconds"]) for a in load_file]),
            "via_cpu_gbps": median([gbps(a["bytes"], a["seconds"]) for a in via_cpu]),
            "h2d": h2d,
            "load_file": load_file,
            "via_cpu": via_cpu,
        }
    )


# ---------------------------------------------------------------- report


def _fmt(x: float, unit: str = "s") -> str:
    if x != x:  # NaN
        return "-"
    if unit == "s" and x < 1:
        return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"
    return f"{x:.2f} {unit}"


def level_rates(res: Results, clients: int) -> tuple[float, float]:
    """Median tokens/s of gswarm and of the anchor at one level of clients."""
    ours = [s.tokens_per_s for s in res.throughput if s.who == "gswarm" and s.clients == clients]
    anchor = [s.tokens_per_s for s in res.throughput if s.who == "anchor" and s.clients == clients]
    return median(ours), median(anchor)


def throughput_report(res: Results, args: argparse.Namespace) -> list[str]:
    """The tokens/s table: gswarm's builtin server beside transformers `generate`."""
    if not res.throughput:
        return []
    out = [
        f"Tokens/s: the builtin backend on n1:gpu0 (simulated: the CPU), N clients at once, each "
        f"sending {args.requests} plain `POST /v1/completions` one after another (max_tokens "
        f"{args.tokens}, temperature 0, one prompt), after one warm-up completion; tokens are the "
        "answers' `usage.completion_tokens`. Anchor: the same model with transformers `generate` "
        "in one process (from the dram copy; N prompts as one batch a call, the same number of "
        f"completions). Medians of {args.runs} round{'s' if args.runs > 1 else ''}.\n",
        "| clients | gswarm tokens/s | request latency (median) | anchor tokens/s | anchor call "
        "(median) | gswarm / anchor | samples (gswarm tok/s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for clients in CLIENT_LEVELS:
        ours, anchor = level_rates(res, clients)
        mine = [s for s in res.throughput if s.who == "gswarm" and s.clients == clients]
        theirs = [s for s in res.throughput if s.who == "anchor" and s.clients == clients]
        lat = median([x for s in mine for x in s.latencies])
        call = median([x for s in theirs for x in s.latencies])
        tokens = sorted({s.tokens // max(1, s.requests) for s in mine + theirs})
        out.append(
            f"| {clients} | **{ours:.1f}** | {_fmt(lat)} | {anchor:.1f} | {_fmt(call)} | "
            f"{ours / anchor:.2f}x | {', '.join(f'{s.tokens_per_s:.1f}' for s in mine)} |"
        )
        if len(tokens) > 1:
            out.append(f"| | (tokens per completion differ: {tokens}) | | | | | |")
    out.append("")
    return out


def report(res: Results, args: argparse.Namespace) -> str:
    """The results as markdown, ready for bench/README.md; the report table last."""
    m, mod = res.machine, res.model
    out = [
        f"### Serving: time to first completion and load throughput ({m['date']})\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"safetensors {m['safetensors']}; OMP_NUM_THREADS {m.get('omp_num_threads', '-')}; "
        f"dram dir on {m['dram_dir_fs']}; "
        f"GPU: {res.cuda.get('device_name') or 'none'}. In the serve table gpu0 is a simulated GPU "
        "(host memory, the real GPU code path).\n",
        f"Command: `{m['command']}`\n",
    ]
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
    for mode in dict.fromkeys(s.mode for s in res.serves):
        ss = [s for s in res.serves if s.mode == mode]
        cached = [s.cached_before for s in ss if s.cached_before is not None]
        resident = "n/a (resident)" if ss[0].device.split(":")[1].startswith("gpu") else "n/a (tmpfs)"
        cached_s = f"{100 * median(cached):.0f} %" if cached else resident
        out.append(
            f"| {ss[0].device} — {mode} | **{_fmt(median([s.ttfc for s in ss]))}** | "
            f"{_fmt(median([s.serve_op for s in ss]))} | {cached_s} | "
            f"{', '.join(f'{s.ttfc:.2f}' for s in ss)} |"
        )
    out.append("")
    if any(s.mode.startswith("disk, page cache") for s in res.serves):
        out.append(
            "Disk eviction: before each evicted run every file of the disk copy got `fdatasync` + "
            "`posix_fadvise(POSIX_FADV_DONTNEED)`; the page-cached fraction is measured with "
            "`mincore(2)` right before `POST /serve`.\n"
        )

    out += throughput_report(res, args)
    out.append("Load dram -> simulated gpu0 (the `load` op, untimed in the table above):\n")
    out.append("| what | median time | median throughput | samples (GB/s) |")
    out.append("| --- | ---: | ---: | --- |")
    anchor = [gbps(a["bytes"], a["seconds"]) for a in res.anchor_cpu]
    copies = [gbps(a["copy_bytes"], a["copy_seconds"]) for a in res.anchor_cpu]
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
         [a["copy_seconds"] for a in res.anchor_cpu], copies),
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
    load_gbps = median([s.op_gbps for s in res.loads])
    ratio = load_gbps / median(anchor) if anchor else float("nan")
    out.append(f"\nRatio gswarm load / anchor (`load_file`): **{ratio:.2f}x**.\n")
    if load_gbps > median(copies):
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

    dram = median([s.ttfc for s in res.serves if s.device.endswith(":dram")])
    steps = float("nan")
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
        steps = median([sum(p[k] for k in total_keys) for p in res.phases])
        out.append(
            f"| **sum of the steps above** (without the parenthesised ones) | **{_fmt(steps)}** |\n"
            f"| measured: dram time to first completion | {_fmt(dram)} |\n"
        )

    table = [
        Comparison(
            "serve on n1:dram, to the first completion",
            _fmt(dram),
            f"the worker's steps replayed (transformers `generate`) {_fmt(steps)}",
            dram / steps,
        ),
        Comparison(
            "load dram → simulated gpu0 (GB/s)",
            _fmt(load_gbps, "GB/s"),
            f'`load_file(device="cpu")` {_fmt(median(anchor), "GB/s")}',
            ratio,
        ),
        Comparison(
            "same load (GB/s)",
            _fmt(load_gbps, "GB/s"),
            f"one `readinto` copy {_fmt(median(copies), 'GB/s')}",
            load_gbps / median(copies),
        ),
    ]
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
        vc = c["via_cpu_gbps"]
        out.append(
            f'| `load_file(device="cpu")` + `.to("cuda")` per tensor, fresh process | {vc:.2f} | '
            f"gswarm/this {g / vc:.2f}x | |"
        )
        out.append("")
        table += [
            Comparison(
                "load dram → gpu0, CUDA (GB/s)",
                f"{g:.2f} GB/s",
                f"torch pinned H2D copy {pin:.2f} GB/s",
                g / pin,
                f"≥ {TARGET_PINNED}×",
                g / pin >= TARGET_PINNED,
            ),
            Comparison(
                "same load (GB/s)",
                f"{g:.2f} GB/s",
                f'`load_file(device="cuda")` {lf:.2f} GB/s',
                g / lf,
                f"≥ {TARGET_LOAD_FILE}×",
                g / lf >= TARGET_LOAD_FILE,
            ),
        ]
    for clients in CLIENT_LEVELS:
        ours, anchor_tps = level_rates(res, clients)
        table.append(
            Comparison(
                f"tokens/s, {clients} client{'s' if clients > 1 else ''} at once (builtin, gpu0 simulated)",
                f"{ours:.1f} tok/s",
                f"transformers `generate` {'batch of ' + str(clients) if clients > 1 else 'one prompt'}, "
                f"one process {anchor_tps:.1f} tok/s",
                ours / anchor_tps,
            )
        )
    setup = ", ".join(f"{k} {v:.1f} s" for k, v in res.setup.items())
    out.append(f"Setup (not part of the results): {setup}.\n")
    out.append("Ratios: time / anchor's time for the serve, throughput / anchor's throughput for loads.\n")
    out.append(comparison_table(table))
    return "\n".join(out)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the benchmark, print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium", help="model size [medium]")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported [3]")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens a completion [32]")
    parser.add_argument("--requests", type=int, default=2, help="completions a client [2]")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every process [torch's default]")
    parser.add_argument("--no-cuda", action="store_true", help="skip the real-GPU section")
    parser.add_argument("--json", type=Path, help="also write every sample to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke test: --size small --runs 1 --no-cuda")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.runs, args.no_cuda, args.tokens, args.requests = "small", 1, True, 16, 1
    if args.tokens < 1 or args.requests < 1:
        parser.error("--tokens and --requests must be at least 1")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every child inherits it
    res = Results(machine=machine_info())
    res.machine["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS", "torch's default")
    dram_parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    res.machine["dram_dir_fs"] = "tmpfs (/dev/shm)" if dram_parent else "not tmpfs (no /dev/shm)"
    with (
        tempfile.TemporaryDirectory(prefix="gswarm-bench-serve-", ignore_cleanup_errors=True) as tmp,
        tempfile.TemporaryDirectory(
            prefix="gswarm-bench-serve-", dir=dram_parent, ignore_cleanup_errors=True
        ) as shm,
    ):
        wall0, busy0 = time.monotonic(), machine_busy_seconds()
        own0 = self_cpu() + children_cpu()  # this process and every child it has waited for

        async def amain() -> int:
            async with Cluster(Path(tmp), client_timeout=60, stop_grace=20.0) as cluster:
                await bench(args, res, cluster, Path(shm))
            return 0

        rc = run_main(amain, error_rc=1)
        wall = time.monotonic() - wall0
        others = machine_busy_seconds() - busy0 - (self_cpu() + children_cpu() - own0)
        res.machine["others_cpu_percent"] = max(0.0, 100 * others / wall / (os.cpu_count() or 1))
    if rc == 0:
        print(report(res, args))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(res), indent=2, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
