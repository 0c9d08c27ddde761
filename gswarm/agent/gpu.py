"""GPU inventory from NVML (nvidia-ml-py), or clearly marked simulated GPUs.

NVML calls block, so callers run `GpuProbe.read` in a thread. Where NVML is absent (no
driver, no NVIDIA hardware) the node reports no GPUs and says why, and nothing crashes.
"""

from __future__ import annotations

import re
import threading

from gswarm.protocol import GpuInfo

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`16G`, `512MiB`, `1.5T`, `1048576` -> bytes."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (try 16G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


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
