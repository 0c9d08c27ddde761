"""Which local paths a `file://` download may read.

Only paths below a root the node's operator allowed (agent option `--allow-file-root PATH`,
config key `allow_file_roots`; none by default), and never anything overlapping the agent's own
tiers and state or a head's state directory on the same machine. Paths are judged after every
symlink is resolved; a path naming `..` is refused outright. Each file is checked again through
the descriptor that reads it (`/proc/self/fd`), so a symlink swapped in after the listing reads
nothing outside the roots either. All functions here block; callers run them in threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from gswarm.errors import Forbidden


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class FileRoots:
    """The roots `file://` sources may be read from, and the directories they may never touch."""

    def __init__(self, allowed: Iterable[Path], private: Iterable[Path]) -> None:
        self.allowed = [Path(os.path.abspath(p)) for p in allowed]
        """The operator's roots, as given (resolved when checked: a root may be a symlink)."""
        self.private = [Path(os.path.abspath(p)) for p in private]
        """The agent's tiers and state and the head's state dir: never read, at any depth."""

    def _refuse(self, shown: str, why: str) -> Forbidden:
        roots = ", ".join(str(r) for r in self.allowed) or "none"
        return Forbidden(
            f"file://{shown}: {why} (roots this node allows for file:// sources: {roots}; "
            "its operator allows one with the agent option --allow-file-root PATH)",
            code="forbidden_source",
            details={"path": shown, "allowed_roots": [str(r) for r in self.allowed]},
        )

    def _judge(self, real: Path, shown: str) -> None:
        if not any(_inside(real, root.resolve()) for root in self.allowed):
            raise self._refuse(shown, "not below a root this node allows")
        for private in self.private:
            own = private.resolve()
            if _inside(real, own) or _inside(own, real):
                raise self._refuse(shown, "overlaps this node's own tiers or a head's state directory")

    def check(self, path: str) -> Path:
        """The resolved path of a `file://` source, or Forbidden (`forbidden_source`)."""
        if ".." in PurePosixPath(path).parts:
            raise self._refuse(path, "'..' is not allowed in a file:// path")
        real = Path(os.path.realpath(path))
        self._judge(real, path)
        return real

    def check_fd(self, fd: int, shown: str) -> None:
        """Forbidden unless the file open on `fd` lies below an allowed root (and in no private
        directory): what was opened, not what the name pointed at when it was listed."""
        try:
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            raise self._refuse(shown, "cannot tell where the opened file lies") from None
        self._judge(real, shown)
