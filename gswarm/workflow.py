"""Job files: parse YAML or JSON, validate every action before anything runs, build the DAG.
No I/O.

Accepted, as the original README shows: `name`, `description`, `actions` with `action`,
`model`, `source`, `target`, `from`, `to`, `device`, `port`, `keep_source`; plus `id`,
`depends_on`, `retries`, `timeout`, `continue_on_error`, `backend`, `config`, `targets`,
`all_nodes`, `node`. The original design's long form (`action_id`, `action_type`,
`model_name`, `source_url`, `source_device`, `target_device`, `dependencies`) maps onto it.

Dependencies: an explicit `depends_on` wins; without it an action waits for the previous
action in the file that touches the same model, so actions on different models run at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import yaml

from gswarm.api import (
    MAX_LIST,
    MAX_TIMEOUT,
    FreeForm,
    Patterns,
    ShortStr,
    UrlStr,
    check_free_form,
)
from gswarm.devices import parse_device, validate_model_name, validate_node_id
from gswarm.errors import GswarmError, InvalidWorkflow
from gswarm.sources import parse_source

MAX_ACTIONS = 1000

_LONG_FORM = {
    "action_id": "id",
    "action_type": "action",
    "model_name": "model",
    "source_url": "source",
    "source_device": "from",
    "dependencies": "depends_on",
}
_COMMON = frozenset(
    {"id", "action", "depends_on", "retries", "timeout", "continue_on_error", "description", "target_device"}
)
"""Keys every action may carry besides its kind's own fields."""


# ---------------------------------------------------------------- one Struct per action kind


class Action(msgspec.Struct, tag_field="action", kw_only=True, omit_defaults=True):
    """The fields of one action as a job file writes them; the subclass is the kind."""

    model: ShortStr = ""

    def writes(self) -> list[str]:
        """The devices whose copy of `model` this action writes (the locks it must hold)."""
        return []


class DownloadAction(Action, tag="download"):
    """`download`: fetch `model` from `source` onto `target` (disk or dram)."""

    model: ShortStr
    source: UrlStr
    target: ShortStr
    include: Patterns | None = None
    exclude: Patterns | None = None

    def writes(self) -> list[str]:
        return [self.target]


class CopyAction(Action, tag="copy"):
    """`copy`: copy `model` from one device to another."""

    model: ShortStr
    from_: ShortStr = msgspec.field(name="from")
    to: ShortStr
    keep_source: bool = False

    def writes(self) -> list[str]:
        return [self.to]


class MoveAction(CopyAction, tag="move"):
    """`move`: move `model` (the source goes once the target is verified); a copy's fields."""

    def writes(self) -> list[str]:
        return [self.from_, self.to]


class DeleteAction(Action, tag="delete"):
    """`delete`: remove the copy on `device`."""

    model: ShortStr
    device: ShortStr
    force: bool = False

    def writes(self) -> list[str]:
        return [self.device]


class LoadAction(Action, tag="load"):
    """`load`: make `model` resident on a GPU (`node:gpuN`)."""

    model: ShortStr
    device: ShortStr
    from_: ShortStr | None = msgspec.field(default=None, name="from")

    def writes(self) -> list[str]:
        return [self.device]


class ServeAction(Action, tag="serve"):
    """`serve`: start a server for `model` on `device` at `port`."""

    model: ShortStr
    device: ShortStr
    port: int
    backend: ShortStr | None = None
    config: FreeForm = msgspec.field(default_factory=dict)
    """The backend's own options, passed through."""

    def writes(self) -> list[str]:
        return [self.device]


class StopAction(Action, tag="stop"):
    """`stop`: stop the service of `model` on `device`."""

    model: ShortStr
    device: ShortStr

    def writes(self) -> list[str]:
        return [self.device]


class ReplicateAction(Action, tag="replicate"):
    """`replicate`: spread `model` to `targets` or to every online node's tier."""

    model: ShortStr
    targets: Annotated[list[ShortStr], msgspec.Meta(max_length=MAX_LIST)] | None = None
    all_nodes: Literal["disk", "dram"] | None = None
    from_: ShortStr | None = msgspec.field(default=None, name="from")

    def writes(self) -> list[str]:
        return list(self.targets or [])


