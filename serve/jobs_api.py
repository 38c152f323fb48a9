"""/v1/jobs: submit audio for later, follow it, fetch the transcript, cancel or delete it.

Every route needs an API key (serve.auth) and counts against the rate limits (serve.ratelimit);
another user's job is a 404, never a 403, so ids do not leak. Plug in with
`app.include_router(jobs_api.router)` and `serve.errors.install_error_handlers(app)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from config.settings import get_settings
from db import repository as repo
from db.models import TERMINAL_STATUSES, Job, User
from serve import job_events, webhooks
from serve.auth import CurrentUser, SessionDep, client_ip, require_admin
from serve.context import ServicesDep
from serve.errors import ApiError, error_responses
from serve.job_records import clean_filename, in_session
from serve.params import TranscriptionParams, check_model, parse_params
from serve.ratelimit import rate_limit
from serve.storage import StoredAudio, delete_audio, release_upload, save_upload
from speech.audio import load_audio
from speech.request import check_request

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


log = logging.getLogger(__name__)


async def _check_against_models(services: ServicesDep, params: TranscriptionParams) -> None:
    """The request against what the served models can do (model name, language, translation,
    diarization), as the transcription route checks it: a job that cannot succeed is refused
    now, not failed later. Skipped only while the models do not answer: a job must be queueable
    while they are down; the runner checks again before it runs it."""
    try:
        caps = await asyncio.wait_for(services.models.capabilities(), timeout=5)
    except Exception as exc:  # noqa: BLE001 - no answer: accept, the runner decides
        log.warning("options not checked against the models at submission",
                    extra={"error": type(exc).__name__})
        return
    check_model(params.model, caps.model)
    check_request(params.request, caps)


def _owned(session: Session, job_id: str, user_id: int) -> Job:
    job = repo.get_job(session=session, job_id=job_id, user_id=user_id)
    if job is None:
        raise _not_found(job_id)
    return job


async def _discard(stored: StoredAudio) -> None:
    """Remove audio this request stored, unless a job references it."""
    if stored.created and not await run_in_threadpool(in_session, repo.audio_in_use, sha256=stored.sha256):
        delete_audio(stored.sha256)


@router.post("", status_code=202, summary="Queue a transcription job", responses={
    200: {"description": "The earlier job of a repeated Idempotency-Key",
          "content": {"application/json": {"schema": {"type": "object"}}}},
    **error_responses(400, 408, 413, 507)})
async def create_job(
    request: Request,
    user: CurrentUser,
    services: ServicesDep,
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
    params = parse_params(
        task=task, model=model or "whisper-1", language=language, prompt=prompt,
        # the output format is chosen when the transcript is fetched; granularities need verbose_json
        response_format="verbose_json" if timestamp_granularities else "json",
        temperature=temperature, timestamp_granularities=timestamp_granularities, diarize=diarize,
        num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers,
    )
    await _check_against_models(services, params)
    options = {"model": model, **params.request.to_dict()}
    if callback_url:
        await run_in_threadpool(webhooks.check_callback_url, callback_url)
    if idempotency_key:
        existing = await run_in_threadpool(in_session, repo.job_by_idempotency_key, user_id=user.id,
                                           key=idempotency_key)
        if existing is not None:
            return JSONResponse(job_public(existing), status_code=200)
    stored = await save_upload(file, max_bytes=settings.AUDIO_MAX_FILE_SIZE)
    try:
        duration_s = await run_in_threadpool(_probe_duration, stored, settings.AUDIO_MAX_DURATION_S)
        job, created = await run_in_threadpool(
            in_session, repo.create_job, user_id=user.id, options=options, audio=stored,
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
    from speech.audio import AudioLimits, audio_duration_s

    return audio_duration_s(load_audio(stored.path, AudioLimits(max_duration_s=max_duration_s)))


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
def follow_job(job_id: str, request: Request, user: CurrentUser, session: SessionDep,
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
               ) -> StreamingResponse:
    """An id that is not one of ours (foreign, damaged, too long) is ignored: the stream starts
    from the current state, as for a first connection."""
    _owned(session, job_id, user.id)  # 404 before the stream starts
    return StreamingResponse(_event_stream(job_id, user.id, request, (last_event_id or "")[:64] or None),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(job: dict[str, Any]) -> str:
    state_id = job_events.event_id(job["status"], job["progress"], job["attempts"])
    return f"id: {state_id}\nevent: {job['status']}\ndata: {json.dumps(job)}\n\n"


async def _event_stream(job_id: str, user_id: int, request: Request,
                        last_id: str | None) -> AsyncIterator[str]:
    """One event per change of status, progress or attempts, each with its state as id; after a
    reconnect (Last-Event-ID) only what came since. Changes are pushed through Redis when it is
    configured (serve/job_events.py), else read from the database every SSE_POLL_S. The stream
    ends itself before Serve's request timeout (JOB_EVENTS_MAX_S) and tells the client to
    reconnect, so a long job is followed across reconnections, not cut off."""
    settings = get_settings()
    clock = asyncio.get_running_loop().time
    deadline = clock() + settings.JOB_EVENTS_MAX_S
    snapshot: dict[str, Any] | None = None
    sent_at = clock()

    async def read() -> dict[str, Any] | None:
        job = await run_in_threadpool(in_session, repo.get_job, job_id=job_id, user_id=user_id)
        return None if job is None else job_public(job)

    def fresh(state: dict[str, Any]) -> bool:
        nonlocal last_id
        state_id = job_events.event_id(state["status"], state["progress"], state["attempts"])
        if not job_events.is_after(state_id, last_id):
            return False
        last_id = state_id
        return True

    pushed = job_events.subscribe(job_id, settings.REDIS_URL)
    reread = True
    try:
        while True:
            if reread:  # first, on a poll, after a quiet spell, and for a final state
                snapshot = await read()
                if snapshot is None:
                    yield f"event: deleted\ndata: {json.dumps({'id': job_id})}\n\n"
                    return
                if fresh(snapshot):
                    sent_at = clock()
                    yield _event(snapshot)
                if snapshot["status"] in TERMINAL_STATUSES:
                    return
            if await request.is_disconnected():
                return
            if clock() >= deadline:
                yield "retry: 1000\n\n"  # reconnect with Last-Event-ID to go on
                return
            pushed_events = await _next_push(pushed, snapshot, fresh)  # type: ignore[arg-type]
            if pushed_events is None:  # no Redis: poll
                await asyncio.sleep(SSE_POLL_S)
            reread = not pushed_events
            for event in pushed_events or []:
                sent_at = clock()
                yield event
            if clock() - sent_at >= SSE_KEEPALIVE_S:
                sent_at = clock()
                yield ": keep-alive\n\n"
    finally:
        await pushed.aclose()


async def _next_push(pushed: AsyncIterator[dict[str, Any] | None], snapshot: dict[str, Any],
                     fresh: Any) -> list[str] | None:
    """The events of the next message pushed for the job: a running step straight from the
    message (no database read between steps, so every step is seen however fast they come);
    [] when none came for a while, or for a final state (the caller reads the database then,
    which has all of its fields); None without Redis (the caller polls)."""
    try:
        message = await anext(pushed)
    except StopAsyncIteration:
        return None
    except Exception as exc:  # noqa: BLE001 - Redis failed under the stream: poll instead
        log.warning("job events: Redis subscription lost; polling", extra={"error": type(exc).__name__})
        return None
    if not message or message.get("status") != "running":
        return []
    state = {**snapshot, **message}
    return [_event(state)] if fresh(state) else []


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
               ip=client_ip(request))
    session.commit()
    if orphan:
        delete_audio(orphan)
    return {"id": job_id, "object": "job.deleted", "deleted": True}


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
               ip=client_ip(request), details={"by": admin.id})
    return {"id": key.id, "object": "api_key", "revoked": True, "revoked_at": _ts(key.revoked_at)}
