"""Job commands: `job` runs a job file (shown live), `jobs` lists, shows and cancels jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gswarm.cli.commands import open_client, with_client
from gswarm.cli.common import HeadUrl, HelpfulGroup, JsonOpt, TokenOpt, app, err, fail, out
from gswarm.cli.processes import run
from gswarm.cli.render import ago, follow_job, job_table, print_json
from gswarm.config import Settings
from gswarm.errors import GswarmError, InvalidWorkflow
from gswarm.protocol import Job
from gswarm.words import counted


@app.command()
def job(
    file: Annotated[Path, typer.Argument(help="Job file (YAML or JSON)")],
    check: Annotated[bool, typer.Option("--check", help="Validate only; print every problem.")] = False,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return at once with the job id.")] = False,
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a job file: a DAG of actions, shown live; exits with the job's outcome."""
    from gswarm.workflow import parse

    limit = Settings.from_env().max_job_bytes
    try:
        with file.open("rb") as f:
            raw = f.read(limit + 1)  # a device like /dev/zero never ends: read no more than this
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    if len(raw) > limit:
        fail(f"{file} is over the {limit}-byte limit of a job file")
    text = raw.decode(errors="replace")
    try:
        # Here for messages that name the file and its lines; the head checks the job again.
        spec = parse(text, str(file))
    except GswarmError as exc:
        _print_problems(exc.details.get("errors", []))
        fail(_in_file(exc.message, file))
        return
    if check:
        out.print(f"{file}: ok, {counted(len(spec.actions), 'action')}", highlight=False)
        for a in spec.actions:
            deps = f" after {', '.join(a.depends_on)}" if a.depends_on else ""
            out.print(f"  {a.id}: {a.action} {a.model}{deps}", highlight=False)
        return

    async def main() -> Job:
        async with open_client(head_url, token) as c:
            try:
                submitted: Job = await c.submit_job(text)
            except InvalidWorkflow as exc:  # a head of another version may judge differently
                _print_problems(exc.details.get("errors", []))
                exc.message = _in_file(exc.message, file)
                raise
            if detach:
                return submitted
            return await follow_job(c, submitted, json_out)

    final = run(main())
    if json_out:
        print_json(final)
    elif detach:
        out.print(final.job_id, highlight=False)
    else:
        out.print(
            f"job {final.job_id} {final.state}" + (f": {final.error}" if final.error else ""), highlight=False
        )
    if not detach and final.state != "succeeded":
        raise typer.Exit(1)


def _print_problems(problems: list[dict[str, str]]) -> None:
    """Every problem of a job that does not validate, one a line (the first again in the error)."""
    for problem in problems:
        err.print(f"{problem['action']}: {problem['field']}: {problem['message']}", highlight=False)


def _in_file(message: str, file: Path) -> str:
    """A job file's error naming the file: the head calls it `request body`."""
    if message.startswith("request body"):
        return f"{file}{message.removeprefix('request body')}"
    return message if message.startswith(f"{file}") else f"{file}: {message}"


jobs_app = typer.Typer(
    help="List, show and cancel jobs.", no_args_is_help=False, invoke_without_command=True, cls=HelpfulGroup
)
app.add_typer(jobs_app, name="jobs")


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context, head_url: HeadUrl = None, token: TokenOpt = None, json_out: JsonOpt = False
) -> None:
    """List jobs (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    found: list[Job] = with_client(head_url, token, lambda c: c.list_jobs())
    if json_out:
        print_json(found)
        return
    table = Table("job", "name", "state", "actions", "created", "error")
    for j in found:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(j.counts.items()))
        table.add_row(j.job_id, j.name, j.state, counts, ago(j.created_at), j.error[:60])
    out.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="Job id")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one job: each action's state, ops, timings and error."""
    found: Job = with_client(head_url, token, lambda c: c.get_job(job_id))
    if json_out:
        print_json(found)
    else:
        out.print(job_table(found, {}, out.width))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="Job id")],
    head_url: HeadUrl = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cancel a job: running ops are cancelled, the rest skipped."""
    found: Job = with_client(head_url, token, lambda c: c.cancel_job(job_id))
    if json_out:
        print_json(found)
    else:
        out.print(f"job {job_id} cancelling", highlight=False)
