"""Every op kind in one place: its typed args and result, and the copies it writes and removes.
No I/O.

An op kind is one `Args` Struct and one `Result` Struct, both tagged with the kind's name in a
`kind` field, plus one entry in `KINDS`. The head builds the args (never a dict), the agent's
handler table maps the kind to its handler, the head's result-hook table maps it to what the
result changes in the registry, and `Args.writes`/`Args.removes` tell the head which copies an
open op is working on (so a reconnect or a restart never mistakes a copy being written for a
copy that is gone).

On the wire a command's args and a result are JSON objects (`msgspec.Raw` in `protocol`),
decoded here by kind. A decoder for one tagged Struct does not need the tag, so an agent or a
head one version older that leaves `kind` out still talks; fields a newer side adds are
ignored by an older one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec

from gswarm.protocol import Holding, Inventory, OpError, OpProgress
from gswarm.states import OP_TERMINAL, LocationState, OpState

CopyKey = tuple[str, str]
"""(model, device): one copy of a model on one device."""

HEAD_NODE = "@head"
"""The node id of ops the head runs itself (replication); no agent can claim it."""


def _dev(node_id: str, tier: str) -> str:
    return f"{node_id}:{tier}"


# ---------------------------------------------------------------- args


class PeerSource(msgspec.Struct):
    """A node that holds a verified copy (or one still arriving), with a grant to fetch it."""

    node_id: str
    url: str
    tier: str
    token: str


class Args(msgspec.Struct, tag_field="kind", kw_only=True):
    """The base of every op's args."""

    def writes(self, node_id: str) -> list[CopyKey]:
        """The copies this op writes when it runs on `node_id`."""
        return []

    def removes(self, node_id: str) -> list[CopyKey]:
        """The copies this op removes (once it has succeeded) when it runs on `node_id`."""
        return []


class ProbeArgs(Args, tag="probe"):
    """Re-read the node's inventory and holdings."""


class DownloadArgs(Args, tag="download"):
    """Fetch a model from the Hub, a URL or a local path into a tier; `peers` first."""

    model_name: str
    source_url: str
    tier: str
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    peers: list[PeerSource] = msgspec.field(default_factory=list)
    bandwidth_limit: int | None = None

    def writes(self, node_id: str) -> list[CopyKey]:
        return [(self.model_name, _dev(node_id, self.tier))]


class FetchArgs(Args, tag="fetch"):
    """Pull a copy from other nodes (copy or move between nodes, replication)."""

    model_name: str
    tier: str
    peers: list[PeerSource]
    bandwidth_limit: int | None = None
    source_device: str | None = None
    remove_source: bool = False
    parent_op: str | None = None

    def writes(self, node_id: str) -> list[CopyKey]:
        return [(self.model_name, _dev(node_id, self.tier))]

    def removes(self, node_id: str) -> list[CopyKey]:
        if self.remove_source and self.source_device:
            return [(self.model_name, self.source_device)]
        return []


class CopyArgs(Args, tag="copy"):
    """Copy (or move, with `remove_source`) a published copy between a node's tiers."""

    model_name: str
    source_tier: str
    target_tier: str
    remove_source: bool = False
    verify: Literal["size", "sha256"] = "size"
    parent_op: str | None = None

    def writes(self, node_id: str) -> list[CopyKey]:
        return [(self.model_name, _dev(node_id, self.target_tier))]

    def removes(self, node_id: str) -> list[CopyKey]:
        return [(self.model_name, _dev(node_id, self.source_tier))] if self.remove_source else []


class DeleteArgs(Args, tag="delete"):
    """Remove a copy (published or partial) from a tier, or free it from a GPU."""

    model_name: str
    tier: str
    previous_state: LocationState = "ready"

    def writes(self, node_id: str) -> list[CopyKey]:
        return [(self.model_name, _dev(node_id, self.tier))]

    def removes(self, node_id: str) -> list[CopyKey]:
        return [(self.model_name, _dev(node_id, self.tier))]


