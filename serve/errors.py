"""OpenAI's error shape and the one mapping of expected failures to HTTP statuses.

Every router (transcriptions, jobs, auth) answers errors as
`{"error": {"message", "type", "param", "code"}}`; `install_error_handlers(app)` makes FastAPI's
own failures (validation, 404, 405) and the engine's `SpeechError`s come out that way too.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from speech.errors import (
    AudioTooLargeError,
    AudioTooLongError,
    DiarizationUnavailableError,
    InvalidOptionError,
    ModelNotFoundError,
    SpeechError,
)

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
OVERLOADED = "service_unavailable_error"

_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: INVALID_REQUEST,
                 429: "rate_limit_error", 501: INVALID_REQUEST, 503: OVERLOADED}


class ApiError(HTTPException):
    """An expected failure, answered in OpenAI's error shape with its own status and headers."""

    def __init__(self, status_code: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.message = message
        self.type = type or _STATUS_TYPES.get(status_code, INVALID_REQUEST if status_code < 500
                                              else SERVER_ERROR)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def __reduce__(self) -> tuple[Any, ...]:
        """Survive pickling (a replica raising to the ingress) with every field intact."""
        return (_rebuild_api_error, (self.status_code, self.message, self.type, self.param,
                                     self.code, self.headers))


def _rebuild_api_error(status_code: int, message: str, type: str, param: str | None,
                       code: str | None, headers: dict[str, str] | None) -> ApiError:
    return ApiError(status_code, message, type=type, param=param, code=code, headers=headers)


class UploadTooLargeError(ApiError):
    """413: the upload passed `AUDIO_MAX_FILE_SIZE`; raised while streaming, not after."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The uploaded file is larger than the limit of {max_bytes} bytes.",
                         param="file", code="file_too_large")
        self.max_bytes = max_bytes


class UploadStalledError(ApiError):
    """408: the client stopped sending the request body for `timeout_s` (a stalled upload), or
    sent it slower than `min_rate_bps` on average (a trickled one)."""

    def __init__(self, timeout_s: float, min_rate_bps: int | None = None) -> None:
        what = (f"arrived slower than {min_rate_bps} bytes/s" if min_rate_bps
                else f"sent nothing for {timeout_s:g} s")
        super().__init__(408, f"The upload {what} and was dropped; send the whole body without pausing.",
                         code="upload_timeout", headers={"Connection": "close"})
        self.timeout_s = timeout_s
        self.min_rate_bps = min_rate_bps


class InsufficientStorageError(ApiError):
    """507: storing the upload would pass STORAGE_QUOTA_BYTES, or the disk is full."""

    def __init__(self, message: str) -> None:
        super().__init__(507, message, type=SERVER_ERROR, param="file",
                         code="insufficient_storage")


class OverloadedError(ApiError):
    """503 + Retry-After: the replicas' queues are full (Serve backpressure)."""

    def __init__(self, retry_after_s: float = 1.0, what: str = "transcription") -> None:
        seconds = max(1, int(round(retry_after_s + 0.499)))
        super().__init__(503, f"The {what} service is overloaded; retry in {seconds} s.",
                         code="overloaded", headers={"Retry-After": str(seconds)})


class DatabaseUnavailableError(ApiError):
    """503 + Retry-After: the database cannot be reached now (restarting, network, pool full)."""

    def __init__(self, retry_after_s: int = 5) -> None:
        super().__init__(503, f"The database is unavailable; retry in {retry_after_s} s.",
                         code="database_unavailable", headers={"Retry-After": str(retry_after_s)})


class ReplicaUnavailableError(ApiError):
    """503 + Retry-After: the model replica serving this request died (Serve replaces it)."""

    def __init__(self, retry_after_s: float = 5.0, what: str = "transcription") -> None:
        seconds = max(1, int(round(retry_after_s + 0.499)))
        super().__init__(503, f"The {what} replica serving this request was lost; "
                         f"retry in {seconds} s.", code="replica_unavailable",
                         headers={"Retry-After": str(seconds)})


def is_database_unavailable(exc: BaseException) -> bool:
    """A database error that says "not reachable right now", not "this query is wrong":
    connection refused, reset or closed, a pool timeout, an operational error (restart,
    failover, lock timeout); retrying later can succeed."""
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.TimeoutError)):
        return True
    return isinstance(exc, sa.DBAPIError) and bool(exc.connection_invalidated)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error's body: OpenAI's shape (what `error_body` builds)."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "Invalid request: a parameter or the uploaded file, named in `param`",
    401: "Missing, malformed or revoked API key",
    403: "The key may not do this (admin keys only)",
    404: "No such resource for this key (another user's job is a 404 too)",
    408: "The upload stalled: nothing was sent for UPLOAD_STALL_TIMEOUT_S, or less than UPLOAD_MIN_RATE_BPS on average",
    409: "The job is not in a state that allows this",
    413: "The upload is larger than AUDIO_MAX_FILE_SIZE",
    429: "Rate limit reached; retry after Retry-After seconds",
    501: "Not available in this deployment (diarization)",
    503: "Overloaded, or a dependency (model, database) is unavailable; see Retry-After",
    507: "The audio storage is full (STORAGE_QUOTA_BYTES or the disk)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the error statuses a route can answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        if status == 429:
            entry["headers"] = {"Retry-After": {"description": "Seconds to wait",
                                                "schema": {"type": "integer"}}}
        out[status] = entry
    return out


