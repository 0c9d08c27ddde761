"""The head's state and its lifecycle: registry, store, event bus, agents, dispatcher, tokens.

Route modules reach it through `HEAD_KEY`; it imports none of them. What a route family
needs done at start-up (resuming replications and jobs) it adds to `on_started`.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from gswarm import grants
from gswarm.config import LOCK_FILE, TOKENS_FILE, Settings, Tokens
from gswarm.errors import GswarmError
from gswarm.head.agents import AgentHub
from gswarm.head.dispatcher import Dispatcher, ResultHook
from gswarm.head.events import EventBus
from gswarm.head.metrics import Metrics
from gswarm.protocol import Event
from gswarm.registry import Registry
from gswarm.states import OP_TERMINAL
from gswarm.store import Store

log = logging.getLogger(__name__)

HEAD_KEY: web.AppKey[Head] = web.AppKey("head")


def load_or_create_tokens(state_dir: Path) -> Tokens:
    """The head's tokens, created (mode 0600) at first start."""
    path = state_dir / TOKENS_FILE
    if path.exists():
        return msgspec.json.decode(path.read_bytes(), type=Tokens)
    state_dir.mkdir(parents=True, exist_ok=True)
    tokens = Tokens(
        api_token="gsw_api_" + secrets.token_urlsafe(24),
        join_token="gsw_join_" + secrets.token_urlsafe(24),
        transfer_key=secrets.token_hex(32),
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(tokens))
    tmp.replace(path)
    return tokens


class StateDirInUse(GswarmError):
    """Another head already runs on this state directory."""

    default_code = "state_dir_in_use"


class HeadLock(msgspec.Struct):
    """What the lock file says about the head holding it."""

    pid: int
    host: str
    port: int = 0
    started_at: float = 0.0


class StateLock:
    """The state dir's lock file, held (flock) for as long as a head uses the directory; the
    kernel drops it when the process dies, so a crashed head never leaves a stale lock."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None
        self._info = HeadLock(pid=os.getpid(), host=socket.gethostname(), started_at=time.time())

    def acquire(self) -> None:
        """Take the lock, or raise StateDirInUse naming the head that has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise StateDirInUse(
                f"state dir {self.path.parent} is in use by another head ({holder}); stop it, "
                "or give this one another --state-dir",
                details={"lock_file": str(self.path)},
            ) from None
        self._fd = fd
        self._write()

    def record_port(self, port: int) -> None:
        """Note the port the head listens on (known only once it is bound)."""
        self._info.port = port
        if self._fd is not None:
            self._write()

    def release(self) -> None:
        """Let go of the lock (the file stays; its content is stale but harmless)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self) -> None:
        assert self._fd is not None
        data = msgspec.json.encode(self._info)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    @staticmethod
    def _read(fd: int) -> str:
        try:
            info = msgspec.json.decode(os.pread(fd, 4096, 0), type=HeadLock)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return "its lock file does not say which"
        port = f", port {info.port}" if info.port else ""
        return f"pid {info.pid} on {info.host}{port}"


class Head:
    """Registry, store, event bus, agents and dispatcher of one head, and their tasks."""

    def __init__(
        self, state_dir: Path, settings: Settings, result_hooks: dict[str, ResultHook] | None = None
    ) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self.registry = Registry()
        self.metrics = Metrics(self)
        self.store = Store(
            state_dir / "gswarm.db",
            settings.events_kept,
            settings.events_max_age,
            on_write=self.metrics.observe_store_write,
        )
        self.bus = EventBus(self.store, settings.event_ring, settings.subscriber_queue)
        self.agents = AgentHub(self)
        self.dispatcher = Dispatcher(self, result_hooks or {})
        self.tokens = Tokens(api_token="", join_token="")
        self.credentials: dict[str, str] = {}
        """Node id -> hash of the node's credential (`grants.credential_hash`). Kept in the
        store's `node_credentials` table, never in an entity or an event; changed only by the
        agent socket's handshake (enrolment) and by removing a node."""
        self.started_at = time.time()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_started: list[Callable[[], None]] = []
        self.lock = StateLock(state_dir)

    async def start(self) -> None:
        """Lock the state dir (StateDirInUse when another head has it), read state back and
        start the background sweeper."""
        await asyncio.to_thread(self.lock.acquire)
        self.tokens = await asyncio.to_thread(load_or_create_tokens, self.state_dir)
        snap = await asyncio.to_thread(self.store.open_and_load, self.settings.event_ring)
        self.credentials = snap.credentials
        self.registry.load(
            snap.models, snap.nodes, snap.locations, snap.ops, snap.last_seq, snap.services, snap.jobs
        )
        self.bus.preload(snap.recent_events, snap.last_seq)
        # What start-up loaded lives as long as the head: keep it out of the collector's scans,
        # whose pauses otherwise show in the latency tail.
        gc.freeze()
        self._tasks.add(asyncio.create_task(self._sweeper(), name="head-sweeper"))
        for hook in self.on_started:
            hook()
        log.info(
            "head state loaded from %s: %d models, %d nodes, %d ops",
            self.state_dir,
            len(snap.models),
            len(snap.nodes),
            len(snap.ops),
        )

    async def stop(self) -> None:
        """Cancel background tasks and flush the store."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for futs in self._waiters.values():
            for fut in futs:
                fut.cancel()
        await self.store.close()
        self.lock.release()

    def commit(self, events: list[Event]) -> None:
        """Persist and publish the events of a registry mutation; wake op waiters; count the
        ops that ended (every path that ends an op commits its event here)."""
        if not events:
            return
        self.store.persist(events)
        self.bus.publish(events)
        for ev in events:
            if ev.topic == "op" and ev.data.get("state") in OP_TERMINAL:
                op = self.registry.ops.get(ev.key)
                if op is not None:
                    self.metrics.op_ended(op)
                for fut in self._waiters.pop(ev.key, []):
                    if not fut.done():
                        fut.set_result(None)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str = "head-task") -> asyncio.Task[None]:
        """Run a background coroutine owned by the head (cancelled and awaited on shutdown)."""
        task = asyncio.create_task(self._guarded(coro), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _guarded(coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task failed")

    def _prune(self) -> None:
        pruned = self.registry.prune_ops(self.settings.ops_kept)
        if pruned:
            self.store.forget("ops", pruned)

    def node_key(self, node_id: str) -> str:
        """The key node `node_id`'s data server checks grants with: bound to its current
        credential, so grants minted before it was removed or enrolled afresh stop working."""
        return grants.node_key(self.tokens.transfer_key, node_id, self.credentials.get(node_id, ""))

    def log_warning(self, message: str) -> None:
        """A warning in the head's log."""
        log.warning("%s", message)

    def op_waiter(self, op_id: str) -> asyncio.Future[None]:
        """A future resolved when the op ends."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(op_id, []).append(fut)
        return fut

    async def _sweeper(self) -> None:
        settings = self.settings
        while True:
            await asyncio.sleep(settings.sweep_interval)
            try:
                now = time.time()
                for node_id in self.registry.stale_nodes(
                    now, settings.offline_after, settings.reconnect_grace
                ):
                    node = self.registry.nodes[node_id]
                    reason = (
                        f"no word from the agent for {now - node.last_seen:.0f} s"
                        if node.connected
                        else "agent connection lost"
                    )
                    self.commit(self.registry.node_offline(node_id, reason))
                await self.dispatcher.sweep()
                self._prune()
            except Exception:
                log.exception("sweeper step failed")
