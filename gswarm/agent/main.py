"""The agent process: its parts (session, executor, stores, GPU probe), their lifecycle,
and the built-in `probe` op."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from gswarm import PROTOCOL_VERSION, __version__
from gswarm.agent import inventory as inventory_mod
from gswarm.agent import serving as serving
from gswarm.agent.dataserver import DataServer
from gswarm.agent.executor import Executor, RunOp
from gswarm.agent.file_roots import FileRoots
from gswarm.agent.gpu import GpuPool, GpuProbe
from gswarm.agent.handlers import run_op
from gswarm.agent.identity import CREDENTIAL_FILE, load_credential, save_credential
from gswarm.agent.session import AgentRefused, Session
from gswarm.agent.stores import TierStore
from gswarm.config import Settings, default_state_dir
from gswarm.devices import validate_node_id
from gswarm.errors import GswarmError
from gswarm.protocol import (
    Ack,
    Cancel,
    Command,
    HeadMessage,
    Heartbeat,
    Hello,
    Holding,
    HoldingsChanged,
    Inventory,
    Welcome,
)
from gswarm.tls import client_context, server_context

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentConfig", "AgentRefused"]


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The agent's config file (`--config`, YAML); an unknown key is an error, not ignored."""

    serving: serving.ServingConfig = msgspec.field(default_factory=serving.ServingConfig)
    allow_file_roots: list[str] = msgspec.field(default_factory=list)
    """Directories `file://` downloads may read from (also `--allow-file-root`); none by default."""


