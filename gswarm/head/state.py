"""The head's state and its lifecycle: registry, store, event bus, agents, dispatcher, tokens.

Route modules reach it through `HEAD_KEY`; it imports none of them. What a route family
needs done at start-up (resuming replications and jobs) it adds to `on_started`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from gswarm import grants
from gswarm.config import TOKENS_FILE, Settings, Tokens
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


class Head:
    """Registry, store, event bus, agents and dispatcher of one head, and their tasks."""

    def __init__(
        self, state_dir: Path, settings: Settings, result_hooks: dict[str, ResultHook] | None = None
    ) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self.registry = Registry()
        self.metrics = Metrics(self)
        self.store = Store(state_dir / "gswarm.db", on_write=self.metrics.observe_store_write)
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

    async def start(self) -> None:
        """Read state back and start the background sweeper."""
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
