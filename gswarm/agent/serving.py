"""Services on a node: start, supervise (health checks, restarts with backoff), stop, logs;
and the `load`, `serve`, `stop`, `health_check` and `logs` op handlers.

Backends:
- `builtin`: the OpenAI-compatible server inside the worker process that holds the weights
  (the GPU's worker for `gpuN`, a CPU worker of its own for `disk`/`dram`);
- `vllm`: `vllm serve MODEL_DIR` (its OpenAI server) pinned with CUDA_VISIBLE_DEVICES;
- named command templates from the agent's config file. The API names a template; it never
  sends a command line.

A command-template backend (vLLM included) on a GPU loads the weights itself, from the node's
fastest copy (dram before disk). The GPU is handed over first: gswarm's resident copy of the model
there is freed, and the server gets `--gpu-memory-utilization` for the share of the GPU nothing
else holds (other resident models, other servers' shares, other processes), reserved until it
stops; when its weights do not fit in that share nothing starts (409 `insufficient_gpu_memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from gswarm.agent.context import OpContext
from gswarm.agent.gpu import GpuShare, WorkerHandle
from gswarm.devices import parse_device
from gswarm.errors import BadRequest, Conflict, GswarmError, NotFound
from gswarm.ops import (
    LOG_CHUNK_BYTES,
    HealthCheckArgs,
    HealthCheckResult,
    LoadArgs,
    LoadResult,
    LogsArgs,
    LogsResult,
    ServeArgs,
    ServeResult,
    StopArgs,
    StopResult,
    decode_builtin_config,
)
from gswarm.protocol import Service, ServiceChanged, service_id
from gswarm.states import ServiceState

if TYPE_CHECKING:
    from gswarm.agent.main import Agent

log = logging.getLogger(__name__)


class Template(msgspec.Struct):
    """A serving command: placeholders {model}, {model_path}, {port}, {gpu}, {host} and
    {gpu_memory_utilization} (the share of the GPU it may use, e.g. 0.9)."""

    command: list[str]
    health: str = "/health"
    env: dict[str, str] = msgspec.field(default_factory=dict)
    gpu_command: list[str] = msgspec.field(default_factory=list)
    """Arguments appended when served on a GPU (none off a GPU)."""


class ServingConfig(msgspec.Struct):
    """The `serving` part of the agent's config file."""

    templates: dict[str, Template] = msgspec.field(default_factory=dict)
    host: str = "127.0.0.1"
    """The address services listen on (also `--service-host`); 0.0.0.0 exposes them on every
    interface, their URLs then naming the address the node is reached at."""
    max_restarts: int = 3
    health_interval: float = 5.0
    ready_timeout: float = 300.0
    stop_grace: float = 10.0


def vllm_executable() -> str:
    """The `vllm` command of the agent's own environment if it has one, else from PATH."""
    return shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"


VLLM = Template(
    command=[
        vllm_executable(), "serve", "{model_path}", "--served-model-name", "{model}",
        "--host", "{host}", "--port", "{port}",
    ],
    gpu_command=["--gpu-memory-utilization", "{gpu_memory_utilization}"],
    env={"CUDA_VISIBLE_DEVICES": "{gpu}"},
)  # fmt: skip


@dataclass
class Runtime:
    """One service on this node and what runs it."""

    service: Service
    model_dir: Path
    template: Template | None
    gpu: int | None
    log_path: Path
    host: str = "127.0.0.1"
    """The address it listens on."""
    proc: asyncio.subprocess.Process | None = None
    worker: WorkerHandle | None = None
    share: GpuShare | None = None
    """A template backend's share of its GPU (reserved until it stops)."""
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
"""Listen addresses meaning every interface."""


def url_host(host: str) -> str:
    """A host as it goes into a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def port_free(port: int) -> bool:
    """True when nothing listens on the port (checked by binding it). Connections of a server
    that just stopped, lingering in TIME_WAIT, do not count: servers rebind over them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file."""
    return tail_at(path, lines)[0]


def tail_at(path: Path, lines: int) -> tuple[str, int]:
    """The last lines of a log file (from its last `LOG_CHUNK_BYTES`) and its size then."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = f.seek(max(0, size - LOG_CHUNK_BYTES))
            data = f.read(size - start)
    except OSError:
        return "", 0
    if start > 0:  # begin on a whole line if there is one, else on a whole character
        cut = data.find(b"\n") + 1
        data = data[cut:] if cut else data.lstrip(bytes(range(0x80, 0xC0)))
    return b"\n".join(data.splitlines()[-lines:]).decode(errors="replace"), size


