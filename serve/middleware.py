"""ASGI middleware of the ingress: the upload size and stall limits, the HTTP metrics and the
access log.

All plain ASGI (not `BaseHTTPMiddleware`), so the body limits see the body as it streams in and
the metrics and access log see the final status of every response, errors included.

Behind Ray Serve the proxy reads the client's body as fast as it comes and hands it to the
replica message by message; when a client stops sending, the replica's `receive()` simply waits
(until the proxy's `request_timeout_s`, 10 minutes). The stall limit answers such a request with
a 408 after `stall_timeout_s` without a body message.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import metrics
from serve.errors import ApiError, UploadStalledError, UploadTooLargeError

access_log = logging.getLogger("serve.access")

MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Room for form fields and part headers on top of the audio size limit."""


class BodyLimitMiddleware:
    """413 for uploads over the limit: by Content-Length before reading anything, else while
    the body streams in (the request never gets past `limit_bytes`); 408 for a body that stops
    arriving for `stall_timeout_s` (None: wait as long as the server in front does), or that
    after that first `stall_timeout_s` averages under `min_rate_bps` (0: no floor). The floor is
    Apache mod_reqtimeout's MinRate: each byte received buys 1/min_rate more seconds, so a
    client trickling a byte now and then is cut off while a slow but real upload is not."""

    def __init__(self, app: ASGIApp, limit_bytes: int, stall_timeout_s: float | None = None,
                 min_rate_bps: int = 0) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.stall_timeout_s = stall_timeout_s
        self.min_rate_bps = min_rate_bps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, receive, send)
            return
        seen = 0
        started = False
        body_done = False
        stall_s = self.stall_timeout_s
        min_rate = self.min_rate_bps
        loop = asyncio.get_running_loop()
        begun = loop.time()

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done or stall_s is None:
                message = await receive()  # after the body: only a disconnect comes, wait for it
            else:
                wait, rate_bound = stall_s, False
                if min_rate:
                    budget = begun + stall_s + seen / min_rate - loop.time()
                    wait, rate_bound = min(stall_s, max(budget, 0.0)), budget < stall_s
                try:
                    message = await asyncio.wait_for(receive(), wait)
                except asyncio.TimeoutError:
                    raise UploadStalledError(stall_s, min_rate if rate_bound else None) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    raise UploadTooLargeError(limit - MULTIPART_OVERHEAD_BYTES)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (UploadTooLargeError, UploadStalledError) as exc:
            if started:
                raise
            await self._reject(scope, receive, send, exc)

    async def _reject(self, scope: Scope, receive: Receive, send: Send,
                      exc: ApiError | None = None) -> None:
        exc = exc or UploadTooLargeError(self.limit_bytes - MULTIPART_OVERHEAD_BYTES)
        response = JSONResponse(exc.body(), status_code=exc.status_code,
                                headers={**(exc.headers or {}), "Connection": "close"})
        await response(scope, receive, send)


def request_id(scope: Scope) -> str | None:
    """Serve's id of the request (the `x-request-id` it answers with), when behind Serve."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - not in a Serve replica (tests, plain ASGI)
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"x-request-id")
        return value.decode("latin-1") if value else None


class HttpMetricsMiddleware:
    """Request count and latency by route template (bounded labels), method and status; one
    JSON access line per request: method, route template (never the raw path or query, which
    may carry names), status, duration, request id and the authenticated user's id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            duration_s = time.perf_counter() - t0
            metrics.HTTP_REQUESTS.labels(template, method, str(status)).inc()
            metrics.HTTP_REQUEST_DURATION.labels(template, method).observe(duration_s)
            user = (scope.get("state") or {}).get("user")
            access_log.info("access", extra={
                "method": method, "route": template, "status": status,
                "duration_s": round(duration_s, 4), "request_id": request_id(scope),
                "user_id": getattr(user, "id", None)})
