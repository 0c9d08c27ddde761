"""Transfer grants: short-lived tokens the head signs (HMAC-SHA256) that let one node fetch one
model's files from another node's data server. No I/O.

A grant reads `<base64url claims>.<base64url signature>`; the claims name the model, the node
serving it, the node fetching it, and when the grant expires.

Each data server checks grants with a key of its own, derived from the head's secret, its node
id and the hash of the node's credential; the head gives each agent only that key. So an agent
can check grants for its own data server, but cannot mint one that another node's data server
would accept; and a node removed (its credential revoked) or enrolled afresh gets a new key, so
the grants minted for its old one stop working.

Node credentials: a random secret the head issues a node when it enrols (see
`gswarm.head.agents`); the head keeps only `credential_hash` of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import msgspec

from gswarm.errors import Forbidden


class Grant(msgspec.Struct):
    """What a transfer token allows."""

    model: str
    source: str
    target: str
    exp: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_credential() -> str:
    """A fresh node credential (256 random bits)."""
    return "gsw_node_" + secrets.token_urlsafe(32)


def credential_hash(credential: str) -> str:
    """What the head stores of a node credential (hex sha256: the secret is random, so a plain
    hash cannot be reversed by guessing)."""
    return hashlib.sha256(credential.encode()).hexdigest()


def node_key(secret: str, node_id: str, cred_hash: str) -> str:
    """The key that node `node_id`'s data server checks grants with (hex), bound to the node's
    current credential (`cred_hash`, its `credential_hash`)."""
    msg = f"gswarm data server {node_id} {cred_hash}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def mint(key: str, model: str, source: str, target: str, ttl: float) -> str:
    """A token letting `target` fetch `model` from `source` for `ttl` seconds; `key` is the
    source's `node_key`."""
    claims = msgspec.json.encode(Grant(model=model, source=source, target=target, exp=time.time() + ttl))
    sig = hmac.new(key.encode(), claims, hashlib.sha256).digest()
    return f"{_b64(claims)}.{_b64(sig)}"


def check(key: str, token: str, model: str, source: str) -> Grant:
    """The grant, if `token` is genuine, unexpired, for `model` and served by `source`;
    Forbidden naming the reason otherwise."""
    if not key:
        raise Forbidden("this node has no transfer key yet (not connected to a head)")
    try:
        claims_b64, sig_b64 = token.split(".", 1)
        claims = _unb64(claims_b64)
        sig = _unb64(sig_b64)
    except (ValueError, TypeError):
        raise Forbidden("malformed transfer token") from None
    if not hmac.compare_digest(sig, hmac.new(key.encode(), claims, hashlib.sha256).digest()):
        raise Forbidden("transfer token signature does not match")
    try:
        grant = msgspec.json.decode(claims, type=Grant)
    except msgspec.DecodeError:
        raise Forbidden("malformed transfer token") from None
    if grant.exp < time.time():
        raise Forbidden("transfer token expired")
    if grant.model != model:
        raise Forbidden(f"transfer token is for model {grant.model!r}, not {model!r}")
    if grant.source != source:
        raise Forbidden(f"transfer token is for node {grant.source!r}, not this node")
    return grant
