"""`watch`: the cluster live in a terminal, full screen: nodes, running ops with their progress,
services and the latest events, redrawn as the head's events arrive.

What is shown is a `ClusterView`, a typed snapshot loaded over REST and then kept current by
folding `/ws/events` into it; after a lost connection it is loaded again and followed from
there. `frame` turns a view into a rich renderable and does nothing else (no I/O, no clock), so
what a terminal shows can be checked without one. It lays itself out for the width it is given
(80 columns and up keep every row on one line, long names cut with an ellipsis) and, on a
screen, for its height: rows the screen has no room for are counted (`… 3 more`), and a taller
screen shows more of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from gswarm.cli.commands import open_client
from gswarm.cli.common import HeadUrl, TokenOpt, app, out
from gswarm.cli.processes import run
from gswarm.cli.progress import amount, human_size
from gswarm.ops import (
    CopyArgs,
    DeleteArgs,
    DownloadArgs,
    FetchArgs,
    HealthCheckArgs,
    LoadArgs,
    LogsArgs,
    Op,
    ReplicateArgs,
    ServeArgs,
    StopArgs,
)
from gswarm.protocol import Event, Node, Notice, Service

if TYPE_CHECKING:
    from rich.console import JustifyMethod

    from gswarm.client import GswarmClient

EVENT_TAIL = 200
"""Events a view keeps (a tall screen shows as many as fit)."""
EVENTS_SHOWN = 8
"""Events a frame shows when it has no height to fill (one printed snapshot)."""
EVENTS_FIRST = 2
"""Events a screen shows before the other sections have room for all their rows."""
FRAME_INTERVAL = 0.25
"""At least this long between two redraws (at most four a second, however busy the cluster)."""
TICK = 1.0
"""Redraw at least this often: the clock, ETAs and elapsed times move without events."""
RECONNECT_MIN, RECONNECT_MAX = 0.25, 5.0

Link = Literal["snapshot", "connecting", "live", "reconnecting"]


@dataclass
class ClusterView:
    """What `watch` shows: the head's nodes, its open (queued or running) ops, its services,
    the tail of its events (progress ticks left out), up to event `last_seq`."""

    head_url: str
    nodes: dict[str, Node] = field(default_factory=dict)
    ops: dict[str, Op] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=EVENT_TAIL))
    last_seq: int = 0
    link: Link = "snapshot"

    def apply(self, ev: Event) -> None:
        """Fold one event in (one already folded in, replayed around a reconnect, is skipped)."""
        if ev.seq <= self.last_seq:
            return
        self.last_seq = ev.seq
        topic, _, what = ev.kind.partition(".")
        try:
            if topic == "node":
                if what == "deleted":
                    self.nodes.pop(ev.key, None)
                else:
                    self.nodes[ev.key] = msgspec.convert(ev.data, Node)
            elif topic == "op":
                op = msgspec.convert(ev.data, Op)
                if op.terminal:
                    self.ops.pop(op.op_id, None)
                else:
                    self.ops[op.op_id] = op
            elif topic == "service":
                if what == "deleted":
                    self.services.pop(ev.key, None)
                else:
                    self.services[ev.key] = msgspec.convert(ev.data, Service)
        except msgspec.ValidationError:
            pass  # an entity this CLI cannot read (a newer head): the rest of the view still holds
        if ev.kind != "op.progress":
            self.events.append(ev)

    def replace(self, fresh: ClusterView) -> None:
        """Take everything from a freshly loaded view, except how the link stands."""
        self.nodes, self.ops, self.services = fresh.nodes, fresh.ops, fresh.services
        self.events, self.last_seq = fresh.events, fresh.last_seq


async def load_view(c: GswarmClient) -> ClusterView:
    """The cluster as the head's REST routes show it now, with the event seq read before them
    (following the events from there misses nothing)."""
    info = await c.info()
    since = int(info.get("last_seq", 0))
    nodes, running, queued, services, events = await asyncio.gather(
        c.list_nodes(),
        c.list_ops(state="running", limit="1000"),
        c.list_ops(state="queued", limit="1000"),
        c.list_services(),
        c.list_events(max(0, since - 2 * EVENT_TAIL), limit=2 * EVENT_TAIL),
    )
    view = ClusterView(c.head_url, last_seq=since)
    view.nodes = {n.node_id: n for n in nodes}
    view.ops = {o.op_id: o for o in [*running, *queued] if not o.terminal}
    view.services = {s.service_id: s for s in services}
    view.events.extend(e for e in events if e.seq <= since and e.kind != "op.progress")
    return view


async def follow(c: GswarmClient, view: ClusterView, changed: Callable[[], None]) -> None:
    """Keep `view` current from the event socket until cancelled, calling `changed` after each
    change. A lost connection is retried with backoff; the view is then loaded again and
    followed from its seq. A head refusing the token ends it (its error raised)."""
    import aiohttp

    from gswarm.client import HeadUnreachable

    delay = RECONNECT_MIN
    while True:
        try:
            async with contextlib.aclosing(c.events(since=view.last_seq)) as stream:
                async for msg in stream:
                    if isinstance(msg, Notice):
                        if msg.code == "live":
                            if msg.last_seq < view.last_seq:
                                break  # the head's event log started afresh: load the view again
                            view.link, delay = "live", RECONNECT_MIN
                    else:
                        view.apply(msg)
                    changed()
        except (HeadUnreachable, aiohttp.ClientError, ConnectionError, TimeoutError):
            pass
        view.link = "reconnecting"
        changed()
        await asyncio.sleep(delay)
        delay = min(2 * delay, RECONNECT_MAX)
        try:
            view.replace(await load_view(c))
        except HeadUnreachable:
            continue
        changed()


# ---------------------------------------------------------------- the frame (no I/O)


def frame(view: ClusterView, now: float) -> RenderableType:
    """The view as one screen at time `now`: a header, then nodes, open ops, services and
    events. It fits the width it is rendered at; given a height (on a screen), it fills it."""
    return _Frame(view, now)


@dataclass(frozen=True)
class _Col:
    header: str
    flex: bool = False  # gives up width first (cut with an ellipsis) when the row is too wide
    justify: JustifyMethod = "left"
    min_width: int = 6


@dataclass
class _Section:
    title: Text
    cols: list[_Col]
    rows: list[list[Text]]
    empty: str
    count_left_out: bool = True  # `… 3 more` on its last line when not every row fits

    def render(self, width: int, room: int | None) -> list[RenderableType]:
        """Its title rule, then its table (or the word that it is empty) with at most `room`
        rows, the last of them counting what did not fit."""
        parts: list[RenderableType] = [Rule(self.title, align="left", style="bright_black")]
        if not self.rows:
            parts.append(Text(self.empty, style="dim", no_wrap=True, overflow="ellipsis"))
            return parts
        rows = self.rows
        more = 0
        if room is not None and len(rows) > room:
            shown = max(0, room - 1) if self.count_left_out else room
            rows, more = rows[:shown], len(rows) - shown
        parts.append(_table(self.cols, rows, width))
        if more and self.count_left_out:
            parts.append(Text(f"… {more} more", style="dim"))
        return parts


class _Frame:
    def __init__(self, view: ClusterView, now: float) -> None:
        self.view = view
        self.now = now

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width, height = options.max_width, options.height
        view, now = self.view, self.now
        sections = [
            _nodes_section(view),
            _ops_section(view, now),
            _services_section(view),
            _events_section(view, EVENTS_SHOWN if height is None else height),
        ]
        rooms: list[int | None] = [None] * len(sections)
        if height is not None:
            header_lines, per_section = 2, 2  # a rule, and a table's header or the word 'none'
            room = height - header_lines - per_section * len(sections)
            rooms = list(_share(max(0, room), [len(s.rows) for s in sections], EVENTS_FIRST))
        parts: list[RenderableType] = [_header(view, now, width)]
        for section, section_room in zip(sections, rooms, strict=True):
            parts.extend(section.render(width, section_room))
        yield Group(*parts)


def _share(room: int, wants: Sequence[int], last_first: int) -> list[int]:
    """`room` rows split among sections wanting `wants` rows: none gets more than it wants, what
    one leaves goes to the others in equal parts, and the last (the event tail, which never
    ends) asks for only `last_first` rows until the others have theirs."""
    first = [*wants[:-1], min(wants[-1], last_first)]
    got = [0] * len(wants)
    left = room
    order = sorted(range(len(first)), key=lambda i: first[i])
    for k, i in enumerate(order):
        got[i] = min(first[i], left // (len(order) - k))
        left -= got[i]
    got[-1] += min(left, wants[-1] - got[-1])
    return got


def _table(cols: list[_Col], rows: list[list[Text]], width: int) -> Table:
    """A borderless table whose rows each take one line at `width`: columns get the width of
    their longest cell, then flexible ones give up width, widest first, until the row fits."""
    widths = [max([Text(c.header).cell_len, *(row[i].cell_len for row in rows)]) for i, c in enumerate(cols)]
    excess = sum(widths) + len(cols) - 1 - width
    while excess > 0:
        shrinkable = [i for i, c in enumerate(cols) if c.flex and widths[i] > c.min_width]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    table = Table(
        box=None, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False, header_style="bold bright_black"
    )
    for c, w in zip(cols, widths, strict=True):
        table.add_column(c.header, width=w, no_wrap=True, overflow="ellipsis", justify=c.justify)
    for row in rows:
        table.add_row(*row)
    return table


def _header(view: ClusterView, now: float, width: int) -> RenderableType:
    online = sum(1 for n in view.nodes.values() if n.status == "online")
    running = sum(1 for o in view.ops.values() if o.state == "running")
    queued = len(view.ops) - running
    ready = sum(1 for s in view.services.values() if s.state == "ready")
    link = {
        "snapshot": Text(""),
        "connecting": Text(" connecting…", style="yellow"),
        "live": Text(" ● live", style="green"),
        "reconnecting": Text(" reconnecting…", style="bold yellow"),
    }[view.link]
    clock = Text(time.strftime("%H:%M:%S", time.localtime(now))) + link
    top = Table.grid(expand=True)
    top.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
    top.add_column(no_wrap=True, justify="right", width=clock.cell_len)
    top.add_row(Text.assemble(("gswarm ", "bold"), (view.head_url, "cyan")), clock)
    counts = [
        f"{online}/{len(view.nodes)} nodes online",
        f"{running} {_plural(running, 'op')} running" + (f", {queued} queued" if queued else ""),
        f"{len(view.services)} {_plural(len(view.services), 'service')}"
        + (f" ({ready} ready)" if view.services else ""),
        f"event {view.last_seq}",
    ]
    return Group(top, Text(" · ".join(counts), no_wrap=True, overflow="ellipsis", style="bold"))


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


_STATUS_STYLE = {
    "online": "green",
    "offline": "red",
    "ready": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "stopping": "yellow",
    "unhealthy": "red",
    "failed": "red",
    "stopped": "bright_black",
}


def _nodes_section(view: ClusterView) -> _Section:
    rows = []
    for node in sorted(view.nodes.values(), key=lambda n: n.node_id):
        inv = node.inventory
        rows.append(
            [
                Text(node.node_id, style="bold"),
                Text(node.status, style=_STATUS_STYLE.get(node.status, "")),
                Text(_gpus(node)),
                Text("  ".join(f"{t.name} {human_size(t.free)}" for t in inv.tiers) or "-"),
            ]
        )
    cols = [
        _Col("node", flex=True, min_width=8),
        _Col("status"),
        _Col("GPUs used/total", flex=True, min_width=12),
        _Col("free", flex=True, min_width=10),
    ]
    online = sum(1 for n in view.nodes.values() if n.status == "online")
    title = Text.assemble(("nodes", "bold"), f" {online}/{len(view.nodes)} online")
    return _Section(title, cols, rows, "no nodes yet: start an agent with 'gswarm client HEAD_URL'")


def _gpus(node: Node) -> str:
    """Each GPU's memory in use of its total (two at most; more are summed up)."""
    gpus = node.inventory.gpus
    if not gpus:
        return "-"
    if len(gpus) > 2:
        used = sum(g.memory_total - g.memory_free for g in gpus)
        return f"{len(gpus)}× {amount(used, sum(g.memory_total for g in gpus))}"
    return "  ".join(f"gpu{g.index} {amount(g.memory_total - g.memory_free, g.memory_total)}" for g in gpus)


