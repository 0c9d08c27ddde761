"""The head's aiohttp application and server: where the route families, the result-hook
table and the head's state are put together. Nothing imports this module but the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gswarm.config import Settings
from gswarm.errors import GswarmError
from gswarm.head import dashboard, jobs, replication, routes, services, transfers
from gswarm.head.http import JsonErrorAppRunner, error_middleware
from gswarm.head.metrics import metrics_response
from gswarm.head.results import RESULT_HOOKS
from gswarm.head.state import HEAD_KEY, Head
from gswarm.tls import server_context


def create_app(head: Head) -> web.Application:
    """The aiohttp application of a head."""
    # Routes read their bodies with their own limits (`http.read_body`); this is the largest.
    app = web.Application(client_max_size=max(head.settings.max_body_bytes, head.settings.max_job_bytes))
    app[HEAD_KEY] = head
    routes.setup(app)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/ws/agent", head.agents.handle)
    transfers.setup(app)
    replication.setup(app)
    services.setup(app)
    jobs.setup(app)
    dashboard.setup(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await head.start()
        yield
        await head.stop()

    async def on_shutdown(app: web.Application) -> None:
        head.bus.close_all("head shutting down")
        await head.agents.close_all()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    return app


async def _metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus metrics, with the api token like every route."""
    return metrics_response(request.app[HEAD_KEY], request)


def create_metrics_app(head: Head) -> web.Application:
    """The application of the open metrics port: `GET /metrics` and nothing else, no token."""
    app = web.Application(middlewares=[error_middleware])

    async def scrape(request: web.Request) -> web.Response:
        return metrics_response(head, request)

    app.router.add_get("/metrics", scrape)
    return app


class HeadServer:
    """A head listening on a TCP port; `port=0` picks a free one."""

    def __init__(
        self,
        state_dir: Path,
        host: str = "0.0.0.0",
        port: int = 8100,
        settings: Settings | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        """With `tls_cert` and `tls_key` the head serves https and wss only."""
        self.head = Head(state_dir, settings or Settings.from_env(), RESULT_HOOKS)
        self.host = host
        self.port = port
        self._ssl = server_context(tls_cert, tls_key) if tls_cert and tls_key else None
        self._runner: JsonErrorAppRunner | None = None
        self._metrics_runner: JsonErrorAppRunner | None = None
        self.metrics_port = self.head.settings.metrics_port
        """The open metrics port (the one bound once started, when `metrics_port` was 0); -1: none."""

    @property
    def url(self) -> str:
        """Base URL to reach this head from the same machine."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> str:
        """Start listening; returns the URL."""
        self._runner = JsonErrorAppRunner(create_app(self.head), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]
        await asyncio.to_thread(self.head.lock.record_port, self.port)
        if self.metrics_port >= 0:
            self._metrics_runner = JsonErrorAppRunner(
                create_metrics_app(self.head), access_log=None, shutdown_timeout=1.0
            )
            await self._metrics_runner.setup()
            msite = web.TCPSite(self._metrics_runner, self.host, self.metrics_port, ssl_context=self._ssl)
            try:
                await msite.start()
            except OSError as exc:
                await self.stop()
                raise GswarmError(
                    f"cannot listen on {self.host}:{self.metrics_port} (the metrics port): "
                    f"{exc.strerror or exc}"
                ) from None
            if self.metrics_port == 0 and msite._server is not None:
                sockets = getattr(msite._server, "sockets", None) or []
                self.metrics_port = sockets[0].getsockname()[1]
        return self.url

    @property
    def metrics_url(self) -> str | None:
        """Where the open metrics port serves `/metrics`, or None when there is none."""
        if self.metrics_port < 0:
            return None
        return self.url.rsplit(":", 1)[0] + f":{self.metrics_port}/metrics"

    async def stop(self) -> None:
        """Close sockets, stop tasks, flush state."""
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
