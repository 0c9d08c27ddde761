"""The agent's data server: published model files to peers, nothing else.

`GET /models/{model}/{tier}/manifest` and `GET /models/{model}/{tier}/files/{path}` (with
Range), each needing `Authorization: Bearer <transfer token>` signed by the head for this
model and this node. Files go out with `sendfile` (aiohttp's FileResponse) unless a bandwidth
limit is set, in which case they are streamed through a token bucket shared by all requests.

A copy still being downloaded is served too (so copies spread as a pipeline, not hop by hop):
its manifest is the download's plan (with `X-Gswarm-Partial: 1`), and a range is served as far
as it has been written; a range not written yet answers 425 Too Early.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING

from aiohttp import web

from gswarm import grants
from gswarm.agent.fetch.ranges import DOWNLOAD_PLAN, available_ranges
from gswarm.agent.stores import MANIFEST_NAME, safe_relpath
from gswarm.devices import MODEL_NAME_RE
from gswarm.errors import Forbidden, GswarmError, NotFound
from gswarm.protocol import encode

if TYPE_CHECKING:
    from gswarm.agent.main import Agent

log = logging.getLogger(__name__)


class TokenBucket:
    """A shared rate limit in bytes/s (async side)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        # Little burst: an idle limiter must not let a second's worth of bytes out at once.
        self._burst = float(min(rate / 20, 1 << 20))
        self._tokens = self._burst
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until `n` bytes may be sent."""
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class DataServer:
    """Serves this node's published copies to peers holding a transfer grant."""

    def __init__(
        self, agent: Agent, port: int = 0, bandwidth: int | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        """With `tls` (a server context) it serves https only."""
        self.agent = agent
        self.tls = tls
        self.port = port
        self.host = ""
        """The address it listens on ("" until it listens)."""
        self.bucket = TokenBucket(bandwidth) if bandwidth else None
        self._runner: web.AppRunner | None = None
        self.bytes_served = 0

    async def start(self, host: str) -> None:
        """Listen on `host` (port 0 picks a free port; a restart keeps the port it picked)."""
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/models/{model}/{tier}/manifest", self._manifest)
        app.router.add_get("/models/{model}/{tier}/files/{path:.+}", self._file)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, self.port, ssl_context=self.tls).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.host = host
        self.port = int(runner.addresses[0][1])

    async def listen(self, host: str) -> None:
        """Listen on `host`, moving there if it listens elsewhere now (the agent reaches the head
        from another address than before)."""
        if self._runner is not None and host == self.host:
            return
        await self.stop()
        await self.start(host)

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self.host = ""

    @web.middleware
    async def _errors(self, request: web.Request, handler: object) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[operator, no-any-return]
        except GswarmError as err:
            return web.Response(
                body=encode(err.to_payload()), status=err.status, content_type="application/json"
            )

    def _authorize(self, request: web.Request) -> tuple[str, str]:
        model = request.match_info["model"]
        tier = request.match_info["tier"]
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            raise Forbidden("a transfer token is needed")
        grants.check(self.agent.transfer_key, header[7:].strip(), model, self.agent.node_id)
        if not MODEL_NAME_RE.fullmatch(model) or tier not in self.agent.stores:
            raise NotFound("no such copy")
        return model, tier

    async def _manifest(self, request: web.Request) -> web.Response:
        model, tier = self._authorize(request)
        store = self.agent.stores[tier]
        for path in (store.model_dir(model) / MANIFEST_NAME, store.partial_dir(model) / DOWNLOAD_PLAN):
            try:
                body = await asyncio.to_thread(path.read_bytes)
            except OSError:
                continue
            # A copy still being written serves its plan: peers may fetch what is there already.
            headers = {"X-Gswarm-Partial": "1"} if path.name == DOWNLOAD_PLAN else {}
            return web.Response(body=body, content_type="application/json", headers=headers)
        raise NotFound(f"{model} is not held on {tier} of {self.agent.node_id}")

    async def _file(self, request: web.Request) -> web.StreamResponse:
        model, tier = self._authorize(request)
        try:
            rel = safe_relpath(request.match_info["path"])
        except GswarmError:
            raise NotFound("no such file") from None
        store = self.agent.stores[tier]
        manifest = await asyncio.to_thread(store.manifest, model)
        if manifest is not None:
            if rel not in {f.path for f in manifest.files}:
                raise NotFound(f"{rel} is not a published file of {model} on {tier}")
            path = store.model_dir(model) / rel
            if self.bucket is None:
                return web.FileResponse(path, chunk_size=1 << 20)
            size = (await asyncio.to_thread(os.stat, path)).st_size
            start, end = self._range(request, size)
            return await self._stream(request, path, start, end, size)
        partial = store.partial_dir(model)
        try:
            size, ranges = await asyncio.to_thread(available_ranges, partial, rel)
        except (OSError, ValueError, KeyError):
            raise NotFound(f"{rel} is not a file of {model} on {tier}") from None
        start, end = self._range(request, size)
        have = next(((a, b) for a, b in ranges if a <= start < b), None)
        if have is None:
            return web.Response(status=425, headers={"Retry-After": "1"}, text="not downloaded yet")
        return await self._stream(request, partial / rel, start, min(end, have[1]), size, partial=True)

    @staticmethod
    def _range(request: web.Request, size: int) -> tuple[int, int]:
        rng = request.http_range
        start = rng.start or 0
        end = min(size, rng.stop if rng.stop is not None else size)
        if start >= end and size:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
        return start, end

    async def _stream(
        self,
        request: web.Request,
        path: os.PathLike[str],
        start: int,
        end: int,
        size: int,
        partial: bool = False,
    ) -> web.StreamResponse:
        """Bytes [start, end) of a file, through the bandwidth limit if there is one."""
        ranged = partial or start > 0 or end < size or request.http_range.stop is not None
        resp = web.StreamResponse(status=206 if ranged else 200)
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        if ranged:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        # sendfile needs the plain socket; under TLS the bytes go through the encrypting transport.
        transport = request.transport if self.tls is None else None
        fh = await asyncio.to_thread(open, path, "rb")
        try:
            pos = start
            while pos < end:
                n = min(1 << 20, end - pos)
                if self.bucket is not None:
                    await self.bucket.take(n)
                if transport is not None:
                    # Zero-copy, slice by slice (as aiohttp's FileResponse does, but metered).
                    sent = await loop.sendfile(transport, fh, pos, n)
                else:
                    data = await asyncio.to_thread(os.pread, fh.fileno(), n, pos)
                    await resp.write(data)
                    sent = len(data)
                if not sent:
                    break
                pos += sent
                self.bytes_served += sent
            await resp.write_eof()
        except ConnectionError:
            pass  # the peer went away; it resumes elsewhere
        finally:
            fh.close()
        return resp
