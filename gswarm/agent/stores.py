"""The agent's storage tiers: `disk` and `dram` directories, one subdirectory per model.

A published copy is `<tier dir>/<model>/` holding the files and a manifest
(`.gswarm-manifest.json`: files, sizes, sha256). Only a directory with a manifest counts
as held. Work in progress lives under `<tier dir>/.partial/<model>/` until it is verified
and renamed into place, so a reader never sees half a copy, and a crash leaves the partial
work to resume. All functions here block; callers run them in threads.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
import uuid
from pathlib import Path, PurePosixPath

import msgspec

from gswarm.devices import MODEL_NAME_RE, validate_model_name
from gswarm.errors import BadRequest, Conflict, GswarmError, InsufficientSpace
from gswarm.protocol import Holding, TierInfo

MANIFEST_NAME = ".gswarm-manifest.json"
PARTIAL_DIR = ".partial"
TRASH_DIR = ".trash"


class ManifestFile(msgspec.Struct):
    """One file of a model copy."""

    path: str
    size: int
    sha256: str = ""


class Manifest(msgspec.Struct):
    """What a published copy holds."""

    model: str
    files: list[ManifestFile]
    source: str = ""
    revision: str = ""
    created_at: float = 0.0

    @property
    def size(self) -> int:
        """Total bytes of the copy."""
        return sum(f.size for f in self.files)


def safe_relpath(name: str) -> str:
    """A file name inside a model directory, refused if it could escape it."""
    p = PurePosixPath(name)
    if (
        not name
        or "\x00" in name
        or "\\" in name
        or p.is_absolute()
        or any(part in ("..", ".", "") for part in name.split("/"))
        or p.parts[0] in (MANIFEST_NAME, PARTIAL_DIR, TRASH_DIR)
    ):
        raise BadRequest(
            f"refusing file name {name!r}: it would leave the model directory", code="unsafe_path"
        )
    return str(p)


def read_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of a published copy, or None if there is none (or it is unreadable)."""
    try:
        return msgspec.json.decode((model_dir / MANIFEST_NAME).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def dir_size(path: Path) -> int:
    """Bytes of all regular files below a directory."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def allocated_size(path: Path) -> int:
    """Bytes the files below a directory take on disk (a preallocated, partly written file
    counts what was written)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


class TierStore:
    """One tier (`disk` or `dram`) of this node: a root directory and an optional quota."""

    def __init__(self, name: str, root: Path, quota: int | None = None) -> None:
        self.name = name
        self.root = root
        self.quota = quota

    def model_dir(self, model: str) -> Path:
        """Where a published copy of `model` lives."""
        return self.root / validate_model_name(model, "model_name")

    def partial_dir(self, model: str) -> Path:
        """Where work on a copy of `model` happens until it is published."""
        return self.root / PARTIAL_DIR / validate_model_name(model, "model_name")

    def ensure(self) -> None:
        """Create the tier's directories (its root 0700). A root in a directory every user may
        write to (/dev/shm, /tmp) must belong to this user: another could have made it first,
        to read the weights or to plant links in it."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(self.root.parent).st_mode & stat.S_IWOTH:
            owner = os.lstat(self.root).st_uid
            if owner != os.getuid():
                raise GswarmError(
                    f"the {self.name} tier directory {self.root} belongs to uid {owner}, not to this "
                    "user: choose another directory",
                    code="unsafe_tier_dir",
                )
        (self.root / PARTIAL_DIR).mkdir(exist_ok=True)

    def info(self) -> TierInfo:
        """Capacity and free space, the quota applied."""
        self.ensure()
        usage = shutil.disk_usage(self.root)
        capacity, free = usage.total, usage.free
        if self.quota is not None:
            used = dir_size(self.root)
            capacity = min(capacity, self.quota)
            free = max(0, min(free, self.quota - used))
        return TierInfo(name=self.name, path=str(self.root), capacity=capacity, free=free)

    def check_space(self, needed: int) -> None:
        """InsufficientSpace unless `needed` more bytes fit (checked before the first byte)."""
        free = self.info().free
        if needed > free:
            raise InsufficientSpace(
                f"not enough space on {self.name} ({self.root}): {needed} bytes needed, {free} free",
                details={"needed": needed, "free": free, "tier": self.name},
            )

    def manifest(self, model: str) -> Manifest | None:
        """The manifest of the published copy of `model`, if any."""
        return read_manifest(self.model_dir(model))

    def holdings(self) -> list[Holding]:
        """Every published copy on this tier."""
        found: list[Holding] = []
        if not self.root.is_dir():
            return found
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or not MODEL_NAME_RE.fullmatch(entry.name):
                continue
            manifest = read_manifest(entry)
            if manifest is None:
                continue
            found.append(
                Holding(
                    model=entry.name,
                    tier=self.name,
                    path=str(entry),
                    size=manifest.size,
                    files=len(manifest.files),
                    source=manifest.source,
                    revision=manifest.revision,
                )
            )
        return found

    def partials(self) -> list[Holding]:
        """Unfinished copies on this tier (a failed or interrupted write kept them to resume),
        each with the bytes it takes."""
        base = self.root / PARTIAL_DIR
        if not base.is_dir():
            return []
        found = [
            self.partial_holding(entry.name)
            for entry in sorted(base.iterdir())
            if entry.is_dir() and MODEL_NAME_RE.fullmatch(entry.name)
        ]
        return [h for h in found if h is not None]

    def partial_holding(self, model: str) -> Holding | None:
        """The unfinished copy of `model` on this tier, if there is one that takes space."""
        path = self.partial_dir(model)
        if not path.is_dir():
            return None
        size = allocated_size(path)
        return Holding(model=model, tier=self.name, path=str(path), size=size) if size else None

    def publish(self, model: str, partial: Path, manifest: Manifest) -> Path:
        """Write the manifest and rename the verified partial directory into place."""
        manifest.created_at = manifest.created_at or time.time()
        tmp = partial / (MANIFEST_NAME + ".tmp")
        tmp.write_bytes(msgspec.json.encode(manifest))
        os.replace(tmp, partial / MANIFEST_NAME)
        final = self.model_dir(model)
        if final.exists():
            self._discard(final)
        os.replace(partial, final)
        return final

    def remove(self, model: str) -> bool:
        """Delete the published copy of `model` (first unpublished by a rename); False if absent."""
        final = self.model_dir(model)
        if not final.exists():
            return False
        self._discard(final)
        return True

    def discard_partial(self, model: str) -> None:
        """Throw away unfinished work on `model`."""
        partial = self.partial_dir(model)
        if partial.exists():
            self._discard(partial)

    def _discard(self, path: Path) -> None:
        trash = self.root / TRASH_DIR
        trash.mkdir(parents=True, exist_ok=True)
        doomed = trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, doomed)
        except OSError as exc:
            raise Conflict(f"cannot remove {path}: {exc}") from None
        shutil.rmtree(doomed, ignore_errors=True)
