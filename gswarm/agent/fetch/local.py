"""The local copy engine: files copied between stores with the kernel's copy path
(`copy_file_range`, else `sendfile`), and listing a local file or directory source."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from pathlib import Path

from gswarm.agent.fetch.common import ByteCounter, Cancelled, RateLimit, TransferError
from gswarm.agent.stores import safe_relpath
from gswarm.errors import BadRequest, NotFound

COPY_CHUNK_BYTES = 64 << 20
"""Bytes per copy_file_range/sendfile call; a worker copies up to four of these per job."""


def _copy_range(
    src_fd: int,
    dst_fd: int,
    offset: int,
    length: int,
    counter: ByteCounter,
    cancel: threading.Event,
    limit: RateLimit | None = None,
) -> None:
    end = offset + length
    pos = offset
    use_cfr = hasattr(os, "copy_file_range")
    # Under a limit, a tenth of a second's worth at a time, so the pace is even and cancel quick.
    chunk = COPY_CHUNK_BYTES if limit is None else max(64 << 10, min(COPY_CHUNK_BYTES, limit.rate // 10))
    while pos < end:
        if cancel.is_set():
            raise Cancelled()
        step = min(chunk, end - pos)
        if limit is not None:
            limit.take(step)
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, step, pos, pos)
            except OSError:
                use_cfr = False
        if not use_cfr:
            # Across filesystems (disk -> tmpfs) copy_file_range refuses; sendfile still copies
            # in the kernel. dst_fd is this job's own descriptor, so its offset is ours to set.
            os.lseek(dst_fd, pos, os.SEEK_SET)
            n = os.sendfile(dst_fd, src_fd, pos, step)
        if n == 0:
            raise TransferError(
                f"source ended early at byte {pos} (expected {end})", code="verification_failed"
            )
        pos += n
        counter.add(n)


def copy_files(
    src: Path,
    dst: Path,
    files: list[tuple[str, int]],
    counter: ByteCounter,
    cancel: threading.Event,
    workers: int = 4,
    check_source: Callable[[int, str], None] | None = None,
    limit: RateLimit | None = None,
) -> None:
    """Copy files (relative path, size) from `src` to `dst` with the kernel's copy path
    (`copy_file_range`), large files split across worker threads. `check_source` vets each
    source file through its open descriptor (and raises to refuse it) before a byte is read."""
    dst.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, int, int]] = []
    for rel, size in files:
        safe_relpath(rel)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.truncate(size)
        jobs.extend(
            (rel, off, min(COPY_CHUNK_BYTES * 4, size - off)) for off in range(0, size, COPY_CHUNK_BYTES * 4)
        )

    def run(job: tuple[str, int, int]) -> None:
        rel, off, length = job
        s = os.open(src / rel, os.O_RDONLY)
        try:
            if check_source is not None:
                check_source(s, str(src / rel))
            d = os.open(dst / rel, os.O_WRONLY)
            try:
                _copy_range(s, d, off, length, counter, cancel, limit)
            finally:
                os.close(d)
        finally:
            os.close(s)

    if not jobs:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        for fut in [pool.submit(run, j) for j in jobs]:
            fut.result()
    for rel, size in files:
        actual = (dst / rel).stat().st_size
        if actual != size:
            raise TransferError(f"{rel}: copied {actual} bytes, expected {size}", code="verification_failed")


def list_local(path: Path) -> tuple[Path, list[tuple[str, int]]]:
    """The base directory and files (relative path, size) of a local file or directory source."""
    if path.is_file():
        return path.parent, [(path.name, path.stat().st_size)]
    if not path.is_dir():
        raise NotFound(f"local source {path} does not exist", code="source_not_found")
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            full = Path(root) / name
            if name.startswith(".") or not full.is_file():
                continue
            found.append((str(full.relative_to(path)), full.stat().st_size))
    if not found:
        raise BadRequest(f"local source {path} holds no files")
    return path, found
