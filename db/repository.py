"""Every query the service runs, as functions taking the session explicitly (keyword-only).

The job queue lives here: claims take a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite a
conditional UPDATE decides the race), results are written only by the lease owner and replace
whatever an earlier attempt wrote, so a job is done at least once but recorded exactly once.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import (
    TERMINAL_STATUSES,
    ApiKey,
    AuditEvent,
    Job,
    SegmentRow,
    User,
    WordRow,
    new_id,
    utcnow,
)
from speech.types import Segment, SpeakerTurn, Transcript, Word


class StoredAudioLike(Protocol):
    path: Any
    sha256: str
    size: int


class InvalidCursorError(ValueError):
    """A pagination cursor this service did not issue."""


# ---------------------------------------------------------------- users, keys, audit


def create_user(*, session: Session, email: str, is_admin: bool = False) -> User:
    user = User(email=email.strip().lower(), is_admin=is_admin)
    session.add(user)
    session.flush()
    return user


def get_user_by_email(*, session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == email.strip().lower()))


def count_users(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User)) or 0


def add_api_key(*, session: Session, user: User, key_id: str, key_hash: str, name: str = "") -> ApiKey:
    key = ApiKey(id=key_id, user_id=user.id, key_hash=key_hash, name=name)
    session.add(key)
    session.flush()
    return key


def get_api_key(*, session: Session, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def list_api_keys(*, session: Session, user_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at)))


def revoke_api_key(*, session: Session, key_id: str) -> ApiKey | None:
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def touch_api_key(*, session: Session, key_id: str, min_interval_s: float = 60.0) -> None:
    """Record use, at most once per interval, so authentication does not write on every request."""
    now = utcnow()
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - timedelta(seconds=min_interval_s)),
        )
        .values(last_used_at=now)
    )


def audit(
    *,
    session: Session,
    action: str,
    user_id: int | None = None,
    target: str | None = None,
    ip: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append an audit event; callers pass ids, never keys or transcript text."""
    session.add(AuditEvent(action=action, user_id=user_id, target=target, ip=ip, details=dict(details or {})))


