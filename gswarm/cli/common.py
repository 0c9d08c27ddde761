"""What every command module of the CLI shares: the typer app (and the group class that names
every value in `--help` as a person reads it), the consoles, the option types, errors in a
command's own words (`in_cli_words`), listings that fit the terminal (`table_of`), `fail`.

It imports no other module of `gswarm.cli`, so each of them can import it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperGroup, TyperOption

from gswarm.errors import GswarmError

_VALUE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "path": "PATH", "Path": "PATH"}
"""What an option's value is called in `--help` when it names none itself, by its type."""


class _NamedArgument(TyperArgument):
    """An argument whose `--help` row shows its name (`MODEL`) without typer's type column
    (`<str>`, `<list[str]>`), which says nothing to a person."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def _name_values(params: Iterable[Any], ctx: Any) -> None:
    """Give every parameter a name for its value in `--help`: a flag none, an option its own
    metavar or its type's (`TEXT`, `INTEGER`, `PATH`), an argument its name in capitals.
    Newer typer versions otherwise print `<bool>`, `<str>` and `<list[str]>`."""
    for param in params:
        if isinstance(param, TyperOption) and param.metavar is None:
            if param.is_flag:
                param.metavar = ""
            else:
                label = str(param.display_type(ctx)).strip("<>")
                label = label.removeprefix("list[").removesuffix("]")
                param.metavar = _VALUE_NAMES.get(label, label.upper())
        elif isinstance(param, TyperArgument) and type(param) is TyperArgument:
            if param.metavar is None:  # the usage line adds "..." to one taking many
                param.metavar = (param.name or "value").upper()
            # typer builds its own TyperArgument, whose type column has no other hook.
            param.__class__ = _NamedArgument


class HelpfulGroup(TyperGroup):
    """A command group whose `--help`, and its commands', names values as people write them
    (see `_name_values`); the app and every sub-app use it."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)
        _name_values(params, ctx)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            _name_values(cmd.get_params(ctx), ctx)  # its --help option, made now, is kept
        return cmd


app = typer.Typer(
    name="gswarm",
    help="gswarm: model management for GPU clusters (head, agents, registry, operations).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=HelpfulGroup,
)
out = Console()  # results, on stdout
err = Console(stderr=True)  # errors, progress and messages, on stderr

HeadUrl = Annotated[
    str | None,
    typer.Option(
        "--head-url",
        envvar="GSWARM_HEAD_URL",
        metavar="URL",
        help="Head URL [default: http://localhost:8100]",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="GSWARM_TOKEN", metavar="TOKEN", help="API token (found locally if omitted)"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", metavar="DIR", help="Head state dir [default: ~/.local/share/gswarm]"),
]
DetachOpt = Annotated[bool, typer.Option("--detach", "-d", help="Return at once with the op id.")]


Flags = Mapping[str, str]
"""A command's words for what it sends a head: the API's name of a body field or query
parameter (`all_nodes`, `since`, `force`) to the command's flag or argument (`--all-nodes`,
`--since`, `--force`, `MODEL`)."""

_REFUSED_FIELD = re.compile(r"invalid field: (?P<why>.*) - at `\$\.(?P<field>\w+)[^`]*`", re.DOTALL)
_BAD_QUERY = re.compile(r"query parameter (?P<field>\w+)=(?P<rest>.*)", re.DOTALL)


def in_cli_words(exc: GswarmError, flags: Flags) -> str:
    """The head's message with the names of the API (which it must use: curl and the SDK see
    the same message) replaced by the command's own. A refused body field or query parameter
    leads with the flag (`--all-nodes: invalid enum value 'gpu0'`); elsewhere any snake_case
    field, `force=true` and the plain words the error lists as fields (`details["fields"]`:
    in "give model_name and device" `device` is one, in "invalid device" it is not) become the
    command's words."""
    message = exc.message
    if (refused := _REFUSED_FIELD.fullmatch(message)) and refused["field"] in flags:
        why = refused["why"]
        return f"{flags[refused['field']]}: {why[:1].lower()}{why[1:]}"
    if (query := _BAD_QUERY.fullmatch(message)) and query["field"] in flags:
        return f"{flags[query['field']]} {query['rest']}"
    named = {str(name) for name in exc.details.get("fields") or []}
    words = {f"{name}=true": flag for name, flag in flags.items()}
    words.update({name: flag for name, flag in flags.items() if "_" in name or name in named})
    if not words:
        return message
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.sub(rf"(?<![\w.$-])({pattern})(?![\w-])", lambda m: words[m[1]], message)


def table_of(columns: Sequence[str]) -> Table:
    """A listing that fits the terminal: no borders, one line a row; cells never wrap, and the
    last column (an error, a list) is cut with an ellipsis to what the others leave it. Give its
    cells through `cut`."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for name in columns[:-1]:
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    table.add_column(columns[-1], overflow="ellipsis", min_width=min(len(columns[-1]), 8))
    return table


def cut(text: str) -> Text:
    """A cell of a `table_of` table's last column: one line, cut with an ellipsis."""
    return Text(text, no_wrap=True, overflow="ellipsis")


def short_age(ts: float) -> str:
    """How long ago, in a few characters: `5s`, `3m`, `2h`, `4d` (`-` for never)."""
    if not ts:
        return "-"
    d = max(0.0, time.time() - ts)
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= seconds:
            return f"{d // seconds:.0f}{unit}"
    return f"{d:.0f}s"


def fail(message: str, code: int = 1) -> None:
    """Print `error: MESSAGE` on stderr and exit with `code` (it never returns)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
