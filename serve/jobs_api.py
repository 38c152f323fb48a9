"""/v1/jobs: submit audio for later, follow it, fetch the transcript, cancel or delete it.

Every route needs an API key (serve.auth) and counts against the rate limits (serve.ratelimit);
another user's job is a 404, never a 403, so ids do not leak. Plug in with
`app.include_router(jobs_api.router)` and `serve.errors.install_error_handlers(app)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from config.settings import get_settings
from db import repository as repo
from db.models import TERMINAL_STATUSES, Job, User
from db.session import get_sessionmaker, ping
from serve import ratelimit, webhooks
from serve.auth import CurrentUser, SessionDep, require_admin
from serve.errors import ApiError, error_responses
from serve.job_runner import JobOptions
from serve.ratelimit import rate_limit
from serve.storage import StoredAudio, delete_audio, release_upload, save_upload
from speech.errors import InvalidOptionError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(rate_limit)],
                   responses=error_responses(401, 429, 503))
TRANSCRIPT_CONTENT: dict[str, Any] = {
    "application/json": {"schema": {"type": "object"}},
    **{t: {"schema": {"type": "string"}} for t in ("text/plain", "application/x-subrip", "text/vtt",
                                                   "text/tab-separated-values")},
}
"""What a transcript comes back as, by `format` (speech.formats.media_type)."""

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_public(job: Job) -> dict[str, Any]:
    """The job as the API shows it: no audio path, no lease internals, no transcript text."""
    return {
        "id": job.id, "object": "job", "status": job.status, "source": job.source,
        "created_at": _ts(job.created_at), "started_at": _ts(job.started_at), "finished_at": _ts(job.finished_at),
        "progress": job.progress, "attempts": job.attempts, "max_attempts": job.max_attempts, "error": job.error,
        "filename": job.filename, "duration": job.duration_s, "language": job.language, "options": job.options,
        "callback_url": job.callback_url, "webhook_status": job.webhook_status,
    }


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, f"No job with id '{job_id}'.", param="job_id", code="job_not_found")


FILENAME_MAX_CHARS = 255
"""The `jobs.filename` column's width."""

log = logging.getLogger(__name__)


def clean_filename(name: str | None) -> str | None:
    """A client's file name as metadata: its last path component, without control characters
    (NUL cannot even be stored) or invisible format characters (a right-to-left override makes
    "\u202egnp.wav" display as "vaw.png"), at most FILENAME_MAX_CHARS. Audio is stored by its
    digest, so the name never reaches the file system."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch) not in ("Cc", "Cf")).strip()
    return base[:FILENAME_MAX_CHARS] or None


async def _check_model(request: Request, model: str) -> None:
    """A job may only ask for the served model (or its alias), as on the transcription route.

    Unchecked where the app has no model handles (the router on its own) or they cannot be asked
    now: a job must be queueable while the model is down, and the runner uses the served model."""
    from serve.openai_api import check_model

    services = getattr(request.app.state, "services", None)
    if services is None:
        return
    try:
        info = await asyncio.wait_for(services.model_info(), timeout=5)
    except Exception as exc:  # noqa: BLE001 - no answer: accept, the runner decides
        log.warning("model not checked at submission", extra={"error": type(exc).__name__})
        return
    check_model(model.strip(), info["id"])


def _owned(session: Session, job_id: str, user_id: int) -> Job:
    job = repo.get_job(session=session, job_id=job_id, user_id=user_id)
    if job is None:
        raise _not_found(job_id)
    return job


def _parse_options(*, task: str | None, model: str | None, language: str | None, prompt: str | None,
                   temperature: str | None, timestamp_granularities: list[str] | None, diarize: str | None,
                   num_speakers: str | None, min_speakers: str | None, max_speakers: str | None) -> JobOptions:
    """The transcription endpoint's own validation (same rules, same messages), then JobOptions."""
    from serve.openai_api import parse_params
    from speech.languages import LANGUAGE_NAMES

    if task not in (None, "", "transcribe", "translate"):
        raise InvalidOptionError("task", "task must be transcribe or translate.")
    params = parse_params(
        task=task or "transcribe",  # type: ignore[arg-type]
        model=model or "whisper-1", language=language, prompt=prompt,
        # the output format is chosen when the transcript is fetched; granularities need verbose_json
        response_format="verbose_json" if timestamp_granularities else "json",
        temperature=temperature, timestamp_granularities=timestamp_granularities, diarize=diarize,
        num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers,
    )
    if params.language is not None and params.language not in LANGUAGE_NAMES:
        raise InvalidOptionError("language", f"Unknown language {params.language!r}.")
    try:
        return JobOptions(model=model, language=params.language, prompt=params.prompt, task=params.task,
                          temperature=params.temperature,
                          word_timestamps="word" in params.timestamp_granularities, diarize=params.diarize,
                          num_speakers=params.num_speakers, min_speakers=params.min_speakers,
                          max_speakers=params.max_speakers)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first.get("loc") else None
        raise ApiError(400, first.get("msg", "invalid option"), param=param, code="invalid_value") from exc


