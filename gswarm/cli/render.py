"""Rendering for the CLI: JSON for scripts, sizes and ages, op lines, live progress of an op or a job."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import msgspec
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from gswarm.cli.common import err, out
from gswarm.errors import GswarmError
from gswarm.ops import DeleteResult, HealthCheckResult, Op, ServeResult, WrittenCopy
from gswarm.protocol import Job, JobAction, Notice, to_builtins


def print_json(data: Any) -> None:
    """Print `data` (msgspec structs included) as one line of JSON on stdout."""
    sys.stdout.write(msgspec.json.encode(to_builtins(data)).decode() + "\n")


def human_size(n: float) -> str:
    """A byte count for people, in powers of 1000: `512 B`, `1.5 GB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


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


async def follow_op(c: Any, op: Op, detach: bool, json_out: bool, title: str) -> Op:
    """Show an op's live progress (bytes, rate, ETA) until it ends; Ctrl-C asks what to do."""
    if detach or op.terminal:
        return op
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        handles_sigint = True
    except (RuntimeError, ValueError):  # not the main thread (the CLI driven in-process)
        handles_sigint = False
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    ]
    try:
        with Progress(*columns, console=err, transient=False, disable=json_out) as bar:
            task = bar.add_task(title, total=None, note="")

            def update(o: Op) -> None:
                p = o.progress
                bar.update(task, completed=p.done, total=p.total or None, note=p.message or o.state)

            waiter = asyncio.create_task(c.wait_op(op.op_id, on_progress=update))
            stopper = asyncio.create_task(interrupted.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not waiter.done():
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
                bar.stop()
                await _ask_cancel(c, op)
            final: Op = waiter.result()
            if final.state == "succeeded":
                bar.update(task, completed=final.progress.total or final.progress.done, note="done")
            return final
    finally:
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
    return f"{word}: {r.gpus} GPUs; {tiers}; services: {services or 'none'}"


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


def job_table(job: Job, progress: dict[str, Any]) -> Table:
    """A table of a job's actions: state, progress bar of its latest op (`progress` by op id), rate."""
    table = Table(
        "action",
        "kind",
        "model",
        "state",
        "progress",
        "rate",
        "elapsed",
        "error",
        title=f"job {job.job_id}: {job.name} ({job.state})",
    )
    colors = {
        "succeeded": "green",
        "failed": "red",
        "skipped": "yellow",
        "cancelled": "yellow",
        "running": "cyan",
    }
    now = time.time()
    for a in job.actions:
        p = progress.get(a.op_ids[-1]) if a.op_ids else None
        bar = rate = ""
        if p is not None and p.total:
            frac = min(1.0, p.done / p.total)
            bar = (
                "█" * int(frac * 20)
                + "░" * (20 - int(frac * 20))
                + f" {frac:4.0%} {human_size(p.done)}/{human_size(p.total)}"
            )
            rate = f"{human_size(p.rate)}/s" if p.rate else ""
        elif p is not None and p.message:
            bar = p.message
        elapsed = ""
        if a.started_at:
            elapsed = f"{(a.finished_at or now) - a.started_at:.1f}s"
        state = f"[{colors.get(a.state, 'white')}]{a.state}[/]"
        table.add_row(a.id, a.action, str(a.spec.model), state, bar, rate, elapsed, a.error[:60])
    return table


async def follow_job(c: Any, job: Job, json_out: bool) -> Job:
    """Show a job's DAG live (a row per action) until it ends."""
    from rich.live import Live

    job = await c.get_job(job.job_id)
    by_id = {a.id: a for a in job.actions}
    progress: dict[str, Any] = {}
    with Live(job_table(job, progress), console=err, refresh_per_second=4, transient=False) as live:
        if job.terminal:
            return job
        async for msg in c.events(since=None, topics=["job", "op"]):
            if isinstance(msg, Notice):
                if msg.code == "live":
                    job = await c.get_job(job.job_id)
                    by_id = {a.id: a for a in job.actions}
                elif msg.code == "dropped":
                    raise GswarmError(f"event stream dropped: {msg.message}")
            elif msg.kind == "job.action" and msg.data.get("job_id") == job.job_id:
                action = msgspec.convert(msg.data, JobAction)
                by_id[action.id] = action
                job.actions = [by_id[a.id] for a in job.actions]
            elif msg.kind == "job.updated" and msg.key == job.job_id:
                header = msgspec.convert(msg.data, Job)
                job.state, job.error = header.state, header.error
            elif msg.topic == "op":
                op = msgspec.convert(msg.data, Op)
                progress[op.op_id] = op.progress
            if not json_out:
                live.update(job_table(job, progress))
            if job.terminal:
                break
    final: Job = await c.get_job(job.job_id)
    return final
