"""How progress reads: sizes, durations, an op's figures (percent, bytes, rate, ETA, elapsed, each
labelled), fitted to a width; the lines a terminal shows for a running op; and the plain lines a
log gets without a terminal (a line per phase, a progress line now and then, a summary).

Pure functions of numbers and times: no console, no clock of their own (callers pass `now`), so
tests give them any figures and widths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gswarm.ops import Op, WrittenCopy
from gswarm.protocol import Job, JobAction, OpProgress

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
"""Frames of the spinner of ops without bytes to count, one per tenth of a second."""
BAR_MIN = 10
"""A bar narrower than this is left out: the figures say more in that room."""
BAR_MAX = 40
ELLIPSIS = "…"
ETA_MAX = 100 * 86400.0
"""An ETA beyond this (100 days) says nothing: it is left out."""
COUNTED_KINDS = frozenset({"replicate"})
"""Op kinds whose progress counts items (targets), not bytes."""


_UNITS = ("B", "KB", "MB", "GB", "TB")


def _unit(n: float) -> int:
    """Which of `_UNITS` shows `n` best: the largest it has at least 1 of (powers of 1000)."""
    i = 0
    while abs(n) >= 1000 and i < len(_UNITS) - 1:
        n /= 1000
        i += 1
    return i


def _in_unit(n: float, i: int) -> str:
    return f"{n:.0f}" if i == 0 else f"{n / 1000**i:.1f}"


def human_size(n: float) -> str:
    """A byte count for people, in powers of 1000: `512 B`, `1.5 GB`."""
    i = _unit(n)
    return f"{_in_unit(n, i)} {_UNITS[i]}"


def duration(seconds: float) -> str:
    """A span of time as a clock shows it: `0:07`, `12:05`, `1:02:03`."""
    if not seconds > 0:  # NaN too
        return "0:00"
    s = int(min(seconds, ETA_MAX))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def amount(done: int, total: int, counted: bool = False) -> str:
    """How much of how much, in the total's unit: `1.2/2.9 GB`, `0.0/2.9 GB`; `2/3` for
    items; without a total, just what is done (`1.2 GB`)."""
    if counted:
        return f"{done}/{total}" if total else str(done)
    if not total:
        return human_size(done)
    i = _unit(total)
    return f"{_in_unit(done, i)}/{_in_unit(total, i)} {_UNITS[i]}"


def percent(done: int, total: int) -> str:
    """`42%`; 100% only once everything is done."""
    if total <= 0:
        return ""
    p = min(100, int(100 * done / total))
    return f"{99 if p == 100 and done < total else p}%"


def eta(done: int, total: int, rate: float) -> float | None:
    """Seconds left at `rate`, or None when that cannot be said."""
    if total <= 0 or rate <= 0 or done >= total:
        return None
    left = (total - done) / rate
    return left if left < ETA_MAX else None


def fit(text: str, width: int) -> str:
    """`text`, cut to `width` characters with an ellipsis when longer."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS if width > 0 else ""


def bar(done: int, total: int, width: int) -> str:
    """A bar of `width` characters, filled as far as `done` is of `total`."""
    filled = int(width * min(1.0, done / total)) if total > 0 else 0
    return "█" * filled + "░" * (width - filled)


@dataclass(frozen=True)
class Figures:
    """How far an op has come, at one moment."""

    done: int
    total: int
    rate: float
    elapsed: float | None
    """Seconds since the op started; None: not shown."""
    counted: bool = False
    """Items (targets), not bytes."""

    @classmethod
    def of(cls, op: Op, now: float, elapsed: bool = True) -> Figures:
        """An op's figures at `now` (a wall-clock time, as the head stamps `started_at`)."""
        p = op.progress
        start = op.started_at or op.created_at or now
        end = op.finished_at if op.finished_at is not None else now
        took = max(0.0, end - start) if elapsed else None
        return cls(p.done, p.total, p.rate, took, op.kind in COUNTED_KINDS)

    @property
    def has_total(self) -> bool:
        """Whether there is something to show a share of (a bar, a percent)."""
        return self.total > 0


