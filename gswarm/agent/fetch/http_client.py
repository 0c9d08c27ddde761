"""HTTP over `http.client`: one keep-alive connection per worker thread and host, requests
that follow redirects (credentials only to the origin host), HTTP errors as gswarm errors,
and small JSON GETs."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
from typing import Any
from urllib.parse import urljoin, urlsplit

from gswarm.agent.fetch.common import TransferError, network_reason, unreachable
from gswarm.agent.fetch.hub import access_hint, on_hub
from gswarm.errors import GswarmError, NotFound


class Connections:
    """One keep-alive HTTP connection per worker thread and host."""

    def __init__(self, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: the client context for https (None: the system's CAs)."""
        self.timeout = timeout
        self.tls = tls
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}

    def get(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        """The connection to `url`'s host (opened on first use) and the request path."""
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        conn = self._conns.get(key)
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self.tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            self._conns[key] = conn
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return conn, path

    def drop(self, url: str) -> None:
        """Close and forget the connections to `url`'s host (after an error or unread body)."""
        parts = urlsplit(url)
        for key in [k for k in self._conns if k[1] == parts.hostname]:
            self._conns.pop(key).close()

    def interrupt(self) -> None:
        """Shut the sockets down from another thread: a read blocked on a slow peer returns at
        once (how a cancel reaches a worker waiting for its 4 MiB to arrive)."""
        try:
            conns = list(self._conns.values())
        except RuntimeError:  # the worker changed the dict meanwhile: it is not blocked in a read
            return
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close every connection."""
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def request(
    conns: Connections, url: str, headers: dict[str, str], method: str = "GET"
) -> tuple[http.client.HTTPResponse, str]:
    """Send a request, following redirects; returns the response and the final URL.
    Credentials go only to the origin host, never to a redirect target elsewhere."""
    origin = urlsplit(url).hostname
    for _ in range(6):
        conn, path = conns.get(url)
        hdrs = headers
        if urlsplit(url).hostname != origin:
            hdrs = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        try:
            conn.request(method, path, headers=hdrs)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            conns.drop(url)
            raise
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("Location") or ""
            resp.read()
            url = urljoin(url, location)
            continue
        return resp, url
    raise TransferError(f"too many redirects fetching {url}")


def http_error(status: int, reason: str, url: str) -> GswarmError:
    """An HTTP error status from a source as the gswarm error to report, with what to do about
    it when the source is the Hub."""
    hub = on_hub(url)
    if status == 404:
        hint = ": no such repo, revision or file on the Hub" if hub else ""
        return NotFound(f"HTTP 404 {reason} from {url}{hint}", code="source_not_found")
    if status in (401, 403):
        hint = f": {access_hint()}" if hub else ""
        return TransferError(f"HTTP {status} {reason} from {url}{hint}", code="source_forbidden")
    return TransferError(f"HTTP {status} {reason} from {url}", code="source_error")


def content_range_end(header: str | None) -> int | None:
    """The last byte of `Content-Range: bytes a-b/size`."""
    if not header or not header.startswith("bytes ") or "-" not in header:
        return None
    try:
        return int(header[6:].split("/")[0].split("-")[1])
    except (ValueError, IndexError):
        return None


def fetch_json(
    url: str, headers: dict[str, str], timeout: float = 15.0, tls: ssl.SSLContext | None = None
) -> Any:
    """GET a small JSON document (blocking); TransferError/NotFound/Forbidden on failure."""
    conns = Connections(timeout, tls)
    try:
        conn, path = conns.get(url)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status >= 400:
            raise http_error(resp.status, resp.reason, url)
        return json.loads(body)
    except ValueError as exc:
        raise TransferError(f"{url} sent no JSON: {exc}", code="source_error") from None
    except (OSError, http.client.HTTPException) as exc:
        raise unreachable(url, network_reason(exc) or f"{type(exc).__name__}: {exc}") from None
    finally:
        conns.close()
