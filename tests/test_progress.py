"""Progress people trust: totals known before bytes flow, progress that moves as bytes arrive,
labelled figures that fit an 80-column terminal, plain lines without a terminal, and byte
figures in `gsmodel events`.

The formatting is tested as pure functions; then real heads, agents and the suite's Hub
(throttled a little, so an op lasts about a second) show what a user sees."""

from __future__ import annotations

import io
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from gswarm.agent.fetch.ranges import PACE_MIN_BYTES, PACE_START_BYTES, READ_BYTES, ReadPace
from gswarm.cli.progress import (
    Figures,
    PlainJobLines,
    PlainLines,
    amount,
    duration,
    event_progress,
    figures_text,
    job_cells,
    live_lines,
    stale,
    summary,
)
from gswarm.cli.render import follow_job, follow_op, job_table
from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from gswarm.ops import DeleteArgs, DownloadArgs, DownloadResult, Op, ReplicateArgs
from gswarm.protocol import Event, Job, JobAction, OpProgress
from gswarm.words import counted
from gswarm.workflow import parse
from tests.conftest import AgentRunner, Cli, running_hub, wait_for

pytestmark = pytest.mark.timeout(60)

WEIGHTS = 1 << 20
"""The slow repo's weights: a second's worth at the throttled rate."""
RATE = 1 << 20
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ---------------------------------------------------------------- pure formatting


def _op(
    kind: str = "download",  # delete and replicate get args of their own, others a download's
    done: int = 0,
    total: int = 0,
    rate: float = 0.0,
    message: str = "",
    state: str = "running",
    started: float = 1000.0,
    finished: float | None = None,
    result: Any = None,
) -> Op:
    args: Any = (
        DeleteArgs(model_name="m", tier="dram")
        if kind == "delete"
        else ReplicateArgs(model_name="m", targets=["n2:disk"])
        if kind == "replicate"
        else DownloadArgs(model_name="m", source_url="org/m", tier="disk")
    )
    return Op(
        op_id="op1",
        kind=kind,
        node_id="n1",
        args=args,
        state=state,  # type: ignore[arg-type]
        progress=OpProgress(done=done, total=total, rate=rate, message=message),
        started_at=started,
        finished_at=finished,
        result=result,
    )


def test_figures_are_labelled() -> None:
    f = Figures(done=1_200_000_000, total=2_900_000_000, rate=85e6, elapsed=14.2)
    assert figures_text(f) == "41% 1.2/2.9 GB 85.0 MB/s ETA 0:20 elapsed 0:14"
    assert amount(0, 73_400_000) == "0.0/73.4 MB"
    assert amount(5, 999) == "5/999 B"
    assert duration(3723) == "1:02:03" and duration(59.9) == "0:59"
    # Nearly done is not done; done shows no ETA and no rate.
    assert figures_text(Figures(999, 1000, 10.0, 1.0)).startswith("99% ")
    assert figures_text(Figures(1000, 1000, 10.0, 3.0)) == "100% 1.0/1.0 KB elapsed 0:03"


@given(
    done=st.integers(0, 1 << 50),
    total=st.integers(0, 1 << 50),
    rate=st.floats(0, 1e12),
    elapsed=st.floats(0, 1e7),
    width=st.integers(1, 200),
)
def test_figures_never_exceed_the_width(
    done: int, total: int, rate: float, elapsed: float, width: int
) -> None:
    assert len(figures_text(Figures(done, total, rate, elapsed), width)) <= width