def fields(f: Figures) -> list[tuple[int, str]]:
    """The labelled figures in the order shown, each with its rank: the highest rank is left
    out first when room is short (elapsed, then rate, then the ETA; never percent or amount)."""
    out: list[tuple[int, str]] = []
    if f.has_total:
        out.append((0, percent(f.done, f.total)))
    if f.has_total or f.done:
        out.append((1, amount(f.done, f.total, f.counted)))
    moving = f.rate > 0 and (not f.has_total or f.done < f.total)
    if moving and not f.counted:
        out.append((3, f"{human_size(f.rate)}/s"))
    left = eta(f.done, f.total, f.rate)
    if left is not None:
        out.append((2, f"ETA {duration(left)}"))
    if f.elapsed is not None:
        out.append((4, f"elapsed {duration(f.elapsed)}"))
    return out


def figures_text(f: Figures, width: int = 1 << 16) -> str:
    """The figures on one line of at most `width` characters, e.g.
    `42% 1.2/2.9 GB 85.0 MB/s ETA 0:21 elapsed 0:14`: the least needed ones go first."""
    shown = fields(f)
    while True:
        text = " ".join(t for _, t in shown)
        if len(text) <= width or len(shown) <= 1:
            return fit(text, width)
        shown.remove(max(shown, key=lambda ft: ft[0]))


def stale(seen: Op | None, new: Op) -> bool:
    """Whether `new` is an older state of the op than `seen`: a follower reads the op once when
    its event stream goes live, and events queued before that read arrive after it. An op
    never goes back to an earlier state, to no phase once it had one, or back in bytes within
    a phase."""
    if seen is None:
        return False
    if seen.terminal or new.state != seen.state:
        return seen.terminal or (new.state == "queued" and seen.state == "running")
    if new.progress.message != seen.progress.message:
        return not new.progress.message
    return new.progress.done < seen.progress.done


_ACTION_STEP = {"pending": 0, "waiting": 1, "running": 2, "retrying": 2}
"""How far along an action's states lie (an ended action: 3)."""


def action_stale(seen: JobAction | None, new: JobAction) -> bool:
    """Whether `new` is an older state of a job's action than `seen` (see `stale`): an earlier
    attempt, or an earlier step of the same one."""
    if seen is None:
        return False
    if new.attempts != seen.attempts:
        return new.attempts < seen.attempts
    return _ACTION_STEP.get(new.state, 3) < _ACTION_STEP.get(seen.state, 3)


def phase(op: Op) -> str:
    """What the op is doing now: its progress message, else its state."""
    return op.progress.message or op.state


def spinner(now: float) -> str:
    """The spinner's frame at `now`."""
    return SPINNER[int(now * 10) % len(SPINNER)]


def live_lines(title: str, op: Op, now: float, width: int) -> list[str]:
    """What a terminal of `width` columns shows for a running op, each line at most `width`.

    With a total: the title and phase, then a bar and the figures. Without one (a delete, a
    stop, a serve, a load that counts nothing): one line, a spinner, the phase, elapsed."""
    f = Figures.of(op, now)
    head = f"{title}: {phase(op)}"
    if f.has_total:
        figures = figures_text(f, width)
        room = width - len(figures) - 1
        if room >= BAR_MIN:
            figures = f"{bar(f.done, f.total, min(BAR_MAX, room))} {figures}"
        return [fit(head, width), figures]
    tail = figures_text(f, max(0, width - 4))
    text = f"{spinner(now)} {head}"
    room = width - len(tail) - 2
    if room <= 8:  # too narrow for both: the phase
        return [fit(text, width)]
    return [f"{fit(text, room)}  {tail}"]


