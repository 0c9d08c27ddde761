"""The `gswarm` / `gsmodel` command line: typer commands over `gswarm.client`.

People get rich tables and live progress; scripts pass `--json`. Errors are one line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
import yaml
from rich.console import Console
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

from gswarm import __version__
from gswarm.config import (
    DEFAULT_PORT,
    Settings,
    default_disk_dir,
    default_dram_dir,
    default_state_dir,
    load_tokens,
)
from gswarm.errors import GswarmError
from gswarm.protocol import Event, Job, JobAction, ModelView, Node, Notice, Op, Service, to_builtins

T = TypeVar("T")

app = typer.Typer(
    name="gswarm",
    help="gswarm: model management for GPU clusters (head, agents, registry, operations).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

HeadUrl = Annotated[
    str | None,
    typer.Option("--head-url", envvar="GSWARM_HEAD_URL", help="Head URL [default: http://localhost:8100]"),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="GSWARM_TOKEN", help="API token (found locally if omitted)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
StateDir = Annotated[
    Path | None, typer.Option("--state-dir", help="Head state dir [default: ~/.local/share/gswarm]")
]


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a GswarmError becomes one line on stderr and exit status 1."""
    try:
        return asyncio.run(coro)
    except GswarmError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # one line, never a traceback
        _fail(f"unexpected {type(exc).__name__}: {exc}")
    raise AssertionError("unreachable")


def _client(head_url: str | None, token: str | None) -> Any:
    from gswarm.client import GswarmClient

    return GswarmClient(head_url, token)


def _print_json(data: Any) -> None:
    sys.stdout.write(msgspec.json.encode(to_builtins(data)).decode() + "\n")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _ago(ts: float) -> str:
    d = max(0.0, time.time() - ts)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)


async def _until_signal(*tasks: asyncio.Task[Any]) -> None:
    """Wait for SIGINT/SIGTERM or for any of the tasks to end."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# ---------------------------------------------------------------- processes


def _agent_token(token: str | None, state_dir: Path | None = None) -> str:
    if token:
        return token
    tokens = load_tokens(state_dir)
    if tokens is None:
        _fail("no join token: pass --token or set GSWARM_TOKEN (run 'gswarm token' on the head to see it)")
        raise AssertionError
    return tokens.join_token


async def _run_agent_task(agent_task: asyncio.Task[None]) -> None:
    from gswarm.agent.session import AgentRefused

    try:
        await agent_task
    except AgentRefused as exc:
        _fail(exc.message, 2)
    except asyncio.CancelledError:
        pass


@app.command()
def head(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    state_dir: StateDir = None,
    offline_after: Annotated[
        float | None, typer.Option(help="Seconds of silence before a node is offline [15].")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Start the head server (REST API, agent and event sockets, registry)."""
    from gswarm.head.app import HeadServer

    _setup_logging(verbose)
    settings = Settings.from_env(offline_after=offline_after)

    async def main() -> None:
        server = HeadServer(state_dir or default_state_dir(), host, port, settings)
        try:
            await server.start()
        except OSError as exc:
            raise GswarmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        err.print(f"gswarm head {__version__} listening on {server.url} (state: {server.head.state_dir})")
        try:
            await _until_signal()
        finally:
            await server.stop()
            err.print("head stopped")

    run(main())


def _agent_options(
    node_id: str | None, disk_dir: Path | None, dram_dir: Path | None
) -> tuple[str, Path, Path]:
    return (
        node_id or socket.gethostname().split(".")[0],
        disk_dir or default_disk_dir(),
        dram_dir or default_dram_dir(),
    )


NodeIdOpt = Annotated[str | None, typer.Option("--node-id", help="This node's id [default: hostname]")]
DiskDirOpt = Annotated[Path | None, typer.Option("--disk-dir", help="Directory of the disk tier.")]
DramDirOpt = Annotated[Path | None, typer.Option("--dram-dir", help="Directory of the dram tier (tmpfs).")]
SimGpuOpt = Annotated[
    str | None,
    typer.Option("--simulate-gpus", envvar="GSWARM_SIMULATE_GPUS", help="N[:SIZE] simulated GPUs."),
]