@pytest.mark.parametrize("width", [20, 40, 60, 80, 100, 200])
def test_live_lines_fit_the_terminal(width: int) -> None:
    title = "download meta-llama-Llama-2-7b-hf -> worker1:disk"
    op = _op(done=1_200_000_000, total=2_900_000_000, rate=85e6, message="downloading 12 files")
    lines = live_lines(title, op, now=1014.0, width=width)
    assert all(len(line) <= width for line in lines), lines
    if width >= 80:
        assert lines[0] == f"{title}: downloading 12 files"
        assert lines[1].endswith(" 41% 1.2/2.9 GB 85.0 MB/s ETA 0:20 elapsed 0:14") and "█" in lines[1]
    # An op without bytes (rm, stop, serve) shows no bar and no byte count: its phase and elapsed.
    rm = _op(kind="delete", state="running")
    (line,) = live_lines("rm m on n1:dram", rm, now=1001.0, width=width)
    assert len(line) <= width and "█" not in line and "B" not in line.replace("rm m", "")
    if width >= 40:
        assert line.endswith("elapsed 0:01") and "rm m on n1:dram: running" in line


def test_counted_progress_is_not_bytes() -> None:
    op = _op(kind="replicate", done=1, total=3, message="1/3 targets ready")
    assert live_lines("replicate m", op, now=1005.0, width=80)[1].endswith(" 33% 1/3 elapsed 0:05")
    assert event_progress("replicate", op.progress) == "33% 1/3 1/3 targets ready"


def test_plain_lines_say_each_phase_once_then_progress_now_and_then() -> None:
    plain = PlainLines("download m -> n1:disk", every=5.0)
    seen: list[str] = []
    seen += plain.update(_op(message="resolving hf://org/m@main"), now=1000.0)
    seen += plain.update(_op(message="resolving hf://org/m@main"), now=1000.5)
    for t in range(1, 13):
        done = t * 100_000_000
        seen += plain.update(
            _op(done=done, total=1_200_000_000, rate=1e8, message="downloading 2 files"), 1000 + t
        )
    seen += plain.update(_op(done=1_200_000_000, total=1_200_000_000, message="verifying"), 1013.0)
    end = _op(
        done=1_200_000_000,
        total=1_200_000_000,
        state="succeeded",
        finished=1015.0,
        result=DownloadResult(model="m", tier="disk", size=1_200_000_000),
    )
    seen += plain.update(end, 1015.0) + plain.finish(end)
    assert seen == [
        "download m -> n1:disk: resolving hf://org/m@main",
        "download m -> n1:disk: downloading 2 files (1.2 GB)",
        "download m -> n1:disk: 50% 0.6/1.2 GB 100.0 MB/s ETA 0:06 elapsed 0:06",
        "download m -> n1:disk: 91% 1.1/1.2 GB 100.0 MB/s ETA 0:01 elapsed 0:11",
        "download m -> n1:disk: verifying",
        "download m -> n1:disk: succeeded, 1.2 GB in 0:15 (80.0 MB/s mean)",
    ]
    rm = _op(kind="delete", state="succeeded", finished=1002.0)
    assert summary("rm m on n1:dram", rm) == "rm m on n1:dram: succeeded in 0:02"


def test_plain_job_lines() -> None:
    plain = PlainJobLines(every=5.0)
    lines = plain.action("dl", "download m", "running")
    lines += plain.action("dl", "download m", "running")
    lines += plain.op("dl", _op(done=1, total=4_000_000, rate=1e6, message="downloading 1 file"), 1001.0)
    lines += plain.op(
        "dl", _op(done=2_000_000, total=4_000_000, rate=1e6, message="downloading 1 file"), 1003.0
    )
    lines += plain.op(
        "dl", _op(done=3_000_000, total=4_000_000, rate=1e6, message="downloading 1 file"), 1006.0
    )
    lines += plain.action("dl", "download m", "succeeded")
    assert lines == [
        "dl (download m): running",
        "dl: downloading 1 file",
        "dl: 75% 3.0/4.0 MB 1.0 MB/s ETA 0:01 elapsed 0:06",
        "dl (download m): succeeded",
    ]


