"""Every default in one place, each overridable by an environment variable `GSWARM_<NAME>`.

No I/O here except reading the environment and, in `load_tokens`, one small file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import msgspec

DEFAULT_PORT = 8100
DEFAULT_HEAD_URL = f"http://localhost:{DEFAULT_PORT}"
TOKENS_FILE = "tokens.json"
LOCK_FILE = "head.lock"
"""In a head's state dir: held (flock) by the head using it; names its pid, host and port."""
BANDWIDTH_MIN = 64 << 10
"""Smallest `bandwidth_limit` (bytes/s) a transfer accepts: below it a throttled read would wait
for seconds, and a limit that small is a mistake, not a wish."""
BANDWIDTH_MAX = 1 << 40
"""Largest `bandwidth_limit` (bytes/s) a transfer accepts (1 TiB/s: no link is faster)."""


def default_state_dir() -> Path:
    """The head's state directory: `$GSWARM_STATE_DIR`, else `~/.local/share/gswarm`."""
    env = os.environ.get("GSWARM_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gswarm"


def default_disk_dir() -> Path:
    """Where an agent keeps its `disk` tier: `$GSWARM_DISK_DIR`, else the user's cache dir."""
    env = os.environ.get("GSWARM_DISK_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gswarm" / "models"


def default_dram_dir() -> Path:
    """Where an agent keeps its `dram` tier (a tmpfs): `$GSWARM_DRAM_DIR`, else
    `/dev/shm/gswarm-<uid>`, one per user (the agent creates it 0700 and refuses one that
    another user made first)."""
    env = os.environ.get("GSWARM_DRAM_DIR")
    if env:
        return Path(env).expanduser()
    return Path(f"/dev/shm/gswarm-{os.getuid()}")


def _flag(raw: str) -> bool:
    """A yes/no environment value: 1/true/yes/on or 0/false/no/off (any case)."""
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")


@dataclass
class Settings:
    """Tunables shared by head and agent. Each field reads `GSWARM_<FIELD>` when built by `from_env`."""

    heartbeat_interval: float = 5.0
    """Seconds between an agent's heartbeats (fresh resource figures)."""
    offline_after: float = 15.0
    """A node that has not been heard from for this long is marked offline."""
    reconnect_grace: float = 2.0
    """A dropped agent connection marks its node offline only if it is not back within this time."""
    ws_ping_interval: float = 5.0
    """Websocket ping/pong interval, both ends; a missing pong closes the connection."""
    op_timeout: float = 6 * 3600.0
    """Default per-op timeout in seconds."""
    max_body_bytes: int = 1 << 20
    """Largest REST request body (a job file has its own limit, `max_job_bytes`)."""
    max_job_bytes: int = 8 << 20
    """Largest job file, sent to `POST /jobs` or checked by `gsmodel job --check`."""
    max_ws_message_bytes: int = 8 << 20
    """Largest websocket message either way."""
    subscriber_queue: int = 2048
    """Events an event subscriber may have waiting before it is dropped as slow."""
    ops_kept: int = 50_000
    """Ended ops kept (in memory and SQLite); older ones are forgotten."""
    event_ring: int = 20_000
    """Events kept in memory for replay; older ones are read back from SQLite."""
    events_kept: int = 200_000
    """Events kept in the SQLite log; the writer prunes older ones (a reconnecting subscriber
    further behind than this misses them)."""
    events_max_age: float = 7 * 86400.0
    """Seconds an event stays in the SQLite log at most."""
    replay_page_bytes: int = 4 << 20
    """Largest replay page (`GET /events`, and each page of the `/ws/events` replay), in bytes
    of encoded events: a replay never holds more than this in memory at once."""
    progress_interval: float = 0.2
    """An agent sends at most one progress message per op per this many seconds."""
    progress_every: float = 5.0
    """Without a terminal, the CLI prints at most one progress line per op (or job action) per
    this many seconds, besides a line per phase and a summary."""
    reconnect_min: float = 0.5
    """First reconnect backoff of an agent, seconds."""
    reconnect_max: float = 10.0
    """Largest reconnect backoff of an agent, seconds."""
    hello_timeout: float = 10.0
    """How long the head waits for an agent's Hello, and the agent for the Welcome."""
    request_timeout: float = 30.0
    """Client-side timeout of one REST request."""
    sweep_interval: float = 0.5
    """How often the head checks liveness and op deadlines."""
    warm_spare: bool = True
    """An agent keeps one CPU worker with torch and transformers already imported, so the next
    builtin service on disk or dram starts without their seconds of import; false saves the
    memory that idle process holds."""
    metrics_port: int = -1
    """A port on which the head serves `/metrics` to anyone, without the api token (for a
    Prometheus scraper); -1: none, `/metrics` only on the head's port with the api token."""

    @classmethod
    def from_env(cls, **overrides: float | int | bool | None) -> Settings:
        """Defaults, then `GSWARM_*` environment variables, then explicit non-None overrides."""
        settings = cls()
        for f in fields(cls):
            raw = os.environ.get(f"GSWARM_{f.name.upper()}")
            if raw is not None:
                kind = type(getattr(settings, f.name))
                try:
                    setattr(settings, f.name, _flag(raw) if kind is bool else kind(raw))
                except ValueError as exc:
                    raise ValueError(f"GSWARM_{f.name.upper()}={raw!r}: {exc}") from None
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        return settings


class Tokens(msgspec.Struct):
    """Secrets a head creates at first start: REST access, agent join, transfer signing."""

    api_token: str
    join_token: str
    transfer_key: str = ""


def load_tokens(state_dir: Path | None = None) -> Tokens | None:
    """The tokens of a head whose state dir is on this machine, or None when there is none."""
    path = (state_dir or default_state_dir()) / TOKENS_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=Tokens)
    except (OSError, msgspec.DecodeError):
        return None
