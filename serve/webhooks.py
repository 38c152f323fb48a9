"""Job webhooks: a signed POST to the job's callback_url when it finishes, retried with backoff.

Signature header (Stripe-style): `X-Speech-Signature: t=<unix ts>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
keyed with WEBHOOK_SECRET (or a key derived from SECRET_KEY). Targets are checked when the job is
submitted and again at delivery (DNS may change): no loopback, private, link-local or reserved
addresses unless WEBHOOK_ALLOW_INTERNAL.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from config.settings import get_settings
from speech.errors import InvalidOptionError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Speech-Signature"


def webhook_secret() -> bytes:
    s = get_settings()
    if s.WEBHOOK_SECRET:
        return s.WEBHOOK_SECRET.encode()
    return hmac.new(s.SECRET_KEY.encode(), b"webhook-signing", hashlib.sha256).digest()


def sign(body: bytes, *, secret: bytes, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify(body: bytes, header: str, *, secret: bytes, tolerance_s: float = 300.0) -> bool:
    """What a receiver runs: signature matches and is recent (replay window)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    expected = sign(body, secret=secret, timestamp=ts).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _is_internal(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_global or addr.is_multicast


def check_callback_url(url: str, *, allow_internal: bool | None = None) -> str:
    """Accept an http(s) URL whose host resolves only to public addresses; else InvalidOptionError."""
    if allow_internal is None:
        allow_internal = get_settings().WEBHOOK_ALLOW_INTERNAL
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
        raise InvalidOptionError("callback_url", "callback_url must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise InvalidOptionError("callback_url", "callback_url must not carry credentials")
    if allow_internal:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidOptionError("callback_url", "callback_url host does not resolve") from exc
    if any(_is_internal(info[4][0]) for info in infos):
        raise InvalidOptionError(
            "callback_url", "callback_url points at an internal address; set WEBHOOK_ALLOW_INTERNAL to allow it"
        )
    return url


def job_payload(job: Any) -> dict[str, Any]:
    """What the receiver gets: ids and status, never transcript text (fetch it with the API)."""
    return {
        "type": f"job.{job.status}",
        "job": {"id": job.id, "status": job.status, "error": job.error, "attempts": job.attempts,
                "duration": job.duration_s, "language": job.language},
    }


async def deliver(url: str, payload: dict[str, Any], *, max_attempts: int | None = None,
                  backoff_s: float | None = None, timeout_s: float | None = None) -> tuple[bool, int]:
    """POST until a 2xx, with exponential backoff on errors, 5xx and 429. Returns (delivered, attempts)."""
    s = get_settings()
    max_attempts = max_attempts or s.WEBHOOK_MAX_ATTEMPTS
    delay = s.WEBHOOK_BACKOFF_S if backoff_s is None else backoff_s
    body = json.dumps(payload, separators=(",", ":")).encode()
    secret = webhook_secret()
    async with httpx.AsyncClient(timeout=timeout_s or s.WEBHOOK_TIMEOUT_S, follow_redirects=False) as client:
        for attempt in range(1, max_attempts + 1):
            try:
                check_callback_url(url)
                headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret=secret)}
                response = await client.post(url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return True, attempt
                retryable = response.status_code >= 500 or response.status_code == 429
                log.warning("webhook refused", extra={"status": response.status_code, "attempt": attempt})
            except InvalidOptionError:
                log.warning("webhook target refused at delivery", extra={"attempt": attempt})
                return False, attempt
            except httpx.HTTPError as exc:
                retryable = True
                log.warning("webhook failed", extra={"error": type(exc).__name__, "attempt": attempt})
            if not retryable:
                return False, attempt
            if attempt < max_attempts:
                await asyncio.sleep(delay)
                delay *= 2
    return False, max_attempts
