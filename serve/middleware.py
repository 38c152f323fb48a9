"""ASGI middleware of the ingress: the upload size limit and the HTTP metrics.

Both are plain ASGI (not `BaseHTTPMiddleware`), so the size limit sees the body as it streams in
and the metrics see the final status of every response, errors included.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import metrics
from serve.errors import UploadTooLargeError

MULTIPART_OVERHEAD_BYTES = 64 * 1024
"""Room for form fields and part headers on top of the audio size limit."""


class BodyLimitMiddleware:
    """413 for uploads over the limit: by Content-Length before reading anything, else while
    the body streams in (the request never gets past `limit_bytes`)."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

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

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise UploadTooLargeError(limit - MULTIPART_OVERHEAD_BYTES)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except UploadTooLargeError:
            if started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = UploadTooLargeError(self.limit_bytes - MULTIPART_OVERHEAD_BYTES)
        response = JSONResponse(exc.body(), status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


class HttpMetricsMiddleware:
    """Request count and latency by route template (bounded labels), method and status."""

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
            metrics.HTTP_REQUESTS.labels(template, method, str(status)).inc()
            metrics.HTTP_REQUEST_DURATION.labels(template, method).observe(time.perf_counter() - t0)