def list_audit_events(*, session: Session, action: str | None = None) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(AuditEvent.id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    return list(session.scalars(query))


# ---------------------------------------------------------------- jobs: API side


def options_to_dict(options: Any) -> dict[str, Any]:
    """Options as stored JSON, from a pydantic model, a dataclass or a mapping."""
    if options is None:
        return {}
    if hasattr(options, "model_dump"):
        return options.model_dump(mode="json")
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return dataclasses.asdict(options)
    return dict(options)


def create_job(
    *,
    session: Session,
    user_id: int,
    options: Any,
    audio: StoredAudioLike,
    filename: str | None = None,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    max_attempts: int = 3,
    duration_s: float | None = None,
) -> tuple[Job, bool]:
    """Queue a job; with an idempotency key already used by this user, return that job instead.

    Returns (job, created). Commits, because the unique constraint decides concurrent retries.
    """
    if idempotency_key is not None:
        existing = _job_by_idempotency_key(session, user_id, idempotency_key)
        if existing is not None:
            return existing, False
    job = Job(
        id=new_id("job"),
        user_id=user_id,
        status="queued",
        options=options_to_dict(options),
        filename=filename,
        audio_path=str(audio.path),
        audio_sha256=audio.sha256,
        audio_size=audio.size,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts,
        duration_s=duration_s,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = _job_by_idempotency_key(session, user_id, idempotency_key or "")
        if existing is None:
            raise
        return existing, False
    return job, True


def job_by_idempotency_key(*, session: Session, user_id: int, key: str) -> Job | None:
    return _job_by_idempotency_key(session, user_id, key)


def audio_in_use(*, session: Session, sha256: str) -> bool:
    return bool(session.scalar(select(func.count()).select_from(Job).where(Job.audio_sha256 == sha256)))


def _job_by_idempotency_key(session: Session, user_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.user_id == user_id, Job.idempotency_key == key))


def get_job(*, session: Session, job_id: str, user_id: int | None) -> Job | None:
    """The job if it exists and belongs to `user_id` (None: any owner, for the runner and admins)."""
    query = select(Job).where(Job.id == job_id)
    if user_id is not None:
        query = query.where(Job.user_id == user_id)
    return session.scalar(query)


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        return datetime.fromisoformat(created), job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursorError("cursor is not one this service issued") from exc


def list_jobs(
    *, session: Session, user_id: int, status: str | None = None, limit: int = 20, cursor: str | None = None
) -> tuple[list[Job], str | None]:
    """Newest first; returns (page, cursor of the next page or None)."""
    query = select(Job).where(Job.user_id == user_id)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, (_encode_cursor(page[-1]) if len(rows) > limit else None)


def cancel_job(*, session: Session, job: Job) -> bool:
    """Queued or running -> cancelled (a runner notices at its next heartbeat); False if finished."""
    if job.status in TERMINAL_STATUSES:
        return False
    now = utcnow()
    job.status, job.finished_at, job.lease_owner, job.lease_expires_at = "cancelled", now, None, None
    session.flush()
    return True


def delete_job(*, session: Session, job: Job) -> str | None:
    """Delete the job and its results; returns the audio sha256 when no other job still uses it."""
    sha = job.audio_sha256
    session.delete(job)
    session.flush()
    if sha is None:
        return None
    still_used = session.scalar(select(func.count()).select_from(Job).where(Job.audio_sha256 == sha))
    return None if still_used else sha


def purge_finished(*, session: Session, older_than: datetime) -> list[str]:
    """Retention: delete jobs finished before `older_than`; returns audio hashes now unreferenced."""
    jobs = list(
        session.scalars(select(Job).where(Job.status.in_(TERMINAL_STATUSES), Job.finished_at < older_than).limit(500))
    )
    orphaned = {sha for job in jobs if (sha := delete_job(session=session, job=job))}
    return sorted(orphaned)


def load_transcript(*, session: Session, job: Job) -> Transcript:
    """Rebuild the engine's Transcript from the stored rows."""
    segments = [
        Segment(
            id=row.idx,
            start=row.start,
            end=row.end,
            text=row.text,
            avg_logprob=row.avg_logprob,
            compression_ratio=row.compression_ratio,
            no_speech_prob=row.no_speech_prob,
            temperature=row.temperature,
            speaker=row.speaker,
            words=[Word(start=w.start, end=w.end, word=w.word, probability=w.probability, speaker=w.speaker)
                   for w in row.words],
        )
        for row in session.scalars(select(SegmentRow).where(SegmentRow.job_id == job.id).order_by(SegmentRow.idx))
    ]
    speakers = [SpeakerTurn(**t) for t in job.speakers] if job.speakers is not None else None
    return Transcript(
        language=job.language or "", duration=job.duration_s or 0.0, segments=segments,
        task=(job.task or "transcribe"), speakers=speakers,  # type: ignore[arg-type]
    )


def count_segments(*, session: Session, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(SegmentRow).where(SegmentRow.job_id == job_id)) or 0


def record_sync_job(
    *,
    session: Session,
    user: User,
    stored_audio: StoredAudioLike | None,
    options: Any,
    transcript: Transcript,
    filename: str | None = None,
) -> Job:
    """Record a synchronous transcription as a succeeded job, so it is listed and retained like one."""
    now = utcnow()
    job = Job(
        id=new_id("job"), user_id=user.id, status="succeeded", source="sync", options=options_to_dict(options),
        filename=filename, progress=1.0, attempts=1, created_at=now, started_at=now, finished_at=now,
        audio_path=str(stored_audio.path) if stored_audio else None,
        audio_sha256=stored_audio.sha256 if stored_audio else None,
        audio_size=stored_audio.size if stored_audio else None,
    )
    session.add(job)
    write_transcript(session=session, job=job, transcript=transcript)
    session.flush()
    return job


# ---------------------------------------------------------------- jobs: runner side


def _claimable(now: datetime):  # type: ignore[no-untyped-def]
    return and_(
        or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now)),
        Job.attempts < Job.max_attempts,
    )


def claim_next_job(*, session: Session, owner: str, lease_s: float) -> Job | None:
    """Take the oldest claimable job (queued, or running with an expired lease) under a lease.

    Commits. PostgreSQL skips rows other runners hold; the conditional UPDATE is what decides the
    race on SQLite, where FOR UPDATE does not exist.
    """
    now = utcnow()
    candidate = (
        select(Job.id).where(_claimable(now)).order_by(Job.created_at, Job.id).limit(1)
        .with_for_update(skip_locked=True)
    )
    job_id = session.scalar(candidate)
    if job_id is None:
        session.rollback()
        return None
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, _claimable(now))
        .values(
            status="running", lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s),
            attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now), updated_at=now,
            progress=0.0,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        return None
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    return job


def fail_exhausted_jobs(*, session: Session) -> list[str]:
    """Jobs whose runner died on their last allowed attempt: failed, with the reason. Commits."""
    now = utcnow()
    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.status == "running", Job.lease_expires_at < now, Job.attempts >= Job.max_attempts)
            .with_for_update(skip_locked=True)
        )
    )
    for job in jobs:
        job.status, job.finished_at = "failed", now
        job.error = f"runner stopped responding on all {job.attempts} attempts (lease expired)"
        job.lease_owner = job.lease_expires_at = None
        if job.callback_url:
            job.webhook_status = "pending"
    session.commit()
    return [job.id for job in jobs]


