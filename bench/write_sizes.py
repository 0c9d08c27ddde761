"""Page-cache write sizes: what it costs to receive bytes over loopback and write them to fresh
files, by the size of each write, next to curl and gswarm's range downloader.

    python bench/write_sizes.py [--gib 2] [--runs 3] [--sizes 16K,32K,64K,1M] [--tmp-dir DIR] [--quick]

Scenario: the same files (8 shards of random bytes and a config.json, `--gib` in all) fetched
from a plain aiohttp `FileResponse` server (harness.py's `files` role) into a fresh directory on
the same disk, after `sync` and the removal of the previous round's files, by
  - one Python thread, `readinto` a 1 MiB buffer, `pwrite` in pieces of each size (no hash);
  - gswarm's `RangeDownloader` with its defaults (streams, reads, writes, sha256 of every byte).
Anchor: `curl` (sequential, one connection). The order of the contenders rotates every round.

Why: the kernel sizes new page-cache folios by the write, and on a VM that returns free memory
to its host (virtio-balloon free page reporting) large folios come from memory the host took
back, which faults in again on first touch. gswarm's downloader writes 32 KiB at a time
because of what this measures; on bare metal the sizes should cost about the same.

Wall time and the receiver's user and system CPU (the server's is not counted) are reported as
medians. `--quick`: 1/16 GiB, 1 round (a smoke test). Exit status 0, or 2 when something fails.
"""

from __future__ import annotations

import argparse
import http.client
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from harness import HARNESS, Processes, bench_env
from measure import Timing, compare, comparison_table, md_table, median, rotate, time_call, write_model

from gswarm.agent.fetch.common import ByteCounter
from gswarm.agent.fetch.hub import RemoteFile
from gswarm.agent.fetch.ranges import RangeDownloader

MIB = 1 << 20
SHARDS = 8
"""Files of random bytes in the source (plus a small config.json)."""


def parse_size(text: str) -> int:
    """`16K` -> 16384, `1M` -> 1048576, `4096` -> 4096."""
    units = {"K": 1 << 10, "M": 1 << 20}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def receive_with_writes(url: str, files: list[tuple[str, int]], dest: Path, piece: int) -> None:
    """One connection, files one after another, `pwrite` in pieces of `piece` bytes."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
    buf = bytearray(MIB)
    mv = memoryview(buf)
    try:
        for name, size in files:
            conn.request("GET", f"/{name}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"{name}: HTTP {resp.status}")
            fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                pos = 0
                while pos < size:
                    n = resp.readinto(mv[: min(MIB, size - pos)])
                    if not n:
                        raise RuntimeError(f"{name}: the server stopped at byte {pos}")
                    for off in range(0, n, piece):
                        os.pwrite(fd, mv[off : min(n, off + piece)], pos + off)
                    pos += n
            finally:
                os.close(fd)
    finally:
        conn.close()


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
    """The rounds and the table."""
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    files = write_model(tmp / "src", int(args.gib * (1 << 30)), SHARDS)
    server = procs.spawn("files", [sys.executable, HARNESS, "files", str(tmp / "src")])
    url = server.wait_for_sync(r"^(http://\S+)\s*$", stream="out").group(1)
    dest = tmp / "dest"

    def curl() -> None:
        cmd = ["curl", "-s", "-f", "--noproxy", "*"]
        for name, _ in files:
            cmd += ["-o", str(dest / name), f"{url}/{name}"]
        subprocess.run(cmd, check=True)

    def gswarm() -> None:
        wanted = [RemoteFile(rel=n, url=f"{url}/{n}", size=s) for n, s in files]
        RangeDownloader(dest, {}, ByteCounter(), threading.Event()).run(wanted)

    contenders: list[tuple[str, Callable[[], None], int]] = [("curl", curl, resource.RUSAGE_CHILDREN)]
    for piece in sizes:
        label = f"python, {piece >> 10} KiB writes" if piece < MIB else f"python, {piece >> 20} MiB writes"
        contenders.append(
            (label, lambda piece=piece: receive_with_writes(url, files, dest, piece), resource.RUSAGE_SELF)
        )
    contenders.append(("gswarm RangeDownloader", gswarm, resource.RUSAGE_SELF))
    results: dict[str, list[Timing]] = {name: [] for name, _, _ in contenders}
    for r in range(args.runs):
        for name, fn, who in rotate(contenders, r):
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            os.sync()
            results[name].append(time_call(fn, who))
        print(
            f"round {r + 1}: " + ", ".join(f"{n} {t[-1][0]:.2f} s" for n, t in results.items()),
            file=sys.stderr,
        )
    nbytes = sum(s for _, s in files)
    print(f"\n{nbytes / (1 << 30):.2f} GiB per round, medians of {args.runs} rounds (receiver's CPU only)\n")
    rows = []
    for name, timings in results.items():
        wall, user, system = (median(t[i] for t in timings) for i in range(3))
        rows.append((name, f"{wall:.2f} s", f"{user:.2f} s", f"{system:.2f} s", f"{nbytes / wall / 1e9:.2f}"))
    print(md_table(("receiver", "wall", "user", "system", "GB/s"), rows, right=(1, 2, 3, 4)))
    walls = {name: median(t[0] for t in timings) for name, timings in results.items()}
    gib = f"{nbytes / (1 << 30):.2f} GiB"
    row = compare(
        f"receive {gib} over loopback into fresh files",
        walls["gswarm RangeDownloader"],
        "`curl`",
        walls["curl"],
        nbytes=nbytes,
    )
    print("\n" + comparison_table([row]))


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=2.0, help="bytes per round, GiB [2]")
    parser.add_argument("--runs", type=int, default=3, help="rounds [3]")
    parser.add_argument("--sizes", default="16K,32K,64K,1M", help="write sizes to try [16K,32K,64K,1M]")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where on disk to work [system temp]")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1/16 GiB, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.gib, args.runs = 1 / 16, 1
    if shutil.which("curl") is None:
        print("curl is needed for the anchor", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(
        prefix="gswarm-bench-writes-", dir=args.tmp_dir, ignore_cleanup_errors=True
    ) as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp / "logs", bench_env(tmp))
        try:
            bench(args, tmp, procs)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:  # BenchError is a RuntimeError
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 2
        finally:
            for proc in procs.list:
                proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
