"""A small Hugging Face Hub-compatible HTTP server for tests and benchmarks.

It implements the subset of the Hub API that ``huggingface_hub`` (2.x) uses to
download repositories over plain HTTP: repo info, tree listing, paths-info,
refs and ``/resolve`` (HEAD + GET with Range support). Xet headers are never
sent, so the client always falls back to regular HTTP downloads.

Point the real client at it with ``endpoint=server.url`` (or ``HF_ENDPOINT``,
which ``huggingface_hub`` only reads at import time).

Command line (serves every file under DIR as one repo, prints the URL first)::

    python tests/hubserver.py --dir DIR --repo org/name [--port N] [--rate-limit 50M]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from aiohttp import web

__all__ = [
    "DEFAULT_LFS_THRESHOLD",
    "HubRepo",
    "HubServer",
    "RequestRecord",
    "ThreadedHubServer",
    "main",
]

RepoType = Literal["model", "dataset", "space"]

#: Files at least this large are served as LFS files (sha256 etag, ``lfs`` metadata).
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024

_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
_HASH_CHUNK = 4 * 1024 * 1024
_FAST_CHUNK = 4 * 1024 * 1024
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_PLURALS: dict[str, RepoType] = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES: dict[str, RepoType] = {"datasets": "dataset", "spaces": "space"}
_API_ACTIONS = frozenset({"revision", "tree", "paths-info", "refs"})
_SIZE_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def _check_repo_path(path: str) -> bool:
    """Return True if ``path`` is a safe, relative, '/'-separated repo path."""
    if not path or "\\" in path or "\0" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


@dataclass
class HubRepo:
    """A repository to serve: files given as in-memory bytes or paths on disk."""

    repo_id: str
    files: dict[str, bytes | Path]
    revision: str = "main"
    repo_type: RepoType = "model"
    token: str | None = None
    """A gated repo: every request must carry ``Authorization: Bearer TOKEN`` (401 without a
    token, 403 with another one, as the Hub answers for a gated repo)."""

    @classmethod
    def from_dir(
        cls,
        repo_id: str,
        directory: str | os.PathLike[str],
        *,
        revision: str = "main",
        repo_type: RepoType = "model",
    ) -> HubRepo:
        """Build a repo serving every regular file under ``directory`` (``.git`` excluded)."""
        root = Path(directory)
        files: dict[str, bytes | Path] = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if ".git" in rel.parts or not path.is_file():
                continue
            files[rel.as_posix()] = path
        return cls(repo_id=repo_id, files=files, revision=revision, repo_type=repo_type)

    def file_size(self, name: str) -> int:
        """Size in bytes of one file of the repo."""
        source = self.files[name]
        return len(source) if isinstance(source, bytes) else Path(source).stat().st_size

    @property
    def commit_sha(self) -> str:
        """Fixed 40-hex commit id derived from repo id, revision, file names and sizes."""
        digest = hashlib.sha1(f"{self.repo_type}\n{self.repo_id}\n{self.revision}\n".encode())
        for name in sorted(self.files):
            digest.update(f"{name}\0{self.file_size(name)}\n".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class RequestRecord:
    """One request handled by the server (``filename`` set for ``/resolve`` requests)."""

    method: str
    path: str
    status: int
    range: str | None
    repo_id: str | None
    filename: str | None
    bytes_sent: int


@dataclass(eq=False)
class _File:
    """Server-side state of one repo file; ``digest`` is a git sha1 or (LFS) a sha256."""

    path: str
    source: bytes | Path
    size: int
    mtime_ns: int
    lfs: bool
    digest: str | None = None
    task: asyncio.Task[str] | None = None

    def lfs_pointer(self) -> bytes:
        """Git LFS pointer file content (requires ``digest``)."""
        spec = "https://git-lfs.github.com/spec/v1"
        return f"version {spec}\noid sha256:{self.digest}\nsize {self.size}\n".encode()

    def blob_id(self) -> str:
        """Git blob id of the file as stored in git (the pointer for LFS files)."""
        assert self.digest is not None
        return _git_blob_sha1(self.lfs_pointer()) if self.lfs else self.digest


@dataclass(eq=False)
class _Repo:
    """Server-side state of one repo."""

    repo: HubRepo
    sha: str
    files: dict[str, _File]
    dirs: set[str] = field(default_factory=set)


class _HashAborted(Exception):
    """Raised inside hashing threads when the server stops."""


class _BadRange(Exception):
    """Unsatisfiable or unsupported Range header."""


class _HubError(Exception):
    """Carries a ready-made Hub-style error response out of a route."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hash_source(source: bytes | Path, size: int, lfs: bool, stop: threading.Event) -> str:
    """Compute sha256 (LFS) or git blob sha1 of a file; runs in a worker thread."""
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    if isinstance(source, bytes):
        digest.update(source)
        return digest.hexdigest()
    with source.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            if stop.is_set():
                raise _HashAborted(str(source))
            digest.update(chunk)
    return digest.hexdigest()


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """Parse a single-range ``Range`` header into an inclusive (start, end) pair."""
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        raise _BadRange(header)
    first, last = match.groups()
    if not first:
        if not last or int(last) == 0 or size == 0:
            raise _BadRange(header)
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or start > end:
        raise _BadRange(header)
    return start, min(end, size - 1)