def whole_chars(data: bytes) -> int:
    """The length of `data` without a UTF-8 character cut at its end (read on, it completes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return len(data) - back if need > back else len(data)
    return len(data)


def read_from(path: Path, since: int, limit: int) -> tuple[bytes, int, bool] | None:
    """Up to `limit` bytes of a file from offset `since` (ending on a whole character), the
    offset past them, and whether the file was shorter than `since` (replaced or truncated:
    read from its beginning instead). None when there is no such file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            reset = size < since
            start = 0 if reset else since
            f.seek(start)
            data = f.read(limit)
    except FileNotFoundError:
        return None
    data = data[: whole_chars(data)]
    return data, start + len(data), reset


class ServiceManager:
    """Every service of this agent."""

    def __init__(self, agent: Agent, config: ServingConfig, log_dir: Path) -> None:
        self.agent = agent
        self.config = config
        self.log_dir = log_dir
        self.runtimes: dict[str, Runtime] = {}
        self._spare: WorkerHandle | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self._spares = 0

    @property
    def spare_ready(self) -> bool:
        """True when a warm CPU worker waits for the next builtin service on disk or dram."""
        return self._spare is not None and self._spare.alive

    @property
    def backends(self) -> list[str]:
        """Backend names this agent accepts."""
        return ["builtin", "vllm", *sorted(self.config.templates)]

    def log_path(self, sid: str) -> Path:
        """The log file of a service that has one of its own (all but builtin on a GPU)."""
        return self.log_dir / f"{sid.replace(':', '_')}.log"

    def log_of(self, sid: str) -> tuple[Path, bool]:
        """Where a service's output goes, and whether other services write there too (a GPU
        worker's log); for a service that is gone, where it went."""
        rt = self.runtimes.get(sid)
        if rt is not None:
            return rt.log_path, rt.template is None and rt.gpu is not None
        own = self.log_path(sid)
        gpu = parse_device(sid.rpartition("@")[2]).gpu_index
        if gpu is not None and not own.exists():
            return self.agent.gpu_pool.log_path(gpu), True
        return own, False

    def services(self) -> list[Service]:
        """Every service, as reported to the head."""
        return [rt.service for rt in self.runtimes.values()]

    def _emit(self, rt: Runtime, removed: bool = False) -> None:
        rt.service.updated_at = time.time()
        self.agent.send(ServiceChanged(service=msgspec.structs.replace(rt.service), removed=removed))

    def gpu_lost(self, index: int) -> None:
        """A GPU worker died: wake the supervisors of the services it ran."""
        for rt in self.runtimes.values():
            if rt.gpu == index and rt.template is None:
                rt.wake.set()

    # ------------------------------------------------------------ start

    async def start(
        self,
        model: str,
        device: str,
        backend: str,
        port: int,
        config: dict[str, Any],
        model_dir: Path,
        host: str,
        note: Callable[[str], None] = lambda _: None,
    ) -> tuple[Service, GpuShare | None]:
        """Start a service listening on `host` (empty: the agent's own choice, 127.0.0.1 unless
        its operator said otherwise) and wait until it answers its health check (or fails).
        A template backend on a GPU gets the GPU handed over first (see the module's docstring);
        its share comes back with the service, and `note` hears each step."""
        sid = service_id(model, device)
        if sid in self.runtimes:
            rt = self.runtimes[sid]
            if rt.service.state == "failed" and (rt.task is None or rt.task.done()):
                # Its supervisor gave up: serving it again starts it afresh.
                self.runtimes.pop(sid)
                await self._halt(rt)
            elif rt.service.port != port or rt.service.backend != backend:
                raise Conflict(
                    f"{model} is already served on {device} by {rt.service.backend} on port "
                    f"{rt.service.port} ({rt.service.state}, {rt.service.url})",
                    code="already_serving",
                    details={"service_id": sid, "port": rt.service.port, "backend": rt.service.backend},
                )
            else:
                return rt.service, rt.share
        if not 1 <= port <= 65535:
            raise BadRequest(f"port {port} is out of range (1-65535)", code="invalid_port")
        if not await asyncio.to_thread(port_free, port):
            raise Conflict(
                f"port {port} is already in use on this node: nothing was started", code="port_in_use"
            )
        template: Template | None = None
        if backend == "vllm":
            template = VLLM
        elif backend != "builtin":
            template = self.config.templates.get(backend)
            if template is None:
                raise BadRequest(
                    f"unknown backend {backend!r} (this node has {', '.join(self.backends)})",
                    code="unknown_backend",
                )
        dev = parse_device(device)
        bind = host or self.config.host
        shown = (self.agent.reach_host or "127.0.0.1") if bind in WILDCARD_HOSTS else bind
        svc = Service(
            service_id=sid,
            model=model,
            device=device,
            backend=backend,
            port=port,
            url=f"http://{url_host(shown)}:{port}",
            state="starting",
            config=config,
            started_at=time.time(),
        )
        log_path = self.log_path(sid)
        if template is None and dev.gpu_index is not None:
            # The builtin server runs inside the GPU's worker: its output is that worker's log.
            log_path = self.agent.gpu_pool.log_path(dev.gpu_index)
        rt = Runtime(svc, model_dir, template, dev.gpu_index, log_path, bind)
        self.runtimes[sid] = rt
        try:
            if template is not None and rt.gpu is not None:
                needed = await asyncio.to_thread(copy_size, model_dir)
                rt.share = await self.agent.gpu_pool.hand_over(rt.gpu, model, needed, sid, note)
                svc.gpu_memory = rt.share.reserved
                if rt.share.freed:
                    self.agent.holdings_changed()
        except BaseException:
            self.runtimes.pop(sid, None)
            raise
        self._emit(rt)
        try:
            await self._launch(rt)
            await self._wait_ready(rt)
        except BaseException as exc:
            await self._halt(rt)
            await self._release(rt)
            self.runtimes.pop(sid, None)
            rt.service.state = "failed"
            rt.service.error = exc.message if isinstance(exc, GswarmError) else f"{type(exc).__name__}: {exc}"
            rt.service.log_tail = await asyncio.to_thread(tail, rt.log_path)
            self._emit(rt, removed=True)
            if isinstance(exc, GswarmError):
                exc.message += f"\n--- last lines of {rt.log_path.name} ---\n{rt.service.log_tail}"
            raise
        rt.task = asyncio.create_task(self._supervise(rt), name=f"supervise-{sid}")
        return rt.service, rt.share

    async def _launch(self, rt: Runtime) -> None:
        svc = rt.service
        await asyncio.to_thread(rt.log_path.parent.mkdir, parents=True, exist_ok=True)
        if rt.template is not None:
            values = {
                "model": svc.model,
                "model_path": str(rt.model_dir),
                "port": str(svc.port),
                "gpu": "" if rt.gpu is None else str(rt.gpu),
                "host": rt.host,
                "gpu_memory_utilization": f"{rt.share.utilization:.2f}" if rt.share is not None else "",
            }
            parts = rt.template.command + (rt.template.gpu_command if rt.gpu is not None else [])
            cmd = [part.format(**values) for part in parts]
            env = {**os.environ, **{k: v.format(**values) for k, v in rt.template.env.items()}}
            log_file = await asyncio.to_thread(open, rt.log_path, "ab")
            try:
                rt.proc = await asyncio.create_subprocess_exec(
                    *cmd, stdout=log_file, stderr=log_file, env=env, start_new_session=True
                )
            except OSError as exc:
                raise GswarmError(f"cannot start {cmd[0]}: {exc}", code="backend_failed") from None
            finally:
                log_file.close()
            svc.pid = rt.proc.pid
            return
        try:
            cfg = decode_builtin_config(svc.config)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_config") from None
        if rt.gpu is not None:
            pool = self.agent.gpu_pool
            if svc.model not in pool.resident.get(rt.gpu, {}):
                await load_model(self.agent, svc.model, rt.gpu, None, lambda d, t: None)
            rt.worker = await pool.worker(rt.gpu)
        else:
            rt.worker = await self._cpu_worker(rt.log_path)
            files = await asyncio.to_thread(safetensors_files, rt.model_dir)
            await rt.worker.call("load", model=svc.model, dir=str(rt.model_dir), files=files)
        await rt.worker.call(
            "serve",
            service=svc.service_id,
            model=svc.model,
            dir=str(rt.model_dir),
            host=rt.host,
            port=svc.port,
            names=cfg.names(svc.model),
            max_model_len=cfg.max_model_len,
            max_waiting=cfg.max_waiting,
        )
        svc.pid = rt.worker.pid

    async def _cpu_worker(self, log_path: Path) -> WorkerHandle:
        """A CPU worker for a disk/dram service: the spare one, warm (torch and transformers
        imported), if there is one; a new spare starts in the background for the next serve
        (unless the agent's `warm_spare` setting is off)."""
        spare, self._spare = self._spare, None
        if spare is None or not spare.alive:
            spare = WorkerHandle("cpu", log_path)
            await spare.start()
        else:
            # From now on the spare's output is the service's log; what it wrote while idle
            # (its start) goes with its own file.
            idle_log = spare.log_path
            await spare.redirect_log(log_path)
            await asyncio.to_thread(idle_log.unlink, missing_ok=True)
        if self.agent.settings.warm_spare and (self._spare_task is None or self._spare_task.done()):
            self._spare_task = asyncio.create_task(self._start_spare())
        return spare

    async def _start_spare(self) -> None:
        self._spares += 1
        spare = WorkerHandle("cpu", self.log_dir / f"spare-cpu-worker-{os.getpid()}-{self._spares}.log")
        try:
            await spare.start()
        except GswarmError as exc:
            log.warning("no spare CPU worker: %s", exc.message)
            return
        except asyncio.CancelledError:
            await spare.kill()
            raise
        self._spare = spare

    def alive(self, rt: Runtime) -> bool:
        """True while the service's process (or its GPU worker) runs."""
        if rt.proc is not None:
            return rt.proc.returncode is None
        return rt.worker is not None and rt.worker.alive

    async def healthy(self, rt: Runtime) -> bool:
        """True when the service's health endpoint answers."""
        path = rt.template.health if rt.template is not None else "/health"
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(rt.host, rt.host)
        url = f"http://{url_host(host)}:{rt.service.port}{path}"
        try:
            async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _wait_ready(self, rt: Runtime) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        while time.monotonic() < deadline:
            if not self.alive(rt):
                code = rt.proc.returncode if rt.proc is not None else "?"
                raise GswarmError(
                    f"the {rt.service.backend} server exited ({code}) before it was ready",
                    code="backend_failed",
                )
            if await self.healthy(rt):
                rt.service.state = "ready"
                rt.service.error = ""
                self._emit(rt)
                return
            await asyncio.sleep(0.2)
        raise GswarmError(f"not ready within {self.config.ready_timeout:g} s", code="backend_failed")

    # ------------------------------------------------------------ supervision

    async def _supervise(self, rt: Runtime) -> None:
        backoff = 1.0
        while not rt.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.wake.wait(), self.config.health_interval)
            rt.wake.clear()
            if rt.stopping:
                return
            if self.alive(rt):
                healthy = await self.healthy(rt)
                state: ServiceState = "ready" if healthy else "unhealthy"
                if state != rt.service.state:
                    rt.service.state = state
                    self._emit(rt)
                continue
            if rt.service.restarts >= self.config.max_restarts:
                rt.service.state = "failed"
                rt.service.error = f"exited {rt.service.restarts + 1} times; not restarted again"
                rt.service.log_tail = await asyncio.to_thread(tail, rt.log_path)
                await self._release(rt)  # a dead server holds no GPU memory
                rt.service.gpu_memory = 0
                self._emit(rt)
                return
            rt.service.restarts += 1
            rt.service.state = "restarting"
            self._emit(rt)
            log.warning(
                "service %s died; restart %d in %.0f s", rt.service.service_id, rt.service.restarts, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            try:
                await self._halt(rt)
                if rt.gpu is not None:
                    # The copy it started from may be gone (moved): take the node's fastest one now.
                    _, rt.model_dir = await local_copy(self.agent, rt.service.model, None)
                await self._launch(rt)
                await self._wait_ready(rt)
                backoff = 1.0
            except GswarmError as exc:
                rt.service.error = exc.message
                rt.wake.set()

    # ------------------------------------------------------------ stop

    async def _halt(self, rt: Runtime) -> None:
        if rt.proc is not None and rt.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rt.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(rt.proc.wait(), self.config.stop_grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rt.proc.pid, signal.SIGKILL)
                await rt.proc.wait()
        rt.proc = None
        if rt.worker is not None:
            if rt.gpu is not None:
                if rt.worker.alive:
                    with contextlib.suppress(GswarmError):
                        await rt.worker.call("unserve", service=rt.service.service_id)
            else:
                await rt.worker.stop()
            rt.worker = None

    async def _release(self, rt: Runtime) -> None:
        if rt.share is not None and rt.gpu is not None:
            await self.agent.gpu_pool.release(rt.gpu, rt.service.service_id)

    async def stop(self, sid: str) -> Service:
        """Stop a service (SIGTERM, then SIGKILL after the grace period) and free its GPU memory."""
        rt = self.runtimes.pop(sid, None)
        if rt is None:
            raise NotFound(f"no service {sid} on this node", code="service_not_found")
        rt.stopping = True
        rt.wake.set()
        if rt.task is not None:
            rt.task.cancel()
            await asyncio.gather(rt.task, return_exceptions=True)
        await self._halt(rt)
        await self._release(rt)
        if rt.gpu is not None and rt.template is None:
            await self.agent.gpu_pool.unload(rt.gpu, rt.service.model)
            self.agent.holdings_changed()
        rt.service.state = "stopped"
        self._emit(rt, removed=True)
        return rt.service

    async def close(self) -> None:
        """Stop every service and the spare worker (the agent is shutting down)."""
        for sid in list(self.runtimes):
            with contextlib.suppress(GswarmError):
                await self.stop(sid)
        if self._spare_task is not None:
            self._spare_task.cancel()
            await asyncio.gather(self._spare_task, return_exceptions=True)
        if self._spare is not None:
            await self._spare.stop()
            await asyncio.to_thread(self._spare.log_path.unlink, missing_ok=True)


# ---------------------------------------------------------------- model files


def copy_size(model_dir: Path) -> int:
    """Bytes of a published copy (from its manifest)."""
    from gswarm.agent.stores import read_manifest

    manifest = read_manifest(model_dir)
    return manifest.size if manifest is not None else 0


def safetensors_files(model_dir: Path) -> list[str]:
    """The safetensors files of a copy (from its manifest), or BadRequest naming what is there."""
    from gswarm.agent.stores import read_manifest

    manifest = read_manifest(model_dir)
    names = [f.path for f in manifest.files] if manifest else []
    found = sorted(n for n in names if n.endswith(".safetensors"))
    if not found:
        shown = ", ".join(names[:8]) or "nothing"
        raise BadRequest(
            f"{model_dir.name} has no .safetensors files to load (it has: {shown})", code="no_safetensors"
        )
    return found


async def local_copy(agent: Agent, model: str, tier: str | None) -> tuple[str, Path]:
    """The fastest local copy of a model (dram before disk), or Conflict naming the tiers."""
    for name in [tier] if tier else ["dram", "disk"]:
        store = agent.stores.get(name or "")
        if store is not None and await asyncio.to_thread(store.manifest, model) is not None:
            return store.name, store.model_dir(model)
    raise Conflict(
        f"{model} is not on this node's {tier or 'dram or disk'}: copy it here first", code="not_held"
    )


async def load_model(
    agent: Agent, model: str, gpu: int, tier: str | None, progress: Callable[[int, int], None]
) -> tuple[str, int]:
    """Load a model's safetensors onto a GPU from the fastest local copy."""
    source_tier, model_dir = await local_copy(agent, model, tier)
    files = await asyncio.to_thread(safetensors_files, model_dir)
    size = await asyncio.to_thread(lambda: sum((model_dir / f).stat().st_size for f in files))
    resident = await agent.gpu_pool.load(gpu, model, model_dir, files, size, progress)
    agent.holdings_changed()
    return source_tier, resident


# ---------------------------------------------------------------- op handlers


async def load(ctx: OpContext, args: LoadArgs) -> LoadResult:
    """Make a model resident in a GPU's memory, with byte progress."""
    ctx.progress(0, 0, f"loading onto gpu{args.gpu}")
    source_tier, resident = await load_model(
        ctx.agent, args.model_name, args.gpu, args.source_tier, ctx.progress
    )
    removed = False
    if args.remove_source:
        removed = await asyncio.to_thread(ctx.agent.stores[source_tier].remove, args.model_name)
        ctx.agent.holdings_changed()
    device = ctx.agent.gpu_pool.workers[args.gpu].device
    manifest = await asyncio.to_thread(ctx.agent.stores[source_tier].manifest, args.model_name)
    return LoadResult(
        model=args.model_name,
        tier=args.tier,
        size=resident,
        path=device,
        source=manifest.source if manifest is not None else "",
        revision=manifest.revision if manifest is not None else "",
        source_tier=source_tier,
        removed_source=removed,
    )


async def serve(ctx: OpContext, args: ServeArgs) -> ServeResult:
    """Start a service; succeeds once its health endpoint answers."""
    dev = parse_device(args.device)
    source_tier, model_dir = await local_copy(ctx.agent, args.model_name, None if dev.is_gpu else dev.tier)
    if dev.is_gpu and args.backend == "builtin":
        source_tier = dev.tier  # it serves the resident copy (loaded from model_dir if need be)
    ctx.progress(0, 0, f"starting {args.backend} on port {args.port} from {source_tier}")
    svc, share = await ctx.agent.services.start(
        args.model_name,
        str(dev),
        args.backend,
        args.port,
        args.config,
        model_dir,
        args.host,
        lambda message: ctx.progress(0, 0, message),
    )
    return ServeResult(
        service_id=svc.service_id,
        url=svc.url,
        state=svc.state,
        pid=svc.pid,
        source_tier=source_tier,
        freed=share.freed if share is not None else 0,
        gpu_memory_utilization=share.utilization if share is not None else 0.0,
    )


async def stop(ctx: OpContext, args: StopArgs) -> StopResult:
    """Stop a service and free its GPU memory."""
    svc = await ctx.agent.services.stop(args.service_id)
    return StopResult(service_id=svc.service_id, state=svc.state)


async def health_check(ctx: OpContext, args: HealthCheckArgs) -> HealthCheckResult:
    """Check one service (its health endpoint), or the whole node."""
    manager = ctx.agent.services
    if args.service_id:
        rt = manager.runtimes.get(args.service_id)
        if rt is None:
            raise NotFound(f"no service {args.service_id} on this node", code="service_not_found")
        t0 = time.monotonic()
        healthy = manager.alive(rt) and await manager.healthy(rt)
        return HealthCheckResult(
            service_id=args.service_id,
            healthy=healthy,
            state=rt.service.state,
            latency_ms=round((time.monotonic() - t0) * 1000, 2),
        )
    checks = {}
    for sid, rt in manager.runtimes.items():
        checks[sid] = manager.alive(rt) and await manager.healthy(rt)
    inventory = await ctx.agent.inventory()
    return HealthCheckResult(
        healthy=all(checks.values()),
        services=checks,
        gpus=len(inventory.gpus),
        tiers={t.name: t.free for t in inventory.tiers},
    )


LOG_POLL = 0.25
"""Seconds between looks at a log file while a `logs` op waits for it to grow."""


async def logs(ctx: OpContext, args: LogsArgs) -> LogsResult:
    """The tail of a service's log; or, with `since_bytes`, what it gained past that offset,
    waiting up to `wait` seconds for something (a long poll, so a follower costs one op per
    answer, not one per look)."""
    manager = ctx.agent.services
    sid = args.service_id
    path, shared = await asyncio.to_thread(manager.log_of, sid)
    if not await asyncio.to_thread(path.exists):
        raise NotFound(f"no log for {sid} on this node", code="service_not_found")
    if args.since_bytes is None:
        text, size = await asyncio.to_thread(tail_at, path, max(1, min(args.lines, 10_000)))
        return LogsResult(
            service_id=sid,
            log=text,
            offset=size,
            file=path.name,
            shared=shared,
            running=sid in manager.runtimes,
        )
    since = max(0, args.since_bytes)
    deadline = time.monotonic() + max(0.0, min(args.wait, 60.0))
    while True:
        got = await asyncio.to_thread(read_from, path, since, LOG_CHUNK_BYTES)
        data, offset, reset = got if got is not None else (b"", 0, since > 0)
        running = sid in manager.runtimes
        if data or reset or not running or time.monotonic() >= deadline:
            break
        await asyncio.sleep(LOG_POLL)
        path, shared = await asyncio.to_thread(manager.log_of, sid)
    return LogsResult(
        service_id=sid,
        log=data.decode(errors="replace"),
        offset=offset,
        reset=reset,
        file=path.name,
        shared=shared,
        running=running,
    )