def outcome(op: Op) -> str:
    """How an ended op ended: its state, time, and for bytes moved the size and mean rate,
    e.g. `succeeded, 2.9 GB in 0:34 (85.0 MB/s mean)`."""
    f = Figures.of(op, op.finished_at or 0.0)
    seconds = f.elapsed or 0.0
    took = duration(seconds)
    size = op.result.size if isinstance(op.result, WrittenCopy) else 0
    if isinstance(op.result, WrittenCopy) and op.result.already_present:
        size = 0
    moved = size or (f.total if f.has_total and not f.counted and op.state == "succeeded" else 0)
    if moved and seconds > 0:
        return f"{op.state}, {human_size(moved)} in {took} ({human_size(moved / seconds)}/s mean)"
    if moved:
        return f"{op.state}, {human_size(moved)} in {took}"
    return f"{op.state} in {took}"


def summary(title: str, op: Op) -> str:
    """An ended op in one line: `download m -> n1:disk: succeeded, 2.9 GB in 0:34 (...)`."""
    return f"{title}: {outcome(op)}"


def summary_lines(title: str, op: Op, width: int) -> list[str]:
    """The summary on a terminal of `width` columns: one line, or the title and the outcome
    on a line each when that is too long."""
    line = summary(title, op)
    if len(line) <= width:
        return [line]
    return [fit(f"{title}:", width), fit(outcome(op), width)]


@dataclass
class PlainLines:
    """The lines a log gets for an op without a terminal: one when its phase changes, a progress
    line at most every `every` seconds while it moves, and a summary when it ends."""

    title: str
    every: float
    _phase: str = field(default="", init=False)
    _last: float | None = field(default=None, init=False)
    _sized: bool = field(default=False, init=False)

    def update(self, op: Op, now: float) -> list[str]:
        """Lines to print for the op as it is at `now`."""
        if op.terminal:
            return []
        f = Figures.of(op, now)
        current = phase(op)
        if current != self._phase:
            self._phase, self._last = current, now
            size = ""
            if f.has_total and not f.counted and not self._sized:  # said once, with the phase it starts
                size, self._sized = f" ({human_size(f.total)})", True
            return [f"{self.title}: {current}{size}"]
        if (f.done or f.has_total) and (self._last is None or now - self._last >= self.every):
            self._last = now
            return [f"{self.title}: {figures_text(f)}"]
        return []

    def finish(self, op: Op) -> list[str]:
        """The summary of an op that has ended."""
        return [summary(self.title, op)]


@dataclass
class PlainJobLines:
    """The lines a log gets for a job without a terminal: one per action state change, a
    progress line per moving action at most every `every` seconds."""

    every: float
    _states: dict[str, str] = field(default_factory=dict, init=False)
    _phases: dict[str, str] = field(default_factory=dict, init=False)
    _last: dict[str, float] = field(default_factory=dict, init=False)

    def action(self, action_id: str, what: str, state: str, error: str = "") -> list[str]:
        """A line when the action's state has changed."""
        if self._states.get(action_id) == state:
            return []
        self._states[action_id] = state
        return [f"{action_id} ({what}): {state}" + (f": {error}" if error else "")]

    def op(self, action_id: str, op: Op, now: float) -> list[str]:
        """A line for the action's op: its new phase, or its figures now and then."""
        if op.terminal:
            return []
        f = Figures.of(op, now)
        current = phase(op)
        if current != self._phases.get(action_id):
            self._phases[action_id], self._last[action_id] = current, now
            return [f"{action_id}: {current}"]
        last = self._last.get(action_id)
        if (f.done or f.has_total) and (last is None or now - last >= self.every):
            self._last[action_id] = now
            return [f"{action_id}: {figures_text(f)}"]
        return []