def _serving_config(path: Path | None) -> Any:
    from gswarm.agent.serving import ServingConfig

    if path is None:
        return ServingConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise GswarmError(f"cannot read agent config {path}: {exc}") from None
    try:
        return msgspec.convert(raw.get("serving") or {}, ServingConfig)
    except (msgspec.ValidationError, AttributeError) as exc:
        raise GswarmError(f"agent config {path}: serving: {exc}") from None


@app.command("client")
def client_cmd(
    head_url: Annotated[str, typer.Argument(help="URL of the head, e.g. http://head:8100")],
    node_id: NodeIdOpt = None,
    token: Annotated[str | None, typer.Option("--token", envvar="GSWARM_TOKEN", help="Join token.")] = None,
    disk_dir: DiskDirOpt = None,
    dram_dir: DramDirOpt = None,
    simulate_gpus: SimGpuOpt = None,
    data_port: Annotated[int, typer.Option(help="Port of the data server peers fetch from (0: any).")] = 0,
    data_host: Annotated[
        str,
        typer.Option(help="Address peers reach the data server at [default: the one used to reach the head]"),
    ] = "",
    data_bandwidth: Annotated[
        str | None, typer.Option(help="Cap of the data server's uplink, e.g. 500M (bytes/s).")
    ] = None,
    disk_quota: Annotated[
        str | None, typer.Option(help="Most gswarm may store on the disk tier, e.g. 500G.")
    ] = None,
    dram_quota: Annotated[
        str | None, typer.Option(help="Most gswarm may store on the dram tier, e.g. 64G.")
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="Agent config (YAML): serving templates, restart limits.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run an agent on this node, connected to the head."""
    from gswarm.agent.gpu import parse_size
    from gswarm.agent.main import Agent

    _setup_logging(verbose)
    nid, disk, dram = _agent_options(node_id, disk_dir, dram_dir)
    join = _agent_token(token)

    async def main() -> None:
        try:
            quotas = {k: parse_size(v) for k, v in {"disk": disk_quota, "dram": dram_quota}.items() if v}
            agent = Agent(
                head_url,
                nid,
                join,
                disk,
                dram,
                Settings.from_env(),
                simulate_gpus,
                quotas=quotas,
                data_port=data_port,
                data_host=data_host,
                data_bandwidth=parse_size(data_bandwidth) if data_bandwidth else None,
                serving_config=_serving_config(config_file),
            )
        except ValueError as exc:
            raise GswarmError(str(exc)) from None
        task = asyncio.create_task(agent.run())
        err.print(f"gswarm agent {nid} -> {head_url} (disk: {disk}, dram: {dram})")
        await _until_signal(task)
        task.cancel()
        await _run_agent_task(task)
        err.print("agent stopped")

    run(main())


app.command("agent", help="Run an agent on this node (same as 'client').")(client_cmd)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Address the head listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the head.")] = DEFAULT_PORT,
    state_dir: StateDir = None,
    node_id: NodeIdOpt = None,
    disk_dir: DiskDirOpt = None,
    dram_dir: DramDirOpt = None,
    simulate_gpus: SimGpuOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """A head and a local agent in one process: the whole system on one machine."""
    from gswarm.agent.main import Agent
    from gswarm.head.app import HeadServer

    _setup_logging(verbose)
    nid, disk, dram = _agent_options(node_id, disk_dir, dram_dir)
    settings = Settings.from_env()

    async def main() -> None:
        server = HeadServer(state_dir or default_state_dir(), host, port, settings)
        try:
            await server.start()
        except OSError as exc:
            raise GswarmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            agent = Agent(server.url, nid, server.head.tokens.join_token, disk, dram, settings, simulate_gpus)
        except ValueError as exc:
            await server.stop()
            raise GswarmError(str(exc)) from None
        task = asyncio.create_task(agent.run())
        err.print(
            f"gswarm {__version__} up: head {server.url}, agent {nid} "
            f"(state: {server.head.state_dir}, disk: {disk}, dram: {dram}); Ctrl-C stops"
        )
        try:
            await _until_signal(task)
        finally:
            task.cancel()
            await _run_agent_task(task)
            await server.stop()
            err.print("stopped")

    run(main())


@app.command()
def token(state_dir: StateDir = None, json_out: JsonOpt = False) -> None:
    """Print the head's tokens (API token for the CLI/REST, join token for agents)."""
    tokens = load_tokens(state_dir)
    if tokens is None:
        _fail(f"no head state in {state_dir or default_state_dir()}: start 'gswarm head' first")
        return
    if json_out:
        _print_json({"api_token": tokens.api_token, "join_token": tokens.join_token})
        return
    out.print(f"api token  (CLI, REST: GSWARM_TOKEN): {tokens.api_token}", highlight=False)
    out.print(f"join token (agents: --token):        {tokens.join_token}", highlight=False)


# ---------------------------------------------------------------- registry


def _with_client(head_url: str | None, tok: str | None, fn: Callable[[Any], Awaitable[T]]) -> T:
    async def main() -> T:
        async with _client(head_url, tok) as c:
            return await fn(c)

    return run(main())


@app.command()
def register(
    name: Annotated[str, typer.Argument(help="Model name")],
    model_type: Annotated[str, typer.Argument(metavar="TYPE", help="llm, diffusion, ...")],
    source_url: Annotated[
        str | None, typer.Option("--source-url", help="Where the model comes from.")
    ] = None,
    metadata_file: Annotated[
        Path | None, typer.Option("--metadata-file", help="JSON or YAML file of metadata.")
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
            _fail(f"cannot read metadata file {metadata_file}: {exc}")
        if loaded is not None and not isinstance(loaded, dict):
            _fail(f"metadata file {metadata_file} must hold a mapping")
        metadata = loaded or {}
    model: ModelView = _with_client(
        head_url, token, lambda c: c.register_model(name, model_type, source_url, metadata)
    )
    if json_out:
        _print_json(model)
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
    models: list[ModelView] = _with_client(head_url, token, lambda c: c.list_models())
    if json_out:
        _print_json(models)
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
    model: ModelView = _with_client(head_url, token, lambda c: c.get_model(name))
    if json_out:
        _print_json(model)
        return
    out.print(f"[bold]{model.name}[/] ({model.type})  source: {model.source_url or '-'}", highlight=False)
    if model.metadata:
        out.print(f"metadata: {model.metadata}", highlight=False)
    if not model.locations:
        out.print("no copies yet")
        return
    table = Table("device", "state", "size", "path", "updated")
    for loc in model.locations:
        table.add_row(loc.device, loc.state, _size(loc.size), loc.path, _ago(loc.updated_at))
    out.print(table)


@app.command()
def nodes(head_url: HeadUrl = None, token: TokenOpt = None, json_out: JsonOpt = False) -> None:
    """List nodes with their hardware and status."""
    found: list[Node] = _with_client(head_url, token, lambda c: c.list_nodes())
    if json_out:
        _print_json(found)
        return
    if not found:
        out.print("no nodes yet: start an agent with 'gswarm client HEAD_URL --node-id ID'")
        return
    table = Table("node", "status", "host", "address", "cpus", "memory", "disk free", "dram free", "gpus")
    for n in found:
        inv = n.inventory
        tiers = {t.name: t for t in inv.tiers}
        gpus = ", ".join(
            f"{g.index}: {g.name} {_size(g.memory_total)}{' (sim)' if g.simulated else ''}" for g in inv.gpus
        )
        status = {"online": "[green]online[/]", "offline": "[red]offline[/]"}.get(n.status, n.status)
        table.add_row(
            n.node_id,
            f"{status} {_ago(n.status_since)}",
            n.hostname or "-",
            (n.addresses or ["-"])[0],
            str(inv.cpu_count or "-"),
            _size(inv.memory_total) if inv.memory_total else "-",
            _size(tiers["disk"].free) if "disk" in tiers else "-",
            _size(tiers["dram"].free) if "dram" in tiers else "-",
            gpus or "none",
        )
    out.print(table)


@app.command()
def probe(
    node_id: Annotated[str, typer.Argument(help="Node to probe")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Ask a node's agent to re-read its inventory and holdings (an op, end to end)."""
    op: Op = _with_client(head_url, token, lambda c: c.probe(node_id, wait=True))
    if json_out:
        _print_json(op)
    else:
        _print_op(op)
    if op.state != "succeeded":
        raise typer.Exit(1)


def _print_op(op: Op) -> None:
    line = f"op {op.op_id} {op.kind} on {op.node_id}: {op.state}"
    if op.error is not None:
        line += f" ({op.error.code}: {op.error.message})"
    out.print(line, highlight=False)


DetachOpt = Annotated[bool, typer.Option("--detach", "-d", help="Return at once with the op id.")]


async def _ask_cancel(c: Any, op: Op) -> None:
    """After Ctrl-C: cancel the op, or leave it running (the default without a terminal)."""
    answer = "n"
    if sys.stdin.isatty():
        err.print(f"\ncancel op {op.op_id}? [y/N] ", end="")
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
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
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
        loop.remove_signal_handler(signal.SIGINT)


def _finish_op(op: Op, json_out: bool, detach: bool, what: str) -> None:
    if json_out:
        _print_json(op)
    elif detach and not op.terminal:
        out.print(op.op_id, highlight=False)
    elif op.state == "succeeded":
        result = op.result or {}
        if result.get("already_present"):
            out.print(f"{what}: already there, nothing to do ({result.get('path', '')})", highlight=False)
        else:
            size = f" ({_size(result['size'])})" if result.get("size") else ""
            out.print(f"{what}: done{size}", highlight=False)
    else:
        _print_op(op)
    if op.terminal and op.state != "succeeded":
        raise typer.Exit(1)


def _run_op(
    head_url: str | None,
    tok: str | None,
    start: Callable[[Any], Awaitable[Op]],
    detach: bool,
    json_out: bool,
    what: str,
) -> None:
    async def main() -> Op:
        async with _client(head_url, tok) as c:
            op = await start(c)
            return await follow_op(c, op, detach, json_out, what)

    _finish_op(run(main()), json_out, detach, what)


@app.command()
def download(
    model: Annotated[str, typer.Argument(help="Model name (registered on first download)")],
    source: Annotated[
        str, typer.Argument(help="https://huggingface.co/ORG/REPO, hf://ORG/REPO@REV, ORG/REPO, URL, file://")
    ],
    device: Annotated[str, typer.Argument(help="Target, e.g. node1:disk")],
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only files matching (glob).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Skip files matching (glob).")
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
    )


@app.command()
def copy(
    model: Annotated[str, typer.Argument(help="Model name")],
    source: Annotated[str, typer.Argument(metavar="FROM", help="Source device, e.g. node1:disk")],
    target: Annotated[str, typer.Argument(metavar="TO", help="Target device, e.g. node1:dram")],
    verify: Annotated[str, typer.Option(help="size, or sha256 to re-hash the copy")] = "size",
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy a model between devices."""
    _run_op(
        head_url, token, lambda c: c.copy(model, source, target, verify=verify), detach, json_out,
        f"copy {model} {source} -> {target}",
    )  # fmt: skip


@app.command()
def move(
    model: Annotated[str, typer.Argument(help="Model name")],
    source: Annotated[str, typer.Argument(metavar="FROM", help="Source device, e.g. node1:disk")],
    target: Annotated[str, typer.Argument(metavar="TO", help="Target device, e.g. node1:dram")],
    keep_source: Annotated[bool, typer.Option("--keep-source", help="Keep the source copy.")] = False,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Move a model between devices (the source goes only after the target is verified)."""
    _run_op(
        head_url, token, lambda c: c.move(model, source, target, keep_source=keep_source), detach, json_out,
        f"move {model} {source} -> {target}",
    )  # fmt: skip


@app.command()
def replicate(
    model: Annotated[str, typer.Argument(help="Model name")],
    targets: Annotated[
        list[str] | None, typer.Argument(help="Target devices, e.g. node2:disk node3:disk")
    ] = None,
    all_nodes: Annotated[str | None, typer.Option("--all-nodes", help="Every online node's TIER.")] = None,
    source: Annotated[str | None, typer.Option("--from", help="Start from this copy.")] = None,
    max_fanout: Annotated[
        int, typer.Option(help="Peers one holder serves at once (1: a pipelined chain).")
    ] = 1,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy a model to many devices; each node that finishes feeds the next."""

    async def main() -> Op:
        async with _client(head_url, token) as c:
            op: Op = await c.replicate(
                model, targets or [], all_nodes=all_nodes, source_device=source, max_fanout=max_fanout
            )
            if detach:
                return op
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"))
            progress = Progress(*columns, TimeElapsedColumn(), console=err, disable=json_out)
            with progress:
                task = progress.add_task(f"replicate {model}", total=None, note="")

                def update(o: Op) -> None:
                    p = o.progress
                    progress.update(task, completed=p.done, total=p.total or None, note=p.message)

                final: Op = await c.wait_op(op.op_id, on_progress=update)
                return final

    op = run(main())
    if json_out:
        _print_json(op)
    elif detach and not op.terminal:
        out.print(op.op_id, highlight=False)
    else:
        table = Table("target", "state", "from", "seconds", "error")
        for target, r in sorted(((op.result or {}).get("targets") or {}).items()):
            table.add_row(
                target, r.get("state", ""), r.get("from", ""), str(r.get("seconds", "")), r.get("error", "")
            )
        out.print(table)
        _print_op(op)
    if op.terminal and op.state != "succeeded":
        raise typer.Exit(1)


@app.command()
def load(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="GPU device, e.g. node1:gpu0")],
    source: Annotated[
        str | None, typer.Option("--from", help="Copy to load from [default: dram, else disk]")
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
    )


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device, e.g. node1:gpu0 (or node1:dram on the CPU)")],
    port: Annotated[int, typer.Argument(help="Port of the server on that node")],
    backend: Annotated[
        str | None, typer.Option(help="builtin, vllm, or a template of the agent's config")
    ] = None,
    config: Annotated[str | None, typer.Option(help="JSON object of backend settings")] = None,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Serve a model behind an OpenAI-compatible endpoint; returns once it answers."""
    try:
        settings = json.loads(config) if config else {}
    except ValueError as exc:
        _fail(f"--config is not JSON: {exc}")
    what = f"serve {model} on {device}:{port}"
    start = lambda c: c.serve(model, device, port, backend=backend, config=settings)  # noqa: E731
    _run_op(head_url, token, start, detach, json_out, what)


@app.command()
def stop(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device it is served on")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stop serving a model and free its GPU memory."""
    _run_op(
        head_url, token, lambda c: c.stop_service(model, device), False, json_out, f"stop {model} on {device}"
    )


@app.command()
def services(head_url: HeadUrl = None, token: TokenOpt = None, json_out: JsonOpt = False) -> None:
    """List services with URL, backend and health."""
    found: list[Service] = _with_client(head_url, token, lambda c: c.list_services())
    if json_out:
        _print_json(found)
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
            _ago(svc.started_at),
            svc.error,
        )
    out.print(table)


@app.command()
def logs(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device it is served on")],
    lines: Annotated[int, typer.Option(help="How many lines")] = 100,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
) -> None:
    """Print the tail of a service's log."""
    text: str = _with_client(head_url, token, lambda c: c.logs(model, device, lines))
    sys.stdout.write(text + ("\n" if text and not text.endswith("\n") else ""))


@app.command()
def health(
    model: Annotated[str | None, typer.Argument(help="Model name (with DEVICE: one service)")] = None,
    device: Annotated[str | None, typer.Argument(help="Device it is served on")] = None,
    node: Annotated[str | None, typer.Option(help="Check a whole node instead.")] = None,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Health-check a service or a node."""
    op: Op = _with_client(head_url, token, lambda c: c.health_check(model, device, node_id=node))
    if json_out:
        _print_json(op)
    else:
        healthy = (op.result or {}).get("healthy")
        out.print(f"{'healthy' if healthy else 'UNHEALTHY'}: {op.result or op.error}", highlight=False)
    if op.state != "succeeded" or not (op.result or {}).get("healthy"):
        raise typer.Exit(1)


@app.command()
def rm(
    model: Annotated[str, typer.Argument(help="Model name")],
    device: Annotated[str, typer.Argument(help="Device whose copy goes, e.g. node1:dram")],
    force: Annotated[bool, typer.Option("--force", help="Cancel a write in progress first.")] = False,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove one copy of a model."""
    _run_op(
        head_url, token, lambda c: c.delete_location(model, device, force=force), detach, json_out,
        f"rm {model} on {device}",
    )  # fmt: skip


@app.command()
def delete(
    model: Annotated[str, typer.Argument(help="Model name")],
    force: Annotated[
        bool, typer.Option("--force", help="Cancel writes; forget copies on offline nodes.")
    ] = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove every copy of a model, then the model."""
    result: dict[str, Any] = _with_client(head_url, token, lambda c: c.delete_model(model, force=force))
    if json_out:
        _print_json(result)
    else:
        out.print(f"deleted {model} ({len(result.get('ops', []))} copies removed)", highlight=False)


@app.command()
def ops(
    node: Annotated[str | None, typer.Option(help="Only this node's ops.")] = None,
    state: Annotated[str | None, typer.Option(help="Only ops in this state.")] = None,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List recent ops."""
    filters = {k: v for k, v in {"node": node, "state": state}.items() if v}
    found: list[Op] = _with_client(head_url, token, lambda c: c.list_ops(**filters))
    if json_out:
        _print_json(found)
        return
    table = Table("op", "kind", "node", "state", "progress", "created", "error")
    for op in found:
        p = op.progress
        prog = f"{_size(p.done)}/{_size(p.total)}" if p.total else "-"
        table.add_row(
            op.op_id,
            op.kind,
            op.node_id,
            op.state,
            prog,
            _ago(op.created_at),
            op.error.message if op.error else "",
        )
    out.print(table)


@app.command()
def cancel(
    op_id: Annotated[str, typer.Argument(help="Op to cancel")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cancel an op."""
    op: Op = _with_client(head_url, token, lambda c: c.cancel_op(op_id))
    if json_out:
        _print_json(op)
    else:
        out.print(f"op {op_id} cancelled", highlight=False)


@app.command()
def events(
    since: Annotated[int | None, typer.Option(help="Replay events after this seq first.")] = None,
    topic: Annotated[
        list[str] | None, typer.Option(help="Only these topics: model, node, op, location.")
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
        out.print(f"{ev.seq:>7} {stamp} {ev.kind:<18} {ev.key} {state}", highlight=False)

    async def main() -> None:
        async with _client(head_url, token) as c:
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
        run(main())


def _job_table(job: Job, progress: dict[str, Any]) -> Table:
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
                + f" {frac:4.0%} {_size(p.done)}/{_size(p.total)}"
            )
            rate = f"{_size(p.rate)}/s" if p.rate else ""
        elif p is not None and p.message:
            bar = p.message
        elapsed = ""
        if a.started_at:
            elapsed = f"{(a.finished_at or now) - a.started_at:.1f}s"
        state = f"[{colors.get(a.state, 'white')}]{a.state}[/]"
        table.add_row(a.id, a.action, str(a.spec.get("model", "")), state, bar, rate, elapsed, a.error[:60])
    return table


async def follow_job(c: Any, job: Job, json_out: bool) -> Job:
    """Show a job's DAG live (a row per action) until it ends."""
    from rich.live import Live

    job = await c.get_job(job.job_id)
    by_id = {a.id: a for a in job.actions}
    progress: dict[str, Any] = {}
    with Live(_job_table(job, progress), console=err, refresh_per_second=4, transient=False) as live:
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
                job.state = str(msg.data.get("state"))
                job.error = str(msg.data.get("error") or "")
            elif msg.topic == "op":
                op = msgspec.convert(msg.data, Op)
                progress[op.op_id] = op.progress
            if not json_out:
                live.update(_job_table(job, progress))
            if job.terminal:
                break
    final: Job = await c.get_job(job.job_id)
    return final


@app.command()
def job(
    file: Annotated[Path, typer.Argument(help="Job file (YAML or JSON)")],
    check: Annotated[bool, typer.Option("--check", help="Validate only; print every problem.")] = False,
    detach: DetachOpt = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a job file: a DAG of actions, shown live; exits with the job's outcome."""
    from gswarm.workflow import parse

    try:
        text = file.read_text()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}")
    if check:
        try:
            spec = parse(text, str(file))
        except GswarmError as exc:
            for problem in exc.details.get("errors", []):
                err.print(f"{problem['action']}: {problem['field']}: {problem['message']}", highlight=False)
            _fail(exc.message)
            return
        out.print(f"{file}: ok, {len(spec.actions)} actions", highlight=False)
        for a in spec.actions:
            deps = f" after {', '.join(a.depends_on)}" if a.depends_on else ""
            out.print(f"  {a.id}: {a.action} {a.model}{deps}", highlight=False)
        return

    async def main() -> Job:
        async with _client(head_url, token) as c:
            try:
                submitted: Job = await c.submit_job(text)
            except GswarmError as exc:
                for problem in exc.details.get("errors", [])[1:]:
                    err.print(
                        f"{problem['action']}: {problem['field']}: {problem['message']}", highlight=False
                    )
                raise
            if detach:
                return submitted
            return await follow_job(c, submitted, json_out)

    final = run(main())
    if json_out:
        _print_json(final)
    elif detach:
        out.print(final.job_id, highlight=False)
    else:
        out.print(
            f"job {final.job_id} {final.state}" + (f": {final.error}" if final.error else ""), highlight=False
        )
    if not detach and final.state != "succeeded":
        raise typer.Exit(1)


jobs_app = typer.Typer(help="List, show and cancel jobs.", no_args_is_help=False, invoke_without_command=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context, head_url: HeadUrl = None, token: TokenOpt = None, json_out: JsonOpt = False
) -> None:
    """List jobs (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    found: list[Job] = _with_client(head_url, token, lambda c: c.list_jobs())
    if json_out:
        _print_json(found)
        return
    table = Table("job", "name", "state", "actions", "created", "error")
    for j in found:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(j.counts.items()))
        table.add_row(j.job_id, j.name, j.state, counts, _ago(j.created_at), j.error[:60])
    out.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="Job id")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one job: each action's state, ops, timings and error."""
    found: Job = _with_client(head_url, token, lambda c: c.get_job(job_id))
    if json_out:
        _print_json(found)
    else:
        out.print(_job_table(found, {}))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="Job id")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cancel a job: running ops are cancelled, the rest skipped."""
    found: Job = _with_client(head_url, token, lambda c: c.cancel_job(job_id))
    if json_out:
        _print_json(found)
    else:
        out.print(f"job {job_id} cancelling", highlight=False)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"gswarm {__version__}")


def main() -> None:
    """Entry point of the `gswarm` and `gsmodel` scripts."""
    app()
