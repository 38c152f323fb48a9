"""A bulk run's files as jobs in the service database, so they show in GET /v1/jobs.

One job per (file content, run options) per user, `source="batch"`, already finished
(succeeded with its segments and words, or failed with the reason). The job's idempotency key is
`batch:<sha256>:<run hash>`: writing a file twice replaces its job instead of adding one, and a
re-run finds what is done by that key. The batch itself is recorded as audit events
(`batch.started`, `batch.finished`) and as `batch_id` in each job's options; the schema has no
batch table yet.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import repository as repo
from db.models import Job, new_id, utcnow
from db.session import session_scope
from pipelines.records import FileRecord

SOURCE = "batch"
KEY_PREFIX = "batch:"


class UnknownUserError(LookupError):
    """--user names nobody; the operator creates users with `python -m serve.admin create-user`."""


def run_hash(run_key: str) -> str:
    return hashlib.sha256(run_key.encode()).hexdigest()[:16]


def job_key(sha256: str, run_key: str) -> str:
    return f"{KEY_PREFIX}{sha256}:{run_hash(run_key)}"


class DbSink:
    """Writes finished files as jobs of `email`'s user, one short transaction per file."""

    def __init__(self, *, email: str, run_key: str, options: dict[str, Any], url: str | None = None,
                 migrate: bool = True) -> None:
        from db.migrate import upgrade_head

        self.url = url
        if migrate:
            upgrade_head(url)
        with session_scope(url) as session:
            user = repo.get_user_by_email(session=session, email=email)
            if user is None:
                raise UnknownUserError(
                    f"no user with email {email!r}; create it first: python -m serve.admin create-user {email}")
            self.user_id = user.id
        self.run_key = run_key
        self.batch_id = f"batch_{uuid.uuid4().hex[:16]}"
        self.options = {**options, "batch_id": self.batch_id}

    def done_hashes(self, *, include_failed: bool) -> set[str]:
        """sha256 of every file this user's earlier runs with the same options finished."""
        suffix = ":" + run_hash(self.run_key)
        statuses = ("succeeded", "failed") if include_failed else ("succeeded",)
        with session_scope(self.url) as session:
            keys = session.scalars(
                select(Job.idempotency_key).where(
                    Job.user_id == self.user_id, Job.source == SOURCE, Job.status.in_(statuses),
                    Job.idempotency_key.like(f"{KEY_PREFIX}%{suffix}"))
            )
            return {k[len(KEY_PREFIX):-len(suffix)] for k in keys if k}

    def audit(self, action: str, details: dict[str, Any]) -> None:
        with session_scope(self.url) as session:
            repo.audit(session=session, action=action, user_id=self.user_id, target=self.batch_id,
                       details=details)

    def write(self, record: FileRecord) -> str:
        """Create or replace the file's job; returns the job id."""
        with session_scope(self.url) as session:
            return self._write(session, record)

    def _write(self, session: Session, record: FileRecord) -> str:
        key = job_key(record.sha256 or hashlib.sha256(record.path.encode()).hexdigest(), self.run_key)
        job = repo.job_by_idempotency_key(session=session, user_id=self.user_id, key=key)
        now = utcnow()
        if job is None:
            job = Job(id=new_id("job"), user_id=self.user_id, source=SOURCE, idempotency_key=key,
                      created_at=now, attempts=1, max_attempts=1)
            session.add(job)
        job.options = dict(self.options)
        job.filename = record.path.rsplit("/", 1)[-1][:255]
        job.audio_path = record.path
        job.audio_sha256 = record.sha256
        job.audio_size = record.size
        job.started_at = job.finished_at = now
        job.progress = 1.0
        job.error = record.error
        job.status = record.status
        session.flush()
        if record.status == "succeeded":
            repo.write_transcript(session=session, job=job, transcript=record.transcript())
        return job.id
