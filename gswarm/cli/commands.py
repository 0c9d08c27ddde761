"""Commands that talk to a head through `gswarm.client`: models, copies, nodes, ops, services, events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
import yaml
from rich.table import Table

from gswarm.cli.common import (
    DetachOpt,
    Flags,
    HeadUrl,
    HelpfulGroup,
    JsonOpt,
    TokenOpt,
    app,
    cut,
    err,
    fail,
    in_cli_words,
    out,
    short_age,
    table_of,
)
from gswarm.cli.processes import run
from gswarm.cli.progress import event_progress, human_size
from gswarm.cli.render import ago, finish_op, follow_op, health_line, print_json, print_op
from gswarm.errors import GswarmError
from gswarm.ops import HealthCheckResult, Op, ReplicateResult
from gswarm.protocol import Event, ModelView, Node, NodeRemoved, Notice, OpProgress, Service
from gswarm.words import counted

T = TypeVar("T")


def open_client(head_url: str | None, token: str | None) -> Any:
    """A `GswarmClient` of the head (imported late: commands that need none start faster)."""
    from gswarm.client import GswarmClient

    return GswarmClient(head_url, token)


def with_client(
    head_url: str | None, tok: str | None, fn: Callable[[Any], Awaitable[T]], flags: Flags | None = None
) -> T:
    """Open a client, await `fn(client)` under `run` and return its result; an error names
    what the command sent in its own words (`flags`)."""

    async def main() -> T:
        async with open_client(head_url, tok) as c:
            return await fn(c)

    return run(main(), flags)


MODEL = {"model_name": "MODEL"}
FORCE = {"force": "--force"}


@app.command()
def register(
    name: Annotated[str, typer.Argument(help="Model name")],
    model_type: Annotated[str, typer.Argument(metavar="TYPE", help="llm, diffusion, ...")],
    source_url: Annotated[
        str | None, typer.Option("--source-url", metavar="URL", help="Where the model comes from.")
    ] = None,
    metadata_file: Annotated[
        Path | None, typer.Option("--metadata-file", metavar="FILE", help="JSON or YAML file of metadata.")
    ] = None,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a model."""
    metadata: dict[str, Any] = {}
    if metadata_file is not None:
        try:
            loaded = yaml.safe_load(metadata_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            fail(f"cannot read metadata file {metadata_file}: {exc}")
        if loaded is not None and not isinstance(loaded, dict):
            fail(f"metadata file {metadata_file} must hold a mapping")
        metadata = loaded or {}
    flags = {"name": "NAME", "type": "TYPE", "source_url": "--source-url", "metadata": "--metadata-file"}
    model: ModelView = with_client(
        head_url, token, lambda c: c.register_model(name, model_type, source_url, metadata), flags
    )
    if json_out:
        print_json(model)
    else:
        out.print(f"registered {model.name} ({model.type})", highlight=False)


def _where(model: ModelView) -> str:
    if not model.locations:
        return "-"
    return ", ".join(
        loc.device if loc.state == "ready" else f"{loc.device} ({loc.state})" for loc in model.locations
    )


@app.command("list")
def list_cmd(head_url: HeadUrl = None, token: TokenOpt = None, json_out: JsonOpt = False) -> None:
    """List models and where each one is."""
    models: list[ModelView] = with_client(head_url, token, lambda c: c.list_models())
    if json_out:
        print_json(models)
        return
    if not models:
        out.print("no models registered")
        return
    table = Table("model", "type", "locations", "source")
    for m in models:
        table.add_row(m.name, m.type, _where(m), m.source_url or "-")
    out.print(table)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Model name")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one model and every copy of it."""
    model: ModelView = with_client(head_url, token, lambda c: c.get_model(name))
    if json_out:
        print_json(model)
        return
    out.print(f"[bold]{model.name}[/] ({model.type})  source: {model.source_url or '-'}", highlight=False)
    if model.metadata:
        out.print(f"metadata: {model.metadata}", highlight=False)
    if not model.locations:
        out.print("no copies yet")
        return
    table = Table("device", "state", "size", "path", "updated")
    for loc in model.locations:
        table.add_row(loc.device, loc.state, human_size(loc.size), loc.path, ago(loc.updated_at))
    out.print(table)


nodes_app = typer.Typer(
    name="nodes",
    help="List nodes with their hardware and status ('nodes remove ID' forgets one).",
    invoke_without_command=True,
    add_completion=False,
    cls=HelpfulGroup,
)
app.add_typer(nodes_app)


@nodes_app.callback()
def nodes(
    ctx: typer.Context, head_url: HeadUrl = None, token: TokenOpt = None, json_out: JsonOpt = False
) -> None:
    """List nodes with their hardware and status ('nodes remove ID' forgets one)."""
    if ctx.invoked_subcommand is not None:
        return
    found: list[Node] = with_client(head_url, token, lambda c: c.list_nodes())
    if json_out:
        print_json(found)
        return
    if not found:
        out.print("no nodes yet: start an agent with 'gswarm client HEAD_URL --node-id ID'")
        return
    out.print(_nodes_table(found, out.width))


def _nodes_table(found: list[Node], width: int) -> Table:
    """One line a node; the host and address columns go when the table would not fit `width`."""
    for columns in (NODE_COLUMNS, NARROW_NODE_COLUMNS):
        table = table_of(columns)
        for n in found:
            cells = _node_cells(n)
            table.add_row(*(cells[c] for c in columns[:-1]), cut(cells[columns[-1]]))
        if out.measure(table, options=out.options.update_width(1 << 16)).maximum <= width:
            break
    return table


NODE_COLUMNS = ("node", "status", "host", "address", "cpus", "memory", "disk free", "dram free", "gpus")
NARROW_NODE_COLUMNS = ("node", "status", "cpus", "memory", "disk free", "dram free", "gpus")


def _node_cells(n: Node) -> dict[str, str]:
    inv = n.inventory
    tiers = {t.name: t for t in inv.tiers}
    status = {"online": "[green]online[/]", "offline": "[red]offline[/]"}.get(n.status, n.status)
    return {
        "node": n.node_id,
        "status": f"{status} {short_age(n.status_since)}",
        "host": n.hostname or "-",
        "address": (n.addresses or ["-"])[0],
        "cpus": str(inv.cpu_count or "-"),
        "memory": human_size(inv.memory_total) if inv.memory_total else "-",
        "disk free": human_size(tiers["disk"].free) if "disk" in tiers else "-",
        "dram free": human_size(tiers["dram"].free) if "dram" in tiers else "-",
        "gpus": _gpus(n),
    }


def _gpus(n: Node) -> str:
    """A node's GPUs, alike ones counted: `2x NVIDIA H100 (80.0 GB)`, `(sim)` for simulated."""
    kinds: dict[tuple[str, int, bool], int] = {}
    for g in n.inventory.gpus:
        key = (g.name, g.memory_total, g.simulated)
        kinds[key] = kinds.get(key, 0) + 1
    return (
        ", ".join(
            f"{count}x {name} ({human_size(memory)}){' (sim)' if sim and 'simulated' not in name else ''}"
            for (name, memory, sim), count in kinds.items()
        )
        or "none"
    )


@nodes_app.command("remove")
def nodes_remove(
    node_id: Annotated[str, typer.Argument(help="Node to forget")],
    force: Annotated[
        bool, typer.Option("--force", help="Also when it is online: disconnect its agent.")
    ] = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Forget a node and revoke its credential.

    Its agent can no longer join as it, and grants for its data server stop working. Its copies
    and services leave the registry (the files stay on its disks). Refused while the node is
    online, unless --force."""
    done: NodeRemoved = with_client(head_url, token, lambda c: c.remove_node(node_id, force), FORCE)
    if json_out:
        print_json(done)
        return
    what = [
        f"{counted(len(done.ops_failed), 'open op')} failed" if done.ops_failed else "",
        f"{counted(len(done.locations), 'copy', 'copies')} forgotten" if done.locations else "",
        f"{counted(len(done.services), 'service')} forgotten" if done.services else "",
        "its agent was disconnected" if done.was_online else "",
    ]
    details = ", ".join(w for w in what if w)
    out.print(f"removed node {done.node_id}{f' ({details})' if details else ''}", highlight=False)


@app.command()
def probe(
    node_id: Annotated[str, typer.Argument(help="Node to probe")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Ask a node's agent to re-read its inventory and holdings (an op, end to end)."""
    op: Op = with_client(head_url, token, lambda c: c.probe(node_id, wait=True))
    if json_out:
        print_json(op)
    else:
        print_op(op)
    if op.state != "succeeded":
        raise typer.Exit(1)


FORCEABLE = frozenset({"serving", "busy", "node_offline"})
"""The conflicts that `--force` overrides: a service serving from the copy, a write in
progress, copies on offline nodes."""


async def _forcing(attempt: Callable[[bool], Awaitable[T]], force: bool) -> T:
    """Run a removal without force first. When running services serve from what it removes
    (a 409 `serving`), ask on a terminal whether to stop them and go on; without a terminal,
    refuse unless `--force`. Say which services are stopped either way."""
    try:
        return await attempt(False)
    except GswarmError as exc:
        if exc.status != 409 or exc.code not in FORCEABLE:
            raise
        if exc.code != "serving":
            if not force:
                raise
            return await attempt(True)
        services = ", ".join(str(s) for s in exc.details.get("services", [])) or "its services"
        if not force:
            if not sys.stdin.isatty():
                raise
            err.print(in_cli_words(exc, FORCE), highlight=False, soft_wrap=True)
            err.print(f"stop {services} and go on? [y/N] ", end="", highlight=False, markup=False)
            answer = (await asyncio.to_thread(sys.stdin.readline)).strip().lower()
            if answer not in ("y", "yes"):
                raise GswarmError(f"nothing was changed; {services} still running", code="declined") from None
        err.print(f"stopping {services} first", highlight=False)
        return await attempt(True)


def _run_op(
    head_url: str | None,
    tok: str | None,
    start: Callable[[Any], Awaitable[Op]],
    detach: bool,
    json_out: bool,
    what: str,
    flags: Flags,
) -> None:
    """Start an op, follow it live (unless detached) and say how it ended; an error names what
    the command sent in its own words (`flags`)."""

    async def main() -> Op:
        async with open_client(head_url, tok) as c:
            op = await start(c)
            return await follow_op(c, op, detach, json_out, what)

    finish_op(run(main(), flags), json_out, detach, what)


@app.command()
def download(
    model: Annotated[str, typer.Argument(help="Model name (registered on first download)")],
    source: Annotated[
        str, typer.Argument(help="https://huggingface.co/ORG/REPO, hf://ORG/REPO@REV, ORG/REPO, URL, file://")
    ],
    device: Annotated[str, typer.Argument(help="Target, e.g. node1:disk")],
    include: Annotated[
        list[str] | None, typer.Option("--include", metavar="GLOB", help="Only files matching (glob).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Skip files matching (glob).")
    ] = None,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a model onto a node's disk or dram, with live progress."""
    _run_op(
        head_url,
        token,
        lambda c: c.download(model, source, device, allow_patterns=include, ignore_patterns=exclude),
        detach,
        json_out,
        f"download {model} -> {device}",
        {
            **MODEL,
            "source_url": "SOURCE",
            "target_device": "DEVICE",
            "allow_patterns": "--include",
            "ignore_patterns": "--exclude",
        },
    )


COPY_FLAGS = {**MODEL, "source_device": "FROM", "target_device": "TO", "verify": "--verify"}


@app.command()
def copy(
    model: Annotated[str, typer.Argument(help="Model name")],
    source: Annotated[str, typer.Argument(metavar="FROM", help="Source device, e.g. node1:disk")],
    target: Annotated[str, typer.Argument(metavar="TO", help="Target device, e.g. node1:dram")],
    verify: Annotated[
        str, typer.Option(metavar="size|sha256", help="sha256 re-hashes the copy; size checks sizes only.")
    ] = "size",
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy a model between devices."""
    _run_op(
        head_url, token, lambda c: c.copy(model, source, target, verify=verify), detach, json_out,
        f"copy {model} {source} -> {target}", COPY_FLAGS,
    )  # fmt: skip


@app.command()
def move(
    model: Annotated[str, typer.Argument(help="Model name")],
    source: Annotated[str, typer.Argument(metavar="FROM", help="Source device, e.g. node1:disk")],
    target: Annotated[str, typer.Argument(metavar="TO", help="Target device, e.g. node1:dram")],
    keep_source: Annotated[bool, typer.Option("--keep-source", help="Keep the source copy.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Stop a service that serves from the source, without asking.")
    ] = False,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Move a model between devices (the source goes only after the target is verified).
    A service serving from the source is stopped only when you say so (asked on a terminal)."""

    def start(c: Any) -> Awaitable[Op]:
        return _forcing(lambda f: c.move(model, source, target, keep_source=keep_source, force=f), force)

    flags = {**COPY_FLAGS, **FORCE, "keep_source": "--keep-source"}
    _run_op(head_url, token, start, detach, json_out, f"move {model} {source} -> {target}", flags)


@app.command()
def replicate(
    model: Annotated[str, typer.Argument(help="Model name")],
    targets: Annotated[
        list[str] | None, typer.Argument(metavar="DEVICE", help="Target devices, e.g. node2:disk node3:disk")
    ] = None,
    all_nodes: Annotated[
        str | None, typer.Option("--all-nodes", metavar="disk|dram", help="Every online node's tier.")
    ] = None,
    source: Annotated[
        str | None, typer.Option("--from", metavar="DEVICE", help="Start from this copy.")
    ] = None,
    max_fanout: Annotated[
        int, typer.Option(metavar="N", help="Peers one holder serves at once (1: a pipelined chain).")
    ] = 1,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy a model to many devices; each node that finishes feeds the next."""

    async def main() -> Op:
        async with open_client(head_url, token) as c:
            op: Op = await c.replicate(
                model, targets or [], all_nodes=all_nodes, source_device=source, max_fanout=max_fanout
            )
            final: Op = await follow_op(c, op, detach, json_out, f"replicate {model}")
            return final

    flags = {
        **MODEL,
        "targets": "DEVICE",
        "all_nodes": "--all-nodes",
        "source_device": "--from",
        "max_fanout": "--max-fanout",
    }
    op = run(main(), flags)
    if json_out:
        print_json(op)
    elif detach and not op.terminal:
        out.print(op.op_id, highlight=False)
    else:
        table = Table("target", "state", "from", "seconds", "error")
        outcomes = op.result.targets if isinstance(op.result, ReplicateResult) else {}
        for target, r in sorted(outcomes.items()):
            table.add_row(target, r.state, r.source, str(r.seconds or ""), r.error)
        out.print(table)
        print_op(op)
    if op.terminal and op.state != "succeeded":
        raise typer.Exit(1)


@app.command()
def load(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="GPU device, e.g. node1:gpu0")],
    source: Annotated[
        str | None,
        typer.Option("--from", metavar="DEVICE", help="Copy to load from [default: dram, else disk]"),
    ] = None,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stage a model's weights into a GPU's memory."""
    _run_op(
        head_url,
        token,
        lambda c: c.load(model, device, source_device=source),
        detach,
        json_out,
        f"load {model} -> {device}",
        {**MODEL, "device": "DEVICE", "source_device": "--from"},
    )


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device, e.g. node1:gpu0 (or node1:dram on the CPU)")],
    port: Annotated[int, typer.Argument(help="Port of the server on that node")],
    backend: Annotated[
        str | None, typer.Option(metavar="NAME", help="builtin, vllm, or a template of the agent's config")
    ] = None,
    config: Annotated[
        str | None, typer.Option(metavar="JSON", help="JSON object of backend settings")
    ] = None,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Serve a model behind an OpenAI-compatible endpoint; returns once it answers."""
    try:
        settings = json.loads(config) if config else {}
    except ValueError as exc:
        fail(f"--config is not JSON: {exc}")
    what = f"serve {model} on {device}:{port}"
    start = lambda c: c.serve(model, device, port, backend=backend, config=settings)  # noqa: E731
    flags = {**MODEL, "device": "DEVICE", "port": "PORT", "backend": "--backend", "config": "--config"}
    _run_op(head_url, token, start, detach, json_out, what, flags)


@app.command()
def stop(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device it is served on")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stop serving a model and free its GPU memory."""
    start = lambda c: c.stop_service(model, device)  # noqa: E731
    flags = {**MODEL, "device": "DEVICE"}
    _run_op(head_url, token, start, False, json_out, f"stop {model} on {device}", flags)


@app.command()
def services(head_url: HeadUrl = None, token: TokenOpt = None, json_out: JsonOpt = False) -> None:
    """List services with URL, backend and health."""
    found: list[Service] = with_client(head_url, token, lambda c: c.list_services())
    if json_out:
        print_json(found)
        return
    if not found:
        out.print("no services")
        return
    table = Table("model", "device", "backend", "url", "state", "restarts", "since", "error")
    for svc in found:
        table.add_row(
            svc.model,
            svc.device,
            svc.backend,
            svc.url,
            svc.state,
            str(svc.restarts),
            ago(svc.started_at),
            svc.error,
        )
    out.print(table)


@app.command()
def logs(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device it is served on")],
    lines: Annotated[int, typer.Option(metavar="N", help="How many lines")] = 100,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Then print what it gains, until the service stops.")
    ] = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
) -> None:
    """Print the tail of a service's log.

    For the builtin backend on a GPU, that is the log of the GPU's worker, which its builtin
    services share."""

    async def show(c: Any) -> None:
        first = True
        async for chunk in c.follow_logs(model, device, lines=lines) if follow else _one(c):
            if first and chunk.shared:
                err.print(
                    f"({chunk.file}: the log of the worker holding {device}'s weights, "
                    "shared by the builtin services there)",
                    highlight=False,
                    soft_wrap=True,
                )
            if chunk.reset:
                err.print(f"({chunk.file} was replaced: from its start)", highlight=False)
            text = chunk.log
            if first and text and not text.endswith("\n"):
                text += "\n"  # a tail is whole lines; what follows starts on a line of its own
            sys.stdout.write(text)
            sys.stdout.flush()
            first = False
        if follow:
            err.print(f"({model} on {device} is no longer running)", highlight=False)

    async def _one(c: Any) -> AsyncIterator[Any]:
        yield await c.log_chunk(model, device, lines=lines)

    with_client(head_url, token, show, {"lines": "--lines"})


@app.command()
def health(
    model: Annotated[str | None, typer.Argument(help="Model name (with DEVICE: one service)")] = None,
    device: Annotated[str | None, typer.Argument(help="Device it is served on")] = None,
    node: Annotated[str | None, typer.Option(metavar="NODE", help="Check a whole node instead.")] = None,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Health-check a service or a node."""
    flags = {**MODEL, "device": "DEVICE", "node_id": "--node"}
    op: Op = with_client(head_url, token, lambda c: c.health_check(model, device, node_id=node), flags)
    if json_out:
        print_json(op)
    else:
        out.print(health_line(op), highlight=False)
    if op.state != "succeeded" or not (isinstance(op.result, HealthCheckResult) and op.result.healthy):
        raise typer.Exit(1)


@app.command()
def rm(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device whose copy goes, e.g. node1:dram")],
    force: Annotated[
        bool, typer.Option("--force", help="Cancel a write in progress; stop a service serving from it.")
    ] = False,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove one copy of a model. A service serving from it is stopped only when you say so
    (asked on a terminal)."""

    def start(c: Any) -> Awaitable[Op]:
        return _forcing(lambda f: c.delete_location(model, device, force=f), force)

    _run_op(head_url, token, start, detach, json_out, f"rm {model} on {device}", FORCE)


@app.command()
def delete(
    model: Annotated[str, typer.Argument(help="Model name")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Cancel writes; stop its services; forget copies on offline nodes."),
    ] = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove every copy of a model, then the model. Its running services are stopped only
    when you say so (asked on a terminal)."""
    result: dict[str, Any] = with_client(
        head_url, token, lambda c: _forcing(lambda f: c.delete_model(model, force=f), force), FORCE
    )
    if json_out:
        print_json(result)
        return
    stopped = result.get("stopped_services") or []
    also = f"; stopped {', '.join(stopped)}" if stopped else ""
    removed = counted(len(result.get("ops", [])), "copy", "copies")
    out.print(f"deleted {model} ({removed} removed{also})", highlight=False)


@app.command()
def ops(
    node: Annotated[str | None, typer.Option(metavar="NODE", help="Only this node's ops.")] = None,
    state: Annotated[
        str | None, typer.Option(metavar="STATE", help="Only ops in this state (queued, running, failed...).")
    ] = None,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List recent ops."""
    filters = {k: v for k, v in {"node": node, "state": state}.items() if v}
    found: list[Op] = with_client(
        head_url, token, lambda c: c.list_ops(**filters), {"node": "--node", "state": "--state"}
    )
    if json_out:
        print_json(found)
        return
    out.print(_ops_table(found, out.width))


def _ops_table(found: list[Op], width: int) -> Table:
    """One line an op, whole ids (what `cancel` takes); the error is cut to what the width leaves
    (`--json` has it all). Progress is shown for open ops only, as a percentage below 120
    columns, and its column only when one has some."""
    rows = []
    for op in found:
        p = op.progress
        done = "-"
        if op.terminal or not (p.done or p.total):
            pass
        elif not p.total:
            done = human_size(p.done)
        elif width >= 120:
            done = f"{human_size(p.done)}/{human_size(p.total)}"
        else:
            done = f"{100 * p.done // p.total}%"
        error = op.error.message if op.error else ""
        rows.append((op.op_id, op.kind, op.node_id, op.state, done, short_age(op.created_at), error))
    with_done = any(row[4] != "-" for row in rows)
    columns = ("op", "kind", "node", "state", "done", "age", "error")
    table = table_of([c for c in columns if with_done or c != "done"])
    for *cells, error in rows:
        table.add_row(*[c for i, c in enumerate(cells) if with_done or i != 4], cut(error))
    return table


@app.command()
def cancel(
    op_id: Annotated[str, typer.Argument(help="Op to cancel")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cancel an op."""
    op: Op = with_client(head_url, token, lambda c: c.cancel_op(op_id))
    if json_out:
        print_json(op)
    else:
        out.print(f"op {op_id} cancelled", highlight=False)


@app.command()
def events(
    since: Annotated[
        int | None, typer.Option(metavar="SEQ", help="Replay events after this seq first.")
    ] = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            metavar="TOPIC", help="Only this topic (repeatable): model, node, op, location, job, service."
        ),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Keep following live.")] = True,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Follow the event stream live (after replaying from --since)."""
    topics = topic or []

    def show_event(ev: Event) -> None:
        if json_out:
            sys.stdout.write(msgspec.json.encode(ev).decode() + "\n")
            sys.stdout.flush()
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts))
        state = ev.data.get("state") or ev.data.get("status") or ""
        line = f"{ev.seq:>7} {stamp} {ev.kind:<18} {ev.key} {state}"
        if ev.kind == "op.progress":
            try:
                figures = event_progress(
                    str(ev.data.get("kind", "")), msgspec.convert(ev.data["progress"], OpProgress)
                )
            except (KeyError, msgspec.ValidationError):
                figures = ""  # an event from a head of another version: its line without figures
            line += f" {figures}" if figures else ""
        out.print(line, highlight=False, markup=False, soft_wrap=True)

    async def main() -> None:
        async with open_client(head_url, token) as c:
            if not follow:
                for ev in await c.list_events(since or 0, topics, limit=10_000):
                    show_event(ev)
                return
            async for msg in c.events(since=since, topics=topics):
                if isinstance(msg, Notice):
                    if msg.code == "dropped":
                        raise GswarmError(f"dropped by the head: {msg.message}")
                    continue
                show_event(msg)

    with contextlib.suppress(KeyboardInterrupt):
        run(main(), {"since": "--since", "topic": "--topic", "topics": "--topic"})
