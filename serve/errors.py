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
from starlette.exceptions import HTTPException as StarletteHTTPException

from speech.errors import (
    AudioTooLongError,
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


class OverloadedError(ApiError):
    """503 + Retry-After: the replicas' queues are full (Serve backpressure)."""

    def __init__(self, retry_after_s: float = 1.0, what: str = "transcription") -> None:
        seconds = max(1, int(round(retry_after_s + 0.499)))
        super().__init__(503, f"The {what} service is overloaded; retry in {seconds} s.",
                         code="overloaded", headers={"Retry-After": str(seconds)})


def error_body(message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON body OpenAI's clients parse into `APIStatusError.body`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class DiarizationUnavailableError(SpeechError):
    """This deployment cannot diarize (engine missing or its model failed to load)."""

    code = "diarization_unavailable"


SPEECH_ERROR_STATUS: dict[type[SpeechError], int] = {
    DiarizationUnavailableError: 501,
    InvalidOptionError: 400,
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


async def _handle_http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, ApiError):
        return _json(exc)
    if hasattr(exc, "body") and callable(exc.body):  # another router's compatible ApiError
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
    return _json(ApiError(exc.status_code, str(exc.detail), headers=exc.headers))


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


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"route": request.url.path})
    return _json(ApiError(500, "Internal server error.", type=SERVER_ERROR))


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure of `app` an OpenAI-shaped JSON error."""
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(SpeechError, _handle_speech)
    app.add_exception_handler(Exception, _handle_unexpected)
