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
from dataclasses import dataclass, field
from typing import Any

import yaml

from gswarm.devices import parse_device, validate_model_name
from gswarm.errors import GswarmError, InvalidWorkflow
from gswarm.sources import parse_source

MAX_ACTIONS = 1000
ACTIONS = ("download", "copy", "move", "delete", "load", "serve", "stop", "replicate", "health_check")

_LONG_FORM = {
    "action_id": "id",
    "action_type": "action",
    "model_name": "model",
    "source_url": "source",
    "source_device": "from",
    "dependencies": "depends_on",
}
_KNOWN = {
    "id", "action", "model", "source", "target", "from", "to", "device", "port", "keep_source", "depends_on",
    "retries", "timeout", "continue_on_error", "backend", "config", "targets", "all_nodes", "node", "include",
    "exclude", "force", "target_device", "description",
}  # fmt: skip
_REQUIRED = {
    "download": ("model", "source", "target"),
    "copy": ("model", "from", "to"),
    "move": ("model", "from", "to"),
    "delete": ("model", "device"),
    "load": ("model", "device"),
    "serve": ("model", "device", "port"),
    "stop": ("model", "device"),
    "replicate": ("model",),
    "health_check": (),
}


@dataclass
class ActionSpec:
    """One validated action of a job."""

    id: str
    action: str
    fields: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)
    retries: int = 0
    timeout: float | None = None
    continue_on_error: bool = False

    @property
    def model(self) -> str:
        """The model the action is about ('' for a node health check)."""
        return str(self.fields.get("model") or "")


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


def load_text(text: str, filename: str = "job") -> dict[str, Any]:
    """Parse a job file's text (JSON or YAML); InvalidWorkflow naming the line on a syntax error."""
    if not text.strip():
        raise InvalidWorkflow(f"{filename} is empty: a job needs a name and a list of actions")
    stripped = text.lstrip()
    try:
        data = json.loads(text) if stripped.startswith("{") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise InvalidWorkflow(
            f"{filename}: JSON does not parse at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            details={"line": exc.lineno, "column": exc.colno},
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidWorkflow(
            f"{filename}: YAML does not parse at line {line}: {problem}", details={"line": line}
        ) from None
    if not isinstance(data, dict):
        raise InvalidWorkflow(
            f"{filename}: a job is a mapping with name and actions, not {type(data).__name__}"
        )
    return data


def _check_device(problems: Problems, where: str, name: str, value: Any, gpu: bool | None = None) -> None:
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
    description = data.get("description") or ""
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
        aid = str(fields_.get("id") or f"{index + 1}-{kind}")
        where = f"action {index + 1} ({aid})"
        if aid in ids:
            problems.add(where, "id", f"duplicate id {aid!r}")
        ids.add(aid)
        if kind not in ACTIONS:
            problems.add(where, "action", f"unknown action {kind!r}: expected one of {', '.join(ACTIONS)}")
            continue
        for key in fields_:
            if key not in _KNOWN:
                problems.add(where, key, f"unknown field {key!r}")
        for key in _REQUIRED[kind]:
            if fields_.get(key) in (None, ""):
                problems.add(where, key, f"{kind} needs {key!r}")
        _check_fields(problems, where, kind, fields_)
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
            not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
        ):
            problems.add(where, "timeout", "a positive number of seconds")
            timeout = None
        coe = fields_.get("continue_on_error", False)
        if not isinstance(coe, bool):
            problems.add(where, "continue_on_error", "true or false")
            coe = False
        actions.append(
            ActionSpec(
                id=aid,
                action=str(kind),
                fields=fields_,
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


def _check_fields(problems: Problems, where: str, kind: str, f: dict[str, Any]) -> None:
    if f.get("model") not in (None, ""):
        try:
            validate_model_name(f["model"], "model")
        except GswarmError as exc:
            problems.add(where, "model", exc.message)
    if kind == "download" and f.get("source"):
        try:
            parse_source(str(f["source"]))
        except GswarmError as exc:
            problems.add(where, "source", exc.message)
    if kind == "download" and f.get("target"):
        _check_device(problems, where, "target", f["target"], gpu=False)
    if kind in ("copy", "move"):
        if f.get("from"):
            _check_device(problems, where, "from", f["from"], gpu=False)
        if f.get("to"):
            _check_device(problems, where, "to", f["to"])
        if "keep_source" in f and not isinstance(f["keep_source"], bool):
            problems.add(where, "keep_source", "true or false")
    if kind in ("delete", "stop", "serve") and f.get("device"):
        _check_device(problems, where, "device", f["device"])
    if kind == "load" and f.get("device"):
        _check_device(problems, where, "device", f["device"], gpu=True)
    if kind == "serve" and f.get("port") is not None:
        port = f["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems.add(where, "port", f"{port!r} is not a port (1-65535)")
    if kind == "serve" and "config" in f and not isinstance(f["config"], dict):
        problems.add(where, "config", "a mapping")
    if kind == "replicate":
        targets = f.get("targets")
        if targets is None and not f.get("all_nodes"):
            problems.add(
                where, "targets", "replicate needs targets (a list of devices) or all_nodes (disk or dram)"
            )
        elif targets is not None:
            if not isinstance(targets, list) or not targets:
                problems.add(where, "targets", "a non-empty list of devices")
            else:
                for t in targets:
                    _check_device(problems, where, "targets", t, gpu=False)
        if f.get("all_nodes") not in (None, "disk", "dram"):
            problems.add(where, "all_nodes", "disk or dram")
    if kind == "health_check":
        if f.get("device"):
            _check_device(problems, where, "device", f["device"])
        if not f.get("device") and not f.get("node"):
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
