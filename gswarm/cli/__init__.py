"""The `gswarm` / `gsmodel` command line: typer commands over `gswarm.client`.

People get rich tables and live progress; scripts pass `--json`. Errors are one line on
stderr and a non-zero exit status, never a traceback.

Modules: `common` (the app, consoles, option types), `render` (tables, sizes, live progress),
`processes` (head, agent, `up`, signals, `run`), `commands` (talking to a head), `jobs`,
`watch` (the live full-screen view). Importing them registers their commands, in the order
`gswarm --help` lists them: `commands` imports `processes` (head, client, agent, up, token)
first, `jobs` comes after `commands`, then `watch`, and `version` last.
"""

from __future__ import annotations

from gswarm import __version__
from gswarm.cli import commands, jobs, processes, watch  # noqa: F401  (registers the commands)
from gswarm.cli.common import app, out

__all__ = ["app", "main"]


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"gswarm {__version__}")


def main() -> None:
    """Entry point of the `gswarm` and `gsmodel` scripts."""
    app()
