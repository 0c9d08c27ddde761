"""The states of every registry entity and the transitions allowed between them. No I/O.

Each entity's state is a `Literal` (so msgspec checks it on every decode), and each has a
table of the moves it may make. The registry is the only place that changes a state, and it
does so through `check_move`, so a transition that the table does not allow is a bug caught
where it happens, not a strange row found later.
"""

from __future__ import annotations

from typing import Final, Literal, TypeVar

OpState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
LocationState = Literal[
    "pending", "downloading", "copying", "loading", "ready", "partial", "failed", "deleting"
]
JobState = Literal["pending", "running", "cancelling", "succeeded", "failed", "cancelled"]
ActionState = Literal[
    "pending", "waiting", "running", "retrying", "succeeded", "failed", "skipped", "cancelled"
]
ServiceState = Literal["starting", "ready", "unhealthy", "restarting", "failed", "stopping", "stopped"]
NodeStatus = Literal["online", "offline"]

OP_TERMINAL: Final = frozenset[OpState]({"succeeded", "failed", "cancelled"})
JOB_TERMINAL: Final = frozenset[JobState]({"succeeded", "failed", "cancelled"})
ACTION_TERMINAL: Final = frozenset[ActionState]({"succeeded", "failed", "skipped", "cancelled"})
WRITING: Final = frozenset[LocationState]({"pending", "downloading", "copying", "loading"})
"""Location states of a copy that an open op is still writing."""

OP_MOVES: Final[dict[OpState, frozenset[OpState]]] = {
    "queued": frozenset({"running", "succeeded", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

JOB_MOVES: Final[dict[JobState, frozenset[JobState]]] = {
    "pending": frozenset({"running", "cancelling", "cancelled"}),
    "running": frozenset({"cancelling", "succeeded", "failed", "cancelled"}),
    "cancelling": frozenset({"cancelled", "failed", "succeeded"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}

_ACTION_OPEN: Final = frozenset[ActionState]({"pending", "waiting", "running", "retrying"})
ACTION_MOVES: Final[dict[ActionState, frozenset[ActionState]]] = {
    "pending": frozenset({"waiting", "running", "retrying", "failed", "skipped", "cancelled"}),
    "waiting": _ACTION_OPEN | {"succeeded", "failed", "cancelled"},
    "running": _ACTION_OPEN | {"succeeded", "failed", "cancelled"},
    "retrying": _ACTION_OPEN | {"succeeded", "failed", "cancelled"},
    "succeeded": frozenset(),
    "failed": frozenset(),
    "skipped": frozenset(),
    "cancelled": frozenset(),
}

_ANY_LOCATION: Final = frozenset[LocationState](
    {"pending", "downloading", "copying", "loading", "ready", "partial", "failed", "deleting"}
)
LOCATION_MOVES: Final[dict[LocationState, frozenset[LocationState]]] = {
    "pending": _ANY_LOCATION,
    "downloading": WRITING | {"ready", "partial", "failed", "deleting"},
    "copying": WRITING | {"ready", "partial", "failed", "deleting"},
    "loading": WRITING | {"ready", "partial", "failed", "deleting"},
    "ready": frozenset({"deleting"}),
    "partial": WRITING | {"ready", "failed", "deleting"},
    "failed": _ANY_LOCATION,
    "deleting": _ANY_LOCATION,  # a failed delete puts the copy back as it was
}
"""A ready copy is never rewritten in place: it is deleted first. A `partial` copy is what a
failed write left on the node's disk (its size is the space it takes): no op writes it, a new
write resumes from it, a delete frees it. Services have no table: the agent running them is
the truth about their state, and the head records what it reports."""

S = TypeVar("S", bound=str)


class IllegalTransition(RuntimeError):
    """A state change that the entity's table does not allow (a bug in the caller)."""


def check_move(entity: str, moves: dict[S, frozenset[S]], old: S, new: S) -> None:
    """Raise IllegalTransition unless `old -> new` is allowed (staying put always is)."""
    if old != new and new not in moves[old]:
        raise IllegalTransition(f"{entity}: {old} -> {new} is not a transition")
