"""The agent socket `/ws/agent`: handshake, node identity, the message loop, liveness.

An agent authenticates with its first message (`Hello`); anything else, an invalid frame or
a refused identity closes the socket with a 44xx code and a reason, and nothing else on the
head is touched.

Node identity: the join token only enrols a node id that has no credential on this head (a
new node, or one known from before credentials existed: `POST /nodes`, an older head). On
enrolment the head issues the node its own credential (sent once, in `Welcome`; the head keeps
only its hash) and every later Hello for that node id must present it: the join token alone is
refused, so a stolen join token cannot take over an existing node. The api token never joins.
The node's transfer key derives from its credential (`Head.node_key`).
What an agent reports is checked against the caps and rules of `protocol` (`inventory_problem`,
`holdings_problem`) before the registry sees it, and its heartbeats are rate-limited
(`HeartbeatGate`): a flood closes the socket with 4429.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from aiohttp import WSMsgType, web

from gswarm import PROTOCOL_VERSION, grants
from gswarm.devices import NODE_ID_RE
from gswarm.errors import GswarmError
from gswarm.protocol import (
    MAX_SERVICES,
    Accepted,
    Failed,
    HeadMessage,
    Heartbeat,
    Hello,
    HoldingsChanged,
    Progress,
    ServiceChanged,
    Succeeded,
    Welcome,
    agent_message_decoder,
    encode,
    holdings_problem,
    inventory_problem,
)

if TYPE_CHECKING:
    from gswarm.head.state import Head

log = logging.getLogger(__name__)

CLOSE_BAD_MESSAGE = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_DUPLICATE = 4409
CLOSE_INCOMPATIBLE = 4426
CLOSE_FLOOD = 4429
CLOSE_REPLACED = 4000
CLOSE_SHUTDOWN = 1001
CLOSE_INTERNAL = 1011


HEARTBEAT_FLOOD = 20
"""More heartbeats than this within one minimum gap (half the heartbeat interval) is a flood:
the agent's socket is closed with 4429."""


def report_problem(hello: Hello) -> str | None:
    """Why the head refuses what a Hello reports (a cap broken, a copy outside the node's
    tiers), or None."""
    if len(hello.services) > MAX_SERVICES:
        return f"{len(hello.services)} services (at most {MAX_SERVICES})"
    return (
        inventory_problem(hello.inventory)
        or holdings_problem(hello.inventory, hello.holdings)
        or holdings_problem(hello.inventory, hello.partials, partial=True)
    )


class HeartbeatGate:
    """At most one heartbeat per `gap` seconds is processed; the rest are dropped and counted,
    and a burst of more than `HEARTBEAT_FLOOD` within one gap is a flood."""

    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.last = -gap
        self.burst = 0
        self.dropped = 0

    def admit(self, now: float) -> bool | None:
        """True: process it; False: drop it; None: the agent floods."""
        if now - self.last >= self.gap:
            self.last = now
            self.burst = 0
            return True
        self.dropped += 1
        self.burst += 1
        return None if self.burst > HEARTBEAT_FLOOD else False


class AgentConnection:
    """One connected agent."""

    def __init__(self, node_id: str, instance_id: str, ws: web.WebSocketResponse, peer: str):
        self.node_id = node_id
        self.instance_id = instance_id
        self.ws = ws
        self.peer = peer
        self.connected_at = time.time()
        self._send_lock = asyncio.Lock()
        self.heartbeats = HeartbeatGate(0.0)

    async def send(self, msg: HeadMessage) -> None:
        """Send one message; a dead socket is logged, not raised (the op is re-sent later)."""
        data = encode(msg).decode()
        try:
            async with self._send_lock, asyncio.timeout(10.0):  # no extra task per message
                await self.ws.send_str(data)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            log.info("send to %s failed: %s", self.node_id, exc)


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    # Close reasons must fit in a control frame (123 bytes).
    msg = reason.encode()[:120].decode(errors="ignore")
    try:
        await asyncio.wait_for(ws.close(code=code, message=msg.encode()), 5.0)
    except (TimeoutError, ConnectionError):
        pass


