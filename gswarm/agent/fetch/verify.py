"""Checksums: verifying fetched files against their expected sizes and hashes, and manifest
entries for files with nothing to verify against."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from pathlib import Path

from gswarm.agent.fetch.common import Cancelled, TransferError
from gswarm.agent.fetch.hub import RemoteFile
from gswarm.agent.stores import ManifestFile

VERIFY_WORKERS = min(4, os.cpu_count() or 1)
"""Files hashed in parallel when verifying."""
HASH_READ_BYTES = 1 << 20
"""Bytes per read when hashing a file back from disk (measured: larger reads cost more CPU per
byte hashed)."""


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
