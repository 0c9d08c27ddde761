"""Peer benchmark: node-to-node copies against curl from a plain file server, and replication
to many agents against separate Hub downloads, all on loopback.

    python bench/peer_copy.py [--copy-gib 2] [--repl-gib 1] [--agents 8] [--cap 100M] [--runs 3]
                              [--repl-runs N] [--warmup 1] [--quick] [--skip-copy] [--skip-repl]
                              [--tmp-dir DIR]

Scenarios and anchors, all in one run on this machine:

(a) copy between two agents: a model of 8 random shards and a config.json is seeded onto node
    n1's disk tier by a gswarm download from `file://` (not timed); then, round by round,
    `POST /copy?wait=true` n1:disk -> n2:disk (end to end: manifest, transfer over n1's data
    server, sha256 verification, publish; the n2 copy is deleted between runs, not timed)
    against the anchor `curl` fetching the same files (n1's published copy) from a plain file
    server on loopback (harness.py's `files` role: aiohttp `FileResponse`, sendfile, the same
    machinery as gswarm's data server without the grant check) into a fresh directory on the
    same disk, once sequentially and once with `--parallel --parallel-max 8`. `sync` (not
    timed) before every timed run; the source stays in the page cache. The order of the three
    rotates from round to round (see bench/README.md for why it matters).
(b) replication: N agents, each with its own disk tier and `--data-bandwidth CAP`, and the test
    Hub server (`tests/hubserver.py --rate-limit CAP`), so every uplink has the same cap and
    the Hub link is the bottleneck. A = a `POST /download?wait=true` from the Hub onto n1,
    then `POST /replicate?wait=true` to n1..nN:disk with `max_fanout` F (timed together and
    apart, F = 1 and 2); A' = the download and the replicate started together (fanout 1).
    Anchor B = N separate downloads from the Hub at once (`prefer_peer: false`, fresh model
    names), until the last finishes. Ratios A/B and A'/B, with the replicate op's per-target
    results and two bandwidth-only references: hop by hop (a target serves only once complete)
    and pipelined (a target serves what it has while it receives, as gswarm does).
(c) CPU: utime + stime of every process (head, agents, Hub or file server, curl) around each
    timed run, as a share of all the machine's cores, to tell a CPU limit from a wire limit.

`--cap` accepts 100M (10^6), 100MiB (2^20), 1G... and is passed to both servers as a plain byte
count. `--quick`: 0.25 GiB, 0.125 GiB at 50M, 1 run, no warm-up (a smoke test). Processes
(bench/harness.py): head, agents, Hub and file servers through their command lines on
127.0.0.1; everything written lives in one temporary directory, removed at the end. Exit
status: 0 all targets met, 1 one missed, 2 the benchmark failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from harness import HOST, Cluster, bench_env, check_op, gswarm_version, log, run_main, run_op, wait_op
from measure import (
    GB,
    GIB,
    NCPU,
    BenchError,
    Comparison,
    Sample,
    Series,
    all_met,
    children_cpu,
    compare,
    comparison_table,
    machine_line,
    read_all,
    rotate,
    round_label,
    run_command,
    timed,
    tree_bytes,
    write_model,
)

from gswarm.ops import TargetOutcome

REPO_ID = "bench/peer-model"
COPY_SHARDS = 8
REPL_SHARDS = 4
CURL_PARALLEL = 8
TARGET_COPY_RATIO = 0.9
TARGET_REPL_RATIO = 0.4

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


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


class PeerBench:
    """The temporary directory, the environment and the cluster of the moment."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.env = bench_env(tmp)
        self.cluster: Cluster | None = None

    def probe(self) -> dict[str, float]:
        """CPU seconds so far per process group (plus `curl`: reaped children)."""
        assert self.cluster is not None
        return {"curl": children_cpu(), **self.cluster.procs.cpu_by_group()}

    async def timed(self, nbytes: int, fn: Callable[[Sample], Awaitable[None]]) -> Sample:
        """`sync`, then one timed call of `fn` with every process's CPU recorded around it."""
        return await timed(nbytes, fn, self.probe)

    async def start_nodes(self, cluster: Cluster, agents: int, hub_url: str, cap: int | None) -> None:
        """A head and agents n1..nN (disk tiers under the cluster's root), all online, and a watcher."""
        self.cluster = cluster
        await cluster.start_head()
        args = ["--data-bandwidth", str(cap)] if cap else []
        # The seeding downloads read their file:// sources there (nothing else).
        for src in ("copy-src", "repl-src"):
            args += ["--allow-file-root", str(self.tmp / src)]
        nodes = [f"n{i}" for i in range(1, agents + 1)]
        root = cluster.root
        await cluster.start_agents(nodes, root, root, *args, env={"HF_ENDPOINT": hub_url}, data_url=True)
        await cluster.watch(progress=True)

    def op_timeout(self, nbytes: int, rate: float) -> float:
        """A generous bound for an op moving `nbytes` at `rate` bytes/s."""
        return 120.0 + 4.0 * nbytes / rate

    # ------------------------------------------------------------ (a) copy between two agents

    async def copy_bench(self) -> tuple[Series, Series, Series, int]:
        """gswarm n1:disk -> n2:disk against curl (sequential and parallel) from a file server."""
        args = self.args
        nbytes = int(args.copy_gib * GIB)
        src = self.tmp / "copy-src"
        t0 = time.perf_counter()
        files = await asyncio.to_thread(write_model, src, nbytes, COPY_SHARDS)
        log(f"(a) {nbytes / GIB:.2f} GiB in {len(files)} files written in {time.perf_counter() - t0:.1f} s")
        async with Cluster(self.tmp / "a", self.env) as cluster:
            await self.start_nodes(cluster, 2, f"http://{HOST}:9", None)
            client, watcher = cluster.client, cluster.watcher
            assert watcher is not None
            model = "peer-copy"
            seed = check_op(
                await client.download(model, f"file://{src}", "n1:disk", wait=True), "seeding n1:disk"
            )
            held = Path(str(getattr(seed.result, "path", "")))
            await asyncio.to_thread(shutil.rmtree, src)
            await asyncio.to_thread(read_all, held)
            url = await cluster.start_anchor("files", str(held))
            log(f"(a) seeded n1:disk; file server {url} serves the same files")
            timeout = self.op_timeout(nbytes, 50e6)
            gs = Series("gswarm copy n1:disk -> n2:disk")
            seq = Series("curl, sequential")
            par = Series(f"curl --parallel (max {CURL_PARALLEL})")

            async def gswarm_copy(sample: Sample) -> None:
                sample.op, _ = await run_op(
                    client.copy(model, "n1:disk", "n2:disk", wait=True), "gswarm copy", timeout
                )

            async def run_gswarm(round_no: int) -> None:
                sample = await self.timed(nbytes, gswarm_copy)
                size = int(getattr(sample.op.result, "size", -1))
                if size != nbytes:
                    raise BenchError(f"the copy reports {size} bytes, expected {nbytes}")
                await asyncio.sleep(0.3)  # the last progress events
                transfer, verify = watcher.fetch_parts(sample.op)
                sample.parts = {"transfer": transfer, "verify": verify}
                gs.samples.append(sample)
                check_op(await client.delete_location(model, "n2:disk", wait=True), "deleting n2:disk")

            async def run_curl(series: Series, parallel: bool, round_no: int) -> None:
                dest = self.tmp / f"curl-{round_no}"
                dest.mkdir()
                argv = ["curl", "-s", "-f", "--noproxy", "*"]
                if parallel:
                    argv += ["--parallel", "--parallel-max", str(CURL_PARALLEL)]
                for name, _ in files:
                    argv += ["-o", str(dest / name), f"{url}/{name}"]

                async def curl(sample: Sample) -> None:
                    await run_command(argv, timeout)

                series.samples.append(await self.timed(nbytes, curl))
                got = await asyncio.to_thread(tree_bytes, dest)
                if got != nbytes:
                    raise BenchError(f"{series.name} wrote {got} bytes, expected {nbytes}")
                await asyncio.to_thread(shutil.rmtree, dest)

            contenders: list[Callable[[int], Awaitable[None]]] = [
                run_gswarm,
                lambda i: run_curl(seq, False, i),
                lambda i: run_curl(par, True, i),
            ]
            for i in range(args.warmup + args.runs):
                # Each round rotates who goes first: what ran just before (and freed its 2 GiB of
                # page cache) changes what the next writer pays for fresh memory on this VM.
                for run in rotate(contenders, i):
                    await run(i)
                parts = gs.samples[-1].parts
                log(
                    f"(a) {round_label(i, args.warmup)}: gswarm {gs.samples[-1].gbps:.2f} GB/s (transfer "
                    f"{parts['transfer']:.2f} s, verify {parts['verify']:.2f} s), curl "
                    f"{seq.samples[-1].gbps:.2f}, curl --parallel {par.samples[-1].gbps:.2f} GB/s"
                )
        return gs.drop(args.warmup), seq.drop(args.warmup), par.drop(args.warmup), nbytes

    # ------------------------------------------------------------ (b) replication

    async def repl_bench(self) -> tuple[list[tuple[int, Series]], Series, Series, int]:
        """Download to n1 + replicate to n1..nN (per fanout), and both at once, against N Hub
        downloads at once."""
        args = self.args
        nbytes = int(args.repl_gib * GIB)
        n = args.agents
        src = self.tmp / "repl-src"
        t0 = time.perf_counter()
        await asyncio.to_thread(write_model, src, nbytes, REPL_SHARDS)
        log(f"(b) {nbytes / GIB:.2f} GiB written in {time.perf_counter() - t0:.1f} s; starting the Hub")
        async with Cluster(self.tmp / "b", self.env) as cluster:
            hub_url = await cluster.start_hub(src, REPO_ID, args.cap)
            await asyncio.to_thread(read_all, src)
            await self.start_nodes(cluster, n, hub_url, args.cap)
            log(f"(b) Hub {hub_url} and {n} agents up, every uplink capped at {args.cap / 1e6:g} MB/s")
            return await self._repl_rounds(cluster, n, nbytes)

    async def _repl_rounds(
        self, cluster: Cluster, n: int, nbytes: int
    ) -> tuple[list[tuple[int, Series]], Series, Series, int]:
        client, args = cluster.client, self.args
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
                sample.op, _ = await run_op(
                    client.replicate(name, targets, max_fanout=1, wait=True), "replicate", timeout
                )
                await wait_op(client, dl.op_id, "download onto n1", timeout)

            osample = await self.timed(n * nbytes, at_once)
            await asyncio.sleep(0.3)
            osample.lines = await self.replicate_lines(cluster, osample)
            overlap.samples.append(osample)
            await client.delete_model(oname)
            log(f"(b) run {r + 1}, download and replicate at once: {osample.seconds:.2f} s")
            for f in fanouts:
                name = f"repl-f{f}-{r}"

                async def spread(sample: Sample, name: str = name, f: int = f) -> None:
                    dl = client.download(name, f"hf://{REPO_ID}", "n1:disk", wait=True)
                    _, sample.parts["download"] = await run_op(dl, "download onto n1", timeout)
                    rep = client.replicate(name, targets, max_fanout=f, wait=True)
                    sample.op, sample.parts["replicate"] = await run_op(rep, "replicate", timeout)

                sample = await self.timed(n * nbytes, spread)
                await asyncio.sleep(0.3)
                sample.lines = await self.replicate_lines(cluster, sample)
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
                calls = (
                    client.download(m, f"hf://{REPO_ID}", d, prefer_peer=False, wait=True)
                    for m, d in zip(names, targets, strict=True)
                )
                ops = await asyncio.wait_for(asyncio.gather(*calls), timeout)
                ends = []
                for op in ops:
                    check_op(op, f"download onto {op.node_id}")
                    if getattr(op.result, "from_peer", ""):
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
        return [(f, tree[f]) for f in fanouts], hub, overlap, nbytes

    async def replicate_lines(self, cluster: Cluster, sample: Sample) -> list[str]:
        """Per target of a replicate op: source, start (after the op was created), seconds,
        transfer and verify parts."""
        assert cluster.watcher is not None
        op = sample.op
        results: dict[str, TargetOutcome] = getattr(op.result, "targets", {})
        rows = []
        for target, res in results.items():
            if res.already_present:
                rows.append((0.0, f"    {target:<10} already there (the Hub download)"))
                continue
            child = await cluster.client.get_op(res.op_id)
            start = (child.started_at or child.created_at) - op.created_at
            transfer, verify = cluster.watcher.fetch_parts(child)
            rows.append(
                (
                    start,
                    f"    {target:<10} from {res.source or '?':<10} start {start:6.2f} s  "
                    f"took {res.seconds:6.2f} s  (transfer {transfer:6.2f}, "
                    f"verify {verify:5.2f})",
                )
            )
        return [text for _, text in sorted(rows)]


