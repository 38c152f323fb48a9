"""A job's state changes, pushed from the runner to whoever follows the job.

The database stays the source of truth. With `REDIS_URL` set, the runner also publishes each
change (claimed, each window's progress, finished) on the job's channel, and the event stream
(`GET /v1/jobs/{id}/events`) waits on that channel instead of polling, so every step reaches the
follower, in order, as it happens. Without Redis, or while it is unreachable, publishing does
nothing and followers poll the database: slower, never wrong.

An event's id is its state (`attempts.status.progress-permille`): states only move forward, so
a follower that reconnects with `Last-Event-ID` is sent only what came after.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from config.settings import get_settings

log = logging.getLogger("serve.job_events")

STATUS_ORDER = {"queued": 0, "running": 1, "succeeded": 2, "failed": 2, "cancelled": 2}
REDIS_RETRY_S = 5.0


def channel(job_id: str) -> str:
    return f"speech:job:{job_id}"


REQUEUED = 3
"""Order of a job queued again after an attempt: later than that attempt's running state."""


def event_id(status: str, progress: float, attempts: int) -> str:
    """The state as an id that sorts as the states follow one another: attempt, then status
    (queued, running, final; queued again after a failed attempt), then progress."""
    order = REQUEUED if status == "queued" and attempts > 0 else STATUS_ORDER.get(status, 0)
    return f"{attempts}.{order}.{int(round(progress * 1000)):04d}"


def is_after(state_id: str, last_id: str | None) -> bool:
    """Whether `state_id` comes after what the follower saw last (None: saw nothing)."""
    if not last_id:
        return True
    try:
        last = tuple(map(int, last_id.split(".")))
    except ValueError:  # a foreign or damaged Last-Event-ID: start afresh
        return True
    if len(last) != 3:
        return True
    return tuple(map(int, state_id.split("."))) > last


class Publisher:
    """The runner's side: one publish per change, never failing the job for Redis's sake."""

    def __init__(self, redis_url: str | None = None) -> None:
        self.redis_url = redis_url if redis_url is not None else get_settings().REDIS_URL
        self._client: Any = None
        self._loop: Any = None
        self._down_until = 0.0

    def _redis(self) -> Any:
        import asyncio

        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client belongs to its loop
            self._client = aioredis.Redis.from_url(self.redis_url, socket_timeout=2,
                                                   socket_connect_timeout=2)
            self._loop = loop
        return self._client

    async def publish(self, job_id: str, state: dict[str, Any]) -> None:
        if not self.redis_url or time.monotonic() < self._down_until:
            return
        try:
            await self._redis().publish(channel(job_id), json.dumps(state))
        except Exception as exc:  # noqa: BLE001 - followers fall back to polling
            self._down_until = time.monotonic() + REDIS_RETRY_S
            log.warning("job event not published; followers poll", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - a client of a loop that is gone
                pass


async def subscribe(job_id: str, redis_url: str | None) -> AsyncIterator[dict[str, Any] | None]:
    """Changes published for the job, as they come; None every few seconds without one (the
    caller re-reads the database then). Ends at once without Redis or when it fails."""
    if not redis_url:
        return
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel(job_id))
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
            yield json.loads(message["data"]) if message else None
    finally:
        try:
            await pubsub.aclose()
            await client.aclose()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
