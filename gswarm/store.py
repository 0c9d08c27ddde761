"""SQLite persistence of the registry and the event log; the only module that touches the db.

Writes are handed to one writer thread that commits them in batches (WAL mode), so the event
loop never waits on the disk. An event's `data` holds the full entity, so persisting an event
means appending it to the log and upserting (or deleting) its entity row; several changes of
one entity within a batch collapse into one row write. `op.progress` events update the op row
but are not kept in the log: they are transient, and a long download would flood it. The log
keeps a window (a count and an age); the writer thread prunes what falls out of it.

Node credentials are not registry entities and never travel in events: the table
`node_credentials` holds the hash of each enrolled node's credential, written through the same
writer thread by `put_credential`, which returns once the row is committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from gswarm.ops import Op, tag_row
from gswarm.protocol import Event, Job, JobAction, Location, Model, Node, Service, encode, event_decoder

_TABLES = {
    "model": "models",
    "node": "nodes",
    "location": "locations",
    "op": "ops",
    "service": "services",
    "job": "jobs",
}
_ENTITY_TYPES: dict[str, type[Any]] = {
    "models": Model,
    "nodes": Node,
    "locations": Location,
    "ops": Op,
    "services": Service,
    "jobs": Job,
    "job_actions": JobAction,
}
_TRANSIENT_KINDS = frozenset({"op.progress"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, ts REAL, kind TEXT, key TEXT, body BLOB);
CREATE TABLE IF NOT EXISTS models (key TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS nodes (key TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS locations (key TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS ops (key TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS services (key TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS jobs (key TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS job_actions (key TEXT PRIMARY KEY, body BLOB);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS node_credentials (key TEXT PRIMARY KEY, hash TEXT);
"""


@dataclass
class Snapshot:
    """Everything read back at start-up."""

    models: list[Model]
    nodes: list[Node]
    locations: list[Location]
    ops: list[Op]
    services: list[Service]
    jobs: list[Job]
    last_seq: int
    recent_events: list[Event]
    credentials: dict[str, str]
    """Node id -> hash of the node's credential."""


_STOP = object()
GROUP_COMMIT_SECONDS = 0.003
"""The writer waits this long after the first queued write, so bursts share one transaction."""
PRUNE_INTERVAL = 10.0
"""The writer prunes the event log at least this often while it writes (and after every tenth
of `events_kept` new events)."""


@dataclass
class _Events:
    queued_at: float
    events: Sequence[Event]


@dataclass
class _Forget:
    table: str
    keys: list[str]


@dataclass
class _Credential:
    node_id: str
    digest: str | None  # None: revoke
    done: concurrent.futures.Future[None]


@dataclass
class _Barrier:
    done: concurrent.futures.Future[None]


def _fail(done: concurrent.futures.Future[None], exc: BaseException) -> None:
    try:
        done.set_exception(RuntimeError(f"state store failed: {exc}"))
    except concurrent.futures.InvalidStateError:
        pass


def _assemble_jobs(jobs: list[Job], actions: list[JobAction]) -> list[Job]:
    by_job: dict[str, list[JobAction]] = {}
    for a in actions:
        by_job.setdefault(a.job_id, []).append(a)
    for job in jobs:
        job.actions = sorted(by_job.get(job.job_id, []), key=lambda a: a.index)
    return jobs


