"""What every command module of the CLI shares: the typer app, the consoles, the option types, `fail`.

It imports no other module of `gswarm.cli`, so each of them can import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="gswarm",
    help="gswarm: model management for GPU clusters (head, agents, registry, operations).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()  # results, on stdout
err = Console(stderr=True)  # errors, progress and messages, on stderr

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
DetachOpt = Annotated[bool, typer.Option("--detach", "-d", help="Return at once with the op id.")]


def fail(message: str, code: int = 1) -> None:
    """Print `error: MESSAGE` on stderr and exit with `code` (it never returns)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
