"""Rate limits: N requests per client IP and per API key in any 60 s window (sliding log).

`rate_limit` (the dependency of every /v1 route) counts the client IP first (`serve.auth.client_ip`:
the peer, or behind TRUSTED_PROXIES the forwarded client), before the key is looked at, so floods
of bad keys are limited by address; then it authenticates, and only a key that authenticated is
counted, by its key id: random bearer tokens create no per-key counters.

Redis holds the counters when REDIS_URL is set, so every ingress replica shares them (each counter
expires one window after its last counted request); without it, or while Redis is unreachable,
each process counts for itself (logged once, and `status()` says "degraded" for readiness) and
goes back to Redis by itself when it answers again. The in-process counters forget a key once its
window has passed and track at most `LOCAL_MAX_KEYS`, dropping the least recently counted first.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from config.settings import get_settings
from serve.auth import Principal, client_ip, current_principal, hash_key
from serve.errors import ApiError

log = logging.getLogger(__name__)

WINDOW_S = 60.0
REDIS_RETRY_S = 5.0
"""While Redis is down, try it again at most this often."""
LOCAL_MAX_KEYS = 20_000
"""Backstop on the in-process counters (each up to `limit` timestamps): past it the key counted
least recently is forgotten. Keys whose window has passed are forgotten anyway."""

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
    """In-process sliding log; exact within one process, bounded in memory.

    A key is forgotten once its last counted request is a window old (it would allow a full
    `limit` again anyway), and at most `max_keys` are tracked: a new key past that forgets the
    key counted least recently. `clock` is for tests."""

    def __init__(self, max_keys: int = LOCAL_MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self._clock = clock
        # key -> (time the key may be forgotten, its hits); least recently counted first
        self._hits: OrderedDict[str, tuple[float, deque[float]]] = OrderedDict()
        self._lock = threading.Lock()

    def _forget_expired(self, now: float) -> None:
        while self._hits:
            key, (expires, _) = next(iter(self._hits.items()))
            if expires > now:
                # Ordered by last count, so with one window for all keys none after it is
                # expired either; with mixed windows a later one waits for the next sweep.
                return
            del self._hits[key]

    def hit(self, key: str, limit: int, window_s: float = WINDOW_S) -> float | None:
        """Count one request; None if allowed, else seconds until one is allowed again."""
        now = self._clock()
        with self._lock:
            self._forget_expired(now)
            entry = self._hits.get(key)
            hits = entry[1] if entry is not None else deque()
            while hits and hits[0] <= now - window_s:
                hits.popleft()
            if len(hits) >= limit:
                return hits[0] + window_s - now
            hits.append(now)
            self._hits[key] = (now + window_s, hits)
            self._hits.move_to_end(key)
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            return None

    def tracked(self) -> int:
        """How many keys are held now (after forgetting the expired ones)."""
        with self._lock:
            self._forget_expired(self._clock())
            return len(self._hits)


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

    async def check_ip(self, ip: str | None) -> float | None:
        """Count one request of client address `ip`; None if allowed, else seconds to wait."""
        if not (self.per_ip and ip):
            return None
        return await self._hit(f"ip:{ip}", self.per_ip)

    async def check_key(self, key_id: str) -> float | None:
        """Count one request of the authenticated key `key_id`; None if allowed, else seconds
        to wait. Only a keyed hash of the key id reaches Redis."""
        if not self.per_key:
            return None
        return await self._hit(f"key:{hash_key(key_id)[:32]}", self.per_key)


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


def _limited(retry: float | None) -> None:
    if retry is not None:
        raise ApiError(
            429, "Rate limit reached; retry after the time in the Retry-After header.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(retry)))},
        )


async def limit_client_ip(request: Request) -> None:
    """FastAPI dependency: 429 with Retry-After once the client's address is over its limit.
    Needs no key, so it runs before authentication."""
    _limited(await get_limiter().check_ip(client_ip(request)))


async def rate_limit(
    _ip_counted: Annotated[None, Depends(limit_client_ip)],
    principal: Annotated[Principal, Depends(current_principal)],
) -> None:
    """FastAPI dependency of every /v1 route: the client IP's limit, then authentication (401),
    then the authenticated key's limit; 429 with Retry-After over either.

    FastAPI resolves the parameters in order, so the address is counted before the key is
    looked at, and the per-key counter is only ever one of a key that authenticated. The
    principal is the request's one (`current_user` reuses it: dependencies are cached per
    request), so authentication runs once."""
    _limited(await get_limiter().check_key(principal.key_id))
