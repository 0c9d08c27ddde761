"""Python SDK over the head's REST API and event socket (async), with a small sync wrapper.

    async with GswarmClient("http://head:8100") as c:
        await c.register_model("llama-7b", "llm", source_url="https://huggingface.co/...")
        op = await c.probe("worker1")
        op = await c.wait_op(op.op_id, on_progress=print)

Without an explicit token the client uses `$GSWARM_TOKEN`, else the token of a head whose
state dir is on this machine (so the CLI works next to its head with nothing typed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from gswarm.api import (
    CopyBody,
    DownloadBody,
    HealthBody,
    LoadBody,
    RegisterModelBody,
    ReplicateBody,
    ServeBody,
)
from gswarm.config import DEFAULT_HEAD_URL, load_tokens
from gswarm.errors import GswarmError, from_payload
from gswarm.ops import LogsResult, Op
from gswarm.protocol import (
    Event,
    Job,
    ModelView,
    Node,
    NodeRemoved,
    Notice,
    Service,
    subscriber_message_decoder,
)
from gswarm.tls import client_context

T = TypeVar("T")


class HeadUnreachable(GswarmError):
    """The head did not answer at all."""

    default_code = "head_unreachable"


def resolve_head_url(head_url: str | None) -> str:
    """Explicit URL, else `$GSWARM_HEAD_URL`, else http://localhost:8100."""
    url = head_url or os.environ.get("GSWARM_HEAD_URL") or DEFAULT_HEAD_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def resolve_token(token: str | None) -> str:
    """Explicit token, else `$GSWARM_TOKEN`, else the local head's api token, else ''."""
    if token:
        return token
    env = os.environ.get("GSWARM_TOKEN")
    if env:
        return env
    tokens = load_tokens()
    return tokens.api_token if tokens else ""


_ModelList = msgspec.json.Decoder(dict[str, list[ModelView]])
_NodeList = msgspec.json.Decoder(dict[str, list[Node]])
_OpList = msgspec.json.Decoder(dict[str, list[Op]])
_ServiceList = msgspec.json.Decoder(dict[str, list[Service]])
_JobList = msgspec.json.Decoder(dict[str, list[Job]])


class _EventPage(msgspec.Struct):
    events: list[Event]
    last_seq: int


