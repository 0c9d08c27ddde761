"""The head's aiohttp application and server: where the route families, the result-hook
table and the head's state are put together. Nothing imports this module but the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gswarm.config import Settings
from gswarm.head import jobs, replication, routes, services, transfers
from gswarm.head.results import RESULT_HOOKS
from gswarm.head.state import HEAD_KEY, Head


def create_app(head: Head) -> web.Application:
    """The aiohttp application of a head."""
    app = web.Application(client_max_size=head.settings.max_body_bytes)
    app[HEAD_KEY] = head
    routes.setup(app)
    app.router.add_get("/ws/agent", head.agents.handle)
    transfers.setup(app)
    replication.setup(app)
    services.setup(app)
    jobs.setup(app)

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


class HeadServer:
    """A head listening on a TCP port; `port=0` picks a free one."""

    def __init__(
        self,
        state_dir: Path,
        host: str = "0.0.0.0",
        port: int = 8100,
        settings: Settings | None = None,
    ) -> None:
        self.head = Head(state_dir, settings or Settings.from_env(), RESULT_HOOKS)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL to reach this head from the same machine."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> str:
        """Start listening; returns the URL."""
        self._runner = web.AppRunner(create_app(self.head), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]
        await asyncio.to_thread(self.head.lock.record_port, self.port)
        return self.url

    async def stop(self) -> None:
        """Close sockets, stop tasks, flush state."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
