"""Rendering for the CLI: JSON for scripts, sizes and ages, op lines, live progress of an op or a job."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import msgspec
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gswarm.cli.common import err, out
from gswarm.cli.progress import (
    COLUMN_GAP,
    JOB_COLUMNS,
    PlainJobLines,
    PlainLines,
    action_stale,
    action_what,
    fit,
    human_size,
    job_cells,
    live_lines,
    stale,
    summary_lines,
)
from gswarm.config import Settings
from gswarm.errors import GswarmError
from gswarm.ops import DeleteResult, HealthCheckResult, Op, ServeResult, WrittenCopy
from gswarm.protocol import Job, JobAction, Notice, to_builtins
from gswarm.words import counted


def print_json(data: Any) -> None:
    """Print `data` (msgspec structs included) as one line of JSON on stdout."""
    sys.stdout.write(msgspec.json.encode(to_builtins(data)).decode() + "\n")


def ago(ts: float) -> str:
    """How long ago a timestamp was (`5s ago`, `3m ago`, `2.5h ago`), or its date past a day."""
    d = max(0.0, time.time() - ts)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def print_op(op: Op) -> None:
    """Print one line on an op: id, kind, node, state and error if any."""
    line = f"op {op.op_id} {op.kind} on {op.node_id}: {op.state}"
    if op.error is not None:
        line += f" ({op.error.code}: {op.error.message})"
    out.print(line, highlight=False)


async def _ask_cancel(c: Any, op: Op) -> None:
    """After Ctrl-C: cancel the op, or leave it running (the default without a terminal)."""
    answer = "n"
    if sys.stdin.isatty():
        err.print(f"\ncancel op {op.op_id}? [y/N] ", end="", markup=False)
        answer = (await asyncio.to_thread(sys.stdin.readline)).strip().lower()
    if answer in ("y", "yes"):
        await c.cancel_op(op.op_id)
        err.print(f"op {op.op_id} cancelled")
    else:
        err.print(
            f"op {op.op_id} keeps running: 'gswarm ops' follows it, 'gswarm cancel {op.op_id}' stops it"
        )
    raise typer.Exit(130)


class _Display:
    """Where an op's progress goes while it is followed: nowhere (JSON), a live view on a
    terminal, or plain lines on a log."""

    closed = False
    _seen: Op | None = None

    def update(self, op: Op) -> None:
        """The op as it is now (an older state of it, come late, is passed over)."""
        if not stale(self._seen, op):
            self._seen = op
            self._show(op)

    def _show(self, op: Op) -> None:
        pass

    def close(self, op: Op | None) -> None:
        """Stop showing (once); `op` is the ended op, None when following stopped short."""
        if not self.closed:
            self.closed = True
            self._end(op)

    def _end(self, op: Op | None) -> None:
        pass


class _LiveDisplay(_Display):
    """A terminal: the op's lines (`progress.live_lines`) redrawn a few times a second, fitted
    to the terminal's width, and its summary as the last frame."""

    def __init__(self, console: Console, title: str, op: Op) -> None:
        self._console = console
        self._title = title
        self._op = op
        self._ended: Op | None = None
        self._live = Live(console=console, get_renderable=self._render, refresh_per_second=8, transient=False)
        self._live.start()

    def _render(self) -> Text:
        width = self._console.width
        if self._ended is not None:
            return Text("\n".join(summary_lines(self._title, self._ended, width)))
        return Text("\n".join(live_lines(self._title, self._op, time.time(), width)))

    def _show(self, op: Op) -> None:
        self._op = op

    def _end(self, op: Op | None) -> None:
        self._ended = op
        if op is None:
            self._live.transient = True  # stopped short: what comes next starts on a clean line
        self._live.stop()


class _PlainDisplay(_Display):
    """No terminal (a pipe, a file, CI): plain lines, no bar (`progress.PlainLines`)."""

    def __init__(self, console: Console, title: str, every: float) -> None:
        self._console = console
        self._lines = PlainLines(title, every)

    def _print(self, lines: list[str]) -> None:
        for line in lines:
            self._console.print(line, highlight=False, markup=False, soft_wrap=True)

    def _show(self, op: Op) -> None:
        self._print(self._lines.update(op, time.time()))

    def _end(self, op: Op | None) -> None:
        if op is not None:
            self._print(self._lines.finish(op))


