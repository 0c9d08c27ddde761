"""TLS contexts for the head (https/wss) and for everything that talks to it. No I/O beyond
reading the named files.

The head serves TLS when it is given a certificate and key. Agents, the CLI and the SDK verify
the head's certificate against the system's CAs, or against a private CA given with `--ca` or
`$GSWARM_CA` (a PEM file); there is no switch to skip verification.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from gswarm.errors import BadRequest

CA_ENV = "GSWARM_CA"
"""The environment variable naming a PEM file of the CA(s) to trust besides the system's."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the head's certificate chain and private key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise BadRequest(
            f"cannot load the TLS certificate {cert} and key {key}: {exc}", code="bad_tls"
        ) from None
    return ctx


def client_context(ca: Path | str | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, plus `ca` (or `$GSWARM_CA`) when given."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    path = ca or os.environ.get(CA_ENV) or None
    if path:
        try:
            ctx.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise BadRequest(f"cannot load the CA file {path}: {exc}", code="bad_tls") from None
    return ctx
