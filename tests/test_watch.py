"""`gswarm watch`: the cluster live in a terminal. Its frame is built from a view of a real head
and agent kept current by the event socket; printed without a terminal; full screen on a real
terminal (a pty), where `q` quits and the terminal gets its settings back."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import struct
import sys
import termios
import time
from typing import Any

from rich.cells import cell_len
from rich.console import Console

from gswarm.cli.watch import ClusterView, follow, frame, load_view
from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from gswarm.ops import CopyArgs, DownloadArgs, Op, ReplicateArgs, ServeArgs
from gswarm.protocol import Event, GpuInfo, Inventory, Node, OpProgress, Service, TierInfo
from tests.conftest import AgentRunner, Cli, wait_for

GB = 10**9


def render(view: ClusterView, width: int, height: int | None = None) -> list[str]:
    """The frame's lines as a terminal `width` columns wide (and `height` rows tall) shows them."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    options = console.options.update(height=height) if height else console.options
    lines = console.render_lines(frame(view, time.time()), options, pad=False)
    return ["".join(seg.text for seg in line).rstrip() for line in lines]


async def test_a_running_download_shows_in_the_frame_with_its_percent(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any
) -> None:
    await agents.start(head, "a", simulate_gpus="1:16G")
    view = await load_view(client)
    links: list[str] = []
    follower = asyncio.create_task(follow(client, view, lambda: links.append(view.link)))
    try:
        await wait_for(lambda: view.link == "live")
        # Dropped by the head, the view is loaded again and followed from there.
        head.head.bus.close_all("test: subscribers dropped")
        hub.rate_limit = 8 * 1024 * 1024  # the 70 MiB file takes about 9 s: still running when looked at
        op = await client.download("tiny", "org/tiny", "a:disk")
        await wait_for(lambda: "reconnecting" in links and view.link == "live")
        progress = await wait_for(
            lambda: (
                (o := view.ops.get(op.op_id)) and o.progress.done * 20 > o.progress.total > 0 and o.progress
            )
        )
        lines = render(view, 80)  # of the view as it is now: no await since `progress` was read
        text = "\n".join(lines)
        assert "1/1 nodes online · 1 op running · 0 services" in text, text
        node = next(line for line in lines if line.startswith("a "))
        assert "online" in node and re.search(r"gpu0 \d+\.\d/17\.2 GB", node), node
        row = next(line for line in lines if line.startswith("download"))
        percent = re.search(r"\b(\d+)% ([\d.]+)/73\.4 MB\b", row)
        assert percent is not None, row
        assert "tiny" in row and "→ a:disk" in row
        assert int(percent.group(1)) == progress.done * 100 // progress.total
        assert float(percent.group(2)) == round(progress.done / 1e6, 1)

        # Cancelled, it leaves the running ops and shows in the event tail.
        await client.cancel_op(op.op_id)
        await wait_for(lambda: op.op_id not in view.ops)
        text = "\n".join(render(view, 80))
        assert "no operations running" in text
        assert re.search(r"op\.cancelled +download tiny → a:disk", text), text
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


def _busy_view() -> ClusterView:
    """A view with long names, many GPUs, ops with and without bytes, and many events."""
    now = time.time()
    long = "worker-with-a-name-far-too-long-for-any-column-at-all"
    view = ClusterView("https://127.0.0.1:8100/behind/a/proxy/with/a/long/path", last_seq=500, link="live")
    tiers = [TierInfo("disk", "/d", 4000 * GB, 1234 * GB), TierInfo("dram", "/m", 512 * GB, 300 * GB)]
    gpus = [GpuInfo(i, "H200", f"u{i}", 141 * GB, 100 * GB) for i in range(8)]
    view.nodes = {
        "a": Node("a", "online", inventory=Inventory(tiers=tiers, gpus=gpus[:1])),
        long: Node(long, "offline", inventory=Inventory(tiers=tiers, gpus=gpus)),
    }
    model = "meta-llama/Llama-3.1-405B-Instruct-with-a-long-suffix"
    view.ops = {
        "1": Op(
            "1",
            "download",
            long,
            DownloadArgs(model_name=model, source_url="hf://x", tier="disk"),
            state="running",
            progress=OpProgress(done=123 * GB, total=810 * GB, rate=1.25 * GB),
            started_at=now - 100,
        ),
        "2": Op(
            "2",
            "serve",
            "a",
            ServeArgs(model_name=model, device="a:gpu0", port=8080),
            state="running",
            progress=OpProgress(message="waiting for the server to answer its health check " * 3),
            started_at=now - 12,
        ),
        "3": Op("3", "copy", "a", CopyArgs(model_name=model, source_tier="disk", target_tier="dram")),
        "4": Op(
            "4",
            "replicate",
            "@head",
            ReplicateArgs(model_name=model, targets=[f"{long}:dram", "a:dram", "b:disk"]),
            state="running",
            started_at=now - 5,
        ),
    }
    view.services = {
        f"{model}@a:gpu0": Service(
            f"{model}@a:gpu0", model, "a:gpu0", "builtin", 8080, url=f"http://{long}:8080", state="ready"
        )
    }
    for seq in range(1, 101):
        view.events.append(Event(seq=seq, ts=now, kind="location.updated", key=f"{model}@{long}:disk"))
    return view