class HealthCheckAction(Action, tag="health_check"):
    """`health_check`: a service (`model` and `device`) or a node."""

    device: ShortStr | None = None
    node: ShortStr | None = None


ActionFields = (
    DownloadAction
    | CopyAction
    | MoveAction
    | DeleteAction
    | LoadAction
    | ServeAction
    | StopAction
    | ReplicateAction
    | HealthCheckAction
)
ACTION_TYPES: dict[str, type[Action]] = {
    "download": DownloadAction,
    "copy": CopyAction,
    "move": MoveAction,
    "delete": DeleteAction,
    "load": LoadAction,
    "serve": ServeAction,
    "stop": StopAction,
    "replicate": ReplicateAction,
    "health_check": HealthCheckAction,
}
ACTIONS = tuple(ACTION_TYPES)
_KIND_OF_ACTION = {cls: kind for kind, cls in ACTION_TYPES.items()}


@dataclass
class ActionSpec:
    """One validated action of a job."""

    id: str
    fields: ActionFields
    depends_on: list[str] = field(default_factory=list)
    retries: int = 0
    timeout: float | None = None
    continue_on_error: bool = False

    @property
    def action(self) -> str:
        """The action's kind."""
        return _kind(self.fields)

    @property
    def model(self) -> str:
        """The model the action is about ('' for a node health check)."""
        return self.fields.model


def _kind(fields_: Action) -> str:
    return _KIND_OF_ACTION[type(fields_)]


@dataclass
class JobSpec:
    """A validated job: its actions in file order, dependencies resolved."""

    name: str
    description: str
    actions: list[ActionSpec]


