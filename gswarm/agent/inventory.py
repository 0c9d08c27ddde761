"""What this node has: identity, addresses, memory, storage tiers, GPUs. Blocking reads;
the agent calls `collect` in a thread."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from gswarm.agent.gpu import GpuProbe
from gswarm.protocol import Inventory, TierInfo


def _addresses() -> list[str]:
    found: list[str] = []
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        infos = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in found and not addr.startswith("127.") and addr != "::1":
            found.append(addr)
    return found or ["127.0.0.1"]


def _meminfo() -> tuple[int, int]:
    total = avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return total, avail


def tier_info(name: str, path: Path) -> TierInfo:
    """Capacity and free space of the filesystem a tier lives on."""
    path.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(path)
    return TierInfo(name=name, path=str(path), capacity=usage.total, free=usage.free)


def collect(tiers: dict[str, Path], gpus: GpuProbe) -> Inventory:
    """A fresh inventory of this machine."""
    total, avail = _meminfo()
    return Inventory(
        hostname=socket.gethostname(),
        addresses=_addresses(),
        cpu_count=os.cpu_count() or 0,
        memory_total=total,
        memory_available=avail,
        tiers=[tier_info(name, path) for name, path in tiers.items()],
        gpus=gpus.read(),
        gpu_error=gpus.error,
    )
