"""Moving bytes onto a node: resolving a Hub repo, a parallel range downloader, the local
copy engine, and checksum verification. Everything here blocks and runs in worker threads;
`run_blocking` bridges to asyncio (cancellation sets a flag the workers check).

Why not `snapshot_download` for the bytes: on loopback it moves 0.3–0.5 GB/s where a plain
HTTP client moves several GB/s; the Python client, not the wire, is the limit. So
`huggingface_hub` resolves the repo (files, sizes, hashes, auth, revision) and the bytes go
through `RangeDownloader`: several threads, each with a keep-alive `http.client` connection,
reading ranges straight into a reusable buffer (`readinto`, no GIL while waiting) and writing
them with `pwrite` into a preallocated file. Finished chunks are recorded in a small state
file, so a killed agent resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import http.client
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

from gswarm.agent.stores import ManifestFile, safe_relpath
from gswarm.errors import BadRequest, GswarmError, InsufficientSpace, NotFound
from gswarm.sources import HttpSource, HubSource

T = TypeVar("T")

CHUNK_BYTES = 32 << 20
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
LIMITED_READ_BYTES = 64 << 10
"""Under a bandwidth limit, reads are at most a tenth of a second's worth (and at least this),
so a slow limit still paces smoothly."""
VERIFY_WORKERS = min(4, os.cpu_count() or 1)
HASH_READ_BYTES = 1 << 20  # measured: larger reads cost more CPU per byte hashed
COPY_CHUNK_BYTES = 64 << 20
DOWNLOAD_STATE = ".gswarm-download.json"
DOWNLOAD_PLAN = ".gswarm-plan.json"
FLUSH_INTERVAL = 0.25
STALL_TIMEOUT = 20.0
"""A peer still downloading may serve what it has; a wait for bytes that do not come ends
after this many seconds, and the next peer is tried."""
_RETRIES = 4


class TransferError(GswarmError):
    """A transfer failed (source error, network, verification)."""

    default_code = "transfer_failed"


def local_write_error(exc: OSError, what: str) -> GswarmError:
    """A failed write on this node as the error to report: 507 when the filesystem is full,
    else a transfer failure naming the cause (never a network error to retry)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(
            f"no space left writing {what} ({reason}); what was written is kept, and a retry "
            "resumes once space is freed",
        )
    return TransferError(f"writing {what} failed: {reason}", code="write_failed")


class Cancelled(Exception):
    """The op was cancelled; workers stop at the next read."""


class ByteCounter:
    """A thread-safe running total of bytes moved."""

    def __init__(self, start: int = 0) -> None:
        self._lock = threading.Lock()
        self.value = start

    def add(self, n: int) -> None:
        """Add `n` bytes."""
        with self._lock:
            self.value += n


class RateLimit:
    """A bytes/s limit shared by worker threads: each takes its share, then sleeps off any debt."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        # Little burst: an idle limiter must not let a second's worth of bytes out at once.
        self._burst = float(min(rate / 20, 1 << 20))
        self._tokens = self._burst
        self._last = time.monotonic()

    def take(self, n: int) -> None:
        """Account for `n` bytes, sleeping as long as the limit requires."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            time.sleep(debt / self.rate)