def test_the_frame_fits_80_columns_and_fills_the_screen() -> None:
    view = _busy_view()
    wide, narrow = render(view, 400), render(view, 80)
    assert max(cell_len(line) for line in narrow) <= 80
    assert len(narrow) == len(wide)  # cut with an ellipsis, never wrapped onto a second line
    assert "…" in "\n".join(narrow)
    download = next(line for line in narrow if line.startswith("download"))
    assert re.search(r" 15% 123\.0/810\.0 GB +1\.2 GB/s +ETA 9m09s$", download), download
    serve = next(line for line in narrow if line.startswith("serve"))
    assert "waiting for the server" in serve and serve.endswith("for 12s")
    assert any(line.startswith("copy") and "queued" in line for line in narrow)
    assert any(re.search(r"^worker-with-a-name.*… offline +8× 0\.3/1\.1 TB", line) for line in narrow)
    # A printed snapshot shows the last few events; a screen is filled with as many as fit.
    assert sum("location.updated" in line for line in narrow) == 8
    for height in (24, 30, 60):
        lines = render(view, 80, height)
        assert len(lines) == height, (height, lines)
        assert max(cell_len(line) for line in lines) <= 80
    assert sum("location.updated" in line for line in render(view, 80, 60)) > 8 + 30
    short = render(view, 80, 16)  # too short for every op: the ones left out are counted
    assert len(short) == 16 and any(re.fullmatch(r"… \d+ more", line) for line in short), short


async def test_watch_without_a_terminal_prints_one_snapshot(
    head: HeadServer, agents: AgentRunner, cli: Cli
) -> None:
    await agents.start(head, "w1")
    r = await cli.ainvoke("watch", "--head-url", head.url, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"gswarm {head.url}")
    assert "1/1 nodes online · 0 ops running · 0 services" in lines[1]
    assert any(line.startswith("w1 ") and "online" in line for line in lines), r.stdout
    assert "no operations running" in r.stdout and "node.registered" in r.stdout
    assert max(cell_len(line) for line in lines) <= 80


async def test_watch_on_a_terminal_is_full_screen_and_q_quits(
    head: HeadServer, agents: AgentRunner, cli: Cli
) -> None:
    import fcntl

    await agents.start(head, "w1")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {k: v for k, v in cli.env.items() if k not in ("COLUMNS", "LINES")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gswarm", "watch", "--head-url", head.url,
        stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm-256color"},
    )  # fmt: skip
    os.close(slave)
    seen = bytearray()

    async def read() -> None:
        while True:
            try:
                data = await asyncio.to_thread(os.read, master, 65536)
            except OSError:  # the terminal's last user has gone
                return
            if not data:
                return
            seen.extend(data)

    reader = asyncio.create_task(read())
    try:
        await wait_for(lambda: b"live" in seen and b"1/1 nodes online" in seen, timeout=20)
        assert b"\x1b[?1049h" in seen  # the alternate screen: what was there before comes back after
        during = termios.tcgetattr(master)[3]
        assert not during & termios.ECHO and not during & termios.ICANON  # keys read as typed
        os.write(master, b"q")
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await asyncio.wait_for(reader, 10)
        assert b"\x1b[?1049l" in seen and b"Traceback" not in seen, bytes(seen[-2000:])
        after = termios.tcgetattr(master)[3]
        assert after & termios.ECHO and after & termios.ICANON
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        with contextlib.suppress(OSError):
            os.close(master)
        await asyncio.gather(reader, return_exceptions=True)