def _tree_oid(path: str, names: Iterable[str]) -> str:
    return hashlib.sha1(("tree " + path + "\0" + "\0".join(sorted(names))).encode()).hexdigest()


class _RateLimiter:
    """Token bucket shared by all responses (virtual-clock form, one chunk of burst)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._free_at = 0.0

    def chunk_size(self) -> int:
        """Write size giving roughly 50 wake-ups per second."""
        return max(4096, min(256 * 1024, self.rate // 50))

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent."""
        now = asyncio.get_running_loop().time()
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.rate
        if start > now:
            await asyncio.sleep(start - now)


class HubServer:
    """Hub-compatible aiohttp server; see the module docstring.

    Stats (``bytes_served``, ``request_counts``, ``range_headers``, ``requests``)
    are keyed by the file path inside the repo.
    """

    def __init__(
        self,
        repos: Iterable[HubRepo] = (),
        *,
        rate_limit: int | None = None,
        fail_after: Mapping[str, int] | None = None,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        prehash: bool = True,
    ) -> None:
        """Create a server.

        ``rate_limit``: total bytes/s of ``/resolve`` bodies, shared by all connections
        (None: unlimited); can be changed later through :attr:`rate_limit`.
        ``fail_after``: ``{filename: n}``; the next GET of that file is cut (connection
        closed) after ``n`` body bytes; each entry is consumed when it fires.
        ``prehash``: hash files in background threads as soon as the server runs.
        """
        self.fail_after: dict[str, int] = dict(fail_after or {})
        self.lfs_threshold = lfs_threshold
        self.prehash = prehash
        self.bytes_served: collections.Counter[str] = collections.Counter()
        self.request_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.range_headers: list[str] = []
        self.requests: list[RequestRecord] = []
        self._repos: dict[tuple[RepoType, str], _Repo] = {}
        self._disk_digests: dict[tuple[str, int, int, bool], str] = {}
        self._limiter = _RateLimiter(rate_limit) if rate_limit else None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[str]] = set()
        self._closing = threading.Event()
        for repo in repos:
            self.add_repo(repo)

    # -- public API -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (only after :meth:`start`)."""
        if self._url is None:
            raise RuntimeError("HubServer is not started")
        return self._url

    @property
    def rate_limit(self) -> int | None:
        """Current total uplink limit in bytes/s (None: unlimited)."""
        return self._limiter.rate if self._limiter else None

    @rate_limit.setter
    def rate_limit(self, value: int | None) -> None:
        self._limiter = _RateLimiter(value) if value else None

    @property
    def total_bytes_served(self) -> int:
        """Body bytes sent by all ``/resolve`` GETs."""
        return sum(self.bytes_served.values())

    def reset_stats(self) -> None:
        """Clear all request/byte counters."""
        self.bytes_served.clear()
        self.request_counts.clear()
        self.range_headers.clear()
        self.requests.clear()

    def add_repo(self, repo: HubRepo) -> None:
        """Serve ``repo`` (replacing one with the same type and id); call from the loop thread."""
        files: dict[str, _File] = {}
        dirs: set[str] = set()
        for name, source in repo.files.items():
            if not _check_repo_path(name):
                raise ValueError(f"invalid repo file path: {name!r}")
            if isinstance(source, bytes):
                size, mtime_ns = len(source), 0
            else:
                source = Path(source).resolve()
                stat = source.stat()
                if not source.is_file():
                    raise ValueError(f"not a regular file: {source}")
                size, mtime_ns = stat.st_size, stat.st_mtime_ns
            files[name] = _File(name, source, size, mtime_ns, lfs=size >= self.lfs_threshold)
            parts = name.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        self._repos[(repo.repo_type, repo.repo_id)] = _Repo(repo, repo.commit_sha, files, dirs)
        if self._loop is not None and self.prehash:
            for entry in files.values():
                self._digest_task(entry)

    def remove_repo(self, repo_id: str, repo_type: RepoType = "model") -> None:
        """Stop serving a repo."""
        self._repos.pop((repo_type, repo_id), None)

    async def wait_hashed(self) -> None:
        """Wait until the digests of all served files are known."""
        entries = [f for r in self._repos.values() for f in r.files.values()]
        await asyncio.gather(*(self._digest(f) for f in entries))

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start listening; returns :attr:`url`."""
        if self._runner is not None:
            raise RuntimeError("HubServer already started")
        self._loop = asyncio.get_running_loop()
        self._closing.clear()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._url = f"http://{shown}:{bound_port}"
        if self.prehash:
            for repo in self._repos.values():
                for entry in repo.files.values():
                    self._digest_task(entry)
        return self._url

    async def stop(self) -> None:
        """Stop listening; cut in-flight responses and end hashing threads."""
        self._closing.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._url = None
        self._loop = None

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- hashing ----------------------------------------------------------------------

    def _digest_task(self, entry: _File) -> asyncio.Task[str] | None:
        """Start (once) the background computation of ``entry.digest``."""
        if entry.digest is not None:
            return None
        if entry.task is None:
            task = asyncio.get_running_loop().create_task(self._compute_digest(entry))
            entry.task = task
            self._tasks.add(task)

            def done(finished: asyncio.Task[str]) -> None:
                self._tasks.discard(finished)
                if entry.task is finished and (finished.cancelled() or finished.exception() is not None):
                    entry.task = None  # allow a later retry (e.g. after a restart)

            task.add_done_callback(done)
        return entry.task

    async def _compute_digest(self, entry: _File) -> str:
        key = None
        if isinstance(entry.source, Path):
            key = (str(entry.source), entry.size, entry.mtime_ns, entry.lfs)
            cached = self._disk_digests.get(key)
            if cached is not None:
                entry.digest = cached
                return cached
        small = isinstance(entry.source, bytes) and entry.size < 1024 * 1024
        args = (entry.source, entry.size, entry.lfs, self._closing)
        digest = _hash_source(*args) if small else await asyncio.to_thread(_hash_source, *args)
        if key is not None:
            self._disk_digests[key] = digest
        entry.digest = digest
        return digest

    async def _digest(self, entry: _File) -> str:
        task = self._digest_task(entry)
        if task is not None:
            await asyncio.shield(task)
        assert entry.digest is not None
        return entry.digest

    # -- routing ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        segs = [unquote(s) for s in request.rel_url.raw_path.split("/")[1:]]
        info: dict[str, Any] = {"repo_id": None, "filename": None, "range": None, "sent": 0}
        try:
            if len(segs) >= 3 and segs[0] == "api" and segs[1] in _PLURALS:
                resp = await self._api(request, _PLURALS[segs[1]], segs[2:], info)
            else:
                repo_type: RepoType = "model"
                if segs and segs[0] in _URL_PREFIXES:
                    repo_type, segs = _URL_PREFIXES[segs[0]], segs[1:]
                resp = await self._resolve(request, repo_type, segs, info)
        except _HubError as exc:
            resp = exc.response
        self.requests.append(
            RequestRecord(
                request.method,
                request.path,
                resp.status,
                info["range"],
                info["repo_id"],
                info["filename"],
                info["sent"],
            )
        )
        return resp

    def _split_repo(
        self, repo_type: RepoType, segs: list[str], actions: Iterable[str]
    ) -> tuple[str, list[str]]:
        """Split ``segs`` into (repo_id, rest), preferring served repos, then ``org/name``."""
        if len(segs) >= 2 and (repo_type, f"{segs[0]}/{segs[1]}") in self._repos:
            return f"{segs[0]}/{segs[1]}", segs[2:]
        if segs and (repo_type, segs[0]) in self._repos:
            return segs[0], segs[1:]
        if len(segs) >= 2 and segs[1] not in actions:
            return f"{segs[0]}/{segs[1]}", segs[2:]
        return (segs[0] if segs else ""), segs[1:]

    def _lookup(self, request: web.Request, repo_type: RepoType, repo_id: str, revision: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _error(404, "RepoNotFound", "Repository not found")
        if repo.repo.token is not None:
            sent = request.headers.get("Authorization", "")
            if not sent:
                raise _error(401, "GatedRepo", f"Access to model {repo_id} is restricted: log in")
            if sent != f"Bearer {repo.repo.token}":
                raise _error(403, "GatedRepo", f"Access to model {repo_id} is restricted")
        if revision is not None and revision not in (repo.repo.revision, repo.sha):
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo

    async def _api(
        self, request: web.Request, repo_type: RepoType, segs: list[str], info: dict[str, Any]
    ) -> web.StreamResponse:
        repo_id, rest = self._split_repo(repo_type, segs, _API_ACTIONS)
        info["repo_id"] = repo_id
        action = rest[0] if rest else ""
        method = request.method
        if action == "" and method in ("GET", "HEAD"):
            return await self._repo_info(request, self._lookup(request, repo_type, repo_id, None))
        if action == "revision" and len(rest) == 2 and method in ("GET", "HEAD"):
            return await self._repo_info(request, self._lookup(request, repo_type, repo_id, rest[1]))
        if action == "tree" and len(rest) >= 2 and method in ("GET", "HEAD"):
            repo = self._lookup(request, repo_type, repo_id, rest[1])
            return await self._tree(request, repo, "/".join(rest[2:]).strip("/"))
        if action == "paths-info" and len(rest) == 2 and method == "POST":
            return await self._paths_info(request, self._lookup(request, repo_type, repo_id, rest[1]))
        if action == "refs" and len(rest) == 1 and method in ("GET", "HEAD"):
            repo = self._lookup(request, repo_type, repo_id, None)
            branch = {
                "name": repo.repo.revision,
                "ref": f"refs/heads/{repo.repo.revision}",
                "targetCommit": repo.sha,
            }
            return web.json_response({"branches": [branch], "converts": [], "tags": [], "pullRequests": []})
        if (repo_type, repo_id) not in self._repos:
            raise _error(404, "RepoNotFound", "Repository not found")
        raise _error(404, None, f"Unsupported API route: {method} {request.path}")

    # -- API endpoints ------------------------------------------------------------------

    async def _repo_info(self, request: web.Request, repo: _Repo) -> web.StreamResponse:
        with_blobs = request.query.get("blobs", "").lower() in ("1", "true")
        if with_blobs:
            await asyncio.gather(*(self._digest(f) for f in repo.files.values()))
        siblings = []
        for name in sorted(repo.files):
            entry = repo.files[name]
            sibling: dict[str, Any] = {"rfilename": name, "size": entry.size}
            if with_blobs:
                sibling["blobId"] = entry.blob_id()
                if entry.lfs:
                    pointer_size = len(entry.lfs_pointer())
                    sibling["lfs"] = {
                        "sha256": entry.digest,
                        "size": entry.size,
                        "pointerSize": pointer_size,
                    }
            siblings.append(sibling)
        repo_id = repo.repo.repo_id
        body: dict[str, Any] = {
            "_id": repo.sha[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": repo.sha,
            "lastModified": _LAST_MODIFIED,
            "createdAt": _LAST_MODIFIED,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values()),
        }
        if repo.repo.repo_type == "model":
            body["modelId"] = repo_id
        return web.json_response(body)

    async def _file_json(self, entry: _File) -> dict[str, Any]:
        await self._digest(entry)
        item: dict[str, Any] = {
            "type": "file",
            "oid": entry.blob_id(),
            "size": entry.size,
            "path": entry.path,
        }
        if entry.lfs:
            item["lfs"] = {
                "oid": entry.digest,
                "size": entry.size,
                "pointerSize": len(entry.lfs_pointer()),
            }
        return item

    def _dir_json(self, repo: _Repo, path: str) -> dict[str, Any]:
        prefix = path + "/"
        names = [p for p in (*repo.files, *repo.dirs) if p.startswith(prefix)]
        return {"type": "directory", "oid": _tree_oid(path, names), "size": 0, "path": path}

    async def _tree(self, request: web.Request, repo: _Repo, path: str) -> web.StreamResponse:
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        if path and (not _check_repo_path(path) or path not in repo.dirs):
            raise _error(404, "EntryNotFound", f"{path} does not exist on {repo.repo.revision}", sha=repo.sha)
        prefix = path + "/" if path else ""

        def wanted(name: str) -> bool:
            return name.startswith(prefix) and (recursive or "/" not in name[len(prefix) :])

        dirs = [self._dir_json(repo, d) for d in sorted(repo.dirs) if wanted(d)]
        files = await asyncio.gather(
            *(self._file_json(repo.files[n]) for n in sorted(repo.files) if wanted(n))
        )
        return web.json_response([*dirs, *files])

    async def _paths_info(self, request: web.Request, repo: _Repo) -> web.StreamResponse:
        paths: list[str] = []
        if request.content_type == "application/json":
            payload = await request.json()
            raw = payload.get("paths", []) if isinstance(payload, dict) else []
            paths = [raw] if isinstance(raw, str) else [str(p) for p in raw]
        else:
            paths = [str(p) for p in (await request.post()).getall("paths", [])]
        result: list[dict[str, Any]] = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in repo.files:
                result.append(await self._file_json(repo.files[path]))
            elif path in repo.dirs:
                result.append(self._dir_json(repo, path))
        return web.json_response(result)

    # -- file downloads -----------------------------------------------------------------

    async def _resolve(
        self, request: web.Request, repo_type: RepoType, segs: list[str], info: dict[str, Any]
    ) -> web.StreamResponse:
        repo_id, rest = self._split_repo(repo_type, segs, ("resolve",))
        if len(rest) < 2 or rest[0] != "resolve" or not repo_id:
            raise _error(404, None, f"Not found: {request.path}")
        info["repo_id"] = repo_id
        repo = self._lookup(request, repo_type, repo_id, rest[1])
        filename = "/".join(rest[2:])
        info["filename"] = filename
        entry = repo.files.get(filename) if _check_repo_path(filename) else None
        if entry is None:
            raise _error(404, "EntryNotFound", "Entry not found", sha=repo.sha)
        if request.method not in ("GET", "HEAD"):
            raise _error(405, None, "Method not allowed")
        self.request_counts[request.method, filename] += 1
        return await self._send_file(request, repo, entry, info)

    async def _send_file(
        self, request: web.Request, repo: _Repo, entry: _File, info: dict[str, Any]
    ) -> web.StreamResponse:
        digest = await self._digest(entry)
        headers = {
            "ETag": f'"{digest}"',
            "X-Repo-Commit": repo.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{digest}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, end, status = 0, entry.size - 1, 200
        range_header = request.headers.get("Range")
        if range_header is not None:
            info["range"] = range_header
            if request.method == "GET":
                self.range_headers.append(range_header)
            try:
                start, end = _parse_range(range_header, entry.size)
            except _BadRange:
                headers["Content-Range"] = f"bytes */{entry.size}"
                raise _error(416, None, f"Range not satisfiable: {range_header}", headers=headers) from None
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start + 1
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        cut_at = self.fail_after.pop(entry.path, None)
        stop = end + 1 if cut_at is None else min(end + 1, start + max(cut_at, 0))
        try:
            sent = await self._write_body(resp, entry, start, stop, info)
        except ConnectionError:
            return resp  # the client went away
        if start + sent <= end and request.transport is not None:
            # fail_after cut or server stopping: flush what was written, then FIN
            request.transport.close()
        return resp

    async def _write_body(
        self, resp: web.StreamResponse, entry: _File, start: int, stop: int, info: dict[str, Any]
    ) -> int:
        """Send bytes ``[start, stop)`` of ``entry``, throttled and counted; returns bytes sent."""
        size = self._limiter.chunk_size() if self._limiter is not None else _FAST_CHUNK
        source = entry.source
        fh = None if isinstance(source, bytes) else await asyncio.to_thread(source.open, "rb")
        try:
            if fh is not None:
                fh.seek(start)
            for pos in range(start, stop, size):
                if self._closing.is_set():
                    return pos - start
                count = min(size, stop - pos)
                if isinstance(source, bytes):
                    data = source[pos : pos + count]
                else:
                    assert fh is not None
                    data = await asyncio.to_thread(fh.read, count)
                    if len(data) != count:
                        raise OSError(f"{source} changed while serving it")
                if self._limiter is not None:
                    await self._limiter.acquire(count)
                await resp.write(data)
                info["sent"] += count
                self.bytes_served[entry.path] += count
        finally:
            if fh is not None:
                fh.close()
        return stop - start


def _error(
    status: int,
    code: str | None,
    message: str,
    *,
    sha: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> _HubError:
    """Build a Hub-style error (``X-Error-Code``/``X-Error-Message`` headers + JSON body)."""
    all_headers = {
        k: v for k, v in (headers or {}).items() if k.lower() not in ("content-length", "content-type")
    }
    all_headers["X-Error-Message"] = message
    if code is not None:
        all_headers["X-Error-Code"] = code
    if sha is not None:
        all_headers["X-Repo-Commit"] = sha
    return _HubError(web.json_response({"error": message}, status=status, headers=all_headers))


class ThreadedHubServer:
    """Run a :class:`HubServer` on its own event loop in a background thread.

    Usable as a context manager from synchronous code (benchmarks)::

        with ThreadedHubServer([HubRepo.from_dir("org/m", path)]) as hub:
            snapshot_download("org/m", endpoint=hub.url)
    """

    def __init__(
        self,
        repos: Iterable[HubRepo] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: int | None = None,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        wait_hashed: bool = True,
    ) -> None:
        """Configure; ``wait_hashed`` makes :meth:`start` wait for all file digests."""
        self.server = HubServer(repos, rate_limit=rate_limit, lfs_threshold=lfs_threshold)
        self._host = host
        self._port = port
        self._wait_hashed = wait_hashed
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return self.server.url

    def start(self) -> str:
        """Start the thread and server; returns the URL."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._ready.clear()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(),), name="hubserver", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self.url

    def stop(self) -> None:
        """Stop the server and join the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (sync or async) on the server loop and return its result."""
        if self._loop is None:
            raise RuntimeError("not started")

        async def runner() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(runner(), self._loop).result()

    def add_repo(self, repo: HubRepo) -> None:
        """Add a repo from any thread (waits for its digests if ``wait_hashed``)."""
        self.call(self.server.add_repo, repo)
        if self._wait_hashed:
            self.call(self.server.wait_hashed)

    def set_rate_limit(self, rate: int | None) -> None:
        """Change the total uplink limit (bytes/s) from any thread."""
        self.call(setattr, self.server, "rate_limit", rate)

    def stats(self) -> tuple[dict[str, int], list[str]]:
        """Snapshot of (bytes_served, range_headers), taken on the server loop."""
        snapshot: tuple[dict[str, int], list[str]] = self.call(
            lambda: (dict(self.server.bytes_served), list(self.server.range_headers))
        )
        return snapshot

    def __enter__(self) -> ThreadedHubServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self.server.start(self._host, self._port)
            if self._wait_hashed:
                await self.server.wait_hashed()
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            await self.server.stop()
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.server.stop()
            self._loop = None