def error_body(message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON body OpenAI's clients parse into `APIStatusError.body`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


SPEECH_ERROR_STATUS: dict[type[SpeechError], int] = {
    DiarizationUnavailableError: 501,
    InvalidOptionError: 400,
    AudioTooLargeError: 413,
    AudioTooLongError: 400,
    ModelNotFoundError: 404,
    SpeechError: 400,  # every AudioError: not audio, empty, corrupt, no audio stream
}
"""Most specific class first; the first `isinstance` match wins."""


def from_speech_error(exc: SpeechError) -> ApiError:
    """The API error for an engine error: status from the table, `code` and `param` kept."""
    status = next(s for cls, s in SPEECH_ERROR_STATUS.items() if isinstance(exc, cls))
    param = getattr(exc, "param", None)
    if param is None and status == 400 and not isinstance(exc, InvalidOptionError):
        param = "file"
    if isinstance(exc, ModelNotFoundError):
        param = "model"
    if isinstance(exc, DiarizationUnavailableError):
        param = "diarize"
    return ApiError(status, str(exc), param=param, code=exc.code)


def unwrap(exc: BaseException) -> BaseException:
    """The user-level exception inside a Ray task error raised by a deployment handle."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and exc is not exc.cause:  # type: ignore[attr-defined]
        exc = exc.cause  # type: ignore[attr-defined]
        seen += 1
    return exc


def _json(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _allowed_methods(request: Request) -> str | None:
    """The methods the app's OpenAPI document lists for this path. Starlette's 405 names only the
    first matching route's (GET /v1/jobs/{id} and DELETE /v1/jobs/{id} are two routes)."""
    import re

    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        parts = re.split(r"(\{[^/}]+\})", template)
        pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
        if re.fullmatch(pattern, request.url.path):
            methods |= {m.upper() for m in item if m in _HTTP_METHODS}
    return ", ".join(sorted(methods)) or None


async def _handle_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, ApiError):
        return _json(exc)
    if hasattr(exc, "body") and callable(exc.body):  # another router's compatible ApiError
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
    headers = exc.headers
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        headers = {**(headers or {}), "Allow": allowed}
    return _json(ApiError(exc.status_code, str(exc.detail), headers=headers))


async def _handle_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = loc[0] if loc else None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    return _json(ApiError(400, message, param=param, code="invalid_value" if param else None))


async def _handle_speech(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SpeechError)
    return _json(from_speech_error(exc))


async def _handle_database(request: Request, exc: Exception) -> JSONResponse:
    if not is_database_unavailable(exc):
        return await _handle_unexpected(request, exc)
    log.warning("database unavailable", extra={
        "route": request.url.path, "error": type(exc).__name__,
        "detail": str(getattr(exc, "orig", None) or exc).strip()[:300]})
    return _json(DatabaseUnavailableError())


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"route": request.url.path})
    return _json(ApiError(500, "Internal server error.", type=SERVER_ERROR))


def _document_400_not_422(app: FastAPI) -> None:
    """Drop FastAPI's automatic 422 from the OpenAPI document: validation failures are answered
    400 here (`_handle_validation`), which routes declare with `error_responses(400, ...)`."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    if isinstance(operation, dict):
                        operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure of `app` an OpenAI-shaped JSON error (and say so in its OpenAPI)."""
    _document_400_not_422(app)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(SpeechError, _handle_speech)
    from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeoutError

    app.add_exception_handler(DBAPIError, _handle_database)  # 503 when the DB is unreachable
    app.add_exception_handler(PoolTimeoutError, _handle_database)
    app.add_exception_handler(Exception, _handle_unexpected)
