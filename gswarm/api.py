"""The REST request bodies, shared by the head's routes, the SDK and the job runner. No I/O.

Every body refuses a field it does not know (a misspelt `keep_sorce` is a 400 naming it, not
a silent default). The field names are the original API's (`model_name`, `source_url`,
`target_device`...), so its documented JSON bodies work as written.

Every field is bounded (the caps are listed under "Limits" in docs/architecture.md): strings
by length, numbers by range, lists by count, and free-form JSON (`metadata`, `config`,
`storage_devices`) by depth (`FREE_FORM_DEPTH` levels), string length and encoded size, so
no body can make the head recurse, overflow an integer column or store megabytes of notes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

MAX_NAME = 256
"""Device addresses, backends, hostnames: a short string (model names and node ids are
capped by their own rules, checked by the routes: 128 and 63 characters)."""
MAX_URL = 4096
"""A source URL."""
MAX_PATTERN = 1024
"""One allow/ignore pattern."""
MAX_LIST = 1024
"""Patterns or targets in one body."""
MAX_FREE_BYTES = 64 * 1024
"""A free-form field (`metadata`, `config`, `storage_devices`) as encoded JSON."""
MAX_FREE_STRING = MAX_FREE_BYTES
"""One string (or key) inside free-form JSON: checked while decoding, before the whole is."""
FREE_FORM_DEPTH = 8
"""Levels of objects or arrays inside a free-form field."""
MAX_TIMEOUT = 30 * 86400.0
"""The longest op timeout, seconds (30 days)."""
MIN_BANDWIDTH = 64 * 1024
"""The smallest bandwidth limit, bytes per second (64 KiB/s)."""
MAX_BANDWIDTH = 1 << 40
"""The largest bandwidth limit, bytes per second (1 TiB/s)."""
MAX_GPUS = 1024
"""The most GPUs a node may claim."""
MAX_FANOUT = 64
"""The most peers one holder serves at once in a replication."""

ShortStr = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
UrlStr = Annotated[str, msgspec.Meta(max_length=MAX_URL)]
Patterns = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=MAX_PATTERN)]], msgspec.Meta(max_length=MAX_LIST)
]
Timeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT)]
Bandwidth = Annotated[int, msgspec.Meta(ge=MIN_BANDWIDTH, le=MAX_BANDWIDTH)]

_FreeStr = Annotated[str, msgspec.Meta(max_length=MAX_FREE_STRING)]
_Leaf = None | bool | int | float | _FreeStr
_J1 = _Leaf | list[_Leaf] | dict[_FreeStr, _Leaf]
_J2 = _Leaf | list[_J1] | dict[_FreeStr, _J1]
_J3 = _Leaf | list[_J2] | dict[_FreeStr, _J2]
_J4 = _Leaf | list[_J3] | dict[_FreeStr, _J3]
_J5 = _Leaf | list[_J4] | dict[_FreeStr, _J4]
_J6 = _Leaf | list[_J5] | dict[_FreeStr, _J5]
_J7 = _Leaf | list[_J6] | dict[_FreeStr, _J6]
FreeForm = dict[_FreeStr, _J7]
"""A free-form JSON object at most `FREE_FORM_DEPTH` levels deep (itself the first), with
strings of at most `MAX_FREE_STRING` characters; its encoded size is checked by `check_free_form`."""

TOO_DEEP = "Expected `bool | int | float | str | null`"
"""How msgspec words a free-form value nested deeper than `FREE_FORM_DEPTH` (read_json rewords it)."""


def check_free_form(name: str, value: FreeForm) -> None:
    """ValueError (a 400 through msgspec) when a free-form field encodes to more than
    `MAX_FREE_BYTES`."""
    size = len(msgspec.json.encode(value))
    if size > MAX_FREE_BYTES:
        raise ValueError(f"{name} is {size} bytes as JSON: at most {MAX_FREE_BYTES}")


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The base of every REST body."""


class RegisterModelBody(Body):
    """`POST /models`."""

    name: str
    """Checked by the model name rule (`devices.validate_model_name`), which also caps it."""
    type: Annotated[str, msgspec.Meta(max_length=64)]
    source_url: UrlStr | None = None
    metadata: FreeForm = msgspec.field(default_factory=dict)
    """Free-form notes about the model, kept as given (bounded like every free-form field)."""

    def __post_init__(self) -> None:
        check_free_form("metadata", self.metadata)


class RegisterNodeBody(Body):
    """`POST /nodes` of the original API."""

    node_id: str
    """Checked by the node id rule (`devices.validate_node_id`), which also caps it."""
    hostname: ShortStr = ""
    ip_address: Annotated[str, msgspec.Meta(max_length=64)] = ""
    storage_devices: FreeForm = msgspec.field(default_factory=dict)
    """Kept as given, for display; agents report the real tiers."""
    gpu_count: Annotated[int, msgspec.Meta(ge=0, le=MAX_GPUS)] = 0

    def __post_init__(self) -> None:
        check_free_form("storage_devices", self.storage_devices)


class DownloadBody(Body):
    """`POST /download` (the original body, plus optional patterns)."""

    model_name: str
    source_url: UrlStr
    target_device: ShortStr
    model_type: ShortStr = "unknown"
    allow_patterns: Patterns | None = None
    ignore_patterns: Patterns | None = None
    prefer_peer: bool = True
    bandwidth_limit: Bandwidth | None = None
    timeout: Timeout | None = None


class CopyBody(Body):
    """`POST /copy` and `POST /move` (the original body)."""

    model_name: str
    source_device: ShortStr
    target_device: ShortStr
    keep_source: bool = False
    verify: Literal["size", "sha256"] = "size"
    bandwidth_limit: Bandwidth | None = None
    timeout: Timeout | None = None


class LoadBody(Body):
    """`POST /load`."""

    model_name: str
    device: ShortStr
    source_device: ShortStr | None = None
    keep_source: bool = True
    timeout: Timeout | None = None


class ServeBody(Body):
    """`POST /serve` (the original body, plus the backend)."""

    model_name: str
    device: ShortStr
    port: int
    """Checked by the route (1-65535, `invalid_port`)."""
    config: FreeForm = msgspec.field(default_factory=dict)
    """The backend's own options, passed to it as given."""
    backend: ShortStr | None = None
    timeout: Timeout | None = None

    def __post_init__(self) -> None:
        check_free_form("config", self.config)


class HealthBody(Body):
    """`POST /health_check`: a service (model and device) or a whole node."""

    model_name: str | None = None
    device: ShortStr | None = None
    node_id: str | None = None


class ReplicateBody(Body):
    """`POST /replicate`."""

    model_name: str
    targets: Annotated[list[ShortStr], msgspec.Meta(max_length=MAX_LIST)] = msgspec.field(
        default_factory=list
    )
    all_nodes: Literal["disk", "dram"] | None = None
    source_device: ShortStr | None = None
    max_fanout: Annotated[int, msgspec.Meta(ge=1, le=MAX_FANOUT)] = 1
    bandwidth_limit: Bandwidth | None = None
    timeout: Timeout | None = None