def _in_session(fn: Any, /, **kwargs: Any) -> Any:
    with get_sessionmaker()() as session:
        out = fn(session=session, **kwargs)
        session.commit()
        return out


async def _discard(stored: StoredAudio) -> None:
    """Remove audio this request stored, unless a job references it."""
    if stored.created and not await run_in_threadpool(_in_session, repo.audio_in_use, sha256=stored.sha256):
        delete_audio(stored.sha256)


@router.post("", status_code=202, summary="Queue a transcription job", responses={
    200: {"description": "The earlier job of a repeated Idempotency-Key",
          "content": {"application/json": {"schema": {"type": "object"}}}},
    **error_responses(400, 408, 413, 507)})
async def create_job(
    request: Request,
    user: CurrentUser,
    file: Annotated[UploadFile, File(description="The audio file")],
    model: Annotated[str | None, Form()] = None,
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    temperature: Annotated[str | None, Form()] = None,
    task: Annotated[str | None, Form()] = None,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    diarize: Annotated[str | None, Form()] = None,
    num_speakers: Annotated[str | None, Form()] = None,
    min_speakers: Annotated[str | None, Form()] = None,
    max_speakers: Annotated[str | None, Form()] = None,
    callback_url: Annotated[str | None, Form()] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JSONResponse:
    """202 with the queued job; 200 with the earlier job when this Idempotency-Key was used before."""
    settings = get_settings()
    options = await run_in_threadpool(
        _parse_options, task=task, model=model, language=language, prompt=prompt, temperature=temperature,
        timestamp_granularities=timestamp_granularities, diarize=diarize, num_speakers=num_speakers,
        min_speakers=min_speakers, max_speakers=max_speakers,
    )
    if model:
        await _check_model(request, model)
    if callback_url:
        await run_in_threadpool(webhooks.check_callback_url, callback_url)
    if idempotency_key:
        existing = await run_in_threadpool(_in_session, repo.job_by_idempotency_key, user_id=user.id,
                                           key=idempotency_key)
        if existing is not None:
            return JSONResponse(job_public(existing), status_code=200)
    stored = await save_upload(file, max_bytes=settings.AUDIO_MAX_FILE_SIZE)
    try:
        duration_s = await run_in_threadpool(_probe_duration, stored, settings.AUDIO_MAX_DURATION_S)
        job, created = await run_in_threadpool(
            _in_session, repo.create_job, user_id=user.id, options=options, audio=stored,
            filename=clean_filename(file.filename), callback_url=callback_url,
            idempotency_key=idempotency_key, max_attempts=settings.JOB_MAX_ATTEMPTS, duration_s=duration_s,
        )
    except BaseException:
        await _discard(stored)
        raise
    finally:
        # Drop this request's in-process hold (save_upload took one): job rows are the references
        # here, and a hold left behind would keep a later failed sync upload of the same bytes
        # from removing its file.
        release_upload(stored, keep=True)
    if not created and job.audio_sha256 != stored.sha256:
        await _discard(stored)
    return JSONResponse(job_public(job), status_code=202 if created else 200)


def _probe_duration(stored: StoredAudio, max_duration_s: float) -> float:
    """Refuse what is not audio (or too long) now, with a 400, rather than as a failed job later."""
    from speech.audio import audio_duration_s, decode_audio

    return audio_duration_s(decode_audio(stored.path, max_duration_s=max_duration_s))


@router.get("", summary="List your jobs, newest first", responses=error_responses(400))
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    try:
        jobs, next_cursor = repo.list_jobs(session=session, user_id=user.id, status=status, limit=limit,
                                           cursor=cursor)
    except repo.InvalidCursorError as exc:
        raise ApiError(400, str(exc), param="cursor", code="invalid_value") from exc
    return {"object": "list", "data": [job_public(j) for j in jobs], "has_more": next_cursor is not None,
            "next_cursor": next_cursor}


@router.get("/{job_id}", summary="One job", responses=error_responses(404))
def get_job(job_id: str, user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    return job_public(_owned(session, job_id, user.id))


@router.get("/{job_id}/transcript", summary="The transcript of a finished job, in any output format",
            responses={200: {"description": "The transcript", "content": TRANSCRIPT_CONTENT},
                       **error_responses(400, 404, 409)})
def get_transcript(
    job_id: str, user: CurrentUser, session: SessionDep,
    format: Annotated[str, Query(max_length=32)] = "json",
) -> Response:
    from speech.formats import FORMATS, media_type, render

    job = _owned(session, job_id, user.id)
    if format not in FORMATS:
        raise ApiError(400, f"Unknown format '{format}'; one of: {', '.join(FORMATS)}.", param="format",
                       code="invalid_value")
    if job.status != "succeeded":
        raise ApiError(409, f"Job is {job.status}; a transcript exists once it has succeeded.",
                       param="job_id", code="job_not_finished")
    transcript = repo.load_transcript(session=session, job=job)
    return Response(render(transcript, format), media_type=media_type(format))


@router.get("/{job_id}/events", summary="Server-sent progress events until the job finishes",
            responses={200: {"description": "An event stream",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                       **error_responses(404)})
def job_events(job_id: str, request: Request, user: CurrentUser, session: SessionDep) -> StreamingResponse:
    _owned(session, job_id, user.id)  # 404 before the stream starts
    return StreamingResponse(_event_stream(job_id, user.id, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(job_id: str, user_id: int, request: Request) -> AsyncIterator[str]:
    """Polls the database (the runner may be another process); one event per visible change."""
    last: tuple[Any, ...] | None = None
    quiet_s = 0.0
    while True:
        job = await run_in_threadpool(_in_session, repo.get_job, job_id=job_id, user_id=user_id)
        if job is None:
            yield f"event: deleted\ndata: {json.dumps({'id': job_id})}\n\n"
            return
        state = (job.status, round(job.progress, 3), job.attempts)
        if state != last:
            last, quiet_s = state, 0.0
            yield f"event: {job.status}\ndata: {json.dumps(job_public(job))}\n\n"
        if job.status in TERMINAL_STATUSES or await request.is_disconnected():
            return
        await asyncio.sleep(SSE_POLL_S)
        quiet_s += SSE_POLL_S
        if quiet_s >= SSE_KEEPALIVE_S:
            quiet_s = 0.0
            yield ": keep-alive\n\n"


@router.post("/{job_id}/cancel", summary="Cancel a queued or running job",
             responses=error_responses(404, 409))
def cancel_job(job_id: str, user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    job = _owned(session, job_id, user.id)
    if not repo.cancel_job(session=session, job=job):
        raise ApiError(409, f"Job already {job.status}.", param="job_id", code="job_finished")
    repo.audit(session=session, action="job.cancelled", user_id=user.id, target=job.id)
    return job_public(job)


@router.delete("/{job_id}", summary="Delete a job, its results and its audio",
               responses=error_responses(404))
def delete_job(job_id: str, request: Request, user: CurrentUser, session: SessionDep) -> dict[str, Any]:
    job = _owned(session, job_id, user.id)
    orphan = repo.delete_job(session=session, job=job)
    repo.audit(session=session, action="job.deleted", user_id=user.id, target=job_id,
               ip=request.client.host if request.client else None)
    session.commit()
    if orphan:
        delete_audio(orphan)
    return {"id": job_id, "object": "job.deleted", "deleted": True}


def record_sync_request(*, request: Request, stored: StoredAudio | None, options: Any,
                        transcript: Any, filename: str | None = None) -> bool:
    """The synchronous endpoint's work, recorded as a succeeded job of the authenticated user.

    Blocking (run it in a thread). Returns True when the stored audio is now referenced (keep it).
    """
    user = getattr(request.state, "user", None)
    if user is None:
        return False
    with get_sessionmaker()() as session:
        repo.record_sync_job(session=session, user=user, stored_audio=stored, options=options,
                             transcript=transcript, filename=clean_filename(filename))
        session.commit()
    return stored is not None


def readiness() -> dict[str, Any]:
    """For the ingress's /ready: database reachable; rate limits on Redis or degraded to local."""
    limits = ratelimit.status()
    db_ok = ping()
    return {"database": "ok" if db_ok else "unreachable", "rate_limits": limits,
            "status": "ready" if db_ok and not limits["degraded"] else ("degraded" if db_ok else "unavailable")}


# --------------------------------------------------------------------------- admin
admin_router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(rate_limit)],
                         responses=error_responses(401, 403, 429, 503))
"""Operator routes: admin keys only (403 for ordinary keys). `python -m serve.admin` does the same
and more from a shell on the database."""

AdminUser = Annotated[User, Depends(require_admin)]


@admin_router.get("/queue", summary="Jobs by status and the age of the oldest queued job (admin)")
def queue_stats(_: AdminUser, session: SessionDep) -> dict[str, Any]:
    stats = repo.queue_stats(session=session)
    return {"object": "queue", "by_status": stats["by_status"], "queue_depth": stats["queue_depth"],
            "oldest_queued_age_s": stats["oldest_queued_age_s"]}


@admin_router.post("/keys/{key_id}/revoke", summary="Revoke an API key at once (admin)",
                   responses=error_responses(404))
def revoke_key(key_id: str, request: Request, admin: AdminUser, session: SessionDep) -> dict[str, Any]:
    key = repo.revoke_api_key(session=session, key_id=key_id)
    if key is None:
        raise ApiError(404, f"No API key with id '{key_id}'.", param="key_id", code="key_not_found")
    repo.audit(session=session, action="key.revoked", user_id=key.user_id, target=key.id,
               ip=request.client.host if request.client else None, details={"by": admin.id})
    return {"id": key.id, "object": "api_key", "revoked": True, "revoked_at": _ts(key.revoked_at)}


def prepare_database() -> str | None:
    """Start-up: migrate to head; on the embedded default, create a local key once and return it."""
    from db.migrate import upgrade_head
    from serve.auth import bootstrap_local_key

    settings = get_settings()
    upgrade_head()
    if settings.DB_URL:
        return None
    return _in_session(bootstrap_local_key)
