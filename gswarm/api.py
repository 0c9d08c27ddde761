"""The REST request bodies, shared by the head's routes, the SDK and the job runner. No I/O.

Every body refuses a field it does not know (a misspelt `keep_sorce` is a 400 naming it, not
a silent default). The field names are the original API's (`model_name`, `source_url`,
`target_device`...), so its documented JSON bodies work as written.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The base of every REST body."""


class RegisterModelBody(Body):
    """`POST /models`."""

    name: str
    type: str
    source_url: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    """Free-form notes about the model, kept as given."""


class RegisterNodeBody(Body):
    """`POST /nodes` of the original API."""

    node_id: str
    hostname: str = ""
    ip_address: str = ""
    storage_devices: dict[str, Any] = msgspec.field(default_factory=dict)
    """Kept as given, for display; agents report the real tiers."""
    gpu_count: int = 0


class DownloadBody(Body):
    """`POST /download` (the original body, plus optional patterns)."""

    model_name: str
    source_url: str
    target_device: str
    model_type: str = "unknown"
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    prefer_peer: bool = True
    bandwidth_limit: int | None = None
    timeout: float | None = None


class CopyBody(Body):
    """`POST /copy` and `POST /move` (the original body)."""

    model_name: str
    source_device: str
    target_device: str
    keep_source: bool = False
    verify: Literal["size", "sha256"] = "size"
    bandwidth_limit: int | None = None
    timeout: float | None = None


class LoadBody(Body):
    """`POST /load`."""

    model_name: str
    device: str
    source_device: str | None = None
    keep_source: bool = True
    timeout: float | None = None


class ServeBody(Body):
    """`POST /serve` (the original body, plus the backend)."""

    model_name: str
    device: str
    port: int
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    """The backend's own options, passed to it as given."""
    backend: str | None = None
    timeout: float | None = None


class HealthBody(Body):
    """`POST /health_check`: a service (model and device) or a whole node."""

    model_name: str | None = None
    device: str | None = None
    node_id: str | None = None


class ReplicateBody(Body):
    """`POST /replicate`."""

    model_name: str
    targets: list[str] = msgspec.field(default_factory=list)
    all_nodes: Literal["disk", "dram"] | None = None
    source_device: str | None = None
    max_fanout: int = 1
    bandwidth_limit: int | None = None
    timeout: float | None = None
