"""The job queue's rules, on both the embedded SQLite and the real PostgreSQL.

A claim takes a lease; only the lease owner writes results; a dead runner's job is claimed again
when its lease expires, up to max_attempts, then failed with the reason; a re-run replaces results.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from db import repository as repo
from db.session import session_scope
from serve.storage import StoredAudio
from speech.types import Segment, Transcript, Word
from tests.db.support import backend, pg_url  # noqa: F401 - fixtures

AUDIO = StoredAudio(path=Path("/nonexistent/a"), sha256="a" * 64, size=1)


def _transcript(n: int) -> Transcript:
    return Transcript(language="en", duration=float(n), segments=[
        Segment(id=i, start=i, end=i + 1, text=f" segment {i}", words=[Word(i, i + 0.5, " segment"),
                                                                      Word(i + 0.5, i + 1, f" {i}")])
        for i in range(n)])


def _queue(n: int = 1, max_attempts: int = 3) -> list[str]:
    with session_scope() as session:
        user = repo.get_user_by_email(session=session, email="q@example.org") or repo.create_user(
            session=session, email="q@example.org")
        ids = []
        for _ in range(n):
            job, _ = repo.create_job(session=session, user_id=user.id, options={}, audio=AUDIO,
                                     max_attempts=max_attempts)
            ids.append(job.id)
            time.sleep(0.002)  # distinct created_at, so "oldest first" is observable
    return ids


def _claim(owner: str, lease_s: float = 30.0):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return repo.claim_next_job(session=session, owner=owner, lease_s=lease_s)


def _complete(job_id: str, owner: str, n: int) -> bool:
    with session_scope() as session:
        return repo.complete_job(session=session, job_id=job_id, owner=owner, transcript=_transcript(n))


def _job(job_id: str):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return repo.get_job(session=session, job_id=job_id, user_id=None)


def test_claims_take_the_oldest_job_once_under_a_lease(backend: str) -> None:  # noqa: F811
    first, second = _queue(2)
    a, b = _claim("runner-a"), _claim("runner-b")
    assert (a.id, b.id) == (first, second)
    assert a.status == "running" and a.attempts == 1 and a.lease_owner == "runner-a"
    assert _claim("runner-c") is None  # both leases are live


def test_an_expired_lease_is_claimed_again_and_the_old_owner_can_no_longer_write(backend: str) -> None:  # noqa: F811
    (job_id,) = _queue(1)
    _claim("dead-runner", lease_s=0.05)
    time.sleep(0.1)
    again = _claim("new-runner")
    assert again.id == job_id and again.attempts == 2
    assert _complete(job_id, "dead-runner", 3) is False
    assert _complete(job_id, "new-runner", 3) is True
    job = _job(job_id)
    assert job.status == "succeeded" and job.attempts == 2
    with session_scope() as session:
        assert repo.count_segments(session=session, job_id=job_id) == 3


def test_writing_results_again_replaces_them(backend: str) -> None:  # noqa: F811
    (job_id,) = _queue(1)
    _claim("r", lease_s=0.05)
    time.sleep(0.1)
    with session_scope() as session:  # an attempt that wrote rows, as if it died right after
        job = repo.get_job(session=session, job_id=job_id, user_id=None)
        repo.write_transcript(session=session, job=job, transcript=_transcript(5))
    _claim("r2")
    assert _complete(job_id, "r2", 2)
    with session_scope() as session:
        job = repo.get_job(session=session, job_id=job_id, user_id=None)
        transcript = repo.load_transcript(session=session, job=job)
    assert [s.text for s in transcript.segments] == [" segment 0", " segment 1"]
    assert [w.word for w in transcript.words] == [" segment", " 0", " segment", " 1"]


def test_attempts_are_capped_then_the_job_fails_with_the_reason(backend: str) -> None:  # noqa: F811
    (job_id,) = _queue(1, max_attempts=2)
    for owner in ("r1", "r2"):
        assert _claim(owner, lease_s=0.05).id == job_id
        time.sleep(0.1)
    assert _claim("r3") is None
    with session_scope() as session:
        assert repo.fail_exhausted_jobs(session=session) == [job_id]
    job = _job(job_id)
    assert job.status == "failed" and job.attempts == 2 and "lease expired" in job.error


def test_a_failed_attempt_is_retried_while_attempts_remain(backend: str) -> None:  # noqa: F811
    (job_id,) = _queue(1, max_attempts=2)
    _claim("r1")
    with session_scope() as session:
        assert repo.release_job(session=session, job_id=job_id, owner="r1", error="boom", retry=True) == "queued"
    _claim("r2")
    with session_scope() as session:
        assert repo.release_job(session=session, job_id=job_id, owner="r2", error="boom", retry=True) == "failed"
    assert _job(job_id).error == "boom"


def test_cancelling_a_running_job_stops_its_heartbeat_and_its_write(backend: str) -> None:  # noqa: F811
    (job_id,) = _queue(1)
    _claim("r")
    with session_scope() as session:
        assert repo.cancel_job(session=session, job=repo.get_job(session=session, job_id=job_id, user_id=None))
    with session_scope() as session:
        assert repo.renew_lease(session=session, job_id=job_id, owner="r", lease_s=30) is False
    assert _complete(job_id, "r", 1) is False
    assert _job(job_id).status == "cancelled"


def test_a_stopped_runner_hands_its_running_job_back_only_when_asked(backend: str) -> None:  # noqa: F811
    """`stop()` abandons the job in flight to lease expiry; `stop(release=True)` (the Serve
    deployment's graceful stop) puts it back in the queue at once, the attempt counted. The
    no-op engine stands in for the model: it only has to be busy when the stop comes."""
    import asyncio

    from serve.job_runner import JobRunner
    from tests.fakes import fake_pipeline

    _queue(2)

    async def run(release: bool) -> str:
        runner = JobRunner(fake_pipeline(delay_s=60), concurrency=1, poll_s=0.05)
        runner.start()
        deadline = time.monotonic() + 20
        while not runner.running:
            assert time.monotonic() < deadline, "the runner never took the job"
            await asyncio.sleep(0.02)
        (job_id,) = runner.running
        assert runner.failure() is None
        await runner.stop(release=release)
        assert runner.failure() is None and runner.running == []
        return job_id

    abandoned = asyncio.run(run(release=False))
    job = _job(abandoned)
    assert (job.status, job.attempts) == ("running", 1) and job.lease_owner
    released = asyncio.run(run(release=True))  # the other job: the first one's lease holds
    assert released != abandoned
    job = _job(released)
    assert (job.status, job.attempts, job.lease_owner) == ("queued", 1, None)
    assert job.error == "runner stopped; requeued"


def test_the_same_idempotency_key_gives_one_job(backend: str) -> None:  # noqa: F811
    with session_scope() as session:
        user = repo.create_user(session=session, email="i@example.org")
        a, created_a = repo.create_job(session=session, user_id=user.id, options={}, audio=AUDIO,
                                       idempotency_key="k1")
        b, created_b = repo.create_job(session=session, user_id=user.id, options={}, audio=AUDIO,
                                       idempotency_key="k1")
    assert (created_a, created_b) == (True, False) and a.id == b.id


@pytest.mark.parametrize("n_jobs", [5])
def test_list_pages_newest_first_with_a_cursor(backend: str, n_jobs: int) -> None:  # noqa: F811
    ids = _queue(n_jobs)
    seen, cursor = [], None
    with session_scope() as session:
        user = repo.get_user_by_email(session=session, email="q@example.org")
        while True:
            page, cursor = repo.list_jobs(session=session, user_id=user.id, limit=2, cursor=cursor)
            seen += [j.id for j in page]
            if cursor is None:
                break
    assert seen == list(reversed(ids))


def test_retention_deletes_old_finished_jobs_and_reports_unreferenced_audio(backend: str) -> None:  # noqa: F811
    from datetime import timedelta

    from db.models import utcnow

    old, recent = _queue(2)
    with session_scope() as session:
        for job_id, age_days in ((old, 40), (recent, 1)):
            job = repo.get_job(session=session, job_id=job_id, user_id=None)
            job.status, job.finished_at = "succeeded", utcnow() - timedelta(days=age_days)
    with session_scope() as session:
        assert repo.purge_finished(session=session, older_than=utcnow() - timedelta(days=30)) == []  # still used
    assert _job(old) is None and _job(recent) is not None
    with session_scope() as session:
        assert repo.purge_finished(session=session, older_than=utcnow()) == [AUDIO.sha256]