def fetch_json(url: str, headers: dict[str, str], timeout: float = 15.0) -> Any:
    """GET a small JSON document (blocking); TransferError/NotFound/Forbidden on failure."""
    conns = _Conn(timeout)
    try:
        conn, path = conns.get(url)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status >= 400:
            raise RangeDownloader._http_error(resp.status, resp.reason, url)
        return json.loads(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise TransferError(f"cannot fetch {url}: {exc}", code="source_unreachable") from None
    finally:
        conns.close()


async def run_blocking(cancel: threading.Event, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` in a thread; if the awaiting task is cancelled, set `cancel` and wait for the
    thread to notice before re-raising, so no worker outlives its op."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await fut
        raise


# ---------------------------------------------------------------- what to fetch


@dataclass
class RemoteFile:
    """One file to fetch: where from, where to, and what it must hash to."""

    rel: str
    url: str
    size: int | None
    sha256: str = ""
    git_sha1: str = ""


@dataclass
class FetchPlan:
    """A resolved source: its files and the revision they come from."""

    files: list[RemoteFile]
    revision: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Bytes to fetch in all (unknown sizes count as 0)."""
        return sum(f.size or 0 for f in self.files)


def hub_endpoint() -> str:
    """The Hub to talk to: `$HF_ENDPOINT` read now (not at import), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def resolve_hub(source: HubSource, allow: list[str] | None, ignore: list[str] | None) -> FetchPlan:
    """List a Hub repo's files (sizes, hashes) at a revision through huggingface_hub."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers, filter_repo_objects  # type: ignore[attr-defined]

    endpoint = hub_endpoint()
    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(source.repo_id, revision=source.revision, files_metadata=True)
    except GatedRepoError as exc:
        raise TransferError(f"{source.repo_id} is gated: accept its terms and set HF_TOKEN ({exc})") from None
    except RevisionNotFoundError:
        raise NotFound(
            f"revision {source.revision!r} of {source.repo_id} not found on {endpoint}",
            code="revision_not_found",
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise NotFound(
            f"repository {source.repo_id} not found on {endpoint} (private? set HF_TOKEN)",
            code="repo_not_found",
        ) from None
    except HfHubHTTPError as exc:
        raise TransferError(f"the Hub at {endpoint} answered: {exc}", code="source_error") from None
    except OSError as exc:
        raise TransferError(f"cannot reach the Hub at {endpoint}: {exc}", code="source_unreachable") from None
    commit = info.sha or source.revision
    siblings = list(
        filter_repo_objects(
            info.siblings or [], allow_patterns=allow, ignore_patterns=ignore, key=lambda s: s.rfilename
        )
    )
    files = []
    for s in siblings:
        rel = safe_relpath(s.rfilename)
        lfs = s.lfs
        files.append(
            RemoteFile(
                rel=rel,
                url=hf_hub_url(source.repo_id, s.rfilename, revision=commit, endpoint=endpoint),
                size=lfs.size if lfs is not None else s.size,
                sha256=lfs.sha256 if lfs is not None else "",
                git_sha1="" if lfs is not None else (s.blob_id or ""),
            )
        )
    if not files:
        raise TransferError(f"{source.repo_id}@{source.revision}: no files to download (check the patterns)")
    headers = build_hf_headers(token=token)
    return FetchPlan(files=files, revision=commit, headers=headers)


def resolve_http(source: HttpSource) -> FetchPlan:
    """A single-file plan for a plain URL (size learnt when fetching)."""
    return FetchPlan(files=[RemoteFile(rel=safe_relpath(source.filename), url=source.url, size=None)])


# ---------------------------------------------------------------- the range downloader


class _Conn:
    """One keep-alive HTTP connection per worker thread and host."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}

    def get(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        conn = self._conns.get(key)
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = cls(host, port, timeout=self.timeout)
            self._conns[key] = conn
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return conn, path

    def drop(self, url: str) -> None:
        parts = urlsplit(url)
        for key in [k for k in self._conns if k[1] == parts.hostname]:
            self._conns.pop(key).close()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


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
    ) -> None:
        self.dest = dest
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
        for f in files:
            if f.size is None:
                self._probe_size(f)
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

        def worker() -> None:
            conns = _Conn(self.timeout)
            buf = bytearray(READ_BYTES)
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
                        self._fetch_chunk(conns, buf, fd, w, index, start)
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
        for t in threads:
            t.join()
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
            time.sleep(0.005)

    def _request(
        self, conns: _Conn, url: str, headers: dict[str, str], method: str = "GET"
    ) -> tuple[http.client.HTTPResponse, str]:
        """Send a request, following redirects; returns the response and the final URL.
        Credentials go only to the origin host, never to a redirect target elsewhere."""
        origin = urlsplit(url).hostname
        for _ in range(6):
            conn, path = conns.get(url)
            hdrs = headers
            if urlsplit(url).hostname != origin:
                hdrs = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            try:
                conn.request(method, path, headers=hdrs)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                conns.drop(url)
                raise
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location") or ""
                resp.read()
                url = urljoin(url, location)
                continue
            return resp, url
        raise TransferError(f"too many redirects fetching {url}")

    def _probe_size(self, f: RemoteFile) -> None:
        conns = _Conn(self.timeout)
        try:
            resp, _ = self._request(conns, f.url, {**self.headers, "Accept-Encoding": "identity"}, "HEAD")
            resp.read()
            if resp.status >= 400:
                raise self._http_error(resp.status, resp.reason, f.url)
            length = resp.getheader("Content-Length")
            if length is None:
                raise TransferError(f"{f.url} sends no Content-Length: cannot verify its size")
            f.size = int(length)
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"cannot reach {f.url}: {exc}", code="source_unreachable") from None
        finally:
            conns.close()

    def _wait_for_peer(self, waited: float) -> float:
        if waited >= STALL_TIMEOUT:
            raise TransferError(f"the peer sent nothing new for {STALL_TIMEOUT:g} s", code="source_stalled")
        if self.cancel.is_set():
            raise Cancelled()
        time.sleep(0.2)
        return waited + 0.2

    @staticmethod
    def _http_error(status: int, reason: str, url: str) -> GswarmError:
        if status == 404:
            return NotFound(f"HTTP 404 {reason} from {url}", code="source_not_found")
        if status in (401, 403):
            return TransferError(
                f"HTTP {status} {reason} from {url} (set HF_TOKEN?)", code="source_forbidden"
            )
        return TransferError(f"HTTP {status} {reason} from {url}", code="source_error")

    def _fetch_chunk(
        self, conns: _Conn, buf: bytearray, fd: int, w: _FileWork, index: int, start: int
    ) -> None:
        f = w.file
        size = f.size or 0
        end = min(size, (index + 1) * self.chunk)
        pos = start
        mv = memoryview(buf)
        step = len(buf)
        if self.limit is not None:
            step = max(LIMITED_READ_BYTES, min(step, self.limit.rate // 10))
        attempt = 0
        waited = 0.0
        while pos < end:
            if self.cancel.is_set():
                raise Cancelled()
            headers = {**self.headers, "Range": f"bytes={pos}-{end - 1}", "Accept-Encoding": "identity"}
            try:
                resp, _ = self._request(conns, f.url, headers)
                if resp.status == 425:
                    # A peer that is still downloading has not got these bytes yet.
                    resp.read()
                    waited = self._wait_for_peer(waited)
                    continue
                if resp.status >= 400:
                    resp.read()
                    raise self._http_error(resp.status, resp.reason, f.url)
                if resp.status == 200 and pos != 0:
                    resp.close()
                    conns.drop(f.url)
                    raise TransferError(f"{f.url} does not support range requests", code="source_error")
                want = end - pos
                served = _content_range_end(resp.getheader("Content-Range"))
                if resp.status == 206 and served is not None:
                    want = min(want, served + 1 - pos)  # a peer still downloading sends what it has
                waited = 0.0
                while want > 0:
                    if self.cancel.is_set():
                        resp.close()
                        conns.drop(f.url)
                        raise Cancelled()
                    if self.limit is not None:
                        self.limit.take(min(step, want))
                    n = resp.readinto(mv[: min(step, want)])
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
                    raise TransferError(
                        f"fetching {f.rel} failed after {_RETRIES} retries: {type(exc).__name__}: {exc}",
                        code="source_unreachable",
                    ) from None
                time.sleep(min(2.0, 0.2 * 2**attempt))


def _content_range_end(header: str | None) -> int | None:
    """The last byte of `Content-Range: bytes a-b/size`."""
    if not header or not header.startswith("bytes ") or "-" not in header:
        return None
    try:
        return int(header[6:].split("/")[0].split("-")[1])
    except (ValueError, IndexError):
        return None


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


# ---------------------------------------------------------------- hashing and verification


def _hash_file(path: Path, want_git: bool, cancel: threading.Event) -> tuple[str, str]:
    sha = hashlib.sha256()
    git = hashlib.sha1(usedforsecurity=False) if want_git else None
    size = path.stat().st_size
    if git is not None:
        git.update(f"blob {size}\0".encode())
    buf = bytearray(HASH_READ_BYTES)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            if cancel.is_set():
                raise Cancelled()
            n = fh.readinto(buf)
            if not n:
                break
            sha.update(mv[:n])
            if git is not None:
                git.update(mv[:n])
    return sha.hexdigest(), git.hexdigest() if git is not None else ""


def verify_files(
    root: Path,
    files: list[RemoteFile],
    cancel: threading.Event,
    workers: int = VERIFY_WORKERS,
    hashed: dict[str, tuple[str, str]] | None = None,
) -> list[ManifestFile]:
    """Check sizes and hashes of fetched files (`hashed`: digests already taken while they
    arrived); the manifest entries, or TransferError naming the first file that does not match."""

    def check(f: RemoteFile) -> ManifestFile:
        path = root / f.rel
        size = path.stat().st_size
        if f.size is not None and size != f.size:
            raise TransferError(f"{f.rel}: size {size} != expected {f.size}", code="verification_failed")
        known = (hashed or {}).get(f.rel)
        sha, git = known if known is not None else _hash_file(path, bool(f.git_sha1), cancel)
        if f.sha256 and sha != f.sha256:
            raise TransferError(f"{f.rel}: sha256 {sha} != expected {f.sha256}", code="checksum_mismatch")
        if f.git_sha1 and git != f.git_sha1:
            raise TransferError(f"{f.rel}: git sha1 {git} != expected {f.git_sha1}", code="checksum_mismatch")
        return ManifestFile(path=f.rel, size=size, sha256=sha)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        return list(pool.map(check, files))


def hash_manifest(root: Path, rels: list[str], cancel: threading.Event) -> list[ManifestFile]:
    """Manifest entries (size, sha256) for files with nothing to verify against."""
    return verify_files(root, [RemoteFile(rel=r, url="", size=None) for r in rels], cancel)


# ---------------------------------------------------------------- local copies


def _copy_range(
    src_fd: int, dst_fd: int, offset: int, length: int, counter: ByteCounter, cancel: threading.Event
) -> None:
    end = offset + length
    pos = offset
    use_cfr = hasattr(os, "copy_file_range")
    while pos < end:
        if cancel.is_set():
            raise Cancelled()
        step = min(COPY_CHUNK_BYTES, end - pos)
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
) -> None:
    """Copy files (relative path, size) from `src` to `dst` with the kernel's copy path
    (`copy_file_range`), large files split across worker threads."""
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
            d = os.open(dst / rel, os.O_WRONLY)
            try:
                _copy_range(s, d, off, length, counter, cancel)
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
