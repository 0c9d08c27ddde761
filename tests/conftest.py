"""Shared fixtures: real heads and agents on 127.0.0.1, in-process and through the real CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gswarm.agent.main import Agent
from gswarm.client import GswarmClient
from gswarm.config import Settings
from gswarm.head.app import HeadServer

FAST = {
    "heartbeat_interval": 0.5,
    "offline_after": 3.0,
    "reconnect_grace": 0.5,
    "reconnect_min": 0.1,
    "reconnect_max": 0.5,
    "sweep_interval": 0.1,
    "ws_ping_interval": 1.0,
    "hello_timeout": 3.0,
    # A spare CPU worker imports torch and transformers (seconds of CPU) for a serve that most
    # tests never make; the tests of the spare itself turn it on.
    "warm_spare": False,
}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker under `--dist loadgroup`, refuse to run when the `xdist_group` marks
    did not take: the grouped modules (one served model for a whole module) would then be spread
    over every worker and start their expensive fixtures again and again, silently."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid:
            raise pytest.UsageError(
                f"{item.nodeid} is marked xdist_group but pytest-xdist could not tag it (pytest "
                f"{pytest.__version__}): install the versions pyproject.toml's test extra names"
            )


def fast_settings(**overrides: Any) -> Settings:
    """Settings with short intervals so liveness tests run in seconds."""
    s = Settings()
    for k, v in {**FAST, **overrides}.items():
        setattr(s, k, v)
    return s


def fast_env() -> dict[str, str]:
    """The same short intervals for subprocesses, as GSWARM_* variables."""
    return {f"GSWARM_{k.upper()}": str(v) for k, v in FAST.items()}


async def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `cond` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """`wait_for` for sync tests, whose head and agents are processes."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def settings() -> Settings:
    return fast_settings()


@pytest.fixture
async def head(tmp_path: Path, settings: Settings) -> AsyncIterator[HeadServer]:
    """A real head on 127.0.0.1, port 0, with SQLite state in tmp_path/state."""
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(head: HeadServer) -> AsyncIterator[GswarmClient]:
    async with GswarmClient(head.url, head.head.tokens.api_token) as c:
        yield c


