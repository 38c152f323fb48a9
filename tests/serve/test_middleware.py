"""The upload guard in front of every route: a body that stalls, or that trickles in slower
than the floor, is answered 408 before the app has it; a slow but steady upload is not.

Plain ASGI calls with a scripted client (chunks and the pauses between them), so the times are
fractions of a second.
"""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.middleware import BodyLimitMiddleware


async def _echo_length(scope, receive, send) -> None:  # noqa: ANN001 - an ASGI app
    body = await Request(scope, receive).body()
    await JSONResponse({"received": len(body)})(scope, receive, send)


def _upload(chunks: list[bytes], pause_s: float | list[float], *, stall_s: float,
            min_rate_bps: int) -> tuple[int, dict]:
    """POST the chunks with `pause_s` before each (or the k-th pause before the k-th chunk);
    (status, JSON body) of the answer."""
    app = BodyLimitMiddleware(_echo_length, limit_bytes=1 << 20, stall_timeout_s=stall_s,
                              min_rate_bps=min_rate_bps)
    pending = list(chunks)
    pauses = list(pause_s) if isinstance(pause_s, list) else [pause_s] * len(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        if not pending:
            await asyncio.sleep(3600)  # the body is complete: only a disconnect could come
        await asyncio.sleep(pauses.pop(0))
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/audio/transcriptions", "headers": [],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_a_steady_upload_passes() -> None:
    status, body = _upload([b"x" * 500] * 6, 0.05, stall_s=0.5, min_rate_bps=1000)
    assert (status, body) == (200, {"received": 3000})


def test_a_body_that_stops_arriving_is_answered_408() -> None:
    status, body = _upload([b"x" * 500, b"x"], 0.8, stall_s=0.3, min_rate_bps=0)
    assert status == 408
    assert body["error"]["code"] == "upload_timeout"
    assert "sent nothing for 0.3 s" in body["error"]["message"]


def test_a_trickle_that_never_stalls_is_cut_off_by_the_rate_floor() -> None:
    """Ten bytes every 0.1 s never pauses for the 0.5 s stall timeout, but after it averages
    100 bytes/s against a floor of 1000: cut off, where without the floor it would go on."""
    status, body = _upload([b"x" * 10] * 30, 0.1, stall_s=0.5, min_rate_bps=1000)
    assert status == 408
    assert body["error"]["code"] == "upload_timeout"
    assert "slower than 1000 bytes/s" in body["error"]["message"]

    status, body = _upload([b"x" * 10] * 8, 0.1, stall_s=0.5, min_rate_bps=0)
    assert (status, body) == (200, {"received": 80})


def test_a_slow_start_is_forgiven_within_the_stall_timeout() -> None:
    """The floor counts from the end of the first stall timeout: a body whose first bytes take
    a moment (a client still opening its file) is not held to the average from the first byte."""
    status, body = _upload([b"x" * 200] * 3, [0.45, 0.01, 0.01], stall_s=0.5, min_rate_bps=1000)
    assert (status, body) == (200, {"received": 600})