class Problems:
    """Validation errors, each naming the action and the field."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, where: str, field_name: str, message: str) -> None:
        self.items.append({"action": where, "field": field_name, "message": message})

    def raise_if_any(self) -> None:
        if self.items:
            first = self.items[0]
            more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
            raise InvalidWorkflow(
                f"invalid job: {first['action']}: {first['field']}: {first['message']}{more}",
                details={"errors": self.items},
            )


MAX_JOB_BYTES = 8 << 20
"""The largest job file (the head's `max_job_bytes` setting defaults to this)."""
MAX_DEPTH = 32
"""Levels of mappings and lists in a job file."""
MAX_SCALAR = 64 * 1024
"""Characters in one string (or number) of a job file."""
MAX_JOB_NAME = 256
"""Characters in a job's name."""
MAX_DESCRIPTION = 4096
"""Characters in a job's (or an action's) description."""
MAX_ACTION_ID = 128
"""Characters in an action id."""

_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when PyYAML has it (fast), else the pure-Python one."""


def _yaml_problem(filename: str, mark: Any, problem: str) -> InvalidWorkflow:
    """`FILE: line L, column C: PROBLEM`, as editors and compilers point at a place."""
    if mark is None:
        return InvalidWorkflow(f"{filename}: {problem}")
    line, column = mark.line + 1, mark.column + 1
    return InvalidWorkflow(
        f"{filename}: line {line}, column {column}: {problem}", details={"line": line, "column": column}
    )


def _check_yaml(text: str, filename: str) -> None:
    """Walk the YAML events before building anything: no alias (an alias bomb expands a few
    hundred bytes into gigabytes), at most `MAX_DEPTH` levels (building deeper recurses), no
    scalar over `MAX_SCALAR` characters. Stops at the first problem, so a bomb costs nothing."""
    loader = _YAML_LOADER(text)
    try:
        depth = 0
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                raise _yaml_problem(
                    filename, event.start_mark, f"aliases (*{event.anchor}) are not allowed in job files"
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _yaml_problem(filename, event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR:
                why = f"a value of {len(event.value)} characters: at most {MAX_SCALAR}"
                raise _yaml_problem(filename, event.start_mark, why)
    finally:
        loader.dispose()


def _check_tree(data: Any, filename: str) -> None:
    """The same bounds on parsed JSON: depth and string lengths (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise InvalidWorkflow(f"{filename}: nested deeper than {MAX_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str) and len(value) > MAX_SCALAR:
            raise InvalidWorkflow(f"{filename}: a value of {len(value)} characters: at most {MAX_SCALAR}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def load_text(text: str, filename: str = "job", max_chars: int = MAX_JOB_BYTES) -> dict[str, Any]:
    """Parse a job file's text (JSON or YAML) within the limits above; InvalidWorkflow naming
    the line on a syntax error. Costs time in proportion to the text: call it off the event
    loop for anything but a small file."""
    if len(text) > max_chars:
        raise InvalidWorkflow(f"{filename} is {len(text)} characters: at most {max_chars}")
    if not text.strip():
        raise InvalidWorkflow(f"{filename} is empty: a job needs a name and a list of actions")
    stripped = text.lstrip()
    try:
        if stripped.startswith("{"):
            data = json.loads(text, parse_constant=_refuse_constant)
            _check_tree(data, filename)
        else:
            _check_yaml(text, filename)
            data = yaml.load(text, Loader=_YAML_LOADER)
    except json.JSONDecodeError as exc:
        raise InvalidWorkflow(
            f"{filename}: line {exc.lineno}, column {exc.colno}: JSON does not parse: {exc.msg}",
            details={"line": exc.lineno, "column": exc.colno},
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise _yaml_problem(filename, mark, f"YAML does not parse: {problem}") from None
    except RecursionError:
        raise InvalidWorkflow(f"{filename}: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # An integer of thousands of digits, NaN in JSON, an unhashable YAML key...
        raise InvalidWorkflow(f"{filename}: does not parse: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidWorkflow(
            f"{filename}: a job is a mapping with name and actions, not {type(data).__name__}"
        )
    return data


def _check_device(problems: Problems, where: str, name: str, value: Any, gpu: bool | None = None) -> None:
    if value in (None, ""):
        return  # missing: reported as such
    try:
        dev = parse_device(str(value) if value is not None else "", name)
    except GswarmError as exc:
        problems.add(where, name, exc.message)
        return
    if gpu is True and not dev.is_gpu:
        problems.add(where, name, f"{value} is not a GPU device (node:gpuN)")
    if gpu is False and dev.is_gpu:
        problems.add(where, name, f"{value}: a GPU is not a storage tier here (use load)")


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        out[_LONG_FORM.get(key, key)] = value
    # The long form says target_device for every kind; the short form says target or to.
    if "target_device" in out:
        kind = out.get("action")
        key = (
            "to"
            if kind in ("copy", "move")
            else ("device" if kind in ("load", "serve", "stop", "delete") else "target")
        )
        out.setdefault(key, out.pop("target_device"))
    return out


def validate(data: dict[str, Any], max_actions: int = MAX_ACTIONS) -> JobSpec:
    """Every problem of a parsed job at once (InvalidWorkflow), or the JobSpec."""
    problems = Problems()
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.add("job", "name", "a job needs a name (a non-empty string)")
    elif len(name) > MAX_JOB_NAME:
        problems.add("job", "name", f"{len(name)} characters: at most {MAX_JOB_NAME}")
    description = data.get("description") or ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        problems.add("job", "description", f"a string of at most {MAX_DESCRIPTION} characters")
        description = ""
    actions_raw = data.get("actions")
    if not isinstance(actions_raw, list) or not actions_raw:
        problems.add("job", "actions", "a job needs a non-empty list of actions")
        problems.raise_if_any()
        raise AssertionError
    if len(actions_raw) > max_actions:
        problems.add(
            "job", "actions", f"{len(actions_raw)} actions: at most {max_actions} in one job; split it"
        )
        problems.raise_if_any()
    actions: list[ActionSpec] = []
    ids: set[str] = set()
    for index, raw in enumerate(actions_raw):
        where = f"action {index + 1}"
        if not isinstance(raw, dict):
            problems.add(where, "action", "an action is a mapping")
            continue
        fields_ = _normalise(raw)
        kind = fields_.get("action")
        kind_shown = kind if isinstance(kind, str) else _shown(kind)
        aid = str(fields_.get("id") or f"{index + 1}-{kind_shown}")
        if len(aid) > MAX_ACTION_ID:
            problems.add(f"action {index + 1}", "id", f"{len(aid)} characters: at most {MAX_ACTION_ID}")
            aid = f"{index + 1}-{kind_shown}"[:MAX_ACTION_ID]
        where = f"action {index + 1} ({aid})"
        if aid in ids:
            problems.add(where, "id", f"duplicate id {aid!r}")
        ids.add(aid)
        if not isinstance(kind, str) or kind not in ACTION_TYPES:
            why = f"unknown action {_shown(kind)}: expected one of {', '.join(ACTIONS)}"
            problems.add(where, "action", why)
            continue
        typed, _ = _typed_fields(problems, where, str(kind), fields_)
        _check_fields(problems, where, typed)
        deps = fields_.get("depends_on")
        if deps is None:
            dep_list: list[str] = []
        elif isinstance(deps, str):
            dep_list = [deps]
        elif isinstance(deps, list) and all(isinstance(d, str | int) for d in deps):
            dep_list = [str(d) for d in deps]
        else:
            problems.add(where, "depends_on", "a list of action ids")
            dep_list = []
        retries = fields_.get("retries", 0)
        if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 20:
            problems.add(where, "retries", "a whole number from 0 to 20")
            retries = 0
        timeout = fields_.get("timeout")
        if timeout is not None and (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_TIMEOUT
            or not math.isfinite(timeout)
        ):
            problems.add(where, "timeout", f"a positive number of seconds, at most {MAX_TIMEOUT:.0f}")
            timeout = None
        coe = fields_.get("continue_on_error", False)
        if not isinstance(coe, bool):
            problems.add(where, "continue_on_error", "true or false")
            coe = False
        actions.append(
            ActionSpec(
                id=aid,
                fields=typed,
                depends_on=dep_list,
                retries=retries,
                timeout=float(timeout) if timeout else None,
                continue_on_error=coe,
            )
        )
    explicit = {a.id for a in actions if a.depends_on}
    for a in actions:
        for d in a.depends_on:
            if d not in ids:
                problems.add(
                    f"action {a.id}", "depends_on", f"depends on {d!r}, which is not an action id of this job"
                )
    _implicit_dependencies(actions, explicit)
    cycle = find_cycle(actions)
    if cycle:
        problems.add(f"action {cycle[0]}", "depends_on", "dependency cycle: " + " -> ".join(cycle))
    problems.raise_if_any()
    return JobSpec(name=str(name), description=str(description), actions=actions)


_WHAT = {
    "port": "a port (1-65535)",
    "keep_source": "true or false",
    "force": "true or false",
    "targets": "a list of devices",
    "include": "a list of patterns",
    "exclude": "a list of patterns",
    "config": "a mapping",
    "all_nodes": "disk or dram",
}


def _shown(value: Any) -> str:
    """A value as a problem quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"


def _blank(typ: Any) -> Any:
    """A stand-in for a missing or mistyped required field, so the other fields still get
    their checks (every problem is reported at once)."""
    if get_origin(typ) is Annotated:
        typ = get_args(typ)[0]
    if typ is int:
        return 0
    if typ is str:
        return ""
    return []


def _typed_fields(
    problems: Problems, where: str, kind: str, raw: dict[str, Any]
) -> tuple[ActionFields, bool]:
    """The action as its kind's Struct (bad fields blanked) and whether every field was fine;
    every unknown, missing or mistyped field is a problem."""
    cls = ACTION_TYPES[kind]
    info = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    ok = True
    good: dict[str, Any] = {"action": kind}
    for key, value in raw.items():
        f = info.get(key)
        if f is None:
            if key not in _COMMON:
                problems.add(where, key, f"unknown field {key!r}")
                ok = False
            continue
        if f.required and value in (None, ""):
            continue  # reported below as missing
        try:
            msgspec.convert(value, f.type)
        except msgspec.ValidationError as exc:
            why = str(exc).split(" - at ")[0].replace("Expected", "expected")
            problems.add(where, key, f"{_shown(value)} is not {_WHAT.get(key, 'valid')} ({why})")
            ok = False
            continue
        good[key] = value
    for name, f in info.items():
        if f.required and name not in good:
            if raw.get(name) in (None, ""):
                problems.add(where, name, f"{kind} needs {name!r}")
            ok = False
            good[name] = _blank(f.type)
    typed: ActionFields = msgspec.convert(good, ActionFields)
    return typed, ok


def _check_fields(problems: Problems, where: str, f: ActionFields) -> None:
    """The checks beyond types: names, sources, device addresses, ports (blank fields skipped)."""
    if f.model:
        try:
            validate_model_name(f.model, "model")
        except GswarmError as exc:
            problems.add(where, "model", exc.message)
    match f:
        case DownloadAction():
            if f.source:
                try:
                    parse_source(f.source)
                except GswarmError as exc:
                    problems.add(where, "source", exc.message)
            _check_device(problems, where, "target", f.target, gpu=False)
        case CopyAction() | MoveAction():
            _check_device(problems, where, "from", f.from_, gpu=False)
            _check_device(problems, where, "to", f.to)
        case DeleteAction() | StopAction():
            _check_device(problems, where, "device", f.device)
        case ServeAction():
            _check_device(problems, where, "device", f.device)
            try:
                check_free_form("config", f.config)
            except ValueError as exc:
                problems.add(where, "config", str(exc))
            if f.port and not 1 <= f.port <= 65535:
                problems.add(where, "port", f"{f.port!r} is not a port (1-65535)")
        case LoadAction():
            _check_device(problems, where, "device", f.device, gpu=True)
            if f.from_ is not None:
                _check_device(problems, where, "from", f.from_, gpu=False)
        case ReplicateAction():
            if f.targets is None and not f.all_nodes:
                why = "replicate needs targets (a list of devices) or all_nodes (disk or dram)"
                problems.add(where, "targets", why)
            elif f.targets is not None:
                if not f.targets:
                    problems.add(where, "targets", "a non-empty list of devices")
                for t in f.targets:
                    _check_device(problems, where, "targets", t, gpu=False)
        case HealthCheckAction():
            if f.device:
                _check_device(problems, where, "device", f.device)
            if f.node:
                try:
                    validate_node_id(f.node)
                except GswarmError as exc:
                    problems.add(where, "node", exc.message)
            if not f.device and not f.node:
                problems.add(where, "device", "health_check needs a device (with model: a service) or a node")


def _implicit_dependencies(actions: list[ActionSpec], explicit: set[str]) -> None:
    last_for_model: dict[str, str] = {}
    for a in actions:
        if a.id not in explicit and a.model in last_for_model:
            a.depends_on = [last_for_model[a.model]]
        if a.model:
            last_for_model[a.model] = a.id


def find_cycle(actions: list[ActionSpec]) -> list[str]:
    """A dependency cycle as a path of ids (first id repeated at the end), or []."""
    graph = {a.id: a.depends_on for a in actions}
    color: dict[str, int] = {}
    for start in graph:
        if color.get(start):
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                color[node] = 1
                path.append(node)
            deps = [d for d in graph.get(node, []) if d in graph]
            if i < len(deps):
                stack.append((node, i + 1))
                nxt = deps[i]
                if color.get(nxt) == 1:
                    return [*path[path.index(nxt) :], nxt]
                if not color.get(nxt):
                    stack.append((nxt, 0))
            else:
                color[node] = 2
                path.pop()
    return []


def parse(text: str, filename: str = "job") -> JobSpec:
    """Parse and validate a job file's text."""
    return validate(load_text(text, filename))
