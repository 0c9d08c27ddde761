"""GPUs: inventory from NVML (nvidia-ml-py) or clearly marked simulated GPUs, and the pool
of worker processes (one per GPU) that hold models resident.

NVML calls block, so callers run `GpuProbe.read` in a thread. Where NVML is absent (no
driver, no NVIDIA hardware) the node reports no GPUs and says why, and nothing crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gswarm.devices import gpu_memory_utilization
from gswarm.errors import BadRequest, Conflict, GswarmError, InsufficientSpace
from gswarm.protocol import GpuInfo, Holding
from gswarm.sizes import parse_size


def parse_simulate(spec: str | None) -> tuple[int, int]:
    """`--simulate-gpus N[:SIZE]` -> (count, bytes each); SIZE defaults to 16G."""
    if not spec:
        return 0, 0
    count, _, size = spec.partition(":")
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"--simulate-gpus {spec!r}: expected N or N:SIZE, e.g. 2:16G") from None
    if not 0 <= n <= 64:
        raise ValueError(f"--simulate-gpus {spec!r}: between 0 and 64 GPUs")
    return n, parse_size(size) if size else 16 << 30


class GpuProbe:
    """Reads the GPUs of this machine; thread-safe, initialises NVML once."""

    def __init__(self, simulate: str | None = None) -> None:
        self._sim_count, self._sim_size = parse_simulate(simulate)
        self.sim_used: dict[int, int] = {}
        self._lock = threading.Lock()
        self._nvml_ready: bool | None = None
        self.error = ""

    def _init_nvml(self) -> bool:
        if self._nvml_ready is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml_ready = True
            except Exception as exc:
                self._nvml_ready = False
                self.error = f"NVML not available: {exc}"
        return self._nvml_ready

    def read(self) -> list[GpuInfo]:
        """Current GPU figures (blocking: call in a thread)."""
        if self._sim_count:
            return [
                GpuInfo(
                    index=i,
                    name="simulated GPU (host memory)",
                    uuid=f"GPU-simulated-{i}",
                    memory_total=self._sim_size,
                    memory_free=max(0, self._sim_size - self.sim_used.get(i, 0)),
                    simulated=True,
                )
                for i in range(self._sim_count)
            ]
        with self._lock:
            if not self._init_nvml():
                return []
            import pynvml

            gpus = []
            try:
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                    try:
                        util = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                    except pynvml.NVMLError:
                        util = 0
                    name = pynvml.nvmlDeviceGetName(h)
                    uuid = pynvml.nvmlDeviceGetUUID(h)
                    gpus.append(
                        GpuInfo(
                            index=i,
                            name=name.decode() if isinstance(name, bytes) else str(name),
                            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                            memory_total=int(mem.total),
                            memory_free=int(mem.free),
                            utilization=util,
                        )
                    )
            except pynvml.NVMLError as exc:
                self.error = f"NVML error: {exc}"
            return gpus


class WorkerHandle:
    """The agent's end of one worker process (`gswarm.agent.gpu_worker`): JSON-line calls,
    progress callbacks, and a callback when the process dies."""

    def __init__(
        self,
        device: str,
        log_path: Path,
        on_exit: Callable[[WorkerHandle], None] | None = None,
        resident: bool = False,
    ):
        self.device = device
        self.resident = resident
        self.log_path = log_path
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self._pending: dict[
            int, tuple[asyncio.Future[dict[str, Any]], Callable[[int, int], None] | None]
        ] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None
        self.stopping = False

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int:
        """The worker's process id (0 before start)."""
        return self.proc.pid if self.proc is not None else 0

    async def start(self, timeout: float = 120.0) -> None:
        """Start the process and wait until it is ready (torch imported)."""
        await asyncio.to_thread(self.log_path.parent.mkdir, parents=True, exist_ok=True)
        log_file = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gswarm.agent.gpu_worker",
                "--device",
                self.device,
                *(["--resident"] if self.resident else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
            )
        finally:
            log_file.close()
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            await self.kill()
            raise GswarmError(f"the {self.device} worker did not start within {timeout:g} s") from None
        ready = json.loads(line) if line else {}
        if ready.get("event") != "ready":
            await self.kill()
            reason = ready.get("error") or f"exited with {self.proc.returncode}; see {self.log_path}"
            raise GswarmError(
                f"the {self.device} worker failed to start: {reason}", code="worker_unavailable"
            )
        self._reader = asyncio.create_task(self._read(), name=f"worker-{self.device}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                msg = json.loads(line)
                entry = self._pending.get(msg.get("id"))
                if entry is None:
                    continue
                fut, progress = entry
                if msg.get("event") == "progress":
                    if progress is not None:
                        progress(int(msg["done"]), int(msg["total"]))
                    continue
                self._pending.pop(msg["id"], None)
                if not fut.done():
                    fut.set_result(msg)
        finally:
            await self.proc.wait()
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(GswarmError(f"the {self.device} worker died", code="worker_died"))
            self._pending.clear()
            if self.on_exit is not None and not self.stopping:
                self.on_exit(self)

    async def call(
        self,
        cmd: str,
        progress: Callable[[int, int], None] | None = None,
        timeout: float = 3600.0,
        **args: Any,
    ) -> dict[str, Any]:
        """Send one command and wait for its answer; GswarmError if it failed."""
        if not self.alive or self.proc is None or self.proc.stdin is None:
            raise GswarmError(f"the {self.device} worker is not running", code="worker_died")
        self._next += 1
        req_id = self._next
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (fut, progress)
        self.proc.stdin.write(json.dumps({"id": req_id, "cmd": cmd, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(req_id, None)
        if not reply.get("ok"):
            code = str(reply.get("code") or "worker_error")
            cls = InsufficientSpace if code == "insufficient_space" else GswarmError
            raise cls(str(reply.get("error")), code=code)
        return reply

    async def redirect_log(self, path: Path) -> None:
        """Make the process write its output to `path` (appending) from now on."""
        await self.call("log", path=str(path))
        self.log_path = path

    async def stop(self, grace: float = 5.0) -> None:
        """Ask the process to exit; kill it after `grace` seconds."""
        self.stopping = True
        if self.alive and self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.proc.stdin.write(b'{"cmd": "exit"}\n')
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                await self.kill()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def kill(self) -> None:
        """SIGKILL the process."""
        if self.alive and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class GpuShare(msgspec.Struct):
    """What a command-template backend got on a GPU: the share it may use and what was freed
    for it."""

    utilization: float
    """Its `--gpu-memory-utilization`."""
    reserved: int
    """Bytes set aside for it (utilization times the GPU's memory)."""
    freed: int = 0
    """Bytes of gswarm's resident copy of the model freed for it (the hand-over)."""


class GpuPool:
    """One worker per GPU holding models resident; memory checked before each load. Command
    template backends (vLLM) get a share of a GPU's memory reserved, so loads and later
    services count it as taken."""

    def __init__(self, probe: GpuProbe, log_dir: Path, on_lost: Callable[[int], None]) -> None:
        self.probe = probe
        self.log_dir = log_dir
        self.on_lost = on_lost
        self.workers: dict[int, WorkerHandle] = {}
        self.resident: dict[int, dict[str, int]] = {}
        self.reserved: dict[int, dict[str, int]] = {}
        """Per GPU, bytes set aside for each template service (by service id)."""
        self._locks: dict[int, asyncio.Lock] = {}

    def _lock(self, gpu: int) -> asyncio.Lock:
        return self._locks.setdefault(gpu, asyncio.Lock())

    async def gpu(self, index: int) -> GpuInfo:
        """The GPU with this index, or BadRequest naming what the node has."""
        gpus = await asyncio.to_thread(self.probe.read)
        for g in gpus:
            if g.index == index:
                return g
        have = ", ".join(f"gpu{g.index}" for g in gpus) or "no GPUs"
        raise BadRequest(f"this node has no gpu{index} (it has {have})", code="invalid_device")

    def log_path(self, index: int) -> Path:
        """The log of GPU `index`'s worker: loads, unloads and the builtin services it runs."""
        return self.log_dir / f"gpu{index}-worker.log"

    async def worker(self, index: int) -> WorkerHandle:
        """The live worker of a GPU, started if needed."""
        info = await self.gpu(index)
        w = self.workers.get(index)
        if w is None or not w.alive:
            device = "cpu" if info.simulated else f"cuda:{index}"
            w = WorkerHandle(
                device,
                self.log_path(index),
                lambda h: self._lost(index, h),
                resident=info.simulated,
            )
            await w.start()
            self.workers[index] = w
        return w

    def _lost(self, index: int, handle: WorkerHandle) -> None:
        if self.workers.get(index) is not handle:
            return
        self.resident.pop(index, None)
        if index in self.probe.sim_used:
            self.probe.sim_used[index] = sum(self.reserved.get(index, {}).values())
        self.on_lost(index)

    def free_bytes(self, info: GpuInfo) -> int:
        """Memory of a GPU nothing holds: what NVML says is free, but no more than what gswarm's
        resident copies and reserved shares leave (a server that has not allocated its share
        yet still has it)."""
        held = sum(self.resident.get(info.index, {}).values()) + sum(
            self.reserved.get(info.index, {}).values()
        )
        return max(0, min(info.memory_free, info.memory_total - held))

    def _sim_add(self, index: int, info: GpuInfo, nbytes: int) -> None:
        if info.simulated:
            self.probe.sim_used[index] = max(0, self.probe.sim_used.get(index, 0) + nbytes)

    async def load(
        self,
        index: int,
        model: str,
        model_dir: Path,
        files: list[str],
        size: int,
        progress: Callable[[int, int], None],
    ) -> int:
        """Make `model` resident on GPU `index`; InsufficientSpace when it cannot fit."""
        async with self._lock(index):
            if model in self.resident.get(index, {}):
                return self.resident[index][model]
            info = await self.gpu(index)
            free = self.free_bytes(info)
            if size > free:
                raise InsufficientSpace(
                    f"{model} needs {size} bytes, gpu{index} has {free} free",
                    details={"needed": size, "free": free},
                )
            w = await self.worker(index)
            progress(0, size)  # the total before the worker's first figures
            reply = await w.call("load", progress, model=model, dir=str(model_dir), files=files)
            resident = int(reply.get("bytes", size))
            self.resident.setdefault(index, {})[model] = resident
            self._sim_add(index, info, resident)
            return resident

    async def unload(self, index: int, model: str) -> int:
        """Free a model's memory on a GPU; 0 when it was not resident."""
        async with self._lock(index):
            held = self.resident.get(index, {})
            if model not in held:
                return 0
            w = self.workers.get(index)
            if w is not None and w.alive:
                await w.call("unload", model=model)
            freed = held.pop(model)
            if index in self.probe.sim_used:
                self.probe.sim_used[index] = max(0, self.probe.sim_used[index] - freed)
            return freed

    async def hand_over(
        self, index: int, model: str, needed: int, key: str, note: Callable[[str], None]
    ) -> GpuShare:
        """Give a GPU to a server that loads `model` itself (`needed` bytes of weights): free
        gswarm's resident copy of it there first, and reserve the share the server gets (under
        `key`, until `release`). Conflict naming the memory needed and free when the weights do
        not fit beside what else holds the GPU; then nothing is freed."""
        async with self._lock(index):
            info = await self.gpu(index)
            own = self.resident.get(index, {}).get(model, 0)
            free = self.free_bytes(info) + own
            utilization = gpu_memory_utilization(info.memory_total, free)
            share = int(utilization * info.memory_total)
            if needed > share:
                others = {m: b for m, b in self.resident.get(index, {}).items() if m != model}
                held = [f"{m} resident ({b} bytes)" for m, b in sorted(others.items())]
                held += [f"service {k} ({b} bytes)" for k, b in sorted(self.reserved.get(index, {}).items())]
                raise Conflict(
                    f"{model} needs {needed} bytes of gpu{index}'s memory for its weights; "
                    f"{share} bytes can be given ({free} free of {info.memory_total}, "
                    f"less headroom)" + (f"; held by {', '.join(held)}" if held else ""),
                    code="insufficient_gpu_memory",
                    details={"needed": needed, "free": free, "share": share, "total": info.memory_total},
                )
            freed = 0
            if own:
                note(f"freeing gswarm's resident copy of {model} on gpu{index} ({own} bytes) for the server")
                w = self.workers.get(index)
                if w is not None and w.alive:
                    await w.call("unload", model=model)
                freed = self.resident[index].pop(model)
                self._sim_add(index, info, -freed)
                if not self.resident[index] and w is not None:
                    # Nothing else lives in the worker: stop it, so its CUDA context goes too.
                    self.workers.pop(index, None)
                    await w.stop()
            self.reserved.setdefault(index, {})[key] = share
            self._sim_add(index, info, share)
            return GpuShare(utilization=utilization, reserved=share, freed=freed)

    async def release(self, index: int, key: str) -> None:
        """Give back the share reserved for a server (it stopped)."""
        async with self._lock(index):
            share = self.reserved.get(index, {}).pop(key, 0)
            if share and index in self.probe.sim_used:
                self.probe.sim_used[index] = max(0, self.probe.sim_used[index] - share)

    def holdings(self) -> list[Holding]:
        """Every resident model, as holdings on tier gpuN."""
        return [
            Holding(model=m, tier=f"gpu{i}", path=self.workers[i].device if i in self.workers else "", size=b)
            for i, models in sorted(self.resident.items())
            for m, b in sorted(models.items())
        ]

    async def close(self) -> None:
        """Stop every worker."""
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
        self.workers.clear()
        self.resident.clear()