JOB_COLUMNS = ("action", "what", "state", "progress", "error")
JOB_COLUMNS_GIVE: tuple[tuple[tuple[int, ...], int], ...] = (
    ((4,), 10),
    ((3,), 34),
    ((0, 1), 8),
    ((3,), 14),
)
"""How a job's table gives up room when it is too wide, step by step (columns, down to what
width): the error first, then the progress down to what its figures need (a long phase goes),
then the action and what it does, then the progress again; the state never."""
COLUMN_GAP = 2
"""Spaces between two columns of a job's table."""


def fit_columns(natural: list[int], room: int, give: tuple[tuple[tuple[int, ...], int], ...]) -> list[int]:
    """Column widths within `room`: at each step of `give`, its columns give up a character at a
    time (the widest first) down to its width; a column named in no step keeps its width. When
    every step is done, the table may still be wider than `room`."""
    widths = list(natural)
    for columns, floor in give:
        while sum(widths) > room:
            shrinkable = [i for i in columns if i < len(widths) and widths[i] > floor]
            if not shrinkable:
                break
            widest = max(shrinkable, key=lambda i: widths[i])
            widths[widest] -= 1
    return widths


def action_what(a: JobAction) -> str:
    """What a job's action does: `download llama-7b`, `health_check`."""
    return f"{a.action} {a.spec.model}" if a.spec.model else a.action


def action_progress(a: JobAction, op: Op | None, now: float, width: int = 1 << 16) -> str:
    """How far a job's action has come, in `width` characters: its op's figures while it
    moves bytes, its phase and elapsed time while it runs without, what it moved and how long
    it took once it has ended."""
    if a.started_at is None:
        return ""
    took = duration((a.finished_at or now) - a.started_at)
    if a.finished_at is not None:
        total = op.progress.total if op is not None and op.state == "succeeded" else 0
        if total and op is not None and op.kind not in COUNTED_KINDS:
            return fit(f"{human_size(total)} in {took}", width)
        return fit(f"in {took}", width)
    running = op is not None and not op.terminal
    if op is not None and running and (op.progress.total or op.progress.done):
        return figures_text(Figures.of(op, now), width)
    tail = f"elapsed {took}"
    doing = phase(op) if op is not None and running else a.state
    if width - len(tail) - 1 < 4:
        return fit(tail, width)
    return f"{fit(doing, width - len(tail) - 1)} {tail}"


def job_cells(job: Job, ops: Mapping[str, Op], now: float, width: int) -> tuple[list[int], list[list[str]]]:
    """A job's table within `width` columns: the widths of `JOB_COLUMNS` and a row of cells per
    action (its latest op's figures from `ops`, by op id), each cell cut to its column. The
    error column is left out while no action has one."""
    columns = len(JOB_COLUMNS) if any(a.error for a in job.actions) else len(JOB_COLUMNS) - 1
    latest = [ops.get(a.op_ids[-1]) if a.op_ids else None for a in job.actions]
    rows: list[list[str]] = []
    for a, op in zip(job.actions, latest, strict=True):
        rows.append([a.id, action_what(a), a.state, action_progress(a, op, now), a.error][:columns])
    natural = [max([len(JOB_COLUMNS[i])] + [len(r[i]) for r in rows]) for i in range(columns)]
    room = width - COLUMN_GAP * (columns - 1)
    widths = fit_columns(natural, room, JOB_COLUMNS_GIVE)
    for i, (a, op) in enumerate(zip(job.actions, latest, strict=True)):
        rows[i][3] = action_progress(a, op, now, widths[3])  # the figures that fit, not a cut line
        rows[i] = [fit(cell, w) for cell, w in zip(rows[i], widths, strict=True)]
    return widths, rows


def event_progress(kind: str, p: OpProgress) -> str:
    """An `op.progress` event's figures and phase for `gsmodel events`, e.g.
    `42% 1.2/2.9 GB 85.0 MB/s ETA 0:21 downloading 4 files`."""
    figures = figures_text(Figures(p.done, p.total, p.rate, None, kind in COUNTED_KINDS))
    return " ".join(part for part in (figures, p.message) if part)
