"""Processes: the head, an agent (`client`/`agent`), both at once (`up`), signals, logging, tokens.

Also `run`, the asyncio wrapper every command goes through: errors become one line on stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import typer
import yaml

from gswarm import __version__
from gswarm.cli.common import Flags, JsonOpt, StateDir, app, err, fail, in_cli_words, out
from gswarm.cli.render import print_json
from gswarm.config import (
    DEFAULT_PORT,
    Settings,
    default_disk_dir,
    default_dram_dir,
    default_state_dir,
    load_tokens,
)
from gswarm.errors import GswarmError
from gswarm.sizes import parse_size

if TYPE_CHECKING:
    from gswarm.agent.main import AgentConfig

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], flags: Flags | None = None) -> T:
    """Run a coroutine; a GswarmError becomes one line on stderr and exit status 1, in the
    command's words (`flags`: see `common.in_cli_words`)."""
    try:
        return asyncio.run(coro)
    except GswarmError as exc:
        fail(in_cli_words(exc, flags or {}))
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except BrokenPipeError:
        # The reader went away (`gswarm events | head -2`): stop quietly, as `cat` does, and
        # point stdout at /dev/null so the interpreter's final flush cannot complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except Exception as exc:  # one line, never a traceback
        fail(f"unexpected {type(exc).__name__}: {exc}")
    raise AssertionError("unreachable")


def _setup_logging(verbose: bool) -> None:
    """Log to stderr (DEBUG with --verbose), without aiohttp's access log, websockets' chatter or
    a line per Hub request from huggingface_hub's HTTP client."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    for name in ("httpx", "httpx2"):  # huggingface_hub 1.x, 2.x
        logging.getLogger(name).setLevel(logging.WARNING)


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


def _agent_token(token: str | None, state_dir: Path | None = None) -> str:
    """The join token: the one given, else the local head's; none is an error."""
    if token:
        return token
    tokens = load_tokens(state_dir)
    if tokens is None:
        fail("no join token: pass --token or set GSWARM_TOKEN (run 'gswarm token' on the head to see it)")
        raise AssertionError
    return tokens.join_token


async def _run_agent_task(agent_task: asyncio.Task[None]) -> None:
    from gswarm.agent.main import AgentRefused

    try:
        await agent_task
    except AgentRefused as exc:
        fail(exc.message, 2)
    except asyncio.CancelledError:
        pass


TlsCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        envvar="GSWARM_TLS_CERT",
        metavar="FILE",
        help="Serve https/wss with this certificate (PEM).",
    ),
]
TlsKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-key", envvar="GSWARM_TLS_KEY", metavar="FILE", help="The private key of --tls-cert (PEM)."
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        envvar="GSWARM_CA",
        metavar="FILE",
        help="Trust this CA (PEM) for an https head, besides the system's.",
    ),
]


DataTlsCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-tls-cert", metavar="FILE", help="Serve peers over https with this certificate (PEM)."
    ),
]
DataTlsKeyOpt = Annotated[
    Path | None, typer.Option("--data-tls-key", metavar="FILE", help="The key of --data-tls-cert (PEM).")
]


def _tls_pair(cert: Path | None, key: Path | None, what: str = "--tls-cert and --tls-key") -> None:
    if (cert is None) != (key is None):
        fail(f"give both {what}, or neither", 2)


MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        metavar="PORT",
        min=0,
        max=65535,
        help="Also serve /metrics on this port to anyone, without the api token (for Prometheus) "
        "[$GSWARM_METRICS_PORT; default: only on the head's port, with the token].",
    ),
]


@app.command()
def head(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = DEFAULT_PORT,
    state_dir: StateDir = None,
    offline_after: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Seconds of silence before a node is offline [15]."),
    ] = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    metrics_port: MetricsPortOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
) -> None:
    """Start the head server (REST API, agent and event sockets, registry, /metrics)."""
    from gswarm.head.app import HeadServer

    _setup_logging(verbose)
    _tls_pair(tls_cert, tls_key)
    settings = Settings.from_env(offline_after=offline_after, metrics_port=metrics_port)

    async def main() -> None:
        server = HeadServer(state_dir or default_state_dir(), host, port, settings, tls_cert, tls_key)
        try:
            await server.start()
        except OSError as exc:
            raise GswarmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        err.print(f"gswarm head {__version__} listening on {server.url} (state: {server.head.state_dir})")
        if server.metrics_url is not None:
            err.print(f"metrics for anyone at {server.metrics_url}")
        err.print(f"dashboard at {server.url}/ui (sign in with the api token: gswarm token)")
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


NodeIdOpt = Annotated[
    str | None, typer.Option("--node-id", metavar="ID", help="This node's id [default: hostname]")
]
DiskDirOpt = Annotated[
    Path | None, typer.Option("--disk-dir", metavar="DIR", help="Directory of the disk tier.")
]
DramDirOpt = Annotated[
    Path | None, typer.Option("--dram-dir", metavar="DIR", help="Directory of the dram tier (tmpfs).")
]
SimGpuOpt = Annotated[
    str | None,
    typer.Option(
        "--simulate-gpus",
        envvar="GSWARM_SIMULATE_GPUS",
        metavar="N[:SIZE]",
        help="Simulated GPUs (host memory), for tests and demos.",
    ),
]


DataPortOpt = Annotated[
    int, typer.Option(metavar="PORT", help="Port of the data server peers fetch from (0: any).")
]
DataHostOpt = Annotated[
    str,
    typer.Option(
        metavar="ADDRESS",
        help="Address the data server listens on and peers are told (0.0.0.0: every interface) "
        "[default: the one used to reach the head]",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", metavar="FILE", help="Agent config (YAML): serving templates and host, allow_file_roots."
    ),
]
FileRootOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--allow-file-root",
        metavar="DIR",
        help="A directory file:// downloads may read from (repeatable; none by default).",
    ),
]
ServiceHostOpt = Annotated[
    str | None,
    typer.Option(
        metavar="ADDRESS", help="Address services listen on (0.0.0.0: every interface) [default: 127.0.0.1]"
    ),
]