class LoadArgs(Args, tag="load"):
    """Make a model resident in a GPU's memory from the node's dram or disk copy."""

    model_name: str
    gpu: int
    source_tier: str | None = None
    remove_source: bool = False

    @property
    def tier(self) -> str:
        """The GPU tier written (`gpuN`)."""
        return f"gpu{self.gpu}"

    def writes(self, node_id: str) -> list[CopyKey]:
        return [(self.model_name, _dev(node_id, self.tier))]

    def removes(self, node_id: str) -> list[CopyKey]:
        if self.remove_source and self.source_tier:
            return [(self.model_name, _dev(node_id, self.source_tier))]
        return []


class ServeArgs(Args, tag="serve"):
    """Start an inference server for a model on a device."""

    model_name: str
    device: str
    port: int
    backend: str = "builtin"
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    """The backend's own options, passed through as the user wrote them."""
    host: str = ""
    """The address the service listens on; empty: the agent's `--service-host` (127.0.0.1
    unless its operator said otherwise)."""


class BuiltinConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The builtin backend's options (a serve's `config`), named as vLLM names them."""

    served_model_name: str | list[str] | None = None
    """The name (or names) the server answers to; the first is the one it reports. Without
    one, the model's gswarm name."""
    aliases: list[str] = msgspec.field(default_factory=list)
    """More names the server answers to, besides the served ones."""
    max_model_len: int | None = None
    """The context length (prompt plus completion) in tokens; at most the model's own."""
    max_waiting: int = 256
    """Requests that may wait for their turn (one generates at a time); more are answered 429."""
    backend: str | None = None
    """The backend (the serve request's `backend` says the same)."""

    def names(self, model_name: str) -> list[str]:
        """Every name the server answers to, the reported one first, without repeats."""
        served = self.served_model_name
        first = [served] if isinstance(served, str) else (served or [model_name])
        return list(dict.fromkeys([*first, *self.aliases]))


SERVED_NAME_MAX = 256