def test_job_table_fits_80_columns() -> None:
    spec = parse(
        "name: wide\nactions:\n"
        "  - {id: fetch-the-weights-of-llama, action: download, model: meta-llama-Llama-2-7b-hf,"
        " source: org/m, target: worker1:disk}\n"
        "  - {id: serve-it, action: serve, model: meta-llama-Llama-2-7b-hf, device: worker1:gpu0,"
        " port: 8080}\n"
        "  - {id: gone, action: delete, model: other, device: worker1:dram}\n",
        "job.yaml",
    )
    actions = [
        JobAction(job_id="j1", id=a.id, index=i, action=a.action, spec=a.fields, op_ids=[f"op{i}"])
        for i, a in enumerate(spec.actions)
    ]
    actions[0].state, actions[0].started_at = "running", 1000.0
    actions[1].state, actions[1].started_at = "running", 1010.0
    actions[2].state, actions[2].started_at, actions[2].finished_at = "failed", 1000.0, 1001.0
    actions[2].error = "worker1 is offline: the copy stays listed until it comes back " * 2
    job = Job(job_id="j1", name="wide", state="running", actions=actions)
    ops = {
        "op0": _op(done=1_200_000_000, total=2_900_000_000, rate=85e6, message="downloading 12 files"),
        "op1": _op(kind="serve", message="starting builtin on port 8080 from dram", started=1010.0),
    }
    widths, rows = job_cells(job, ops, now=1014.0, width=80)
    assert sum(widths) + 2 * (len(widths) - 1) <= 80
    assert all(len(cell) <= w for row in rows for cell, w in zip(row, widths, strict=True))
    assert rows[0][3] == "41% 1.2/2.9 GB 85.0 MB/s ETA 0:20"  # the figures that fit, whole
    assert rows[1][3].endswith(" elapsed 0:04") and rows[1][3].startswith("starting")
    assert rows[2][3] == "in 0:01" and rows[2][4].endswith("…")
    text = Console(file=io.StringIO(), width=80, record=True)
    text.print(job_table(job, ops, 80, now=1014.0))
    assert all(len(line) <= 80 for line in text.export_text().splitlines())


def test_an_older_state_that_comes_late_is_passed_over() -> None:
    resolving = _op(message="resolving hf://org/m@main")
    assert stale(resolving, _op(message=""))  # the op.running event, read after the op itself
    assert stale(
        _op(done=5, total=9, message="downloading 1 file"), _op(done=4, total=9, message="downloading 1 file")
    )
    assert stale(_op(state="succeeded"), _op(done=9, total=9, message="verifying"))
    assert not stale(resolving, _op(total=9, message="downloading 1 file"))
    assert not stale(None, resolving)


def test_counts_in_words() -> None:
    assert counted(1, "file") == "1 file" and counted(4, "file") == "4 files"
    assert counted(1, "copy", "copies") == "1 copy" and counted(0, "copy", "copies") == "0 copies"


def test_reads_shrink_for_a_slow_source_and_grow_for_a_fast_one() -> None:
    pace = ReadPace()
    assert pace.step == PACE_START_BYTES
    for _ in range(20):
        pace.took(pace.step, 0.001)
    assert pace.step == READ_BYTES  # a fast source: the largest reads
    for _ in range(20):
        pace.took(pace.step, 1.0)
    assert pace.step == PACE_MIN_BYTES  # a slow one: small reads, so progress moves


# ---------------------------------------------------------------- real head, agent and Hub


@pytest.fixture
async def slow_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """The suite's Hub serving `org/slow` (a config and 1 MiB of weights) at 1 MiB/s."""
    repo = tmp_path / "slow-repo"
    repo.mkdir()
    (repo / "config.json").write_text('{"model_type": "tiny"}')
    (repo / "model.safetensors").write_bytes(os.urandom(WEIGHTS))
    async with running_hub({"org/slow": repo}, monkeypatch) as server:
        server.rate_limit = RATE
        yield server


def _progress(events: list[Event], op_id: str) -> list[OpProgress]:
    return [OpProgress(**e.data["progress"]) for e in events if e.kind == "op.progress" and e.key == op_id]