class GswarmClient:
    """Async client of one head."""

    def __init__(
        self,
        head_url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        ca: Path | str | None = None,
    ) -> None:
        """`ca`: a PEM file of a private CA to trust for an https head (else `$GSWARM_CA`)."""
        self.head_url = resolve_head_url(head_url)
        self.token = resolve_token(token)
        self.timeout = timeout
        self._ca = ca
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GswarmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl = client_context(self._ca) if self.head_url.startswith("https://") else None
            connector = aiohttp.TCPConnector(ssl=ssl) if ssl is not None else None
            self._session = aiohttp.ClientSession(headers=self._headers(), connector=connector)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One REST call; the raw JSON body on success, the head's error raised otherwise.
        A `str` body goes as it is (a YAML job file), anything else as JSON."""
        headers: dict[str, str] = {}
        data: bytes | None = None
        if isinstance(body, str):
            data, headers = body.encode(), {"Content-Type": "application/yaml"}
        elif body is not None:
            data, headers = msgspec.json.encode(body), {"Content-Type": "application/json"}
        try:
            async with self._http().request(
                method,
                self.head_url + path,
                data=data,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    try:
                        payload = msgspec.json.decode(raw)
                    except msgspec.DecodeError:
                        payload = raw.decode(errors="replace")
                    raise from_payload(resp.status, payload)
                return raw
        except aiohttp.ClientConnectorCertificateError as exc:
            raise HeadUnreachable(
                f"the head at {self.head_url} presented a certificate this client does not trust ({exc}); "
                "pass the CA that signed it with --ca or $GSWARM_CA",
                code="untrusted_certificate",
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise HeadUnreachable(f"cannot reach the head at {self.head_url}: {exc}") from None
        except TimeoutError:
            raise HeadUnreachable(f"the head at {self.head_url} did not answer in time") from None

    async def _get(self, path: str, typ: type[T], params: dict[str, str] | None = None) -> T:
        return msgspec.json.decode(await self.request("GET", path, params=params), type=typ)

    # ------------------------------------------------------------ system

    async def info(self) -> dict[str, Any]:
        """`GET /`."""
        return await self._get("/", dict[str, Any])

    async def health(self) -> dict[str, Any]:
        """`GET /health`."""
        return await self._get("/health", dict[str, Any])

    # ------------------------------------------------------------ models

    async def list_models(self) -> list[ModelView]:
        """Every model with its locations."""
        return _ModelList.decode(await self.request("GET", "/models"))["models"]

    async def get_model(self, name: str) -> ModelView:
        """One model with its locations."""
        return await self._get(f"/models/{quote(name, safe='')}", ModelView)

    async def register_model(
        self,
        name: str,
        type_: str,
        source_url: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ModelView:
        """Register a model."""
        body = RegisterModelBody(name=name, type=type_, source_url=source_url, metadata=metadata or {})
        return msgspec.json.decode(await self.request("POST", "/models", body), type=ModelView)

    async def delete_model(self, name: str, force: bool = False) -> dict[str, Any]:
        """Remove every copy of a model, then the model itself."""
        params = {"force": "true"} if force else None
        raw = await self.request("DELETE", f"/models/{quote(name, safe='')}", params=params, timeout=900)
        return msgspec.json.decode(raw, type=dict[str, Any])

    # ------------------------------------------------------------ nodes

    async def list_nodes(self) -> list[Node]:
        """Every node known to the head."""
        return _NodeList.decode(await self.request("GET", "/nodes"))["nodes"]

    async def get_node(self, node_id: str) -> Node:
        """One node."""
        return await self._get(f"/nodes/{quote(node_id, safe='')}", Node)

    async def remove_node(self, node_id: str, force: bool = False) -> NodeRemoved:
        """Forget a node and revoke its credential (its agent can no longer join as it, and
        grants for its data server stop working). Refused while it is online unless `force`,
        which disconnects its agent."""
        params = {"force": "true"} if force else None
        raw = await self.request("DELETE", f"/nodes/{quote(node_id, safe='')}", params=params)
        return msgspec.json.decode(raw, type=NodeRemoved)

    async def probe(self, node_id: str, wait: bool = False) -> Op:
        """Ask a node's agent to re-read its inventory and holdings."""
        params = {"wait": "true"} if wait else None
        raw = await self.request("POST", f"/nodes/{quote(node_id, safe='')}/probe", {}, params)
        return msgspec.json.decode(raw, type=Op)

    # ------------------------------------------------------------ tier ops

    async def _op(self, method: str, path: str, body: Any = None, wait: bool = False, **query: str) -> Op:
        params = {k: v for k, v in query.items() if v}
        if wait:
            params["wait"] = "true"
        raw = await self.request(method, path, body, params or None, timeout=None if not wait else 7 * 86400)
        return msgspec.json.decode(raw, type=Op)

    async def download(
        self,
        model_name: str,
        source_url: str,
        target_device: str,
        *,
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
        model_type: str = "unknown",
        prefer_peer: bool = True,
        bandwidth_limit: int | None = None,
        wait: bool = False,
    ) -> Op:
        """Download a model onto a node's disk or dram (registers it if new); a node that
        already holds a verified copy serves it unless `prefer_peer` is False."""
        body = DownloadBody(
            model_name=model_name,
            source_url=source_url,
            target_device=target_device,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            model_type=model_type,
            prefer_peer=prefer_peer,
            bandwidth_limit=bandwidth_limit,
        )
        return await self._op("POST", "/download", body, wait)

    async def copy(
        self,
        model_name: str,
        source_device: str,
        target_device: str,
        *,
        verify: Literal["size", "sha256"] = "size",
        wait: bool = False,
    ) -> Op:
        """Copy a model between devices."""
        body = CopyBody(
            model_name=model_name, source_device=source_device, target_device=target_device, verify=verify
        )
        return await self._op("POST", "/copy", body, wait)

    async def move(
        self,
        model_name: str,
        source_device: str,
        target_device: str,
        *,
        keep_source: bool = False,
        force: bool = False,
        wait: bool = False,
    ) -> Op:
        """Move a model between devices (the source goes once the target is verified). A source
        that a running service serves from is a Conflict (`serving`) unless `force`, which
        stops the service first."""
        body = CopyBody(
            model_name=model_name,
            source_device=source_device,
            target_device=target_device,
            keep_source=keep_source,
        )
        return await self._op("POST", "/move", body, wait, force="true" if force else "")

    async def replicate(
        self,
        model_name: str,
        targets: list[str] | None = None,
        *,
        all_nodes: Literal["disk", "dram"] | None = None,
        source_device: str | None = None,
        max_fanout: int = 1,
        bandwidth_limit: int | None = None,
        wait: bool = False,
    ) -> Op:
        """Spread a model to many devices, node to node."""
        body = ReplicateBody(
            model_name=model_name,
            targets=targets or [],
            all_nodes=all_nodes,
            source_device=source_device,
            max_fanout=max_fanout,
            bandwidth_limit=bandwidth_limit,
        )
        return await self._op("POST", "/replicate", body, wait)

    async def load(
        self, model_name: str, device: str, *, source_device: str | None = None, wait: bool = False
    ) -> Op:
        """Stage a model into a GPU's memory (node:gpuN) from the node's fastest copy."""
        body = LoadBody(model_name=model_name, device=device, source_device=source_device)
        return await self._op("POST", "/load", body, wait)

    async def serve(
        self,
        model_name: str,
        device: str,
        port: int,
        *,
        backend: str | None = None,
        config: dict[str, Any] | None = None,
        wait: bool = False,
    ) -> Op:
        """Start an inference server (OpenAI-compatible for builtin and vllm)."""
        body = ServeBody(
            model_name=model_name, device=device, port=port, backend=backend, config=config or {}
        )
        return await self._op("POST", "/serve", body, wait)

    async def stop_service(self, model_name: str, device: str, *, wait: bool = False) -> Op:
        """Stop a service and free its GPU memory."""
        path = f"/stop/{quote(model_name, safe='')}/{quote(device, safe='')}"
        return await self._op("POST", path, {}, wait)

    async def list_services(self) -> list[Service]:
        """Every service with URL, backend and health."""
        return _ServiceList.decode(await self.request("GET", "/services"))["services"]

    async def logs(self, model_name: str, device: str, lines: int = 100) -> str:
        """The tail of a service's log."""
        return (await self.log_chunk(model_name, device, lines=lines)).log

    async def log_chunk(
        self,
        model_name: str,
        device: str,
        *,
        lines: int = 100,
        since_bytes: int | None = None,
        timeout: float = 0.0,
    ) -> LogsResult:
        """The last `lines` of a service's log; or, with `since_bytes`, what it gained past
        that offset (waiting up to `timeout` seconds, at most 25, for something). Either way
        `offset` is where to read on from."""
        path = f"/logs/{quote(model_name, safe='')}/{quote(device, safe='')}"
        params = {"lines": str(lines)}
        if since_bytes is not None:
            params.update(since_bytes=str(since_bytes), timeout=f"{timeout:g}")
        raw = await self.request("GET", path, params=params, timeout=timeout + 40)
        return msgspec.json.decode(raw, type=LogsResult)

    async def follow_logs(
        self, model_name: str, device: str, *, lines: int = 100, poll: float = 10.0
    ) -> AsyncIterator[LogsResult]:
        """The tail of a service's log, then what it gains as it grows, until the service is
        gone (long polls of `poll` seconds: one request per answer)."""
        chunk = await self.log_chunk(model_name, device, lines=lines)
        yield chunk
        offset = chunk.offset
        while True:
            chunk = await self.log_chunk(model_name, device, since_bytes=offset, timeout=poll)
            offset = chunk.offset
            if chunk.log or chunk.reset:
                yield chunk
            elif not chunk.running:
                return

    async def health_check(
        self,
        model_name: str | None = None,
        device: str | None = None,
        *,
        node_id: str | None = None,
        wait: bool = True,
    ) -> Op:
        """Check a service (model and device) or a node."""
        body = HealthBody(model_name=model_name, device=device, node_id=node_id)
        return await self._op("POST", "/health_check", body, wait)

    async def delete_location(
        self, model_name: str, device: str, *, force: bool = False, wait: bool = False
    ) -> Op:
        """Remove one copy of a model."""
        path = f"/models/{quote(model_name, safe='')}/locations/{quote(device, safe='')}"
        return await self._op("DELETE", path, None, wait, force="true" if force else "")

    # ------------------------------------------------------------ jobs

    async def submit_job(self, job: dict[str, Any] | str) -> Job:
        """Submit a job (a parsed mapping, or the text of a YAML/JSON job file)."""
        return msgspec.json.decode(await self.request("POST", "/jobs", job), type=Job)

    async def list_jobs(self) -> list[Job]:
        """Every job, newest first (without actions)."""
        return _JobList.decode(await self.request("GET", "/jobs"))["jobs"]

    async def get_job(self, job_id: str) -> Job:
        """One job with each action's state, ops, timings and error."""
        return await self._get(f"/jobs/{quote(job_id, safe='')}", Job)

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a job's running ops and skip the rest."""
        return msgspec.json.decode(
            await self.request("POST", f"/jobs/{quote(job_id, safe='')}/cancel", {}), type=Job
        )

    # ------------------------------------------------------------ ops

    async def list_ops(self, **filters: str) -> list[Op]:
        """Ops, newest first (filters: node, state, kind, limit)."""
        return _OpList.decode(await self.request("GET", "/ops", params=filters or None))["ops"]

    async def get_op(self, op_id: str) -> Op:
        """One op."""
        return await self._get(f"/ops/{quote(op_id, safe='')}", Op)

    async def cancel_op(self, op_id: str) -> Op:
        """Cancel an op."""
        raw = await self.request("POST", f"/ops/{quote(op_id, safe='')}/cancel", {})
        return msgspec.json.decode(raw, type=Op)

    async def wait_op(
        self,
        op_id: str,
        on_progress: Callable[[Op], None] | None = None,
        timeout: float | None = None,
    ) -> Op:
        """Follow an op's events until it ends; returns the final op."""

        async def follow() -> Op:
            async for msg in self.events(since=None, topics=["op"]):
                if isinstance(msg, Notice):
                    if msg.code == "live":
                        op = await self.get_op(op_id)
                        if on_progress is not None:
                            on_progress(op)
                        if op.terminal:
                            return op
                    elif msg.code == "dropped":
                        raise GswarmError(f"event stream dropped: {msg.message}")
                    continue
                if msg.key != op_id:
                    continue
                op = msgspec.convert(msg.data, Op)
                if on_progress is not None:
                    on_progress(op)
                if op.terminal:
                    return op
            return await self.get_op(op_id)

        return await asyncio.wait_for(follow(), timeout)

    # ------------------------------------------------------------ events

    async def list_events(self, since: int = 0, topics: Iterable[str] = (), limit: int = 1000) -> list[Event]:
        """Past events after `since`."""
        params = {"since": str(since), "limit": str(limit)}
        if topics:
            params["topic"] = ",".join(topics)
        return (await self._get("/events", _EventPage, params)).events

    async def events(
        self, since: int | None = None, topics: Iterable[str] = ()
    ) -> AsyncGenerator[Event | Notice, None]:
        """Follow the event socket: replay after `since` (if given), then live events."""
        params: dict[str, str] = {}
        if since is not None:
            params["since"] = str(since)
        if topics:
            params["topic"] = ",".join(topics)
        url = self.head_url.replace("http", "ws", 1) + "/ws/events"
        try:
            ws = await self._http().ws_connect(
                url, params=params, heartbeat=10.0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0)
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 400:
                # A refused handshake carries no body: the same query over REST says what is wrong.
                await self.request("GET", "/events", params={**params, "limit": "1"})
            raise from_payload(exc.status, {"error": {"message": exc.message}}) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise HeadUnreachable(
                f"the head at {self.head_url} presented a certificate this client does not trust ({exc}); "
                "pass the CA that signed it with --ca or $GSWARM_CA",
                code="untrusted_certificate",
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise HeadUnreachable(f"cannot reach the head at {self.head_url}: {exc}") from None
        try:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    break
                yield subscriber_message_decoder.decode(frame.data)
        finally:
            await ws.close()


class SyncClient:
    """Blocking wrapper: every async method of GswarmClient, run to completion per call.

    Not for use inside a running event loop.
    """

    def __init__(self, head_url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self._args = (head_url, token, timeout)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(GswarmClient, name, None)
        if method is None or name.startswith("_") or name == "events":
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            async def run() -> Any:
                async with GswarmClient(*self._args) as client:
                    return await getattr(client, name)(*args, **kwargs)

            return asyncio.run(run())

        return call
