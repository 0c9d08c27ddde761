"""The parallel range downloader and its resume state.

Why not `snapshot_download` for the bytes: on loopback it moves 0.3–0.5 GB/s where a plain
HTTP client moves several GB/s; the Python client, not the wire, is the limit. So
`huggingface_hub` resolves the repo (see `hub`) and the bytes go through `RangeDownloader`:
several threads, each with a keep-alive `http.client` connection, reading ranges straight
into a reusable buffer (`readinto`, no GIL while waiting) and writing them with `pwrite` into
a preallocated file. Finished chunks are recorded in a small state file (DOWNLOAD_STATE), so
a killed agent resumes where it stopped; a plan file (DOWNLOAD_PLAN) says what the download
will hold, so peers can fetch from it while it runs.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import os
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gswarm.agent.fetch.common import (
    ByteCounter,
    Cancelled,
    RateLimit,
    TransferError,
    host_of,
    local_write_error,
    network_reason,
    unreachable,
)
from gswarm.agent.fetch.http_client import Connections, content_range_end, http_error, request
from gswarm.agent.fetch.hub import RemoteFile
from gswarm.agent.fetch.verify import HASH_READ_BYTES
from gswarm.errors import GswarmError

CHUNK_BYTES = 32 << 20
"""Files are fetched (and their progress recorded) in chunks of this many bytes."""
READ_BYTES = 4 << 20
"""A stream receives this much per read, then hashes and writes it. Measured on 2 cores, 2 GiB
on loopback: 4 MiB reads 1.6-1.7 s, 1 MiB 1.9 s, 256 KiB 2.0 s, 8 MiB 1.9 s."""
WRITE_BYTES = 32 << 10
"""Received bytes go to the page cache in writes this small. The kernel sizes new page-cache
folios by the write: a 1 MiB write asks for 1 MiB folios, and in a VM that hands free memory
back to its host (virtio-balloon free page reporting) those come from blocks the host took
back and must fault in again. Measured on a 2-vCPU VM, 2 GiB written from a socket by one
thread: 3.6-5.0 s of system time in 1 MiB writes, 0.9-4.1 s in 64 KiB writes, 0.9 s in 16 or
32 KiB writes; the cost on bare metal is only the extra system calls."""
DEFAULT_STREAMS = max(2, min(8, os.cpu_count() or 1))
"""Parallel range streams: each hashes and writes what it receives, so streams beyond the
number of cores only contend (measured on 2 cores: 2 streams 1.9 s, 8 streams 2.2 s per 2 GiB)."""
PACE_SECONDS = 0.25
"""A read that takes longer than this halves the next one's size (down to PACE_MIN_BYTES), one
under a quarter of it doubles it (up to READ_BYTES): a fast source keeps large reads, a slow one
gets reads of a fraction of a second, so the byte count (and the op's progress) moves smoothly
instead of jumping by READ_BYTES."""
PACE_MIN_BYTES = 16 << 10
PACE_START_BYTES = 256 << 10
"""The first read of each stream: small, so a slow source shows progress at once."""
LIMITED_READ_BYTES = 64 << 10
"""Under a bandwidth limit, reads are at most a tenth of a second's worth (and at least this),
so a slow limit still paces smoothly."""
DOWNLOAD_STATE = ".gswarm-download.json"
"""In a partial directory: which chunks of which files are written (for resume and for peers)."""
DOWNLOAD_PLAN = ".gswarm-plan.json"
"""In a partial directory: the files the download will hold (see `write_plan`)."""
FLUSH_INTERVAL = 0.25
"""The state file is rewritten at most this often (seconds) while chunks progress."""
STALL_TIMEOUT = 20.0
"""A peer still downloading may serve what it has; a wait for bytes that do not come ends
after this many seconds, and the next peer is tried."""
_RETRIES = 4


class _State:
    """Which chunks of which files are on disk (persisted next to the partial files)."""

    def __init__(self, path: Path, chunk: int = CHUNK_BYTES) -> None:
        self.path = path
        self.chunk = chunk
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.files: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._last_write = 0.0
        try:
            self.files = json.loads(path.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            self.files = {}

    def entry(self, rel: str, size: int, etag: str) -> tuple[set[int], dict[int, int]]:
        """Chunks of a file already complete, and how far unfinished chunks got."""
        with self._lock:
            e = self.files.get(rel)
            if e is None or e.get("size") != size or e.get("etag") != etag:
                e = {"size": size, "etag": etag, "done": [], "part": {}}
                self.files[rel] = e
                self._dirty = True
            return set(e["done"]), {int(k): int(v) for k, v in e.get("part", {}).items()}

    def chunk_progress(self, rel: str, index: int, pos: int) -> None:
        """Bytes up to `pos` of an unfinished chunk are written (persisted now and then)."""
        with self._lock:
            self.files[rel].setdefault("part", {})[str(index)] = pos
            self._dirty = True
        self.flush(force=False)

    def prefix(self, rel: str) -> int:
        """How many bytes from the start of a file are written without a gap."""
        with self._lock:
            e = self.files.get(rel)
            if e is None:
                return 0
            done = set(e["done"])
            i = 0
            while i in done:
                i += 1
            size = int(e["size"])
            pos = min(size, i * self.chunk)
            part = e.get("part", {}).get(str(i))
            return max(pos, min(size, int(part))) if part is not None else pos

    def chunk_done(self, rel: str, index: int) -> None:
        with self._lock:
            e = self.files[rel]
            e["done"].append(index)
            e.get("part", {}).pop(str(index), None)
            self._dirty = True
        self.flush(force=False)

    def forget(self, rel: str) -> None:
        with self._lock:
            self.files.pop(rel, None)
            self._dirty = True
        self.flush()

    def flush(self, force: bool = True) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._dirty or (not force and now - self._last_write < FLUSH_INTERVAL):
                return
            data = json.dumps({"chunk": self.chunk, "files": self.files})
            self._dirty = False
            self._last_write = now
        with self._write_lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(data)
            os.replace(tmp, self.path)


class _FileHash:
    """A file's running checksums, advanced strictly in file order by whichever thread has the
    bytes at the frontier: the worker that just received them (from its receive buffer, with no
    read back) or a catch-up read of bytes already written."""

    def __init__(self, f: RemoteFile) -> None:
        self.size = f.size or 0
        self.pos = 0
        self._lock = threading.Lock()
        self._sha = hashlib.sha256()
        self._git = hashlib.sha1(usedforsecurity=False) if f.git_sha1 else None
        if self._git is not None:
            self._git.update(f"blob {self.size}\0".encode())

    @property
    def complete(self) -> bool:
        """Every byte of the file is hashed."""
        return self.pos >= self.size

    def _update(self, data: memoryview) -> None:
        self._sha.update(data)
        if self._git is not None:
            self._git.update(data)
        self.pos += len(data)

    def feed(self, pos: int, data: memoryview) -> None:
        """Bytes just written at `pos`: hashed now if they are next in line, else left for
        a catch-up read."""
        with self._lock:
            if pos == self.pos:
                self._update(data)

    def catch_up(self, fd: int, ready: int, buf: bytearray) -> bool:
        """Hash bytes [pos, ready) back from the file; whether any were hashed."""
        mv = memoryview(buf)
        moved = False
        while True:
            with self._lock:  # per block, so a worker at the frontier can take over
                if self.pos >= ready:
                    return moved
                n = os.preadv(fd, [mv[: min(len(buf), HASH_READ_BYTES, ready - self.pos)]], self.pos)
                if n <= 0:
                    return moved
                self._update(mv[:n])
                moved = True

    def digests(self) -> tuple[str, str]:
        """(sha256, git blob sha1 or "")."""
        return self._sha.hexdigest(), self._git.hexdigest() if self._git is not None else ""


@dataclass
class _FileWork:
    """One file's chunks still to fetch (chunk index, first byte) and its checksums."""

    file: RemoteFile
    pending: collections.deque[tuple[int, int]]
    hash: _FileHash
    in_flight: int = 0


class _Schedule:
    """Hands out chunks: a worker's own file in order, else a file nobody owns yet (largest
    first), else the last chunk of the file with the most chunks left."""

    def __init__(self, work: list[_FileWork]) -> None:
        self._lock = threading.Lock()
        self._work = work
        self._unowned = sorted(work, key=lambda w: -(w.file.size or 0))

    def take(self, own: _FileWork | None) -> tuple[_FileWork, int, int, bool] | None:
        """The next (file, chunk index, start, whether the worker owns the file) for a worker
        owning `own`; index -1 means its file has nothing left to start, and the worker is to
        follow that file's hash to the end."""
        with self._lock:
            if own is None and self._unowned:
                own = self._unowned.pop(0)
            if own is not None:
                if not own.pending:
                    return own, -1, 0, True
                index, start = own.pending.popleft()
                own.in_flight += 1
                return own, index, start, True
            victim = max(self._work, key=lambda w: len(w.pending), default=None)
            if victim is None or len(victim.pending) < 2:
                return None  # one chunk left is its owner's next: taking it would split nothing
            index, start = victim.pending.pop()
            victim.in_flight += 1
            return victim, index, start, False

    def finished(self, w: _FileWork) -> None:
        """A chunk of `w` is no longer being fetched."""
        with self._lock:
            w.in_flight -= 1

    def active(self, w: _FileWork) -> bool:
        """Whether any chunk of `w` is still being fetched or waiting to be."""
        with self._lock:
            return w.in_flight > 0 or bool(w.pending)


class ReadPace:
    """How many bytes a stream's next read asks for, from how long its last read took (see
    `PACE_SECONDS`). One per stream; `largest` caps it (a bandwidth limit lowers the cap)."""

    def __init__(self, largest: int = READ_BYTES) -> None:
        self.largest = largest
        self.step = min(largest, PACE_START_BYTES)

    def took(self, nbytes: int, seconds: float) -> None:
        """A read of `nbytes` (asked for `step`) took `seconds`: size the next one."""
        if seconds > PACE_SECONDS:
            self.step = max(PACE_MIN_BYTES, self.step // 2)
        elif seconds < PACE_SECONDS / 4 and nbytes >= self.step:
            self.step = min(self.largest, self.step * 2)


class RangeDownloader:
    """Fetches files with parallel HTTP range requests into a partial directory."""

    def __init__(
        self,
        dest: Path,
        headers: dict[str, str],
        counter: ByteCounter,
        cancel: threading.Event,
        workers: int = DEFAULT_STREAMS,
        chunk: int = CHUNK_BYTES,
        timeout: float = 30.0,
        limit: RateLimit | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.dest = dest
        self.tls = tls
        self.headers = headers
        self.counter = counter
        self.cancel = cancel
        self.workers = workers
        self.chunk = chunk
        self.timeout = timeout
        self.limit = limit
        self.state = _State(dest / DOWNLOAD_STATE, chunk)
        self.hashes: dict[str, tuple[str, str]] = {}
        """(sha256, git sha1) of files hashed while they arrived."""

    def already_done(self, files: Iterable[RemoteFile]) -> int:
        """Bytes of these files already on disk from an earlier attempt."""
        done = 0
        for f in files:
            e = self.state.files.get(f.rel)
            if e is None or f.size is None or e.get("size") != f.size:
                continue
            for i in e["done"]:
                done += min(self.chunk, f.size - i * self.chunk)
            for i, pos in e.get("part", {}).items():
                done += max(0, int(pos) - int(i) * self.chunk)
        return done

    def run(self, files: list[RemoteFile]) -> None:
        """Fetch every file (blocking); raises TransferError or Cancelled.

        Each worker owns a file and fetches its chunks in order, hashing every block from its
        buffer before writing it: nothing is read back, and no two threads write one file
        (concurrent writes to one file contend on its inode lock). Workers with no file left
        take chunks from the tail of the file with the most left; those bytes are hashed when
        the file's owner, done with its own chunks, reads them back as they land."""
        self.dest.mkdir(parents=True, exist_ok=True)
        self.probe_sizes(files)
        work: list[_FileWork] = []
        for f in files:
            size = f.size or 0
            path = self.dest / f.rel
            path.parent.mkdir(parents=True, exist_ok=True)
            done, parts = self.state.entry(f.rel, size, f.sha256 or f.git_sha1 or f.url)
            with open(path, "ab") as fh:
                if fh.tell() != size:
                    os.truncate(path, size)
            n_chunks = max(1, -(-size // self.chunk)) if size else 0
            pending = collections.deque(
                (i, parts.get(i, i * self.chunk)) for i in range(n_chunks) if i not in done
            )
            work.append(_FileWork(f, pending, _FileHash(f)))
        self.state.flush()
        schedule = _Schedule(work)
        errors: list[BaseException] = []

        live: list[Connections] = []

        def worker() -> None:
            conns = Connections(self.timeout, self.tls)
            live.append(conns)
            buf = bytearray(READ_BYTES)
            largest = READ_BYTES
            if self.limit is not None:  # a tenth of a second's worth at most, so the pace is even
                largest = min(READ_BYTES, max(LIMITED_READ_BYTES, self.limit.rate // 10))
            pace = ReadPace(largest)
            fds: dict[str, int] = {}
            own: _FileWork | None = None
            try:
                while not errors and not self.cancel.is_set():
                    job = schedule.take(own)
                    if job is None:
                        return
                    w, index, start, mine = job
                    fd = fds.get(w.file.rel)
                    if fd is None:
                        fd = fds[w.file.rel] = os.open(self.dest / w.file.rel, os.O_RDWR)
                    if index < 0:  # this worker's file has no chunks left to start
                        self._follow_hash(w, fd, buf, schedule, errors)
                        own = None
                        continue
                    if mine:
                        own = w
                        # A resumed file: hash what an earlier attempt wrote, then go on inline.
                        w.hash.catch_up(fd, self.state.prefix(w.file.rel), buf)
                    try:
                        self._fetch_chunk(conns, buf, pace, fd, w, index, start)
                    finally:
                        schedule.finished(w)
                    self.state.chunk_done(w.file.rel, index)
            except BaseException as exc:
                errors.append(exc)
            finally:
                conns.close()
                for fd in fds.values():
                    os.close(fd)

        n = max(1, min(self.workers, sum(len(w.pending) for w in work) or 1))
        threads = [threading.Thread(target=worker, name=f"gswarm-fetch-{i}", daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        interrupted = False
        while alive := [t for t in threads if t.is_alive()]:
            if self.cancel.is_set() and not interrupted:
                # A worker may be blocked reading a slow source: cut its socket so it sees the
                # cancel now, not when its 4 MiB have arrived.
                for conns in list(live):
                    conns.interrupt()
                interrupted = True
            alive[0].join(0.05)
        self.state.flush()
        for w in work:
            if w.hash.complete:
                self.hashes[w.file.rel] = w.hash.digests()
        if self.cancel.is_set():
            raise Cancelled()
        if errors:
            err = errors[0]
            if isinstance(err, GswarmError):
                raise err
            raise TransferError(f"download failed: {type(err).__name__}: {err}") from err

    def _follow_hash(
        self, w: _FileWork, fd: int, buf: bytearray, schedule: _Schedule, errors: list[BaseException]
    ) -> None:
        """Hash the rest of a file as other workers write it; return when it is all hashed or
        nobody is fetching it any more (a file that stopped short is reported by verify_files)."""
        while not w.hash.complete:
            if errors or self.cancel.is_set():
                return
            if w.hash.catch_up(fd, self.state.prefix(w.file.rel), buf):
                continue
            if not schedule.active(w):
                w.hash.catch_up(fd, self.state.prefix(w.file.rel), buf)
                return
            if self.cancel.wait(0.005):
                return

    def probe_sizes(self, files: list[RemoteFile]) -> None:
        """Learn the size of every file that has none yet (a plain URL) from a HEAD request's
        Content-Length, so the download's total is known before its bytes flow (blocking)."""
        unknown = [f for f in files if f.size is None]
        if not unknown:
            return
        conns = Connections(self.timeout, self.tls)
        try:
            for f in unknown:
                if self.cancel.is_set():
                    raise Cancelled()
                self._probe_size(conns, f)
        finally:
            conns.close()

    def _probe_size(self, conns: Connections, f: RemoteFile) -> None:
        try:
            resp, _ = request(conns, f.url, {**self.headers, "Accept-Encoding": "identity"}, "HEAD")
            resp.read()
            if resp.status >= 400:
                raise http_error(resp.status, resp.reason, f.url)
            length = resp.getheader("Content-Length")
            if length is None:
                raise TransferError(f"{f.url} sends no Content-Length: cannot verify its size")
            f.size = int(length)
        except (OSError, http.client.HTTPException) as exc:
            raise unreachable(f.url, network_reason(exc) or f"{type(exc).__name__}: {exc}") from None

    def _wait_for_peer(self, waited: float) -> float:
        if waited >= STALL_TIMEOUT:
            raise TransferError(f"the peer sent nothing new for {STALL_TIMEOUT:g} s", code="source_stalled")
        if self.cancel.wait(0.2):
            raise Cancelled()
        return waited + 0.2

    def _fetch_chunk(
        self,
        conns: Connections,
        buf: bytearray,
        pace: ReadPace,
        fd: int,
        w: _FileWork,
        index: int,
        start: int,
    ) -> None:
        f = w.file
        size = f.size or 0
        end = min(size, (index + 1) * self.chunk)
        pos = start
        mv = memoryview(buf)
        attempt = 0
        waited = 0.0
        while pos < end:
            if self.cancel.is_set():
                raise Cancelled()
            headers = {**self.headers, "Range": f"bytes={pos}-{end - 1}", "Accept-Encoding": "identity"}
            try:
                resp, _ = request(conns, f.url, headers)
                if resp.status == 425:
                    # A peer that is still downloading has not got these bytes yet.
                    resp.read()
                    waited = self._wait_for_peer(waited)
                    continue
                if resp.status >= 400:
                    resp.read()
                    raise http_error(resp.status, resp.reason, f.url)
                if resp.status == 200 and pos != 0:
                    resp.close()
                    conns.drop(f.url)
                    raise TransferError(f"{f.url} does not support range requests", code="source_error")
                want = end - pos
                served = content_range_end(resp.getheader("Content-Range"))
                if resp.status == 206 and served is not None:
                    want = min(want, served + 1 - pos)  # a peer still downloading sends what it has
                waited = 0.0
                while want > 0:
                    if self.cancel.is_set():
                        resp.close()
                        conns.drop(f.url)
                        raise Cancelled()
                    ask = min(pace.step, want)
                    if self.limit is not None:
                        self.limit.take(ask)
                    began = time.monotonic()
                    n = resp.readinto(mv[:ask])
                    pace.took(n, time.monotonic() - began)
                    if not n:
                        raise http.client.IncompleteRead(b"", want)
                    try:
                        for o in range(0, n, WRITE_BYTES):
                            os.pwrite(fd, mv[o : min(n, o + WRITE_BYTES)], pos + o)
                    except OSError as exc:
                        raise local_write_error(exc, f.rel) from None
                    w.hash.feed(pos, mv[:n])
                    pos += n
                    want -= n
                    self.counter.add(n)
                    self.state.chunk_progress(f.rel, index, pos)
                if resp.status == 200 and not resp.isclosed():
                    # A server that ignored Range sent the whole file; we took what we needed.
                    resp.close()
                    conns.drop(f.url)
                else:
                    resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conns.drop(f.url)
                attempt += 1
                if attempt > _RETRIES:
                    reason = network_reason(exc) or f"{type(exc).__name__}: {exc}"
                    raise TransferError(
                        f"fetching {f.rel} from {host_of(f.url)} failed after {_RETRIES} retries: {reason}",
                        code="source_unreachable",
                    ) from None
                if self.cancel.wait(min(2.0, 0.2 * 2**attempt)):
                    raise Cancelled() from None


def write_plan(partial: Path, model: str, files: list[RemoteFile], source: str, revision: str) -> None:
    """Record what a download will hold, so peers can fetch from it while it runs."""
    plan = {
        "model": model,
        "source": source,
        "revision": revision,
        "files": [{"path": f.rel, "size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1} for f in files],
    }
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / (DOWNLOAD_PLAN + ".tmp")
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, partial / DOWNLOAD_PLAN)


def available_ranges(partial: Path, rel: str) -> tuple[int, list[tuple[int, int]]]:
    """The file's size and the byte ranges [a, b) of it already written in a partial download."""
    state = json.loads((partial / DOWNLOAD_STATE).read_text())
    chunk = int(state.get("chunk", CHUNK_BYTES))
    entry = state["files"][rel]
    size = int(entry["size"])
    ranges = [(i * chunk, min(size, (i + 1) * chunk)) for i in entry["done"]]
    ranges += [
        (int(i) * chunk, int(pos)) for i, pos in entry.get("part", {}).items() if int(pos) > int(i) * chunk
    ]
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return size, merged
