"""Errors: one root, each kind with an HTTP status and a stable code.

    GswarmError                      500 internal
    ├── BadRequest                   400 bad_request (invalid_json, invalid_field, invalid_name,
    │                                    invalid_device, ...)
    ├── Unauthorized                 401 unauthorized
    ├── Forbidden                    403 forbidden
    ├── NotFound                     404 not_found (model_not_found, node_not_found, op_not_found)
    ├── Conflict                     409 conflict (already_exists, node_offline, not_held, busy)
    ├── PayloadTooLarge              413 payload_too_large
    ├── InvalidWorkflow              422 invalid_workflow
    └── InsufficientSpace            507 insufficient_space

REST answers carry `{"error": {"code", "message", "details"}}`; `from_payload` turns such an
answer back into the same exception on the client side. An error about a request field names it
in `details["field"]`, and lists the plain words its message uses as field names in
`details["fields"]`, so a client can put its own names for them in their place.

`expected` tells a failure the world causes (a GswarmError, a full disk, a refused connection)
from a bug.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, ClassVar


class GswarmError(Exception):
    """Root of every error gswarm raises on purpose."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal"

    def __init__(
        self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details or {}

    def to_payload(self) -> dict[str, Any]:
        """The JSON body of a REST error answer."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(GswarmError):
    """The request is malformed or names something invalid."""

    status = 400
    default_code = "bad_request"


class Unauthorized(GswarmError):
    """No credentials, or unknown ones."""

    status = 401
    default_code = "unauthorized"


class Forbidden(GswarmError):
    """Credentials that do not allow this."""

    status = 403
    default_code = "forbidden"


class NotFound(GswarmError):
    """The named model, node, op, ... does not exist."""

    status = 404
    default_code = "not_found"


class Conflict(GswarmError):
    """The request clashes with the current state (duplicate, offline node, busy copy)."""

    status = 409
    default_code = "conflict"


class PayloadTooLarge(GswarmError):
    """A body or message over the size limit."""

    status = 413
    default_code = "payload_too_large"


class InvalidWorkflow(GswarmError):
    """A job file that does not validate."""

    status = 422
    default_code = "invalid_workflow"


class InsufficientSpace(GswarmError):
    """The target has not enough free space (or GPU memory)."""

    status = 507
    default_code = "insufficient_space"


_BY_STATUS: dict[int, type[GswarmError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        InvalidWorkflow,
        InsufficientSpace,
    )
}


def from_payload(status: int, payload: Any) -> GswarmError:
    """Rebuild the error a head answered with (status plus `{"error": {...}}` body)."""
    cls = _BY_STATUS.get(status, GswarmError)
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        return cls(
            str(err.get("message", "")),
            code=str(err.get("code", cls.default_code)),
            details=err.get("details") or {},
        )
    return cls(f"HTTP {status}: {str(payload)[:200]}")


_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def expected(exc: BaseException) -> GswarmError | None:
    """`exc` as the error to report when it is a failure the world causes, not a bug: any
    GswarmError, a full disk or quota, a path this process may not write, a connection refused,
    reset, timed out or a name that does not resolve. None for anything else: a bug, which
    deserves its traceback in the log."""
    if isinstance(exc, GswarmError):
        return exc
    if not isinstance(exc, OSError):
        return None
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"no space left{where}: {reason}")
    if exc.errno in _DENIED_ERRNOS:
        return GswarmError(f"not allowed{where}: {reason}", code="permission_denied")
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror) or exc.errno in _NETWORK_ERRNOS:
        return GswarmError(f"network error: {reason}", code="network_error")
    return None