async def test_totals_are_known_before_bytes_flow(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, slow_hub: Any
) -> None:
    await agents.start(head, "n1")
    size = WEIGHTS + len('{"model_type": "tiny"}')
    url = f"{slow_hub.url}/org/slow/resolve/main/model.safetensors"  # a plain URL: Content-Length
    for model, source, want in (("viaurl", url, WEIGHTS), ("viahub", "org/slow", size)):
        op = await client.download(model, source, "n1:disk")
        final = await client.wait_op(op.op_id, timeout=30)
        assert final.state == "succeeded", final.error
        reports = _progress(await client.list_events(0, ["op"], limit=10_000), op.op_id)
        moving = [p for p in reports if p.message.startswith("downloading")]
        assert moving and moving[0].done == 0 and moving[0].total == want, reports
        assert all(p.total == want for p in reports if p.done), reports
    slow_hub.rate_limit = None
    op = await client.copy("viahub", "n1:disk", "n1:dram")
    assert (await client.wait_op(op.op_id, timeout=30)).state == "succeeded"
    reports = _progress(await client.list_events(0, ["op"], limit=10_000), op.op_id)
    assert reports and all(p.total == size for p in reports), reports


async def test_progress_moves_as_bytes_arrive(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, slow_hub: Any
) -> None:
    await agents.start(head, "n1")
    op = await client.download("slow", "org/slow", "n1:disk")
    final = await client.wait_op(op.op_id, timeout=30)
    assert final.state == "succeeded", final.error
    reports = _progress(await client.list_events(0, ["op"], limit=10_000), op.op_id)
    between = sorted({p.done for p in reports if 0 < p.done < p.total})
    # A second of bytes, reported a few times a second as they come (not in one 4 MiB read).
    assert len(between) >= 3, [(p.done, p.message) for p in reports]


def _frames(stream: io.StringIO) -> list[str]:
    """What a terminal showed: every line of every frame, escape codes left out."""
    return [line for line in re.split(r"[\r\n]", ANSI.sub("", stream.getvalue())) if line.strip()]


async def test_terminal_shows_labelled_figures_within_80_columns(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, slow_hub: Any
) -> None:
    await agents.start(head, "n1")
    stream = io.StringIO()
    term = Console(file=stream, width=80, force_terminal=True, color_system=None)
    title = "download a-rather-long-model-name-for-a-terminal -> n1:disk"
    op = await client.download("a-rather-long-model-name-for-a-terminal", "org/slow", "n1:disk")
    final = await follow_op(client, op, False, False, title, console=term)
    assert final.state == "succeeded", final.error
    frames = _frames(stream)
    assert frames and all(len(line) <= 80 for line in frames), [ln for ln in frames if len(ln) > 80]
    figures = [
        ln for ln in frames if re.search(r"\d+% [\d.]+/[\d.]+ MB .*ETA \d+:\d\d elapsed \d+:\d\d$", ln)
    ]
    assert figures, frames
    assert "?" not in "".join(frames)
    assert frames[-2] == f"{title}:", frames  # the summary, on two lines as one is too long
    assert re.fullmatch(r"succeeded, 1\.0 MB in 0:0\d \([\d.]+ [KM]B/s mean\)", frames[-1]), frames

    # An op without bytes: a spinner, its phase and elapsed; no bar, no byte count.
    stream.seek(0)
    stream.truncate()
    op = await client.delete_location("a-rather-long-model-name-for-a-terminal", "n1:disk")
    final = await follow_op(client, op, False, False, "rm m on n1:disk", console=term)
    assert final.state == "succeeded"
    frames = _frames(stream)
    assert frames[-1].startswith("rm m on n1:disk: succeeded in 0:0"), frames
    assert not any("█" in ln or "bytes" in ln or "/?" in ln for ln in frames), frames