def _parse_size(text: str) -> int:
    """Parse ``1500000``, ``50M``, ``2MiB``, ``1G`` ... into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}")
    return int(float(match.group(1)) * _SIZE_SUFFIXES[(match.group(2) or "").upper()])


async def _serve(args: argparse.Namespace) -> None:
    repo = HubRepo.from_dir(args.repo, args.dir, revision=args.revision, repo_type=args.repo_type)
    server = HubServer([repo], rate_limit=args.rate_limit, lfs_threshold=args.lfs_threshold)
    await server.start(args.host, args.port)
    try:
        await server.wait_hashed()
        print(server.url, flush=True)
        print(
            f"serving {len(repo.files)} files of {args.repo} (sha {repo.commit_sha})",
            file=sys.stderr,
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve a directory as a Hub repo until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True, type=Path, help="directory whose files form the repo")
    parser.add_argument("--repo", required=True, help="repo id, e.g. org/name")
    parser.add_argument("--revision", default="main", help="branch name (default: main)")
    parser.add_argument("--repo-type", default="model", choices=["model", "dataset", "space"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate-limit", type=_parse_size, default=None, help="total bytes/s, e.g. 50M")
    parser.add_argument("--lfs-threshold", type=_parse_size, default=DEFAULT_LFS_THRESHOLD)
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"not a directory: {args.dir}")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