def _duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h10m`."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _op_kind(op: Op) -> str:
    """The op's kind, or `move` for a copy, fetch or load that removes its source."""
    args = op.args
    if isinstance(args, CopyArgs | FetchArgs | LoadArgs) and args.remove_source:
        return "move"
    return op.kind


def _op_model(op: Op) -> str:
    """The model an op is about (or the service, for a stop, a health check or logs)."""
    args = op.args
    match args:
        case DownloadArgs() | FetchArgs() | CopyArgs() | DeleteArgs() | LoadArgs() | ServeArgs():
            return args.model_name
        case ReplicateArgs():
            return args.model_name
        case StopArgs() | LogsArgs() | HealthCheckArgs():
            return args.service_id
        case _:
            return ""


def _op_where(op: Op) -> str:
    """Where an op works: the copy it writes (from where), the device it serves on."""
    n, args = op.node_id, op.args
    match args:
        case DownloadArgs():
            return f"→ {n}:{args.tier}"
        case FetchArgs():
            source = args.source_device or (
                f"{args.peers[0].node_id}:{args.peers[0].tier}" if args.peers else "peer"
            )
            return f"{source} → {n}:{args.tier}"
        case CopyArgs():
            return f"{n}:{args.source_tier} → {n}:{args.target_tier}"
        case LoadArgs():
            return (f"{n}:{args.source_tier} " if args.source_tier else "") + f"→ {n}:gpu{args.gpu}"
        case DeleteArgs():
            return f"{n}:{args.tier}"
        case ServeArgs():
            return f"{args.device} :{args.port}"
        case ReplicateArgs():
            return "→ " + ", ".join(args.targets)
        case _:
            return n


BAR_WIDTH = 10


def _bar(fraction: float) -> Text:
    filled = round(max(0.0, min(1.0, fraction)) * BAR_WIDTH)
    return Text.assemble(("━" * filled, "green"), ("━" * (BAR_WIDTH - filled), "bright_black"))


def _ops_section(view: ClusterView, now: float) -> _Section:
    rows = []
    bars = BAR_WIDTH + 5  # the width of the widest bar with its bytes: messages give way, bars don't
    for op in sorted(view.ops.values(), key=lambda o: (o.state != "running", o.created_at)):
        p = op.progress
        rate = eta = ""
        if op.state == "queued":
            progress = Text("queued", style="yellow")
        elif p.total > 0:
            fraction = min(1.0, p.done / p.total)
            progress = _bar(fraction) + f" {int(fraction * 100):3d}% {amount(p.done, p.total)}"
            bars = max(bars, progress.cell_len)
            if p.rate > 0:
                rate = f"{human_size(p.rate)}/s"
                if p.total > p.done:
                    eta = f"ETA {_duration((p.total - p.done) / p.rate)}"
        else:
            progress = Text(p.message or op.state)
        if not eta and op.started_at:
            eta = f"for {_duration(now - op.started_at)}"
        rows.append(
            [
                Text(_op_kind(op)),
                Text(_op_model(op), style="bold"),
                Text(_op_where(op)),
                progress,
                Text(rate),
                Text(eta),
            ]
        )
    cols = [
        _Col("op"),
        _Col("model", flex=True, min_width=8),
        _Col("where", flex=True, min_width=8),
        _Col("progress", flex=True, min_width=bars),
        _Col("rate", justify="right"),
        _Col("time", justify="right"),
    ]
    running = sum(1 for o in view.ops.values() if o.state == "running")
    title = Text.assemble(("operations", "bold"), f" {running} running")
    if len(view.ops) > running:
        title.append(f", {len(view.ops) - running} queued")
    return _Section(title, cols, rows, "no operations running")


def _services_section(view: ClusterView) -> _Section:
    rows = []
    for svc in sorted(view.services.values(), key=lambda s: (s.model, s.device)):
        state = svc.state + (f" ×{svc.restarts}" if svc.restarts else "")
        rows.append(
            [
                Text(svc.model, style="bold"),
                Text(svc.device),
                Text(svc.backend),
                Text(state, style=_STATUS_STYLE.get(svc.state, "")),
                Text(svc.url or f":{svc.port}", style="cyan"),
            ]
        )
    cols = [
        _Col("model", flex=True, min_width=8),
        _Col("device", flex=True, min_width=8),
        _Col("backend", flex=True),
        _Col("state"),
        _Col("url", flex=True, min_width=12),
    ]
    title = Text.assemble(("services", "bold"), f" {len(view.services)}")
    return _Section(title, cols, rows, "no services")


def _events_section(view: ClusterView, limit: int) -> _Section:
    events = list(view.events)[-limit:] if limit > 0 else []
    rows = [
        [
            Text(time.strftime("%H:%M:%S", time.localtime(ev.ts)), style="bright_black"),
            Text(ev.kind, style=_event_style(ev.kind)),
            Text(_event_what(ev)),
        ]
        for ev in reversed(events)
    ]
    cols = [_Col("time"), _Col("event", flex=True, min_width=10), _Col("what", flex=True, min_width=10)]
    return _Section(Text("events", style="bold"), cols, rows, "no events yet", count_left_out=False)


def _event_style(kind: str) -> str:
    what = kind.partition(".")[2]
    if what in ("failed", "offline"):
        return "red"
    if what in ("succeeded", "online", "registered"):
        return "green"
    return ""


def _event_what(ev: Event) -> str:
    """An event in a few words: an op's kind, model and where; else what it names and its state."""
    state = str(ev.data.get("state") or ev.data.get("status") or "")
    if ev.topic == "op":
        try:
            op = msgspec.convert(ev.data, Op)
        except msgspec.ValidationError:
            return ev.key
        words = f"{_op_kind(op)} {_op_model(op)} {_op_where(op)}"
        return words + (f": {op.error.code}" if op.error else "")
    return f"{ev.key} {state}".strip()


# ---------------------------------------------------------------- the command


@app.command()
def watch(head_url: HeadUrl = None, token: TokenOpt = None) -> None:
    """Watch the cluster live, full screen; 'q' or Ctrl-C quits.

    Nodes with their GPUs and free space, running ops with progress (bytes, rate, ETA),
    services with their state and URL, and the latest events, redrawn as they change.
    Without a terminal (stdout not a TTY) it prints one snapshot of the same view and exits.
    """

    async def main() -> None:
        async with open_client(head_url, token) as c:
            view = await load_view(c)
            if not sys.stdout.isatty():
                out.print(frame(view, time.time()))
                return
            await _watch_live(c, view)

    run(main())


async def _watch_live(c: GswarmClient, view: ClusterView) -> None:
    """The full-screen view until `q`, Ctrl-C or SIGTERM; the terminal is restored after."""
    quit_ = asyncio.Event()
    dirty = asyncio.Event()
    view.link = "connecting"
    live = Live(
        frame(view, time.time()),
        console=out,
        screen=True,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with _signals(quit_, dirty), _keystrokes(quit_), live:
        tasks = [
            asyncio.create_task(follow(c, view, dirty.set)),
            asyncio.create_task(_paint(live, view, dirty)),
            asyncio.create_task(quit_.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            ended = await asyncio.gather(*tasks, return_exceptions=True)
    for result in ended:
        if isinstance(result, Exception):
            raise result


async def _paint(live: Live, view: ClusterView, dirty: asyncio.Event) -> None:
    """Redraw when the view changed (at most every FRAME_INTERVAL) or every TICK."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dirty.wait(), TICK)
        dirty.clear()
        live.update(frame(view, time.time()), refresh=True)
        await asyncio.sleep(FRAME_INTERVAL)


@contextlib.contextmanager
def _signals(quit_: asyncio.Event, dirty: asyncio.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM end the view quietly; a resized terminal redraws it."""
    loop = asyncio.get_running_loop()
    handled = []
    for sig, event in ((signal.SIGINT, quit_), (signal.SIGTERM, quit_), (signal.SIGWINCH, dirty)):
        try:
            loop.add_signal_handler(sig, event.set)
            handled.append(sig)
        except (RuntimeError, ValueError):  # not the main thread (the CLI driven in-process)
            pass
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def _keystrokes(quit_: asyncio.Event) -> Iterator[None]:
    """Read keys as they are typed (no echo, no Enter): `q` quits. The terminal's settings are
    put back after. Nothing to read without a terminal on stdin."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def on_key() -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:  # the terminal went away
            loop.remove_reader(fd)
            quit_.set()
        elif b"q" in data.lower() or b"\x03" in data:
            quit_.set()

    tty.setcbreak(fd, termios.TCSANOW)
    loop.add_reader(fd, on_key)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
