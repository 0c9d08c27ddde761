"""Tier benchmark: disk -> dram copies against `cp -r`, and Hub downloads against
`huggingface_hub.snapshot_download` and `curl`, with the head's CPU measured meanwhile.

    python bench/tiers.py [--copy-gib 2] [--download-gib 1] [--runs 3] [--warmup 1] [--quick]
                          [--skip-copy] [--skip-download] [--tmp-dir DIR]

Scenarios and anchors, all in one run on this machine (one head, one agent, the test Hub server):

(a) copy: a model (4 safetensors-like random shards and a config.json) is seeded onto the
    agent's disk tier by a gswarm download from `file://` (not timed); then, alternating,
    `POST /copy?wait=true` disk -> dram (end to end, REST call to the op's end) against the
    anchor `cp -r` of the same published files to a fresh directory on /dev/shm (exec to exit).
    Both run warm: the source is read once before the first run and stays in the page cache.
    The dram copy and the `cp` directory are removed between runs (not timed).
(b) download: a second model is served by the test Hub server (`tests/hubserver.py`, files
    hashed before it prints its URL); per round, `POST /download?wait=true` of `hf://REPO` onto
    the disk tier under a fresh model name (removed afterwards), against the anchors
    `snapshot_download(REPO, endpoint=URL, local_dir=FRESH)` in a subprocess (the time of the
    call itself, measured inside it, after the import) and `curl` of every file's `/resolve`
    URL, once sequentially (one curl process, one connection) and once with `--parallel`.
    Every destination is a fresh directory on the same disk.
(c) the head's CPU (utime + stime from /proc/PID/stat) during every gswarm transfer, as % of
    one core; the agent's and the Hub server's CPU too. A subscriber follows the op events
    meanwhile (as the CLI does), which gives the phases.

`sync` (not timed) runs before each timed run so no run pays for another's dirty pages. Each
benchmark starts with --warmup untimed rounds of every tool (first touches of fresh memory, in a
VM above all, make a first run slow for whichever tool comes first). `--quick`: 0.25 GiB models,
2 runs (a smoke test).

Verdicts: the copy against `cp -r` (>= 0.95x its speed); the download against
`snapshot_download` (>= 2x) and against the faster of the two curl modes (>= 0.5x); the head's
CPU in its worst timed run (< 5% of a core). Busy time of the machine that no process of the
benchmark accounts for is reported as `other`; a warning says when there was much of it. Exit
status: 0 all targets met, 1 one missed, 2 the benchmark failed, 130 interrupted.

Processes (bench/harness.py): the head, the agent (disk tier in the temporary directory, dram
tier under /dev/shm) and the Hub server, through their command lines on 127.0.0.1; everything
written lives in two temporary directories that are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from harness import Cluster, check_op, log, run_main, run_op
from measure import (
    GIB,
    BenchError,
    Comparison,
    Sample,
    Series,
    all_met,
    children_cpu,
    compare,
    comparison_table,
    machine_busy_seconds,
    machine_line,
    read_all,
    round_label,
    run_command,
    self_cpu,
    timed,
    tree_bytes,
    write_model,
)

from gswarm.ops import Op

NODE = "bench"
REPO_ID = "bench/tiers-model"
SHARDS = 4
CONFIG = b'{"architectures": ["BenchModel"], "model_type": "bench", "torch_dtype": "uint8"}'
RUN_TIMEOUT = 300.0
SHM = Path("/dev/shm")

TARGET_CP_RATIO = 0.95
TARGET_SNAPSHOT_RATIO = 2.0
TARGET_CURL_RATIO = 0.5
TARGET_HEAD_CPU_PCT = 5.0
NOISY_OTHER_PCT = 25.0
SNAPSHOT_CODE = (
    "import sys, time\n"
    "from huggingface_hub import snapshot_download\n"
    "t = time.perf_counter()\n"
    "snapshot_download(sys.argv[1], endpoint=sys.argv[2], local_dir=sys.argv[3])\n"
    "print(time.perf_counter() - t)\n"
)


class TierBench:
    """The cluster and the temporary directories of one run."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, tmp: Path, shm: Path) -> None:
        self.args = args
        self.cluster = cluster
        self.tmp = tmp
        self.shm = shm

    def probe(self) -> dict[str, float]:
        """CPU seconds so far: head, agents, hub; `tool` = the cp, curl or snapshot_download
        runs (reaped children); `bench` = this process; `machine` (timed makes it `other`)."""
        return {
            **self.cluster.procs.cpu_by_group(),
            "tool": children_cpu(),
            "bench": self_cpu(),
            "machine": machine_busy_seconds(),
        }

    async def measure(self, nbytes: int, fn: Callable[[], Awaitable[float]]) -> Sample:
        """One timed run of a tool that reports its own (inner) seconds."""

        async def run(sample: Sample) -> float:
            return await fn()

        return await timed(nbytes, run, self.probe)

    async def gswarm_op(self, nbytes: int, what: str, call: Callable[[], Awaitable[Op]]) -> Sample:
        """One timed gswarm op (a REST call with ?wait=true), with its phases."""
        started: list[float] = []

        async def run(sample: Sample) -> None:
            started.append(time.time())
            sample.op, _ = await run_op(call(), what, RUN_TIMEOUT)

        sample = await timed(nbytes, run, self.probe)
        size = int(getattr(sample.op.result, "size", -1))
        if size != nbytes:
            raise BenchError(f"{what}: the op reports {size} bytes, expected {nbytes}")
        await asyncio.sleep(0.3)  # let the last events arrive
        assert self.cluster.watcher is not None
        sample.phases = self.cluster.watcher.phases(sample.op.op_id, started[0])
        return sample

    async def check_and_remove(self, dest: Path, nbytes: int, what: str) -> None:
        """BenchError unless `dest` holds `nbytes`; then remove it."""
        got = await asyncio.to_thread(tree_bytes, dest)
        if got != nbytes:
            raise BenchError(f"{what} wrote {got} bytes to {dest}, expected {nbytes}")
        await asyncio.to_thread(shutil.rmtree, dest)

    async def copy_bench(self, src: Path, nbytes: int) -> tuple[Series, Series]:
        """gswarm disk -> dram copies against `cp -r`, alternating."""
        client = self.cluster.client
        model = "bench-copy"
        seed = check_op(
            await client.download(model, f"file://{src}", f"{NODE}:disk", wait=True), "seeding the disk copy"
        )
        disk_copy = Path(str(getattr(seed.result, "path", "")))
        await asyncio.to_thread(read_all, disk_copy)
        gs, cp = Series("gswarm copy disk->dram"), Series("cp -r")
        for i in range(self.args.warmup + self.args.runs):
            call = functools.partial(client.copy, model, f"{NODE}:disk", f"{NODE}:dram", wait=True)
            gs.samples.append(await self.gswarm_op(nbytes, "gswarm copy", call))
            check_op(await client.delete_location(model, f"{NODE}:dram", wait=True), "deleting the dram copy")
            dest = self.shm / f"fresh-{i}"
            argv = ["cp", "-r", str(disk_copy), str(dest)]
            cp.samples.append(await self.measure(nbytes, lambda argv=argv: self.tool(argv)))
            await self.check_and_remove(dest, nbytes, "cp")
            log(
                f"copy {round_label(i, self.args.warmup)}: gswarm {gs.samples[-1].gbps:.2f} GB/s, "
                f"cp {cp.samples[-1].gbps:.2f} GB/s"
            )
        check_op(await client.delete_location(model, f"{NODE}:disk", wait=True), "deleting the seed")
        return gs.drop(self.args.warmup), cp.drop(self.args.warmup)

    async def tool(self, argv: list[str]) -> float:
        """A command's seconds from exec to exit."""
        seconds, _ = await run_command(argv, RUN_TIMEOUT)
        return seconds

    async def snapshot(self, hub_url: str, dest: Path) -> float:
        """`snapshot_download` in a fresh process: the seconds of the call alone."""
        argv = [sys.executable, "-c", SNAPSHOT_CODE, REPO_ID, hub_url, str(dest)]
        _, out = await run_command(argv, RUN_TIMEOUT, self.cluster.env)
        return float(out.strip().splitlines()[-1])

    async def download_bench(self, hub_url: str, files: list[tuple[str, int]], nbytes: int) -> list[Series]:
        """gswarm downloads against snapshot_download and curl, round by round."""
        client = self.cluster.client
        gs, snap = Series("gswarm download"), Series("snapshot_download")
        seq, par = Series("curl (sequential)"), Series("curl --parallel")
        urls = [(name, f"{hub_url}/{REPO_ID}/resolve/main/{name}") for name, _ in files]
        for i in range(self.args.warmup + self.args.runs):
            name = f"bench-dl-{i}"
            call = functools.partial(client.download, name, f"hf://{REPO_ID}", f"{NODE}:disk", wait=True)
            gs.samples.append(await self.gswarm_op(nbytes, "gswarm download", call))
            await client.delete_model(name)

            dest = self.tmp / f"snapshot-{i}"
            snap.samples.append(await self.measure(nbytes, lambda dest=dest: self.snapshot(hub_url, dest)))
            await self.check_and_remove(dest, nbytes, "snapshot_download")

            for series, parallel in ((seq, False), (par, True)):
                dest = self.tmp / f"curl-{'par' if parallel else 'seq'}-{i}"
                dest.mkdir()
                argv = ["curl", "-s", "-f", "-L", "--noproxy", "*"]
                if parallel:
                    argv += ["--parallel", "--parallel-max", str(len(urls))]
                for rel, url in urls:
                    argv += ["-o", str(dest / rel), url]
                series.samples.append(await self.measure(nbytes, lambda argv=argv: self.tool(argv)))
                await self.check_and_remove(dest, nbytes, series.name)
            log(
                f"download {round_label(i, self.args.warmup)}: gswarm {gs.samples[-1].gbps:.2f}, "
                f"snapshot_download {snap.samples[-1].gbps:.2f}, curl {seq.samples[-1].gbps:.2f} / "
                f"parallel {par.samples[-1].gbps:.2f} GB/s"
            )
        return [s.drop(self.args.warmup) for s in (gs, snap, seq, par)]


