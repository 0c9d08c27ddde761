"""Names and device addresses: parsing, normalising, validating. No I/O.

A device address is `node:tier` with tier `disk`, `dram` or `gpuN`; `node:gpu:N` is accepted
and normalised to `node:gpuN`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gswarm.errors import BadRequest

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_GPU_RE = re.compile(r"gpu(\d{1,3})")
STORAGE_TIERS = ("disk", "dram")


def validate_node_id(node_id: str) -> str:
    """Return `node_id` if it is a valid node id, else raise BadRequest naming the rule."""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
        raise BadRequest(
            f"invalid node id {node_id!r}: 1-63 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit",
            code="invalid_name",
            details={"field": "node_id"},
        )
    return node_id


def validate_model_name(name: str, field: str = "name") -> str:
    """Return `name` if it is a valid model name, else raise BadRequest naming the rule."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or name in {".", ".."}:
        shown = name if len(str(name)) <= 80 else f"{str(name)[:80]}... ({len(name)} characters)"
        raise BadRequest(
            f"invalid model name {shown!r}: 1-128 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit",
            code="invalid_name",
            details={"field": field},
        )
    return name


@dataclass(frozen=True, slots=True)
class Device:
    """A parsed device address."""

    node: str
    tier: str

    @property
    def gpu_index(self) -> int | None:
        """The GPU index for a `gpuN` tier, else None."""
        m = _GPU_RE.fullmatch(self.tier)
        return int(m.group(1)) if m else None

    @property
    def is_gpu(self) -> bool:
        """True for a `gpuN` tier."""
        return self.gpu_index is not None

    def __str__(self) -> str:
        return f"{self.node}:{self.tier}"


def parse_device(address: str, field: str = "device") -> Device:
    """Parse and normalise `node:tier`; raise BadRequest with the reason otherwise."""
    if not isinstance(address, str) or ":" not in address:
        raise BadRequest(
            f"invalid device {address!r}: expected NODE:TIER with TIER one of disk, dram, gpuN",
            code="invalid_device",
            details={"field": field},
        )
    node, _, tier = address.partition(":")
    tier = tier.lower()
    if tier.startswith("gpu:"):
        tier = "gpu" + tier[4:]
    if not NODE_ID_RE.fullmatch(node):
        raise BadRequest(
            f"invalid device {address!r}: {node!r} is not a valid node id",
            code="invalid_device",
            details={"field": field},
        )
    if tier not in STORAGE_TIERS and not _GPU_RE.fullmatch(tier):
        raise BadRequest(
            f"invalid device {address!r}: unknown tier {tier!r} (expected disk, dram or gpuN)",
            code="invalid_device",
            details={"field": field},
        )
    if tier.startswith("gpu"):
        tier = f"gpu{int(tier[3:])}"
    return Device(node, tier)


# ---------------------------------------------------------------- sharing a GPU

GPU_HEADROOM = 0.05
"""The fraction of a GPU's memory kept out of a served process's share: its CUDA context and
allocator slack, taken before vLLM checks that its share is free."""
MAX_GPU_UTILIZATION = 0.9
"""The largest share given to one process: vLLM's own default for a GPU it has alone."""


def gpu_memory_utilization(total: int, free: int) -> float:
    """The `--gpu-memory-utilization` a process may be given on a GPU of `total` bytes with
    `free` bytes that nothing else holds: what fits in `free` less the headroom, as a fraction
    of `total` rounded down to 0.01 (vLLM refuses to start when `fraction * total` exceeds the
    free memory it sees), at most `MAX_GPU_UTILIZATION`; 0.0 when nothing fits."""
    if total <= 0:
        return 0.0
    usable = free - GPU_HEADROOM * total
    return max(0.0, min(MAX_GPU_UTILIZATION, int(100 * usable / total) / 100))