class Agent:
    """One node's agent."""

    def __init__(
        self,
        head_url: str,
        node_id: str,
        token: str,
        disk_dir: Path,
        dram_dir: Path,
        settings: Settings | None = None,
        simulate_gpus: str | None = None,
        quotas: dict[str, int] | None = None,
        data_port: int | None = 0,
        data_host: str = "",
        data_bandwidth: int | None = None,
        serving_config: serving.ServingConfig | None = None,
        run_op: RunOp = run_op,
        file_roots: Sequence[Path] = (),
        private_dirs: Sequence[Path] = (),
        credential_file: Path | None = None,
        ca: Path | None = None,
        data_tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`data_host`: the address the data server listens on and peers are told; empty, the
        local address of the socket to the head; a wildcard (0.0.0.0, ::), every interface, peers
        being told the address the head is reached from. `file_roots`: where `file://` downloads
        may read; `private_dirs`: more directories they never may (a head's state dir; the
        tiers and the default head state dir always)."""
        self.node_id = validate_node_id(node_id)
        self.token = token
        """The join token: presented to enrol this node when it has no credential yet."""
        self.credential_file = credential_file or disk_dir / CREDENTIAL_FILE
        """Where this node's credential is kept (see `gswarm.agent.identity`)."""
        self.settings = settings or Settings.from_env()
        self.tiers = {"disk": disk_dir, "dram": dram_dir}
        self.stores = {
            name: TierStore(name, path, (quotas or {}).get(name)) for name, path in self.tiers.items()
        }
        self.gpus = GpuProbe(simulate_gpus)
        self.instance_id = uuid.uuid4().hex
        self.data_url = ""
        self.data_host = data_host
        self.reach_host = ""
        """The address peers reach this node at (the data server's, in its URL)."""
        self.file_roots = FileRoots(file_roots, [disk_dir, dram_dir, default_state_dir(), *private_dirs])
        """Where `file://` downloads may read."""
        self.transfer_key = ""
        self.tls = client_context(ca)
        """What https connections (the head's socket aside) verify against: system CAs plus `ca`."""
        server_tls = server_context(*data_tls) if data_tls is not None else None
        self.dataserver = (
            DataServer(self, data_port, data_bandwidth, server_tls) if data_port is not None else None
        )
        log_dir = disk_dir / ".gswarm-logs"
        self.gpu_pool = GpuPool(self.gpus, log_dir, self._gpu_lost)
        self.services = serving.ServiceManager(self, serving_config or serving.ServingConfig(), log_dir)
        self.executor = Executor(self, self.send, self.settings.progress_interval, run_op)
        """Runs ops through `run_op`: the handler table (an embedding program may wrap it)."""
        self.session = Session(
            head_url, self.settings, self._hello, self._on_message, self._on_connected, ca=ca
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    def send(self, msg: Any) -> None:
        """Send a message to the head now (dropped while disconnected; Hello resyncs)."""
        self.session.send(msg)

    def holdings_changed(self) -> None:
        """Tell the head what this node holds now (after a change outside a tier op)."""
        self.spawn(self._report_holdings())

    async def _report_holdings(self) -> None:
        holdings, partials = await self.copies()
        self.send(HoldingsChanged(holdings=holdings, partials=partials))

    def _gpu_lost(self, index: int) -> None:
        log.warning("the worker of gpu%d died: its resident models are gone", index)
        self.holdings_changed()
        self.services.gpu_lost(index)

    def spawn(self, coro: Any) -> None:
        """Run a small background coroutine owned by the agent."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def inventory(self) -> Inventory:
        """A fresh inventory (read in a thread)."""
        return await asyncio.to_thread(inventory_mod.collect, self.stores, self.gpus)

    async def copies(self) -> tuple[list[Holding], list[Holding]]:
        """Every published copy on this node and every unfinished one, scanned in one thread hop."""
        on_disk, partials = await asyncio.to_thread(lambda: (self._published(), self._unfinished()))
        return on_disk + self.gpu_pool.holdings(), partials

    async def survey(self) -> tuple[Inventory, list[Holding], list[Holding]]:
        """A fresh inventory, the published copies and the unfinished ones, read in one thread
        hop (a probe is on the control plane's round trip: each hop costs a loop turn)."""

        def read() -> tuple[Inventory, list[Holding], list[Holding]]:
            return inventory_mod.collect(self.stores, self.gpus), self._published(), self._unfinished()

        inventory, on_disk, partials = await asyncio.to_thread(read)
        return inventory, on_disk + self.gpu_pool.holdings(), partials

    def _published(self) -> list[Holding]:
        return [h for store in self.stores.values() for h in store.holdings()]

    def _unfinished(self) -> list[Holding]:
        return [h for store in self.stores.values() for h in store.partials()]

    async def _listen_for_peers(self, host: str) -> None:
        assert self.dataserver is not None
        try:
            await self.dataserver.listen(host)
        except OSError as exc:
            raise GswarmError(
                f"the data server cannot listen on {host}:{self.dataserver.port}: {exc.strerror or exc}",
                code="data_server_failed",
            ) from None

    async def _hello(self, local_host: str) -> Hello:
        listen = self.data_host or local_host
        self.reach_host = local_host if listen in serving.WILDCARD_HOSTS else listen
        if self.dataserver is not None:
            await self._listen_for_peers(listen)
            scheme = "https" if self.dataserver.tls is not None else "http"
            self.data_url = f"{scheme}://{serving.url_host(self.reach_host)}:{self.dataserver.port}"
        credential = await asyncio.to_thread(load_credential, self.credential_file, self.node_id)
        inventory, holdings, partials = await self.survey()
        return Hello(
            node_id=self.node_id,
            token="" if credential else self.token,
            credential=credential,
            protocol_version=PROTOCOL_VERSION,
            instance_id=self.instance_id,
            agent_version=__version__,
            data_url=self.data_url,
            inventory=inventory,
            holdings=holdings,
            partials=partials,
            running=list(self.executor.running),
            finished=list(self.executor.outbox),
            services=self.services.services(),
            backends=self.services.backends,
        )

    async def _on_connected(self, welcome: Welcome) -> None:
        if welcome.credential:
            try:
                await asyncio.to_thread(
                    save_credential, self.credential_file, self.node_id, welcome.credential
                )
            except OSError as exc:
                raise AgentRefused(
                    f"cannot keep this node's credential in {self.credential_file}: {exc}; "
                    f"remove the node on the head ('gswarm nodes remove {self.node_id}') and retry"
                ) from None
            log.info("node %s enrolled; its credential is in %s", self.node_id, self.credential_file)
        self.transfer_key = welcome.transfer_key
        self.executor.resend_outbox()

    async def _on_message(self, msg: HeadMessage) -> None:
        match msg:
            case Command():
                self.executor.submit(msg)
            case Cancel(op_id=op_id):
                self.executor.cancel(op_id)
            case Ack(op_id=op_id):
                self.executor.ack(op_id)
            case Welcome():
                pass

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            if self.session.connected.is_set():
                try:
                    self.send(Heartbeat(inventory=await self.inventory()))
                except OSError as exc:
                    log.warning("inventory read failed: %s", exc)

    async def run(self) -> None:
        """Run until cancelled (or refused by the head, which raises AgentRefused)."""
        for store in self.stores.values():
            await asyncio.to_thread(store.ensure)
        if self.dataserver is not None and self.data_host:
            await self._listen_for_peers(self.data_host)  # a bad address fails now, not later
        self.executor.start()
        self._tasks = [asyncio.create_task(self._heartbeats(), name="heartbeats")]
        try:
            await self.session.run()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.executor.close()
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self.services.close()
            await self.gpu_pool.close()
            if self.dataserver is not None:
                await self.dataserver.stop()