async def test_without_a_terminal_lines_not_bars(
    head: HeadServer, agents: AgentRunner, cli: Cli, slow_hub: Any
) -> None:
    await agents.start(head, "n1")
    env = {"GSWARM_TOKEN": head.head.tokens.api_token, "GSWARM_PROGRESS_EVERY": "0.3", "COLUMNS": "80"}
    r = await cli.ainvoke("download", "slow", "org/slow", "n1:disk", "--head-url", head.url, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    title = "download slow -> n1:disk"
    progress = [ln for ln in lines if re.fullmatch(rf"{title}: \d+% [\d.]+/1\.0 MB .*elapsed 0:0\d", ln)]
    took = re.fullmatch(rf"{title}: succeeded, 1\.0 MB in 0:0(\d) \([\d.]+ [KM]B/s mean\)", lines[-1])
    assert took, lines
    assert 1 <= len(progress) <= (int(took[1]) + 1) / 0.3 + 1, lines  # at most one every 0.3 s
    phases = [ln.removeprefix(f"{title}: ") for ln in lines[:-1] if ln not in progress]
    # Each phase once, in order (a phase over before the command followed the op is not seen).
    assert phases in (
        ["resolving hf://org/slow@main", "downloading 2 files (1.0 MB)", "verifying"],
        ["downloading 2 files (1.0 MB)", "verifying"],
    ), lines
    assert "█" not in r.stderr and "?" not in r.stderr
    assert r.stdout == f"{title}: done (1.0 MB)\n"

    r = await cli.ainvoke("rm", "slow", "n1:disk", "--head-url", head.url, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1].startswith("rm slow on n1:disk: succeeded in 0:0"), r.stderr
    assert "bytes" not in r.stderr and "?" not in r.stderr

    r = await cli.ainvoke("events", "--no-follow", "--topic", "op", "--head-url", head.url, env=env)
    shown = [ln for ln in r.stdout.splitlines() if " op.progress " in ln]
    assert any(
        re.search(r" running \d+% [\d.]+/1\.0 MB( [\d.]+ [KM]B/s)?( ETA \d+:\d\d)? downloading 2 files$", ln)
        for ln in shown
    )


async def test_a_job_shows_its_actions_in_lines_and_in_80_columns(
    head: HeadServer, agents: AgentRunner, cli: Cli, client: GswarmClient, slow_hub: Any, tmp_path: Path
) -> None:
    await agents.start(head, "n1")
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: progress\nactions:\n"
        "  - {id: fetch-the-weights, action: download, model: slow, source: org/slow, target: n1:disk}\n"
        "  - {id: to-dram, action: copy, model: slow, from: n1:disk, to: n1:dram}\n"
    )
    env = {"GSWARM_TOKEN": head.head.tokens.api_token, "GSWARM_PROGRESS_EVERY": "0.3"}
    r = await cli.ainvoke("job", str(job), "--head-url", head.url, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    job_id = r.stdout.split()[1]
    assert f"job {job_id}: fetch-the-weights (download slow): running" in lines
    assert f"job {job_id}: fetch-the-weights: downloading 2 files" in lines
    assert any(
        re.fullmatch(rf"job {job_id}: fetch-the-weights: \d+% .*/1\.0 MB .*elapsed 0:0\d", ln) for ln in lines
    )
    assert f"job {job_id}: to-dram (copy slow): succeeded" in lines
    assert len(lines) == len(set(lines)), lines  # nothing said twice
    assert "█" not in r.stderr

    # On a terminal of 80 columns: the table, nothing past the edge.
    await client.delete_location("slow", "n1:dram", wait=True)
    await client.delete_location("slow", "n1:disk", wait=True)
    stream = io.StringIO()
    term = Console(file=stream, width=80, force_terminal=True, color_system=None)
    submitted = await client.submit_job(job.read_text())
    final = await follow_job(client, submitted, False, console=term)
    assert final.state == "succeeded"
    frames = _frames(stream)
    assert all(len(line) <= 80 for line in frames), [ln for ln in frames if len(ln) > 80]
    assert any(re.search(r"\d+% [\d.]+/1\.0 MB", ln) for ln in frames), frames
    # `jobs show`: the same table, the bytes each action moved.
    shown = Console(file=io.StringIO(), width=80, record=True)
    ops = {op_id: await client.get_op(op_id) for a in final.actions for op_id in a.op_ids}
    shown.print(job_table(final, ops, 80))
    text = shown.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()) and "1.0 MB" in text, text
    await wait_for(lambda: not agents.agents["n1"].executor.running)