def _agent_config(path: Path | None, service_host: str | None, file_roots: list[Path] | None) -> AgentConfig:
    """The agent's config file (none: defaults), then what the command line adds or overrides."""
    from gswarm.agent.main import AgentConfig

    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise GswarmError(f"cannot read agent config {path}: {exc}") from None
    try:
        config = msgspec.convert(raw, AgentConfig)
    except msgspec.ValidationError as exc:
        raise GswarmError(f"agent config {path}: {exc}") from None
    if service_host:
        config.serving.host = service_host
    config.allow_file_roots += [str(p) for p in file_roots or []]
    return config


@app.command("client")
def client_cmd(
    head_url: Annotated[str, typer.Argument(help="URL of the head, e.g. http://head:8100")],
    node_id: NodeIdOpt = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="GSWARM_TOKEN", metavar="TOKEN", help="Join token.")
    ] = None,
    disk_dir: DiskDirOpt = None,
    dram_dir: DramDirOpt = None,
    simulate_gpus: SimGpuOpt = None,
    data_port: DataPortOpt = 0,
    data_host: DataHostOpt = "",
    data_bandwidth: Annotated[
        str | None, typer.Option(metavar="RATE", help="Cap of the data server's uplink, e.g. 500M (bytes/s).")
    ] = None,
    disk_quota: Annotated[
        str | None, typer.Option(metavar="SIZE", help="Most gswarm may store on the disk tier, e.g. 500G.")
    ] = None,
    dram_quota: Annotated[
        str | None, typer.Option(metavar="SIZE", help="Most gswarm may store on the dram tier, e.g. 64G.")
    ] = None,
    config_file: ConfigOpt = None,
    allow_file_root: FileRootOpt = None,
    service_host: ServiceHostOpt = None,
    ca: CaOpt = None,
    data_tls_cert: DataTlsCertOpt = None,
    data_tls_key: DataTlsKeyOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
) -> None:
    """Run an agent on this node, connected to the head."""
    from gswarm.agent.main import Agent

    _setup_logging(verbose)
    _tls_pair(data_tls_cert, data_tls_key, "--data-tls-cert and --data-tls-key")
    data_tls = (data_tls_cert, data_tls_key) if data_tls_cert and data_tls_key else None
    nid, disk, dram = _agent_options(node_id, disk_dir, dram_dir)
    join = _agent_token(token)

    async def main() -> None:
        try:
            quotas = {k: parse_size(v) for k, v in {"disk": disk_quota, "dram": dram_quota}.items() if v}
            config = await asyncio.to_thread(_agent_config, config_file, service_host, allow_file_root)
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
                serving_config=config.serving,
                file_roots=[Path(p) for p in config.allow_file_roots],
                ca=ca,
                data_tls=data_tls,
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
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address the head listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port of the head.")] = DEFAULT_PORT,
    state_dir: StateDir = None,
    node_id: NodeIdOpt = None,
    disk_dir: DiskDirOpt = None,
    dram_dir: DramDirOpt = None,
    simulate_gpus: SimGpuOpt = None,
    data_port: DataPortOpt = 0,
    data_host: DataHostOpt = "",
    config_file: ConfigOpt = None,
    allow_file_root: FileRootOpt = None,
    service_host: ServiceHostOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    ca: CaOpt = None,
    metrics_port: MetricsPortOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
) -> None:
    """A head and a local agent in one process: the whole system on one machine. The agent
    reads no file:// source unless given --allow-file-root (or allow_file_roots in --config)."""
    from gswarm.agent.main import Agent
    from gswarm.head.app import HeadServer

    _setup_logging(verbose)
    nid, disk, dram = _agent_options(node_id, disk_dir, dram_dir)
    _tls_pair(tls_cert, tls_key)
    settings = Settings.from_env(metrics_port=metrics_port)

    async def main() -> None:
        config = await asyncio.to_thread(_agent_config, config_file, service_host, allow_file_root)
        server = HeadServer(state_dir or default_state_dir(), host, port, settings, tls_cert, tls_key)
        try:
            await server.start()
        except OSError as exc:
            raise GswarmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            agent = Agent(
                server.url,
                nid,
                server.head.tokens.join_token,
                disk,
                dram,
                settings,
                simulate_gpus,
                data_port=data_port,
                data_host=data_host,
                serving_config=config.serving,
                file_roots=[Path(p) for p in config.allow_file_roots],
                private_dirs=[server.head.state_dir],
                ca=ca,
            )
        except ValueError as exc:
            await server.stop()
            raise GswarmError(str(exc)) from None
        task = asyncio.create_task(agent.run())
        err.print(
            f"gswarm {__version__} up: head {server.url}, agent {nid} "
            f"(state: {server.head.state_dir}, disk: {disk}, dram: {dram}); Ctrl-C stops"
        )
        if server.metrics_url is not None:
            err.print(f"metrics for anyone at {server.metrics_url}")
        err.print(f"dashboard at {server.url}/ui (sign in with the api token: gswarm token)")
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
        fail(f"no head state in {state_dir or default_state_dir()}: start 'gswarm head' first")
        return
    if json_out:
        print_json({"api_token": tokens.api_token, "join_token": tokens.join_token})
        return
    out.print(f"api token  (CLI, REST: GSWARM_TOKEN): {tokens.api_token}", highlight=False)
    out.print(f"join token (agents: --token):        {tokens.join_token}", highlight=False)