# ---------------------------------------------------------------- report


def phase_lines(series: Series) -> list[str]:
    """The phases of every gswarm run, from the op's events (200 ms coalescing applies)."""
    lines = ["  gswarm phases (head time of each op event; progress is sent at most every 0.2 s):"]
    for i, s in enumerate(series.samples):
        steps = ", ".join(f"{t:+.2f}s {msg}" for t, msg in s.phases)
        op, agent = s.op, ""
        if op is not None and op.started_at and op.finished_at:
            agent = f" [head: created->started {op.started_at - op.created_at:.3f}s, "
            agent += f"started->finished {op.finished_at - op.started_at:.3f}s]"
        lines.append(f"  run {i + 1}: {s.seconds:.3f}s{agent}: {steps}")
    return lines


def report(
    args: argparse.Namespace,
    copy: tuple[Series, Series] | None,
    download: list[Series] | None,
    copy_bytes: int,
    download_bytes: int,
) -> bool:
    """Print the results and the report table; True when every target is met."""
    print(f"\n{machine_line()}")
    print(f"command: python bench/tiers.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        "cpu: % of one core over the timed runs; tool = the cp, curl or snapshot_download process; "
        "other = busy time of the machine no process of the benchmark accounts for (kernel threads, "
        "other users)"
    )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows: list[Comparison] = []
    gswarm_runs: list[Series] = []
    if copy is not None:
        gs, cp = copy
        print(
            f"\n(a) copy disk -> dram, {copy_bytes / GIB:.2f} GiB in {SHARDS + 1} files, warm page cache, "
            f"medians of {args.runs} after {args.warmup} warm-up"
        )
        print("\n".join([gs.line(3, 24), cp.line(3, 24), *phase_lines(gs)]))
        scenario = f"copy {copy_bytes / GIB:g} GiB disk → dram"
        rows.append(
            compare(
                scenario, gs.median_s, "`cp -r`", cp.median_s, at_least=TARGET_CP_RATIO, nbytes=copy_bytes
            )
        )
        gswarm_runs.append(gs)
    if download is not None:
        gs, snap, seq, par = download
        print(
            f"\n(b) download from the local Hub server, {download_bytes / GIB:.2f} GiB in {SHARDS + 1} "
            f"files, to the same disk, sync before each run, medians of {args.runs} after {args.warmup} "
            "warm-up"
        )
        print("\n".join([*(s.line(3, 24) for s in download), *phase_lines(gs)]))
        scenario = f"download {download_bytes / GIB:g} GiB from the Hub server"
        rows.append(
            compare(
                scenario,
                gs.median_s,
                "`snapshot_download`",
                snap.median_s,
                at_least=TARGET_SNAPSHOT_RATIO,
                nbytes=download_bytes,
            )
        )
        curl_best = min((seq, par), key=lambda s: s.median_s)
        for curl in sorted((seq, par), key=lambda s: s is not curl_best):
            what = f"`{curl.name}`" + (" (the faster curl)" if curl is curl_best else "")
            goal = TARGET_CURL_RATIO if curl is curl_best else None
            rows.append(
                compare(
                    "same download", gs.median_s, what, curl.median_s, at_least=goal, nbytes=download_bytes
                )
            )
        gswarm_runs.append(gs)
    if gswarm_runs:
        wall = sum(x.seconds for s in gswarm_runs for x in s.samples)
        pct = (
            100.0 * sum(x.cpu.get("head", 0.0) for s in gswarm_runs for x in s.samples) / wall
            if wall
            else 0.0
        )
        worst = max(s.max_cpu_pct("head") for s in gswarm_runs)
        rows.append(
            Comparison(
                "head CPU during the gswarm transfers",
                f"{pct:.1f} % of a core (worst run {worst:.1f} %)",
                "",
                target=f"< {TARGET_HEAD_CPU_PCT:g} % of a core",
                ok=worst < TARGET_HEAD_CPU_PCT,
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
    print("\n" + comparison_table(rows))
    return all_met(rows)


# ---------------------------------------------------------------- main


def plan_sizes(args: argparse.Namespace, tmp: Path) -> tuple[int, int]:
    """Bytes of the copy and download models, shrunk (and said so) when space is short."""
    copy_bytes = int(args.copy_gib * GIB)
    download_bytes = int(args.download_gib * GIB)
    shm_free = shutil.disk_usage(SHM).free
    # One model-sized copy on /dev/shm at a time (gswarm's or cp's), plus a margin.
    shm_fit = int((shm_free - (256 << 20)) * 0.9)
    if copy_bytes > shm_fit:
        log(
            f"/dev/shm has {shm_free / GIB:.2f} GiB free: copying {shm_fit / GIB:.2f} GiB instead of "
            f"{copy_bytes / GIB:.2f} GiB"
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


async def amain(args: argparse.Namespace, tmp: Path, shm: Path) -> int:
    """Generate the models, run both benchmarks, report: 0 when every target is met, else 1."""
    copy_bytes, download_bytes = plan_sizes(args, tmp)
    copy_res: tuple[Series, Series] | None = None
    dl_res: list[Series] | None = None
    async with Cluster(tmp, client_timeout=RUN_TIMEOUT) as cluster:
        bench = TierBench(args, cluster, tmp, shm)
        load = os.getloadavg()
        log(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        t0 = time.perf_counter()
        copy_src, hub_src = tmp / "src-copy", tmp / "src-hub"
        if not args.skip_copy:
            await asyncio.to_thread(write_model, copy_src, copy_bytes, SHARDS, CONFIG, True)
        hub_files: list[tuple[str, int]] = []
        if not args.skip_download:
            hub_files = await asyncio.to_thread(write_model, hub_src, download_bytes, SHARDS, CONFIG, True)
        log(f"model files written in {time.perf_counter() - t0:.1f} s; starting processes")
        hub_url = "http://127.0.0.1:9" if args.skip_download else await cluster.start_hub(hub_src, REPO_ID)
        await cluster.start_head()
        await cluster.start_agents(
            [NODE], tmp, shm, "--allow-file-root", str(copy_src), env={"HF_ENDPOINT": hub_url}
        )
        await cluster.watch(progress=True)
        log("head, agent and Hub server are up")
        if not args.skip_copy:
            copy_res = await bench.copy_bench(copy_src, copy_bytes)
            await asyncio.to_thread(shutil.rmtree, copy_src)
        if not args.skip_download:
            dl_res = await bench.download_bench(hub_url, hub_files, download_bytes)
    return 0 if report(args, copy_res, dl_res, copy_bytes, download_bytes) else 1


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
    with (
        tempfile.TemporaryDirectory(
            prefix="gswarm-bench-tiers-", dir=args.tmp_dir, ignore_cleanup_errors=True
        ) as tmp,
        tempfile.TemporaryDirectory(prefix="gswarm-bench-tiers-", dir=SHM, ignore_cleanup_errors=True) as shm,
    ):
        return run_main(lambda: amain(args, Path(tmp), Path(shm)), error_rc=2)


if __name__ == "__main__":
    sys.exit(main())
