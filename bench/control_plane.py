"""Control-plane benchmark: one real head, N simulated agents, op round trips and idle cost.

    python bench/control_plane.py [--agents 1,100,1000] [--ops 300] [--warmup 20] [--quick]
        [--compression deflate|none] [--profile] [--idle 30] [--baseline 5] [--workers 2]
        [--connect-rate 250] [--seed 1] [--silent]

Scenario, for each N of agents connected (1, then 100, then 1000): the op round trip
`POST /nodes/{id}/probe` (keep-alive session) -> head -> agent (`Accepted`, `Succeeded`) -> head
-> the `op.succeeded` event at a `/ws/events?topic=op` subscriber; sequential probes of random
agents after warm-up ones; p50/p90/p99/max, head CPU and RSS growth per op. Then, with the
largest N connected and idle, heartbeating: head RSS per agent and head CPU.

Anchor: a bare aiohttp websocket echo round trip (harness.py's `echo` role, its own process;
the same count of a 300-byte JSON message), measured at the start and again just before each N,
so each ratio gswarm p50 / echo p50 compares like with like; plus `GET /health` on the head,
the floor of any REST call.

Processes (bench/harness.py): the head through its CLI (`python -m gswarm head`, heartbeat
interval 5 s), the simulated agents (bench/control_plane_agents.py: real websocket clients
connected like `gswarm/agent/session.py`) in `--workers` processes, and the echo server; this
process only measures. `--quick`: 100 ops after 10 warm-up, idle window 8 s, baseline 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from control_plane_agents import grow_agents, head_counters, start_workers, worker_heartbeats
from harness import Cluster, Head, OpWatcher, run_main
from measure import (
    BenchError,
    CpuMeter,
    Latency,
    MachineMeter,
    absolute,
    compare,
    comparison_table,
    machine_line,
    md_table,
    raise_nofile_limit,
)

HEARTBEAT_INTERVAL = 5.0  # the default; the head hands it to the agents in Welcome
ECHO_MESSAGE_BYTES = 300
OP_TIMEOUT = 10.0  # one op round trip that takes longer than this counts as lost

TARGET_P50_RATIO = 2.0
TARGET_P99_MS = 10.0
TARGET_KB_PER_AGENT = 50.0
TARGET_HEARTBEAT_CPU_PCT = 10.0


# ---------------------------------------------------------------- measurements


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
    head: Head,
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
            meter = CpuMeter([head.proc.pid])
        node = rng.choice(nodes)
        t0 = time.perf_counter()
        async with session.post(f"{head.url}/nodes/{node}/probe") as resp:
            body = await resp.read()
        t_post = time.perf_counter()
        if resp.status != 202:
            raise BenchError(f"POST /nodes/{node}/probe: {resp.status} {body[:300]!r}")
        op_id = msgspec.json.decode(body)["op_id"]
        try:
            t1, kind = await watcher.ended(op_id, OP_TIMEOUT)
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


async def http_round_trips(session: aiohttp.ClientSession, head: Head, count: int, warmup: int) -> Latency:
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


# ---------------------------------------------------------------- report


def _ms(x: float) -> str:
    return f"{x:.3f}"


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
    """The results as markdown tables, the report table last."""
    others, steal, load = noise
    out = [
        f"{machine_line()}; aiohttp {aiohttp.__version__}, websockets "
        f"{importlib.metadata.version('websockets')}, msgspec {msgspec.__version__}",
        f"run: agents {args.agents}, {args.ops} ops per N after {args.warmup} warm-up, "
        f"{args.workers} agent worker processes, agent compression {args.compression}, "
        f"heartbeat {HEARTBEAT_INTERVAL:g} s, idle window {args.idle:g} s; {elapsed:.0f} s in all",
        f"machine noise: 1-min load {load:.2f} at start; other processes used {others:.0f} % of a core "
        f"and steal was {steal:.1f} % during the run; agent connections dropped: {drops}",
        "",
        "(a)+(b) round trips in ms, sequential (one in flight at a time)",
        "",
    ]

    def row(what: str, agents: str, lat: Latency, anchor: Latency) -> list[str]:
        ms = [_ms(x) for x in (lat.p50, lat.p90, lat.p99, lat.max, anchor.p50)]
        return [
            what,
            agents,
            str(lat.n),
            *ms,
            f"{lat.p50 / anchor.p50:.2f}",
            f"{lat.p50 / (2 * anchor.p50):.2f}",
        ]

    op = "probe op: POST → agent → `op.succeeded` event"
    rows = [
        row("bare aiohttp ws echo (anchor)", "-", echo, echo),
        row("head `GET /health` (REST floor)", "-", rest, echo),
    ]
    rows += [row(op, str(r.agents), r.latency, r.echo or echo) for r in runs]
    header = [
        "what",
        "agents",
        "n",
        "p50",
        "p90",
        "p99",
        "max",
        "echo p50",
        "p50 / echo p50",
        "p50 / (2 × echo p50)",
    ]
    out += [
        md_table(header, rows, right=range(1, 10)),
        "",
        "Each op row is compared with a bare echo measured just before it (same machine load). "
        "p50 / (2 × echo p50) is the one-hop view: the op round trip crosses 4 one-way hops "
        "(REST request, head→agent, agent→head, head→subscriber), the echo 2.",
        "",
    ]
    detail = [
        ["`POST` answered (202), p50 ms", *(_ms(r.post.p50) for r in runs)],
        ["head CPU per op, µs", *(f"{r.head_cpu_us_per_op:.0f}" for r in runs)],
        ["head RSS growth per op, KB", *(f"{r.rss_kb_per_op:.1f}" for r in runs)],
        ["ops lost / failed", *(f"{r.lost} / {r.failed}" for r in runs)],
    ]
    out.append(
        md_table(["op round trip, detail", *(f"N={r.agents}" for r in runs)], detail, right=range(1, 99))
    )
    grown = zip(connect_seconds.items(), [0, *connect_seconds][:-1], strict=True)
    out.append("agents connected in: " + ", ".join(f"{n - p} more to {n}: {s:.1f} s" for (n, s), p in grown))
    targets = [
        compare(
            f"op p50, N={r.agents}",
            r.latency.p50 / 1e3,
            "bare ws echo p50",
            (r.echo or echo).p50 / 1e3,
            speedup=False,
            at_most=TARGET_P50_RATIO,
        )
        for r in runs
    ]
    targets += [
        absolute(
            f"op p99, N={r.agents}",
            f"{_ms(r.latency.p99)} ms",
            f"≤ {TARGET_P99_MS:g} ms",
            r.latency.p99 <= TARGET_P99_MS and r.lost == 0,
        )
        for r in runs
        if r.agents >= 1000
    ]
    if idle is not None:
        i = idle
        out += ["", f"(c) head with {i.agents} idle agents heartbeating, over {i.window:.0f} s", ""]
        measures = [
            ("head RSS, no agent yet", f"{i.rss0_kb / 1024:.1f} MiB"),
            (f"head RSS, {i.before_agents} agents (before growing)", f"{i.rss_before_kb / 1024:.1f} MiB"),
            (f"head RSS, {i.agents} agents idle", f"{i.rss_kb / 1024:.1f} MiB"),
            ("KB per agent (vs no agent)", f"{i.kb_per_agent:.1f}"),
            (f"KB per agent (marginal, {i.before_agents}→{i.agents})", f"{i.kb_per_agent_marginal:.1f}"),
            ("head CPU, no agent", f"{i.cpu0_pct:.2f} % of a core"),
            (f"head CPU, {i.agents} idle agents", f"{i.cpu_pct:.2f} % of a core"),
            ("heartbeats sent in the window", f"{i.heartbeats} ({i.heartbeats / i.window:.0f}/s)"),
            (
                "agent worker CPU (simulators, not the head)",
                ", ".join(f"{c:.1f} %" for c in i.worker_cpu_pct),
            ),
        ]
        out.append(md_table(("measure", "value"), measures, right=(1,)))
        targets += [
            absolute(
                f"head memory per idle agent, N={i.agents}",
                f"{i.kb_per_agent:.1f} KB",
                f"≤ {TARGET_KB_PER_AGENT:g} KB",
                i.kb_per_agent <= TARGET_KB_PER_AGENT,
            ),
            absolute(
                f"head CPU for the heartbeats of {i.agents} agents",
                f"{i.cpu_pct:.2f} % of a core",
                f"< {TARGET_HEARTBEAT_CPU_PCT:g} %",
                i.cpu_pct < TARGET_HEARTBEAT_CPU_PCT,
            ),
        ]
    out += ["", "targets", "", comparison_table(targets)]
    if not any(r.agents >= 1000 for r in runs) or idle is None or idle.agents < 1000:
        out += ["", "(the p99, memory and CPU targets are defined at 1000 agents; pass --agents ...,1000)"]
    return "\n".join(out)


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
    pstats.Stats(str(path), stream=sys.stdout).sort_stats("tottime").print_stats(top)


# ---------------------------------------------------------------- main


async def bench(args: argparse.Namespace, cluster: Cluster) -> str:
    """Run the whole benchmark; returns the report."""
    started = time.monotonic()
    counts = sorted(set(args.agents))
    rng = random.Random(args.seed)

    def say(text: str) -> None:
        if not args.silent:
            print(text, file=sys.stderr, flush=True)

    machine = MachineMeter()
    machine.track([os.getpid()])
    echo_url = (await cluster.start_anchor("echo")).replace("http://", "ws://", 1) + "/ws"
    profile = ["-m", "cProfile", "-o", str(cluster.root / "head.prof")] if args.profile else []
    head = await cluster.start_head(
        env={"GSWARM_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL)}, python_args=profile
    )
    say(f"head {head.url} pid {head.proc.pid}; echo {echo_url}")
    workers = start_workers(cluster, args.workers, head, args.compression)
    machine.track(cluster.procs.pids)
    headers = {"Authorization": f"Bearer {head.api_token}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30.0)) as session:
        watcher = await cluster.watch(progress=False)
        await head_counters(session, head)
        await asyncio.sleep(1.0)

        say(f"baseline: head with no agent, {args.baseline:g} s")
        meter = CpuMeter([head.proc.pid])
        await asyncio.sleep(args.baseline)
        cpu0 = meter.percent()[0]
        rss0 = head.proc.rss_kb()

        say(f"anchor: {args.ops} bare aiohttp echo round trips")
        echo = await echo_round_trips(session, echo_url, args.ops, args.warmup)
        say(f"REST floor: {args.ops} GET /health round trips")
        rest = await http_round_trips(session, head, args.ops, args.warmup)

        runs: list[OpRun] = []
        connect_seconds: dict[int, float] = {}
        idle: IdleResult | None = None
        current = 0
        for n in counts:
            rss_prev = head.proc.rss_kb()
            prev_n = current
            say(f"connecting agents: {current} -> {n}")
            connect_seconds[n] = await grow_agents(session, head, workers, current, n, args.connect_rate)
            current = n
            if n == counts[-1]:
                settle = min(HEARTBEAT_INTERVAL, args.idle)
                say(f"idle: {n} agents, settle {settle:g} s, measure {args.idle:g} s")
                await asyncio.sleep(settle)
                beats0 = await worker_heartbeats(workers)
                meter = CpuMeter([head.proc.pid] + [w.proc.pid for w in workers])
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
                    rss_kb=head.proc.rss_kb(),
                    cpu_pct=pcts[0],
                    worker_cpu_pct=pcts[1:],
                    heartbeats=beats,
                )
            nodes = [node_id for w in workers for node_id in w.ids]
            say(f"ops: {args.warmup} warm-up + {args.ops} probes with {n} agents")
            echo_now = await echo_round_trips(session, echo_url, args.ops, args.warmup)
            rss_a = head.proc.rss_kb()
            run = await op_round_trips(session, head, watcher, nodes, args.ops, args.warmup, rng)
            run.echo = echo_now
            run.rss_kb_per_op = (head.proc.rss_kb() - rss_a) / (args.ops + args.warmup)
            runs.append(run)
            say(f"  p50 {run.latency.p50:.3f} ms, p99 {run.latency.p99:.3f} ms")

        stats = [await w.call({"cmd": "stats"}, 10.0) for w in workers]
        drops = sum(s["drops"] for s in stats)
        if drops:
            say(f"warning: {drops} agent connections dropped: {[s['errors'] for s in stats]}")
        others, steal = machine.others_percent()
    noise = (others, steal, machine.load_start)
    return report(args, echo, rest, runs, idle, connect_seconds, time.monotonic() - started, noise, drops)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report (and the head's profile with --profile)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    raise_nofile_limit(max(4096, 2 * max(args.agents) + 1024))
    with tempfile.TemporaryDirectory(prefix="gswarm-bench-", ignore_cleanup_errors=True) as tmpdir:
        tmp = Path(tmpdir)
        text: list[str] = []

        async def amain() -> int:
            async with Cluster(tmp) as cluster:
                text.append(await bench(args, cluster))
            return 0

        rc = run_main(amain, error_rc=1)
        if text:
            print(text[0])
            if args.profile:
                print_profile(tmp / "head.prof")
    return rc


if __name__ == "__main__":
    sys.exit(main())
