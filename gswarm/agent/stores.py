"""The agent's storage tiers: `disk` and `dram` directories, one subdirectory per model.

A published copy is `<tier dir>/<model>/` holding the files and a manifest
(`.gswarm-manifest.json`: files, sizes, sha256). Only a directory with a manifest counts
as held; work in progress lives under `<tier dir>/.partial/` until it is verified and
renamed into place. All functions here block; callers run them in threads.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from gswarm.devices import MODEL_NAME_RE
from gswarm.protocol import Holding

MANIFEST_NAME = ".gswarm-manifest.json"
PARTIAL_DIR = ".partial"


class ManifestFile(msgspec.Struct, omit_defaults=True):
    """One file of a model copy."""

    path: str
    size: int
    sha256: str = ""


class Manifest(msgspec.Struct, omit_defaults=True):
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


def read_manifest(model_dir: Path) -> Manifest | None:
    """The manifest of a published copy, or None if there is none (or it is unreadable)."""
    try:
        return msgspec.json.decode((model_dir / MANIFEST_NAME).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def scan_holdings(tiers: dict[str, Path]) -> list[Holding]:
    """Every published copy on the given tiers."""
    found: list[Holding] = []
    for tier, root in tiers.items():
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if not entry.is_dir() or not MODEL_NAME_RE.fullmatch(entry.name):
                continue
            manifest = read_manifest(entry)
            if manifest is None:
                continue
            found.append(
                Holding(
                    model=entry.name,
                    tier=tier,
                    path=str(entry),
                    size=manifest.size,
                    files=len(manifest.files),
                )
            )
    return found