def decode_builtin_config(config: dict[str, Any]) -> BuiltinConfig:
    """The builtin backend's options, checked: a ValueError says what is wrong."""
    try:
        cfg = msgspec.convert(config, BuiltinConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid builtin config: {exc}") from None
    names = cfg.names("x")
    if isinstance(cfg.served_model_name, list) and not cfg.served_model_name:
        raise ValueError("invalid builtin config: served_model_name is an empty list")
    if len(names) > 64:
        raise ValueError("invalid builtin config: at most 64 served names and aliases")
    for name in names:
        if (
            not name
            or len(name) > SERVED_NAME_MAX
            or not name.isprintable()
            or any(c.isspace() for c in name)
        ):
            raise ValueError(
                f"invalid builtin config: served name {name[:80]!r} must be 1-{SERVED_NAME_MAX} "
                "printable characters without spaces"
            )
    if cfg.max_model_len is not None and not 1 <= cfg.max_model_len <= 1 << 24:
        raise ValueError("invalid builtin config: max_model_len must be between 1 and 16777216")
    if not 0 <= cfg.max_waiting <= 1 << 16:
        raise ValueError("invalid builtin config: max_waiting must be between 0 and 65536")
    return cfg


class StopArgs(Args, tag="stop"):
    """Stop a service and free what it held."""

    service_id: str


class HealthCheckArgs(Args, tag="health_check"):
    """Check one service (by id) or, without one, the whole node."""

    service_id: str = ""


class LogsArgs(Args, tag="logs"):
    """The tail of a service's log, or (with `since_bytes`) what it gained past an offset."""

    service_id: str
    lines: int = 100
    since_bytes: int | None = None
    """Read from this byte offset (at most `LOG_CHUNK_BYTES`) instead of the last `lines`."""
    wait: float = 0.0
    """With `since_bytes`: wait up to this many seconds for bytes past it (a long poll)."""


class ReplicateArgs(Args, tag="replicate"):
    """Spread a model to many devices (run by the head, which starts `fetch`/`copy` ops)."""

    model_name: str
    targets: list[str]
    source_device: str | None = None
    max_fanout: int = 1
    bandwidth_limit: int | None = None


OpArgs = (
    ProbeArgs
    | DownloadArgs
    | FetchArgs
    | CopyArgs
    | DeleteArgs
    | LoadArgs
    | ServeArgs
    | StopArgs
    | HealthCheckArgs
    | LogsArgs
    | ReplicateArgs
)

# ---------------------------------------------------------------- results


class Result(msgspec.Struct, tag_field="kind", kw_only=True):
    """The base of every op's result."""


class ProbeResult(Result, tag="probe"):
    """What the node has now."""

    inventory: Inventory
    holdings: list[Holding]
    partials: list[Holding] = msgspec.field(default_factory=list)
    """Unfinished copies (kept to resume; removable with a delete)."""


class WrittenCopy(Result):
    """A copy an op wrote (or found already there)."""

    model: str
    tier: str
    path: str = ""
    size: int = 0
    files: int = 0
    source: str = ""
    """Where the bytes first came from (`hf://org/repo@rev`, a URL, `file://...`)."""
    revision: str = ""
    already_present: bool = False
    """The target already held a verified copy: nothing was written."""
    from_peer: str = ""
    """The node the bytes came from, when a peer served them."""
    peer_errors: list[str] = msgspec.field(default_factory=list)
    removed_source: bool = False
    """A move: the source copy is gone."""
    source_tier: str = ""


class DownloadResult(WrittenCopy, tag="download"):
    """A downloaded copy."""


class FetchResult(WrittenCopy, tag="fetch"):
    """A copy pulled from peers."""


class CopyResult(WrittenCopy, tag="copy"):
    """A copy between tiers of a node."""


class LoadResult(WrittenCopy, tag="load"):
    """A copy made resident on a GPU (`path` names the torch device)."""


class DeleteResult(Result, tag="delete"):
    """A removed copy."""

    model: str
    tier: str
    removed: bool
    freed: int = 0
    """Bytes of a partial copy, or of GPU memory, given back."""


class ServeResult(Result, tag="serve"):
    """A started service."""

    service_id: str
    url: str
    state: str
    pid: int = 0
    already_running: bool = False
    """The same model, device, port and backend were served already: nothing was started."""
    source_tier: str = ""
    """The local copy the server started from (dram before disk), or the GPU for builtin."""
    freed: int = 0
    """Bytes of gswarm's resident copy of the model freed on the GPU before a template
    backend (vLLM) started: the hand-over, so the weights are not held twice."""
    gpu_memory_utilization: float = 0.0
    """The share of the GPU given to a template backend (`--gpu-memory-utilization`)."""


class StopResult(Result, tag="stop"):
    """A stopped service."""

    service_id: str
    state: str


class HealthCheckResult(Result, tag="health_check"):
    """A service's or a node's health."""

    healthy: bool
    service_id: str = ""
    state: str = ""
    latency_ms: float = 0.0
    services: dict[str, bool] = msgspec.field(default_factory=dict)
    gpus: int = 0
    tiers: dict[str, int] = msgspec.field(default_factory=dict)


LOG_CHUNK_BYTES = 64 * 1024
"""The most bytes of log one `logs` answer carries."""


class LogsResult(Result, tag="logs"):
    """The tail of a service's log, or the bytes it gained past an offset."""

    service_id: str
    log: str
    offset: int = 0
    """The byte offset just past what `log` holds: ask `since_bytes=offset` for what follows."""
    reset: bool = False
    """The log was shorter than `since_bytes` (replaced or truncated): `log` starts from its beginning."""
    file: str = ""
    """The log file's name on the node."""
    shared: bool = False
    """The file is a GPU worker's log, which every builtin service on that GPU writes to."""
    running: bool = False
    """The service still exists on the node (a finished one's log is still readable)."""


class TargetOutcome(msgspec.Struct, omit_defaults=True):
    """How one target of a replication ended."""

    state: Literal["succeeded", "failed"]
    op_id: str = ""
    error: str = ""
    source: str = msgspec.field(default="", name="from")
    seconds: float = 0.0
    already_present: bool = False


class ReplicateResult(Result, tag="replicate"):
    """Every target's outcome."""

    targets: dict[str, TargetOutcome]


OpResult = (
    ProbeResult
    | DownloadResult
    | FetchResult
    | CopyResult
    | LoadResult
    | DeleteResult
    | ServeResult
    | StopResult
    | HealthCheckResult
    | LogsResult
    | ReplicateResult
)

# ---------------------------------------------------------------- the kind table


@dataclass(frozen=True)
class OpKind:
    """One op kind: its name, args and result types, and who runs it."""

    name: str
    args: type[Args]
    result: type[Result]
    on_head: bool = False
    """Run by the head itself (node `@head`) rather than by an agent."""


KINDS: dict[str, OpKind] = {
    k.name: k
    for k in (
        OpKind("probe", ProbeArgs, ProbeResult),
        OpKind("download", DownloadArgs, DownloadResult),
        OpKind("fetch", FetchArgs, FetchResult),
        OpKind("copy", CopyArgs, CopyResult),
        OpKind("delete", DeleteArgs, DeleteResult),
        OpKind("load", LoadArgs, LoadResult),
        OpKind("serve", ServeArgs, ServeResult),
        OpKind("stop", StopArgs, StopResult),
        OpKind("health_check", HealthCheckArgs, HealthCheckResult),
        OpKind("logs", LogsArgs, LogsResult),
        OpKind("replicate", ReplicateArgs, ReplicateResult, on_head=True),
    )
}

_ARGS_DECODERS = {name: msgspec.json.Decoder(k.args) for name, k in KINDS.items()}
_RESULT_DECODERS = {name: msgspec.json.Decoder(k.result) for name, k in KINDS.items()}


class UnknownKind(ValueError):
    """An op kind this side does not know (a newer peer, or a hostile one)."""


_KIND_OF_ARGS: dict[type[Args], str] = {k.args: name for name, k in KINDS.items()}


def kind_of(args: OpArgs) -> str:
    """The kind name of an args Struct."""
    return _KIND_OF_ARGS[type(args)]


def decode_args(kind: str, raw: bytes) -> OpArgs:
    """A command's args, by kind; UnknownKind or msgspec.ValidationError when they don't fit."""
    decoder = _ARGS_DECODERS.get(kind)
    if decoder is None:
        raise UnknownKind(f"unknown op kind {kind!r}")
    return cast(OpArgs, decoder.decode(raw))


def decode_result(kind: str, raw: bytes) -> OpResult:
    """An agent's result, by kind; UnknownKind or msgspec.ValidationError when it doesn't fit."""
    decoder = _RESULT_DECODERS.get(kind)
    if decoder is None:
        raise UnknownKind(f"unknown op kind {kind!r}")
    return cast(OpResult, decoder.decode(raw))


def tag_row(row: dict[str, Any]) -> dict[str, Any]:
    """An op row as stored before args and results carried their `kind`, tagged (read-time upgrade)."""
    kind = row.get("kind")
    for key in ("args", "result"):
        value = row.get(key)
        if isinstance(value, dict) and "kind" not in value:
            value["kind"] = kind
    return row


# ---------------------------------------------------------------- the op entity


class Op(msgspec.Struct):
    """One unit of work on one node."""

    op_id: str
    kind: str
    node_id: str
    args: OpArgs
    state: OpState = "queued"
    progress: OpProgress = msgspec.field(default_factory=OpProgress)
    result: OpResult | None = None
    error: OpError | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    timeout: float = 0.0
    attempts: int = 0

    @property
    def terminal(self) -> bool:
        """True once the op has succeeded, failed or been cancelled."""
        return self.state in OP_TERMINAL

    def writes(self) -> list[CopyKey]:
        """The copies this op writes."""
        return self.args.writes(self.node_id)

    def removes(self) -> list[CopyKey]:
        """The copies this op removes once it has succeeded."""
        return self.args.removes(self.node_id)
