"""Errors and small thread primitives shared by the fetch modules: TransferError, Cancelled,
local_write_error, network_reason and unreachable (a failed connection in words), ByteCounter,
RateLimit (with check_bandwidth, its bounds) and run_blocking (the bridge from asyncio to the
blocking workers)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gswarm.config import BANDWIDTH_MAX, BANDWIDTH_MIN
from gswarm.errors import BadRequest, GswarmError, InsufficientSpace

T = TypeVar("T")


class TransferError(GswarmError):
    """A transfer failed (source error, network, verification)."""

    default_code = "transfer_failed"


def local_write_error(exc: OSError, what: str) -> GswarmError:
    """A failed write on this node as the error to report: 507 when the filesystem is full,
    else a transfer failure naming the cause (never a network error to retry)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(
            f"no space left writing {what} ({reason}); what was written is kept, and a retry "
            "resumes once space is freed",
        )
    return TransferError(f"writing {what} failed: {reason}", code="write_failed")


_TRANSPORT_MODULES = ("httpx", "httpcore", "requests", "urllib3", "http.client")
"""HTTP libraries (and their renamed forks, `httpx2`) whose own errors, not statuses, mean the
connection failed."""


def network_reason(exc: BaseException) -> str | None:
    """Why a connection failed, in a few lowercase words (`connection refused`, `name or service
    not known`, `timed out`), found on `exc` or the errors it wraps (an HTTP library's error wraps
    the socket's); None when `exc` is no network failure (a bug, a refused answer)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    transport = False
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TimeoutError):
            return "timed out"
        if isinstance(cur, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {cur.verify_message}"
        if isinstance(cur, ssl.SSLError):
            return f"TLS: {cur.reason or cur}"
        if isinstance(cur, OSError):
            text = cur.strerror or str(cur) or type(cur).__name__
            return text[:1].lower() + text[1:]
        module = type(cur).__module__
        transport = transport or module.startswith(_TRANSPORT_MODULES)
        cur = cur.__cause__ or cur.__context__
    if transport:
        text = str(exc) or type(exc).__name__
        return text[:1].lower() + text[1:]
    return None


def host_of(url: str) -> str:
    """The `host:port` (or `host`) a URL names, for messages."""
    return urlsplit(url).netloc.rpartition("@")[2] or url


def unreachable(url: str, reason: str, hint: str = "") -> TransferError:
    """The error for a connection to `url`'s host that failed for `reason`: names the host (the
    URL too when it says more), and what to do when `hint` says so."""
    where = host_of(url)
    text = f"cannot reach {where} ({reason})"
    if url.rstrip("/") not in (f"http://{where}", f"https://{where}"):
        text += f" to fetch {url}"
    return TransferError(text + (f": {hint}" if hint else ""), code="source_unreachable")


class Cancelled(Exception):
    """The op was cancelled; workers stop at the next read."""


class ByteCounter:
    """A thread-safe running total of bytes moved."""

    def __init__(self, start: int = 0) -> None:
        self._lock = threading.Lock()
        self.value = start

    def add(self, n: int) -> None:
        """Add `n` bytes."""
        with self._lock:
            self.value += n


SLEEP_SLICE = 0.1
"""A throttled thread waits at most this long at a time before it looks at its cancel flag."""


def check_bandwidth(limit: int | None) -> int | None:
    """`limit` if it is a usable bytes/s limit (or None: no limit); BadRequest naming the bounds
    otherwise. The head checks the same bounds; an agent does not trust it to."""
    if limit is not None and not BANDWIDTH_MIN <= limit <= BANDWIDTH_MAX:
        raise BadRequest(
            f"bandwidth_limit {limit} is out of range: give {BANDWIDTH_MIN} to {BANDWIDTH_MAX} "
            "bytes/s (64 KiB/s to 1 TiB/s), or none",
            code="invalid_field",
            details={"field": "bandwidth_limit"},
        )
    return limit


class RateLimit:
    """A bytes/s limit shared by worker threads: each takes its share, then sleeps off any debt,
    in slices of at most `SLEEP_SLICE` seconds, stopping at once (Cancelled) when `cancel` is set."""

    def __init__(self, rate: int, cancel: threading.Event) -> None:
        self.rate = check_bandwidth(rate) or BANDWIDTH_MIN
        self._cancel = cancel
        self._lock = threading.Lock()
        # Little burst: an idle limiter must not let a second's worth of bytes out at once.
        self._burst = float(min(self.rate / 20, 1 << 20))
        self._tokens = self._burst
        self._last = time.monotonic()

    def take(self, n: int) -> None:
        """Account for `n` bytes, sleeping as long as the limit requires; Cancelled if the
        transfer is cancelled (or the agent stops) meanwhile."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt <= 0:
            return
        deadline = time.monotonic() + debt / self.rate
        while (left := deadline - time.monotonic()) > 0:
            if self._cancel.wait(min(left, SLEEP_SLICE)):
                raise Cancelled()


async def run_blocking(cancel: threading.Event, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` in a thread; if the awaiting task is cancelled, set `cancel` and wait for the
    thread to notice before re-raising, so no worker outlives its op."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await fut
        raise