def _display(console: Console, title: str, op: Op, json_out: bool, every: float | None) -> _Display:
    if json_out:
        return _Display()
    if console.is_terminal:
        return _LiveDisplay(console, title, op)
    return _PlainDisplay(console, title, Settings.from_env().progress_every if every is None else every)


async def follow_op(
    c: Any,
    op: Op,
    detach: bool,
    json_out: bool,
    title: str,
    *,
    console: Console | None = None,
    every: float | None = None,
) -> Op:
    """Show an op's progress until it ends (on `console`, stderr by default); Ctrl-C asks what
    to do. On a terminal: live lines with percent, bytes, rate, ETA and elapsed; without one: a
    line per phase, a progress line at most every `every` seconds (`progress_every` in the
    settings by default), and a summary."""
    if detach or op.terminal:
        return op
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        handles_sigint = True
    except (RuntimeError, ValueError):  # not the main thread (the CLI driven in-process)
        handles_sigint = False
    display = _display(console or err, title, op, json_out, every)
    try:
        waiter = asyncio.create_task(c.wait_op(op.op_id, on_progress=display.update))
        stopper = asyncio.create_task(interrupted.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        await asyncio.gather(stopper, return_exceptions=True)
        if not waiter.done():
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            display.close(None)
            await _ask_cancel(c, op)
        final: Op = waiter.result()
        display.close(final)
        return final
    finally:
        display.close(None)
        if handles_sigint:
            loop.remove_signal_handler(signal.SIGINT)


def done_line(op: Op) -> str:
    """What a succeeded op did, in words: written or already there, from which peer, and
    whether a move removed its source."""
    result = op.result
    if isinstance(result, ServeResult):
        if result.already_running:
            return f"already running at {result.url} ({result.state}), nothing started"
        return serve_line(op, result)
    if isinstance(result, DeleteResult) and result.freed:
        return f"done (freed {human_size(result.freed)})"
    if not isinstance(result, WrittenCopy):
        return "done"
    removed = (
        f"; removed the source copy on {op.node_id}:{result.source_tier}" if result.removed_source else ""
    )
    if result.removed_source and not result.source_tier:
        removed = "; removed the source copy"
    if result.already_present:
        if removed:
            return f"already on {op.node_id}:{result.tier}{removed}"
        return f"already there, nothing to do ({result.path})"
    size = f" ({human_size(result.size)})" if result.size else ""
    peer = f" from {result.from_peer}" if result.from_peer else ""
    return f"done{size}{peer}{removed}"


def serve_line(op: Op, result: ServeResult) -> str:
    """A started service in words: its URL, the copy it started from, the GPU hand-over."""
    parts = [f"serving at {result.url}"]
    if result.source_tier:
        parts.append(f"from {op.node_id}:{result.source_tier}")
    if result.freed:
        parts.append(f"gswarm's resident copy freed for it ({human_size(result.freed)})")
    if result.gpu_memory_utilization:
        parts.append(f"--gpu-memory-utilization {result.gpu_memory_utilization:.2f}")
    return "; ".join(parts)


def health_line(op: Op) -> str:
    """A health check's outcome in one line."""
    r = op.result
    if not isinstance(r, HealthCheckResult):
        return f"UNHEALTHY: {op.error.message if op.error else op.state}"
    word = "healthy" if r.healthy else "UNHEALTHY"
    if r.service_id:
        return f"{word}: {r.service_id} is {r.state} ({r.latency_ms:.1f} ms)"
    services = ", ".join(f"{sid} {'ok' if ok else 'down'}" for sid, ok in sorted(r.services.items()))
    tiers = ", ".join(f"{name} {human_size(free)} free" for name, free in sorted(r.tiers.items()))
    return f"{word}: {counted(r.gpus, 'GPU')}; {tiers}; services: {services or 'none'}"


def finish_op(op: Op, json_out: bool, detach: bool, what: str) -> None:
    """Print how an op ended (JSON, its id when detached, or a line); exit 1 if it failed."""
    if json_out:
        print_json(op)
    elif detach and not op.terminal:
        out.print(op.op_id, highlight=False)
    elif op.state == "succeeded":
        out.print(f"{what}: {done_line(op)}", highlight=False)
    else:
        print_op(op)
    if op.terminal and op.state != "succeeded":
        raise typer.Exit(1)


def job_table(job: Job, ops: Mapping[str, Op], width: int, now: float | None = None) -> Table:
    """A table of a job's actions within `width` columns: state, how far the latest op of each
    has come (`ops` by op id: percent, bytes, rate, ETA), elapsed, error. No cell wraps: the
    figures that matter least go first, then text is cut with an ellipsis."""
    now = time.time() if now is None else now
    widths, rows = job_cells(job, ops, now, width)
    title = fit(f"job {job.job_id}: {job.name} ({job.state})", width)
    table = Table(title=title, box=None, pad_edge=False, padding=(0, COLUMN_GAP // 2), header_style="bold")
    for name, w in zip(JOB_COLUMNS, widths, strict=False):
        table.add_column(name, width=w, no_wrap=True, overflow="ellipsis")
    colors = {
        "succeeded": "green",
        "failed": "red",
        "skipped": "yellow",
        "cancelled": "yellow",
        "running": "cyan",
    }
    for row in rows:
        cells: list[str | Text] = list(row)
        cells[2] = Text(row[2], style=colors.get(row[2], ""))
        table.add_row(*cells)
    return table


async def follow_job(
    c: Any, job: Job, json_out: bool, *, console: Console | None = None, every: float | None = None
) -> Job:
    """Show a job's actions live until it ends (on `console`, stderr by default): a table on a
    terminal; without one, a line per action state change and a progress line per moving action
    at most every `every` seconds (`progress_every` in the settings by default)."""
    console = console or err
    job = await c.get_job(job.job_id)
    by_id = {a.id: a for a in job.actions}
    action_of: dict[str, str] = {}
    ops: dict[str, Op] = {}
    live: Live | None = None
    plain: PlainJobLines | None = None
    if not json_out and console.is_terminal:
        live = Live(
            console=console,
            get_renderable=lambda: job_table(job, ops, console.width),
            refresh_per_second=4,
            transient=False,
        )
        live.start()
    elif not json_out:
        plain = PlainJobLines(Settings.from_env().progress_every if every is None else every)

    def say(lines: list[str]) -> None:
        for line in lines:
            console.print(f"job {job.job_id}: {line}", highlight=False, markup=False, soft_wrap=True)

    def actions_changed() -> None:
        for a in job.actions:
            action_of.update({op_id: a.id for op_id in a.op_ids})
            if plain is not None:
                say(plain.action(a.id, action_what(a), a.state, a.error))

    try:
        actions_changed()
        if job.terminal:
            return job
        async for msg in c.events(since=None, topics=["job", "op"]):
            if isinstance(msg, Notice):
                if msg.code == "live":
                    job = await c.get_job(job.job_id)
                    by_id = {a.id: a for a in job.actions}
                    actions_changed()
                elif msg.code == "dropped":
                    raise GswarmError(f"event stream dropped: {msg.message}")
            elif msg.kind == "job.action" and msg.data.get("job_id") == job.job_id:
                action = msgspec.convert(msg.data, JobAction)
                if action_stale(by_id.get(action.id), action):
                    continue
                by_id[action.id] = action
                job.actions = [by_id[a.id] for a in job.actions]
                actions_changed()
            elif msg.kind == "job.updated" and msg.key == job.job_id:
                header = msgspec.convert(msg.data, Job)
                job.state, job.error = header.state, header.error
            elif msg.topic == "op":
                op = msgspec.convert(msg.data, Op)
                if stale(ops.get(op.op_id), op):
                    continue
                ops[op.op_id] = op
                if plain is not None and op.op_id in action_of:
                    say(plain.op(action_of[op.op_id], op, time.time()))
            if job.terminal:
                break
        final: Job = await c.get_job(job.job_id)
        job = final
        actions_changed()  # endings the event stream had not told yet
        return final
    finally:
        if live is not None:
            live.stop()
