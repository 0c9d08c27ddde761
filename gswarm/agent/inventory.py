"""What this node has: identity, addresses, memory, storage tiers, GPUs. Blocking reads;
the agent calls `collect` in a thread."""

from __future__ import annotations

import os
import socket

from gswarm.agent.gpu import GpuProbe
from gswarm.agent.stores import TierStore
from gswarm.protocol import Inventory


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


def collect(stores: dict[str, TierStore], gpus: GpuProbe) -> Inventory:
    """A fresh inventory of this machine."""
    total, avail = _meminfo()
    return Inventory(
        hostname=socket.gethostname(),
        addresses=_addresses(),
        cpu_count=os.cpu_count() or 0,
        memory_total=total,
        memory_available=avail,
        tiers=[store.info() for store in stores.values()],
        gpus=gpus.read(),
        gpu_error=gpus.error,
    )