class AgentRunner:
    """Starts in-process agents and stops them at teardown. Their `file://` downloads may read
    below `file_root` (the test session's temporary directory) unless a test says otherwise,
    and never the head's state dir (as for an agent on the head's machine)."""

    def __init__(self, tmp_path: Path, settings: Settings, file_root: Path | None = None) -> None:
        self.tmp_path = tmp_path
        self.settings = settings
        self.file_roots = [file_root] if file_root is not None else []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.agents: dict[str, Agent] = {}

    def make(self, url: str, token: str, node_id: str, **kw: Any) -> Agent:
        base = self.tmp_path / "nodes" / node_id
        kw.setdefault("file_roots", self.file_roots)
        return Agent(url, node_id, token, base / "disk", base / "dram", self.settings, **kw)

    async def start(self, head: HeadServer, node_id: str, **kw: Any) -> Agent:
        kw.setdefault("private_dirs", [head.head.state_dir])
        agent = self.make(head.url, head.head.tokens.join_token, node_id, **kw)
        self.tasks[node_id] = asyncio.create_task(agent.run())
        self.agents[node_id] = agent
        await wait_for(agent.session.connected.is_set)
        return agent

    async def stop(self, node_id: str) -> None:
        task = self.tasks.pop(node_id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def stop_all(self) -> None:
        for node_id in list(self.tasks):
            await self.stop(node_id)


@pytest.fixture
async def agents(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, settings: Settings
) -> AsyncIterator[AgentRunner]:
    runner = AgentRunner(tmp_path, settings, tmp_path_factory.getbasetemp())
    try:
        yield runner
    finally:
        await runner.stop_all()


# ---------------------------------------------------------------- subprocesses through the CLI


class Proc:
    """A gswarm CLI subprocess with its output captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._f = log.open("wb")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "gswarm", *args],
            stdout=self._f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in output of {self.args}:\n{self.output()}")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.p.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.p.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.p.wait()
        self._f.close()
        return self.p.returncode


class Cli:
    """Runs gswarm commands as a user would, in an environment of its own: `run` and `spawn`
    start real processes, `invoke` and `ainvoke` run a command in this process (typer's
    CliRunner: the same code, output and exit status, without a second of start-up)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            **fast_env(),
            "GSWARM_STATE_DIR": str(tmp_path / "state"),
            "GSWARM_DISK_DIR": str(tmp_path / "disk"),
            "GSWARM_DRAM_DIR": str(tmp_path / "dram"),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
        }
        self.env.pop("GSWARM_TOKEN", None)
        self.env.pop("GSWARM_HEAD_URL", None)
        self.procs: list[Proc] = []

    def spawn(self, *args: str, env: dict[str, str] | None = None, name: str = "proc") -> Proc:
        log = self.tmp_path / f"{name}-{len(self.procs)}.log"
        proc = Proc(list(args), {**self.env, **(env or {})}, log)
        self.procs.append(proc)
        return proc

    def start_head(self, port: int = 0, **env: str) -> tuple[Proc, str]:
        proc = self.spawn("head", "--host", "127.0.0.1", "--port", str(port), env=env, name="head")
        url = proc.wait_output(r"listening on (http://\S+)").group(1)
        return proc, url

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gswarm", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
        )

    async def arun(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`run` from an async test, whose event loop (and in-process head) must keep going."""
        return await asyncio.to_thread(self.run, *args, env=env, timeout=timeout)

    def invoke(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run one command in this process with the environment `run` gives a process.
        The CLI calls asyncio.run: from an async test use `ainvoke`."""
        from typer.testing import CliRunner

        from gswarm.cli import app

        overrides: dict[str, str | None] = {
            k: v for k, v in self.env.items() if k.startswith("GSWARM_") or k == "COLUMNS"
        }
        overrides.update({"GSWARM_TOKEN": None, "GSWARM_HEAD_URL": None, **(env or {})})
        with _invoke_lock:  # CliRunner swaps sys.stdout and os.environ: one command at a time
            result = CliRunner().invoke(app, list(args), env=overrides)
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            # What a real process would print: an escaped exception is a traceback.
            stderr += "Traceback (most recent call last):\n" + "".join(
                traceback.format_exception(result.exception)
            )
        return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)

    async def ainvoke(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`invoke` in a thread, so the test's event loop (and the head in it) keeps running."""
        return await asyncio.to_thread(self.invoke, *args, env=env)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


_invoke_lock = threading.Lock()


def _signal_handlers_off_the_main_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Signals reach only the main thread, and an event loop elsewhere cannot register a handler:
    one the CLI registers from `ainvoke`'s thread is dropped (Ctrl-C is tested on real
    processes), as in a process that nobody interrupts."""
    loop_cls = asyncio.SelectorEventLoop
    add, remove = loop_cls.add_signal_handler, loop_cls.remove_signal_handler

    def add_signal_handler(self: Any, sig: int, callback: Callable[..., object], *args: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            add(self, sig, callback, *args)

    def remove_signal_handler(self: Any, sig: int) -> bool:
        if threading.current_thread() is threading.main_thread():
            return remove(self, sig)
        return False

    monkeypatch.setattr(loop_cls, "add_signal_handler", add_signal_handler)
    monkeypatch.setattr(loop_cls, "remove_signal_handler", remove_signal_handler)


@pytest.fixture
async def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cli]:
    _signal_handlers_off_the_main_thread(monkeypatch)
    c = Cli(tmp_path)
    try:
        yield c
    finally:
        # In a thread: a head in this event loop must answer the processes saying goodbye.
        await asyncio.to_thread(c.stop_all)


# ---------------------------------------------------------------- the test suite's Hub

BIG_FILE_BYTES = 70 * 1024 * 1024


@pytest.fixture(scope="session")
def tiny_repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated model repo on disk: a few small files and one of 70 MiB."""
    root = tmp_path_factory.mktemp("repo")
    (root / "config.json").write_text('{"model_type": "tiny", "hidden_size": 8}')
    (root / "tokenizer.json").write_text('{"vocab": {"a": 0, "b": 1}}' * 50)
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("generated for gswarm tests\n" * 100)
    with open(root / "model.safetensors", "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(BIG_FILE_BYTES >> 20):
            f.write(bytes([i % 256]) + block[1:])
    return root


@contextlib.asynccontextmanager
async def running_hub(repos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """The test suite's Hub serving each directory as a repo; HF_ENDPOINT points at it."""
    from tests.hubserver import HubRepo, HubServer

    server = HubServer([HubRepo.from_dir(repo_id, path) for repo_id, path in repos.items()])
    url = await server.start()
    await server.wait_hashed()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def hub(tiny_repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """A Hub-compatible server serving `org/tiny`; HF_ENDPOINT points at it."""
    async with running_hub({"org/tiny": tiny_repo_dir}, monkeypatch) as server:
        yield server


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file below `root` (manifest excluded), by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".gswarm")
    }


def listening_hosts(port: int) -> set[str]:
    """The addresses sockets of this machine listen on at a TCP port (from /proc/net/tcp{,6})."""
    import ipaddress

    found = set()
    for name, size in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))
            found.add(str(ipaddress.ip_address(packed)))
    return found
