"""Rate limits: N requests per client IP and per API key in any 60 s window (sliding log).

Redis holds the counters when REDIS_URL is set, so every ingress replica shares them; without it,
or while Redis is unreachable, each process counts for itself (logged once, and `status()` says
"degraded" for readiness) and goes back to Redis by itself when it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
import weakref
from collections import deque
from typing import Any

from fastapi import Request

from config.settings import get_settings
from serve.auth import hash_key
from serve.errors import ApiError

log = logging.getLogger(__name__)

WINDOW_S = 60.0
REDIS_RETRY_S = 5.0
"""While Redis is down, try it again at most this often."""

_SLIDING_LOG = """
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
  return '-1'
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""


class LocalLimiter:
    """In-process sliding log; exact within one process."""

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int, window_s: float = WINDOW_S) -> float | None:
        """Count one request; None if allowed, else seconds until one is allowed again."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - window_s:
                hits.popleft()
            if len(hits) < limit:
                hits.append(now)
                return None
            return hits[0] + window_s - now


class RateLimiter:
    """Per-IP and per-key limits on Redis, falling back to `LocalLimiter` while Redis is away."""

    def __init__(self, *, redis_url: str | None, per_ip: int, per_key: int, window_s: float = WINDOW_S) -> None:
        self.redis_url, self.per_ip, self.per_key, self.window_s = redis_url, per_ip, per_key, window_s
        self.local = LocalLimiter()
        self.redis_down_since: float | None = None
        self._next_redis_try = 0.0
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def status(self) -> dict[str, Any]:
        """For readiness: which backend counts, and whether that is a degradation."""
        if self.redis_url is None:
            return {"backend": "local", "degraded": False}
        if self.redis_down_since is not None:
            return {"backend": "local", "degraded": True, "reason": "redis unreachable"}
        return {"backend": "redis", "degraded": False}

    def _client(self) -> Any:
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = aioredis.from_url(
                self.redis_url, socket_timeout=0.25, socket_connect_timeout=0.25, decode_responses=True
            )
            self._clients[loop] = client
        return client

    async def _hit(self, key: str, limit: int) -> float | None:
        if self.redis_url is not None and time.monotonic() >= self._next_redis_try:
            try:
                out = await self._client().eval(
                    _SLIDING_LOG, 1, f"ratelimit:{key}", time.time(), self.window_s, limit, uuid.uuid4().hex
                )
            except Exception as exc:  # noqa: BLE001 - any Redis failure means: count locally
                self._next_redis_try = time.monotonic() + REDIS_RETRY_S
                if self.redis_down_since is None:
                    self.redis_down_since = time.monotonic()
                    log.warning("redis unreachable; rate limits are per process until it is back",
                                extra={"error": type(exc).__name__})
            else:
                if self.redis_down_since is not None:
                    log.warning("redis reachable again; rate limits shared again")
                    self.redis_down_since = None
                retry = float(out)
                return None if retry < 0 else retry
        return self.local.hit(key, limit, self.window_s)

    async def check(self, *, ip: str | None, api_key: str | None) -> float | None:
        """Count one request; None if allowed, else seconds to wait (for Retry-After)."""
        if self.per_ip and ip:
            retry = await self._hit(f"ip:{ip}", self.per_ip)
            if retry is not None:
                return retry
        if self.per_key and api_key:
            # The key itself never reaches Redis: only its keyed hash.
            return await self._hit(f"key:{hash_key(api_key)[:32]}", self.per_key)
        return None


_limiter: RateLimiter | None = None


def get_limiter() -> RateLimiter:
    """The process-wide limiter, built from settings on first use."""
    global _limiter
    if _limiter is None:
        s = get_settings()
        _limiter = RateLimiter(redis_url=s.REDIS_URL, per_ip=s.RATE_LIMIT_PER_MINUTE, per_key=s.RATE_LIMIT_KEY_PER_MINUTE)
    return _limiter


def reset_limiter() -> None:
    """Forget the limiter so the next request builds one from current settings (tests)."""
    global _limiter
    _limiter = None


def status() -> dict[str, Any]:
    return get_limiter().status()


async def rate_limit(request: Request) -> None:
    """FastAPI dependency: 429 with Retry-After once the caller's IP or key is over its limit."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    api_key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    ip = request.client.host if request.client else None
    retry = await get_limiter().check(ip=ip, api_key=api_key)
    if retry is not None:
        raise ApiError(
            429, "Rate limit reached; retry after the time in the Retry-After header.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(retry)))},
        )