# ---------------------------------------------------------------- report


def report(
    args: argparse.Namespace,
    version: str,
    copy: tuple[Series, Series, Series, int] | None,
    repl: tuple[list[tuple[int, Series]], Series, Series, int] | None,
) -> bool:
    """Print the results and the report table; True when every binding target is met."""
    print(f"\n{machine_line()}; gswarm {version}")
    now = gswarm_version()
    if now != version:
        print(f"warning: gswarm changed during the run (now {now}); processes started later may differ")
    print(f"command: python bench/peer_copy.py {' '.join(sys.argv[1:])}".rstrip())
    print("CPU: utime+stime of the processes over the timed runs; per group in % of one core")
    rows: list[Comparison] = []
    if copy is not None:
        gs, seq, par, nbytes = copy
        print(
            f"\n(a) copy between two agents on loopback, {nbytes / GIB:.2f} GiB in {COPY_SHARDS + 1} files, "
            f"medians of {args.runs} after {args.warmup} warm-up"
        )
        print("\n".join(s.line() for s in (gs, seq, par)))
        tr, ve = gs.median_part("transfer"), gs.median_part("verify")
        print(
            f"  gswarm parts (median): transfer {tr:.2f} s ({nbytes / tr / GB:.2f} GB/s), "
            f"sha256 verify {ve:.2f} s, the rest {max(0.0, gs.median_s - tr - ve):.2f} s"
        )
        anchor = min(seq, par, key=lambda s: s.median_s)
        for curl in (anchor, par if anchor is seq else seq):
            what = f"`{curl.name}`" + (" (the faster curl)" if curl is anchor else "")
            goal = TARGET_COPY_RATIO if curl is anchor else None
            scenario = f"(a) copy {nbytes / GIB:g} GiB n1 → n2, loopback, verified"
            rows.append(compare(scenario, gs.median_s, what, curl.median_s, at_least=goal, nbytes=nbytes))
    if repl is not None:
        trees, hub, overlap, nbytes = repl
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
        print(overlap.line())
        print("\n".join(overlap.median_sample().lines))
        best_fanout = min(trees, key=lambda t: t[1].median_s)[0]
        what = f"{args.agents} Hub downloads"
        head = f"{nbytes / GIB:g} GiB to {args.agents} agents, cap {args.cap / 1e6:g} MB/s"
        for f, s in trees:
            scenario = f"(b) {head}: download then replicate, fanout {f}"
            rows.append(
                compare(
                    scenario,
                    s.median_s,
                    what,
                    hub.median_s,
                    speedup=False,
                    at_most=TARGET_REPL_RATIO,
                    binding=f == best_fanout,
                )
            )
        scenario = f"(b′) {head}: download and replicate at once, fanout 1"
        rows.append(
            compare(
                scenario,
                overlap.median_s,
                what,
                hub.median_s,
                speedup=False,
                at_most=TARGET_REPL_RATIO,
                binding=False,
            )
        )
    print("\n" + comparison_table(rows))
    return all_met(rows)


