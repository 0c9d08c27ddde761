"""The node's credential on the agent's side: kept in a file only its user can read.

The head issues a node its credential when the node enrols (its first `Welcome`); the agent
presents it in every later `Hello`. It lives in `<disk-dir>/.gswarm-node-credential` (mode
0600; no model name starts with a dot, so no copy can clash with it), as JSON naming the node
id it belongs to: an agent started with another `--node-id` on the same disk dir does not
present it. Losing the file locks the node out until an operator removes it from the head
(`gswarm nodes remove ID`), after which the join token enrols it again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

CREDENTIAL_FILE = ".gswarm-node-credential"


class NodeCredential(msgspec.Struct):
    """The content of the credential file."""

    node_id: str
    credential: str


def load_credential(path: Path, node_id: str) -> str:
    """The credential kept for `node_id`, or "" when there is none (or the file is unreadable)."""
    try:
        kept = msgspec.json.decode(path.read_bytes(), type=NodeCredential)
    except FileNotFoundError:
        return ""
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("ignoring the node credential file %s: %s", path, exc)
        return ""
    return kept.credential if kept.node_id == node_id else ""


def save_credential(path: Path, node_id: str, credential: str) -> None:
    """Write the credential atomically, readable by this user only (0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_EXCL below: a leftover with wider modes is never reused
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(NodeCredential(node_id=node_id, credential=credential)))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
