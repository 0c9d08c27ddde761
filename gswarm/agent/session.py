"""The agent's websocket to the head: connect, Hello/Welcome, reconnect with backoff and
jitter, and a writer queue. Messages queued while disconnected are dropped, except final
results, which the executor keeps in its outbox and replays after every reconnect."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from gswarm.config import Settings
from gswarm.errors import GswarmError
from gswarm.protocol import AgentMessage, HeadMessage, Hello, Welcome, encode, head_message_decoder
from gswarm.tls import client_context

log = logging.getLogger(__name__)

# Close codes after which retrying cannot help.
FATAL_CLOSE_CODES = {4401: "unauthorized", 4409: "duplicate node id", 4426: "incompatible protocol"}


class AgentRefused(GswarmError):
    """The head refused this agent for good (wrong token, node id taken, protocol)."""

    default_code = "agent_refused"


def agent_socket_url(head_url: str) -> str:
    """`http://host:port` -> `ws://host:port/ws/agent`."""
    base = head_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[8:] + "/ws/agent"
    if base.startswith("http://"):
        return "ws://" + base[7:] + "/ws/agent"
    return base + "/ws/agent"


class Session:
    """Keeps one websocket to the head open for as long as the agent runs."""

    def __init__(
        self,
        head_url: str,
        settings: Settings,
        make_hello: Callable[[str], Awaitable[Hello]],
        on_message: Callable[[HeadMessage], Awaitable[None]],
        on_connected: Callable[[Welcome], Awaitable[None]],
        ca: Path | None = None,
    ) -> None:
        self.url = agent_socket_url(head_url)
        self._ssl = client_context(ca) if self.url.startswith("wss://") else None
        self._settings = settings
        self._make_hello = make_hello
        self._on_message = on_message
        self._on_connected = on_connected
        self._out: asyncio.Queue[bytes] | None = None
        self.connected = asyncio.Event()
        self.connects = 0

    def send(self, msg: AgentMessage) -> None:
        """Queue a message for the head; dropped when disconnected (results are replayed)."""
        if self._out is not None:
            self._out.put_nowait(encode(msg))

    async def run(self) -> None:
        """Connect, serve, reconnect; returns only by cancellation or AgentRefused."""
        backoff = self._settings.reconnect_min
        while True:
            try:
                await self._connect_once()
                backoff = self._settings.reconnect_min
            except AgentRefused:
                raise
            except ssl.SSLCertVerificationError as exc:
                raise AgentRefused(
                    f"the head at {self.url} presented a certificate this agent does not trust "
                    f"({exc.verify_message}); pass the CA that signed it with --ca or $GSWARM_CA"
                ) from None
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
                log.warning("head at %s unreachable: %s", self.url, exc or type(exc).__name__)
            except InvalidURI as exc:
                raise AgentRefused(f"invalid head URL {self.url!r}: {exc}") from None
            finally:
                self._out = None
                self.connected.clear()
            delay = min(backoff, self._settings.reconnect_max) * random.uniform(0.5, 1.5)
            backoff = min(backoff * 2, self._settings.reconnect_max)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        s = self._settings
        async with connect(
            self.url,
            open_timeout=s.hello_timeout,
            ping_interval=s.ws_ping_interval,
            ping_timeout=s.ws_ping_interval * 2,
            close_timeout=2,
            max_size=s.max_ws_message_bytes,
            compression=None,
            ssl=self._ssl,
        ) as ws:
            local = ws.local_address
            hello = await self._make_hello(str(local[0]) if local else "127.0.0.1")
            await ws.send(encode(hello).decode())
            try:
                raw = await asyncio.wait_for(ws.recv(), s.hello_timeout)
            except ConnectionClosed as exc:
                self._raise_if_fatal(exc)
                raise
            welcome = head_message_decoder.decode(raw)
            if not isinstance(welcome, Welcome):
                raise ConnectionError(f"expected welcome, got {type(welcome).__name__}")
            self._out = asyncio.Queue()
            await self._on_connected(welcome)  # keeps a newly issued credential before all else
            self.connects += 1
            log.info("connected to head %s as %s", self.url, welcome.node_id)
            self.connected.set()
            writer = asyncio.create_task(self._write(ws, self._out))
            try:
                await self._read(ws)
            except ConnectionClosed as exc:
                self._raise_if_fatal(exc)
                raise
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    @staticmethod
    def _raise_if_fatal(exc: ConnectionClosed) -> None:
        rcvd = exc.rcvd
        if rcvd is not None and rcvd.code in FATAL_CLOSE_CODES:
            raise AgentRefused(f"head refused this agent: {rcvd.reason or FATAL_CLOSE_CODES[rcvd.code]}")

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                msg = head_message_decoder.decode(raw)
            except msgspec.DecodeError as exc:
                log.error("ignoring undecodable message from head: %s", exc)
                continue
            await self._on_message(msg)

    @staticmethod
    async def _write(ws: ClientConnection, out: asyncio.Queue[bytes]) -> None:
        while True:
            data = await out.get()
            await ws.send(data.decode())