# ---------------------------------------------------------------- main


def check_space(args: argparse.Namespace, tmp: Path) -> None:
    """BenchError when the temporary directory's disk cannot hold what the runs write."""
    need_a = 0 if args.skip_copy else 3 * args.copy_gib * GIB  # n1, n2 (or curl's), slack
    need_b = 0 if args.skip_repl else (args.agents + 2) * args.repl_gib * GIB  # source, N copies
    need = max(need_a, need_b) + GIB
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise BenchError(f"{tmp} has {free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed")


async def amain(args: argparse.Namespace, tmp: Path) -> int:
    """Run the chosen benchmarks and report: 0 when every target is met, else 1."""
    bench = PeerBench(args, tmp)
    version = await asyncio.to_thread(gswarm_version)
    check_space(args, tmp)
    copy_res = None if args.skip_copy else await bench.copy_bench()
    repl_res = None if args.skip_repl else await bench.repl_bench()
    return 0 if report(args, version, copy_res, repl_res) else 1


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
    args = parse_args(argv)
    if shutil.which("curl") is None and not args.skip_copy:
        print("curl is needed for the anchor of (a)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(
        prefix="gswarm-bench-peer-", dir=args.tmp_dir, ignore_cleanup_errors=True
    ) as tmp:
        return run_main(lambda: amain(args, Path(tmp)), error_rc=2)


if __name__ == "__main__":
    sys.exit(main())