class AgentHub:
    """Every live agent connection, by node id."""

    def __init__(self, head: Head) -> None:
        self._head = head
        self._conns: dict[str, AgentConnection] = {}
        self._all_ws: set[web.WebSocketResponse] = set()
        self.heartbeats_dropped = 0
        """Heartbeats that came sooner than half an interval after the last, all agents."""

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._conns

    def get(self, node_id: str) -> AgentConnection | None:
        """The live connection of a node, if any."""
        return self._conns.get(node_id)

    @property
    def count(self) -> int:
        """Connected agents."""
        return len(self._conns)

    async def close_all(self) -> None:
        """Close every agent socket (head shutting down)."""
        await asyncio.gather(*(_close(ws, CLOSE_SHUTDOWN, "head shutting down") for ws in list(self._all_ws)))

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """The `/ws/agent` route."""
        settings = self._head.settings
        ws = web.WebSocketResponse(
            # No permessage-deflate: its zlib state costs ~100 KB per agent on the head, and
            # control messages are small.
            compress=False,
            heartbeat=settings.ws_ping_interval,
            max_msg_size=settings.max_ws_message_bytes,
            timeout=5.0,
        )
        await ws.prepare(request)
        self._all_ws.add(ws)
        conn: AgentConnection | None = None
        try:
            hello = await self._handshake(ws)
            if hello is None:
                return ws
            if (problem := report_problem(hello)) is not None:
                await _close(ws, CLOSE_BAD_MESSAGE, f"hello refused: {problem}")
                return ws
            conn = await self._admit(ws, hello, request.remote or "")
            if conn is None:
                return ws
            await self._loop(conn)
        except GswarmError as exc:
            # Something the agent sent that the registry refuses: a close code, never an HTTP
            # answer written into the upgraded socket.
            log.warning("agent socket from %s: %s", request.remote, exc.message)
            await _close(ws, CLOSE_BAD_MESSAGE, f"refused: {exc.message}")
        except Exception:
            log.exception("agent socket from %s failed", request.remote)
            await _close(ws, CLOSE_INTERNAL, "internal error on the head")
        finally:
            self._all_ws.discard(ws)
            if conn is not None and self._conns.get(conn.node_id) is conn:
                del self._conns[conn.node_id]
                self._head.registry.node_disconnected(conn.node_id)
                log.info("agent %s disconnected", conn.node_id)
        return ws

    async def _handshake(self, ws: web.WebSocketResponse) -> Hello | None:
        try:
            msg = await asyncio.wait_for(ws.receive(), self._head.settings.hello_timeout)
        except TimeoutError:
            await _close(ws, CLOSE_BAD_MESSAGE, "no hello within the timeout")
            return None
        if msg.type != WSMsgType.TEXT:
            await _close(ws, CLOSE_BAD_MESSAGE, "expected a hello text frame")
            return None
        try:
            hello = agent_message_decoder.decode(msg.data)
        except (msgspec.DecodeError, RecursionError) as exc:
            await _close(ws, CLOSE_BAD_MESSAGE, f"invalid message: {exc}")
            return None
        if not isinstance(hello, Hello):
            await _close(ws, CLOSE_UNAUTHORIZED, "unauthenticated: the first message must be hello")
            return None
        if hello.protocol_version != PROTOCOL_VERSION:
            await _close(
                ws,
                CLOSE_INCOMPATIBLE,
                f"incompatible protocol {hello.protocol_version}: head speaks {PROTOCOL_VERSION}",
            )
            return None
        if not NODE_ID_RE.fullmatch(hello.node_id):
            await _close(ws, CLOSE_BAD_MESSAGE, f"invalid node id {hello.node_id[:64]!r}")
            return None
        return hello

    def _identify(self, hello: Hello) -> tuple[bool, str]:
        """Whether the Hello may speak for its node id (and why not), without awaiting: the
        enrolment that may follow reserves the node id before anything else can run."""
        node_id = hello.node_id
        stored = self._head.credentials.get(node_id)
        if stored is not None:
            if not hello.credential:
                # What matters first: a close reason is cut at 120 bytes.
                online = " and already online" if node_id in self._conns else ""
                return False, (
                    f"unauthorized: must present its credential: node {node_id} is enrolled{online} "
                    "(a join token only enrols new nodes)"
                )
            if not hmac.compare_digest(grants.credential_hash(hello.credential), stored):
                return False, f"unauthorized: wrong credential for node {node_id}"
            return True, ""
        if hello.credential:
            return False, (
                f"unauthorized: no credential on this head for node {node_id} (removed?): "
                "delete the agent's credential file to enrol again"
            )
        if not hmac.compare_digest(hello.token.encode(), self._head.tokens.join_token.encode()):
            return False, "unauthorized: wrong join token"
        return True, ""

    async def _admit(self, ws: web.WebSocketResponse, hello: Hello, peer: str) -> AgentConnection | None:
        head = self._head
        ok, why = self._identify(hello)
        if not ok:
            log.warning("agent from %s refused as %s: %s", peer, hello.node_id, why)
            await _close(ws, CLOSE_UNAUTHORIZED, why)
            return None
        old = self._conns.get(hello.node_id)
        if old is not None and not old.ws.closed:
            if old.instance_id != hello.instance_id:
                await _close(
                    ws,
                    CLOSE_DUPLICATE,
                    f"node id {hello.node_id} is already online (connected from {old.peer})",
                )
                return None
            # The same agent process reconnecting: its old socket is dead, take over.
            await _close(old.ws, CLOSE_REPLACED, "replaced by a new connection of the same agent")
        issued = ""
        if hello.node_id not in head.credentials:
            issued = await self._enrol(hello.node_id)
            if not issued:
                await _close(ws, CLOSE_INTERNAL, "the head could not enrol the node (see its log)")
                return None
        conn = AgentConnection(hello.node_id, hello.instance_id, ws, peer)
        conn.heartbeats = HeartbeatGate(self._head.settings.heartbeat_interval / 2)
        self._conns[hello.node_id] = conn
        head.commit(
            head.registry.node_connected(
                hello.node_id,
                hello.inventory,
                hello.holdings,
                hello.agent_version,
                hello.data_url,
                hello.backends,
            )
        )
        head.commit(head.registry.reconcile_holdings(hello.node_id, hello.holdings, hello.partials))
        head.commit(head.registry.reconcile_services(hello.node_id, hello.services))
        await conn.send(
            Welcome(
                node_id=hello.node_id,
                heartbeat_interval=head.settings.heartbeat_interval,
                server_time=time.time(),
                transfer_key=head.node_key(hello.node_id),
                credential=issued,
            )
        )
        log.info("agent %s %s from %s", hello.node_id, "enrolled" if issued else "connected", peer)
        await head.dispatcher.agent_ready(hello.node_id, hello.running, hello.finished)
        return conn

    async def _enrol(self, node_id: str) -> str:
        """A new credential for the node, stored (its hash) before the Welcome carries it; ""
        when the store failed. The node id is taken before the first await, so a second Hello
        for it with the join token is refused meanwhile."""
        credential = grants.new_credential()
        digest = grants.credential_hash(credential)
        self._head.credentials[node_id] = digest
        try:
            await self._head.store.put_credential(node_id, digest)
        except (RuntimeError, OSError) as exc:
            log.error("cannot store the credential of node %s: %s", node_id, exc)
            if self._head.credentials.get(node_id) == digest:
                del self._head.credentials[node_id]
            return ""
        if self._head.credentials.get(node_id) != digest:
            return ""  # removed meanwhile
        return credential

    async def revoke(self, node_id: str, reason: str) -> bool:
        """Forget a node's credential (persisted before this returns) and close its agent's
        socket, which the agent takes as final; True when an agent was connected."""
        self._head.credentials.pop(node_id, None)
        await self._head.store.put_credential(node_id, None)
        conn = self._conns.pop(node_id, None)
        if conn is None:
            return False
        self._head.registry.node_disconnected(node_id)
        await _close(conn.ws, CLOSE_UNAUTHORIZED, reason)
        return True

    async def _loop(self, conn: AgentConnection) -> None:
        head = self._head
        async for msg in conn.ws:
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.BINARY:
                    await _close(conn.ws, CLOSE_BAD_MESSAGE, "binary frames are not spoken here")
                break
            if self._conns.get(conn.node_id) is not conn:
                break  # replaced, or the node was removed: nothing more from this socket counts
            try:
                decoded = agent_message_decoder.decode(msg.data)
            except (msgspec.DecodeError, RecursionError) as exc:
                await _close(conn.ws, CLOSE_BAD_MESSAGE, f"invalid message: {exc}")
                break
            match decoded:
                case Heartbeat(inventory=inventory):
                    admitted = conn.heartbeats.admit(time.monotonic())
                    if not admitted:
                        self.heartbeats_dropped += 1
                        if admitted is None:
                            await _close(conn.ws, CLOSE_FLOOD, "too many heartbeats: slow down")
                            break
                        continue
                    if (problem := inventory_problem(inventory)) is not None:
                        await _close(conn.ws, CLOSE_BAD_MESSAGE, f"heartbeat refused: {problem}")
                        break
                    head.commit(head.registry.node_heartbeat(conn.node_id, inventory))
                case Accepted() | Progress() | Succeeded() | Failed():
                    if self._conns.get(conn.node_id) is conn:
                        head.registry.node_seen(conn.node_id)
                    await head.dispatcher.handle(conn.node_id, decoded)
                case HoldingsChanged(holdings=holdings, partials=partials):
                    inv = head.registry.get_node(conn.node_id).inventory
                    problem = holdings_problem(inv, holdings) or holdings_problem(inv, partials, partial=True)
                    if problem is not None:
                        await _close(conn.ws, CLOSE_BAD_MESSAGE, f"holdings refused: {problem}")
                        break
                    head.registry.node_holdings(conn.node_id, holdings)
                    head.commit(head.registry.reconcile_holdings(conn.node_id, holdings, partials))
                case ServiceChanged(service=service, removed=removed):
                    if service.device.partition(":")[0] != conn.node_id:
                        await _close(conn.ws, CLOSE_BAD_MESSAGE, "a service of another node")
                        break
                    if removed:
                        head.commit(head.registry.remove_service(service.service_id))
                    else:
                        head.commit(head.registry.set_service(service))
                case Hello():
                    await _close(conn.ws, CLOSE_BAD_MESSAGE, "hello sent twice")
                    break
