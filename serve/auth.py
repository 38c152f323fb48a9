"""Who the caller is: API-key authentication (`Authorization: Bearer sk-<key id>.<secret>` on
every /v1 route) and the client's address (`client_ip`, behind trusted proxies).

Only an HMAC-SHA256 of the key (keyed with SECRET_KEY) is stored; the lookup is by the public key id
and the hash comparison is constant time. Keys are never logged; failures leave an audit event.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from config.settings import get_settings
from db import repository as repo
from db.models import User
from db.session import get_sessionmaker, session_scope
from serve.errors import ApiError

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-"


MAX_CLIENT_LEN = 64
"""The audit record's `ip` column holds this many characters."""


def _parse_ip(text: str) -> IPv4Address | IPv6Address | None:
    """An address as proxies write it (`1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:443`,
    `::ffff:1.2.3.4`), IPv4-mapped IPv6 as IPv4; None when it is not an address."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        addr = ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_ip(request: Request) -> str | None:
    """The client's address, for rate limits, logs and audit: the peer's, unless the peer is a
    trusted proxy (settings TRUSTED_PROXIES); then `X-Forwarded-For` is read from the right,
    skipping trusted hops, and the first address that is not trusted is the client (nginx's
    real_ip_recursive). Each proxy appends the address it saw, so that entry was written by a
    trusted proxy; anything a client put into the header sits to its left and is never read.
    From an untrusted peer the header is ignored. When every hop is trusted, the leftmost one
    is the client; an entry that is not an address stops the walk at the last trusted hop."""
    if request.client is None:
        return None
    peer = request.client.host
    peer_addr = _parse_ip(peer)
    if peer_addr is None:
        # Not an address: a test client's name, or text Ray's HTTP proxy (uvicorn, which trusts
        # X-Forwarded-For from 127.0.0.1 itself) took from the header of a local peer. Kept,
        # within the audit record's 64 characters.
        return peer[:MAX_CLIENT_LEN]
    trusted = get_settings().trusted_proxy_networks
    if not trusted:
        return str(peer_addr)

    def is_trusted(addr: IPv4Address | IPv6Address) -> bool:
        return any(addr in net for net in trusted)

    if not is_trusted(peer_addr):
        return str(peer_addr)
    hops = ",".join(request.headers.getlist("x-forwarded-for")).split(",")
    client = peer_addr
    for hop in reversed(hops):
        if not hop.strip():
            continue
        addr = _parse_ip(hop)
        if addr is None:
            break
        client = addr
        if not is_trusted(addr):
            break
    return str(client)


def hash_key(key: str, secret_key: str | None = None) -> str:
    secret = (secret_key or get_settings().SECRET_KEY).encode()
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new (key id, full key). The full key is shown once and never stored."""
    key_id = f"key_{secrets.token_hex(8)}"
    return key_id, f"{KEY_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"


def parse_key(key: str) -> str | None:
    """The key id inside a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX) or "." not in key:
        return None
    key_id = key[len(KEY_PREFIX):].split(".", 1)[0]
    return key_id if key_id.startswith("key_") and 0 < len(key_id) <= 40 else None


def create_key_for(*, session: Session, user: User, name: str = "") -> tuple[str, str]:
    """Create and audit a key; returns (key id, full key)."""
    key_id, key = generate_key()
    repo.add_api_key(session=session, user=user, key_id=key_id, key_hash=hash_key(key), name=name)
    repo.audit(session=session, action="key.created", user_id=user.id, target=key_id)
    return key_id, key


def db_session():  # type: ignore[no-untyped-def]
    """FastAPI dependency: one session per request, committed when the handler returns normally."""
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(db_session)]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: the user and the key they used."""

    user: User
    key_id: str


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def _fail(session: Session, request: Request, reason: str, key_id: str | None) -> ApiError:
    ip = client_ip(request)
    with get_sessionmaker()() as audit_session:  # own transaction: the request's is rolled back
        repo.audit(session=audit_session, action="auth.failed", target=key_id, ip=ip, details={"reason": reason})
        audit_session.commit()
    log.warning("authentication failed", extra={"reason": reason, "key_id": key_id, "client_ip": ip})
    return _unauthorized("Incorrect or missing API key. Send `Authorization: Bearer <key>`.")


def current_principal(request: Request, session: SessionDep) -> Principal:
    """FastAPI dependency: the caller, or 401 in the OpenAI error shape."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _fail(session, request, "missing", None)
    key = key.strip()
    key_id = parse_key(key)
    row = repo.get_api_key(session=session, key_id=key_id) if key_id else None
    # Compare even when no row was found, so timing does not say whether the key id exists.
    expected = row.key_hash if row is not None else hash_key("no-such-key")
    if not hmac.compare_digest(expected, hash_key(key)) or row is None:
        raise _fail(session, request, "invalid", key_id)
    if row.revoked_at is not None:
        raise _fail(session, request, "revoked", key_id)
    repo.touch_api_key(session=session, key_id=row.id)
    session.commit()  # release SQLite's write lock now, not at the end of the request
    request.state.user = row.user  # for the sync endpoint's record of its work
    return Principal(user=row.user, key_id=row.id)


def current_user(principal: Annotated[Principal, Depends(current_principal)]) -> User:
    """FastAPI dependency: the authenticated user."""
    return principal.user


def require_admin(user: Annotated[User, Depends(current_user)]) -> User:
    """FastAPI dependency for admin-only routes: 403 for ordinary keys."""
    if not user.is_admin:
        raise ApiError(403, "This operation needs an admin key.", code="insufficient_permissions")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def bootstrap_local_key(*, session: Session) -> str | None:
    """Embedded default: with no users at all, create a local admin and return its key (print it once)."""
    if repo.count_users(session=session):
        return None
    user = repo.create_user(session=session, email="local@localhost", is_admin=True)
    _, key = create_key_for(session=session, user=user, name="local bootstrap key")
    return key