def renew_lease(*, session: Session, job_id: str, owner: str, lease_s: float, progress: float | None = None) -> bool:
    """Heartbeat. False when the lease is lost or the job was cancelled: the runner must stop. Commits."""
    now = utcnow()
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_s), "updated_at": now}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def _owned_running_job(session: Session, job_id: str, owner: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .with_for_update().execution_options(populate_existing=True)
    )


def write_transcript(*, session: Session, job: Job, transcript: Transcript) -> None:
    """Replace (never append to) the job's segments and words."""
    segment_ids = select(SegmentRow.id).where(SegmentRow.job_id == job.id)
    session.execute(delete(WordRow).where(WordRow.segment_id.in_(segment_ids)))
    session.execute(delete(SegmentRow).where(SegmentRow.job_id == job.id))
    session.flush()
    for i, seg in enumerate(transcript.segments):
        row = SegmentRow(
            job_id=job.id, idx=i, start=seg.start, end=seg.end, text=seg.text, speaker=seg.speaker,
            avg_logprob=seg.avg_logprob, compression_ratio=seg.compression_ratio,
            no_speech_prob=seg.no_speech_prob, temperature=seg.temperature,
        )
        row.words = [
            WordRow(idx=j, start=w.start, end=w.end, word=w.word, probability=w.probability, speaker=w.speaker)
            for j, w in enumerate(seg.words)
        ]
        session.add(row)
    job.language, job.duration_s, job.task = transcript.language, transcript.duration, transcript.task
    job.speakers = [dataclasses.asdict(t) for t in transcript.speakers] if transcript.speakers is not None else None


def complete_job(*, session: Session, job_id: str, owner: str, transcript: Transcript) -> bool:
    """Store the result and mark succeeded, only if this runner still owns the job. Commits."""
    job = _owned_running_job(session, job_id, owner)
    if job is None:
        session.rollback()
        return False
    write_transcript(session=session, job=job, transcript=transcript)
    now = utcnow()
    job.status, job.progress, job.finished_at, job.error = "succeeded", 1.0, now, None
    job.lease_owner = job.lease_expires_at = None
    if job.callback_url:
        job.webhook_status = "pending"
    session.commit()
    return True


def release_job(
    *, session: Session, job_id: str, owner: str, error: str, retry: bool, refund_attempt: bool = False
) -> str | None:
    """After a failed attempt: back to the queue while attempts remain and `retry`, else failed.

    `refund_attempt` requeues without counting the attempt (the model was overloaded, not the job).

    Returns the new status, or None when this runner no longer owned the job. Commits.
    """
    job = _owned_running_job(session, job_id, owner)
    if job is None:
        session.rollback()
        return None
    job.error = error
    job.lease_owner = job.lease_expires_at = None
    if refund_attempt:
        job.attempts = max(job.attempts - 1, 0)
    if retry and job.attempts < job.max_attempts:
        job.status = "queued"
    else:
        job.status, job.finished_at = "failed", utcnow()
        if job.callback_url:
            job.webhook_status = "pending"
    session.commit()
    return job.status


def claim_stale_webhooks(*, session: Session, stale_after_s: float, limit: int = 20) -> list[str]:
    """Jobs whose webhook is still pending long after they finished (their runner died): take them
    over for one more delivery round, marking them so other runners leave them alone meanwhile. Commits."""
    now = utcnow()
    ids = list(session.scalars(
        select(Job.id).where(Job.webhook_status == "pending", Job.updated_at < now - timedelta(seconds=stale_after_s))
        .limit(limit).with_for_update(skip_locked=True)
    ))
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(updated_at=now)
                        .execution_options(synchronize_session=False))
    session.commit()
    return ids


def set_webhook_result(*, session: Session, job_id: str, delivered: bool, attempts: int) -> None:
    session.execute(
        update(Job).where(Job.id == job_id)
        .values(webhook_status="delivered" if delivered else "failed", webhook_attempts=attempts)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def queue_stats(*, session: Session) -> dict[str, Any]:
    """Jobs by status and the age of the oldest queued job, for the metrics gauges."""
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == "queued"))
    age = (utcnow() - oldest.replace(tzinfo=utcnow().tzinfo)).total_seconds() if oldest else 0.0
    return {"by_status": counts, "queue_depth": counts.get("queued", 0), "oldest_queued_age_s": age}