class Store:
    """The SQLite database under a state dir, written by a background thread."""

    def __init__(
        self,
        path: Path,
        events_kept: int = 200_000,
        events_max_age: float = 7 * 86400.0,
        on_write: Callable[[float], None] | None = None,
    ) -> None:
        """`on_write` is called from the writer thread after each committed batch of events with
        the seconds since the first of them was queued."""
        self.path = path
        self.events_kept = events_kept
        self.events_max_age = events_max_age
        self._on_write = on_write
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # ------------------------------------------------------------ start-up (call in a thread)

    def open_and_load(self, recent: int) -> Snapshot:
        """Create the schema if needed, read everything back and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            conn.executescript(_SCHEMA)
            tables: dict[str, list[Any]] = {}
            for table, typ in _ENTITY_TYPES.items():
                rows = conn.execute(f"SELECT body FROM {table}").fetchall()
                if table == "ops":
                    # Rows written before args and results carried their kind are tagged first.
                    tables[table] = [msgspec.convert(tag_row(msgspec.json.decode(r[0])), Op) for r in rows]
                else:
                    tables[table] = [msgspec.json.decode(r[0], type=typ) for r in rows]
            row = conn.execute("SELECT MAX(seq) FROM events").fetchone()
            meta = conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()
            last_seq = max(row[0] or 0, int(meta[0]) if meta else 0)
            rows = conn.execute("SELECT body FROM events ORDER BY seq DESC LIMIT ?", (recent,)).fetchall()
            events = [event_decoder.decode(r[0]) for r in reversed(rows)]
            credentials = dict(conn.execute("SELECT key, hash FROM node_credentials").fetchall())
        finally:
            conn.close()
        self._thread = threading.Thread(target=self._writer, name="gswarm-store", daemon=True)
        self._thread.start()
        return Snapshot(
            models=tables["models"],
            nodes=tables["nodes"],
            locations=tables["locations"],
            ops=tables["ops"],
            services=tables["services"],
            jobs=_assemble_jobs(tables["jobs"], tables["job_actions"]),
            last_seq=last_seq,
            recent_events=events,
            credentials=credentials,
        )

    # ------------------------------------------------------------ writes

    def forget(self, table: str, keys: Sequence[str]) -> None:
        """Queue the deletion of rows (pruned history); returns at once."""
        if keys:
            self._queue.put(_Forget(table, list(keys)))

    async def put_credential(self, node_id: str, digest: str | None) -> None:
        """Store the hash of a node's credential (None: delete it); returns once committed,
        after every write queued before it."""
        if self._error is not None:
            raise RuntimeError(f"state store failed: {self._error}") from self._error
        if self._thread is None:
            raise RuntimeError("state store is not open")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Credential(node_id, digest, done))
        if self._error is not None:  # the writer died after the check above: it may not see this
            _fail(done, self._error)
        await asyncio.wrap_future(done)

    async def flushed(self) -> None:
        """Return once every write queued before this call is committed (a result the head
        acknowledges to an agent must survive the head's crash: the agent forgets it)."""
        if self._error is not None:
            raise RuntimeError(f"state store failed: {self._error}") from self._error
        if self._thread is None:
            raise RuntimeError("state store is not open")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Barrier(done))
        if self._error is not None:  # the writer died after the check above: it may not see this
            _fail(done, self._error)
        await asyncio.wrap_future(done)

    def persist(self, events: Sequence[Event]) -> None:
        """Queue events for writing; returns at once."""
        if self._error is not None:
            raise RuntimeError(f"state store failed: {self._error}") from self._error
        if events:
            self._queue.put(_Events(time.monotonic(), events))

    def _writer(self) -> None:
        conn = self._connect()
        creds: list[_Credential] = []
        barriers: list[_Barrier] = []
        interval = min(PRUNE_INTERVAL, self.events_max_age / 4)
        last_prune = 0.0
        written = 0
        try:
            while True:
                item = self._queue.get()
                batch: list[Event] = []
                queued_at = 0.0
                forget: list[_Forget] = []
                creds = []
                barriers = []
                stop = item is _STOP
                if not stop:
                    time.sleep(GROUP_COMMIT_SECONDS)
                while True:
                    if item is _STOP:
                        stop = True
                    elif isinstance(item, _Forget):
                        forget.append(item)
                    elif isinstance(item, _Credential):
                        creds.append(item)
                    elif isinstance(item, _Barrier):
                        barriers.append(item)
                    elif isinstance(item, _Events):
                        if not batch:
                            queued_at = item.queued_at
                        batch.extend(item.events)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._write(conn, batch)
                    written += len(batch)
                    if self._on_write is not None:
                        self._on_write(time.monotonic() - queued_at)
                for f in forget:
                    conn.executemany(f"DELETE FROM {f.table} WHERE key=?", [(k,) for k in f.keys])
                while creds:
                    c = creds[0]
                    if c.digest is None:
                        conn.execute("DELETE FROM node_credentials WHERE key=?", (c.node_id,))
                    else:
                        conn.execute(
                            "INSERT OR REPLACE INTO node_credentials VALUES (?, ?)", (c.node_id, c.digest)
                        )
                    creds.pop(0).done.set_result(None)
                while barriers:  # autocommit: what came before them is committed
                    barriers.pop(0).done.set_result(None)
                now = time.monotonic()
                if written > self.events_kept // 10 or now - last_prune >= interval:
                    self._prune(conn)
                    last_prune, written = now, 0
                if stop:
                    return
        except BaseException as exc:  # surfaced on the next persist()
            self._error = exc
            # Nobody must wait forever on a credential write that will not happen.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Credential):
                    creds.append(item)
                elif isinstance(item, _Barrier):
                    barriers.append(item)
            for done in [c.done for c in creds] + [b.done for b in barriers]:
                _fail(done, exc)
        finally:
            conn.close()

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Forget logged events beyond the window: more than `events_kept` newer ones, or older
        than `events_max_age` (the seq counter lives on in `meta`)."""
        cutoff = 0
        row = conn.execute(
            "SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?", (self.events_kept,)
        ).fetchone()
        if row is not None:
            cutoff = row[0]
        # Seqs grow with time: the first event young enough bounds the old ones.
        row = conn.execute(
            "SELECT seq FROM events WHERE ts >= ? ORDER BY seq LIMIT 1", (time.time() - self.events_max_age,)
        ).fetchone()
        if row is None:
            row = conn.execute("SELECT MAX(seq) FROM events").fetchone()
            cutoff = max(cutoff, row[0] or 0)
        else:
            cutoff = max(cutoff, row[0] - 1)
        if cutoff:
            conn.execute("DELETE FROM events WHERE seq <= ?", (cutoff,))

    def _write(self, conn: sqlite3.Connection, batch: list[Event]) -> None:
        rows: dict[tuple[str, str], bytes | None] = {}
        log = []
        for ev in batch:
            table = "job_actions" if ev.kind == "job.action" else _TABLES.get(ev.topic)
            if table is not None:
                deleted = ev.kind.endswith(".deleted")
                rows[(table, ev.key)] = None if deleted else encode(ev.data)
            if ev.kind not in _TRANSIENT_KINDS:
                log.append((ev.seq, ev.ts, ev.kind, ev.key, encode(ev)))
        conn.execute("BEGIN")
        conn.executemany("INSERT OR REPLACE INTO events VALUES (?,?,?,?,?)", log)
        for (table, key), body in rows.items():
            if body is None:
                conn.execute(f"DELETE FROM {table} WHERE key=?", (key,))
            else:
                conn.execute(
                    f"INSERT OR REPLACE INTO {table} (key, body) VALUES (?, ?)",
                    (key, body),
                )
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(batch[-1].seq),))
        conn.execute("COMMIT")

    # ------------------------------------------------------------ reads (call in a thread)

    def read_events(
        self, after: int, until: int, topics: frozenset[str], limit: int, max_bytes: int
    ) -> tuple[list[Event], int]:
        """One page of logged events with after < seq <= until in the topics (all when empty),
        oldest first: at most `limit` events and about `max_bytes` of them (at least one).
        Returns the page and the seq it has looked up to (`until` when nothing is left)."""
        conn = self._connect()
        out: list[Event] = []
        size = 0
        seen = after
        try:
            rows = conn.execute(
                "SELECT seq, kind, body FROM events WHERE seq > ? AND seq <= ? ORDER BY seq",
                (after, until),
            )
            for seq, kind, body in rows:
                if topics and kind.partition(".")[0] not in topics:
                    seen = seq
                    continue
                if out and (len(out) >= limit or size + len(body) > max_bytes):
                    break
                out.append(event_decoder.decode(body))
                size += len(body)
                seen = seq
            else:
                seen = until
        finally:
            conn.close()
        return out, seen

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
