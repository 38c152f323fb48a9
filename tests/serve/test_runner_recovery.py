"""Against the real PostgreSQL, with real runner processes started and killed by their own handles.

- Crash: the runner is killed (SIGKILL) while it holds a running job; a runner started afterwards
  claims the job when its lease expires and completes it once, with the real model: attempts 2,
  segments not duplicated. (The killed runner is the tests' fake (tests/fakes.py) told to take 10 minutes:
  all it must do is hold the job when it dies; loading the real model twice would double the
  test's time without testing anything more.)
- Race: two runners poll the same queue of 50 jobs; every job is processed exactly once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jiwer
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from db import repository as repo
from db.models import SegmentRow
from db.session import session_scope
from serve.storage import StoredAudio
from tests.db.support import JFK, JFK_TEXT, env_for_subprocess, make_app, make_caller, pg_only, pg_url, submit  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def _runner(log: Path, *args: str, module: str = "serve.job_runner") -> subprocess.Popen:
    """A runner process: the product's (`serve.job_runner`, real model) or the tests' fake one
    (`tests.fakes`, which holds or answers jobs without reading them)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                            env=env_for_subprocess(LOG_LEVEL="INFO"), stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"runner exited with {p.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _job(job_id: str):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return repo.get_job(session=session, job_id=job_id, user_id=None)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_runner_killed_mid_job_is_replaced_and_the_job_completes_once(pg_only: str, tmp_path: Path) -> None:  # noqa: F811
    alice = make_caller("alice@example.org")
    with TestClient(make_app()) as client:
        job_id = submit(client, alice, JFK, language="en")["id"]
    args = ("--lease-s", "3", "--heartbeat-s", "1", "--poll-s", "0.2")

    first = _runner(tmp_path / "first.log", "--delay-s", "600", *args, module="tests.fakes")
    try:
        _wait(lambda: _job(job_id).status == "running", 240, "the first runner to claim the job", [first])
    finally:
        first.kill()  # SIGKILL: no chance to clean up, exactly like a crashed process
        first.wait()
    killed = _job(job_id)
    assert (killed.status, killed.attempts) == ("running", 1), "the job must still be mid-run when killed"

    second = _runner(tmp_path / "second.log", *args)
    try:
        _wait(lambda: _job(job_id).status in ("succeeded", "failed"), 300, "the restarted runner", [second])
    finally:
        _stop(second)

    job = _job(job_id)
    assert (job.status, job.attempts) == ("succeeded", 2), job.error
    with session_scope() as session:
        transcript = repo.load_transcript(session=session, job=job)
        rows = session.scalar(select(func.count()).select_from(SegmentRow).where(SegmentRow.job_id == job_id))
    assert rows == len(transcript.segments) == len({s.id for s in transcript.segments}) > 0
    norm = lambda t: re.sub(r"[^a-z' ]+", " ", t.lower()).strip()  # noqa: E731
    assert jiwer.wer(norm(JFK_TEXT), norm(transcript.text)) <= 0.15, transcript.text


def _finished_by(log: Path) -> list[str]:
    ids = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "job finished":
            ids.append(record["job_id"])
    return ids


def test_two_runners_racing_over_50_jobs_process_each_exactly_once(pg_only: str, tmp_path: Path) -> None:  # noqa: F811
    """The model is replaced by the tests' fake pipeline: this tests the queue (claims, leases, SKIP LOCKED),
    not transcription."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runners = [_runner(log, "--delay-s", "0.02", "--poll-s", "0.05", module="tests.fakes") for log in logs]
    try:
        _wait(lambda: all("runner started" in log.read_text() for log in logs), 60, "runners to start", runners)
        audio = StoredAudio(path=Path("/nonexistent"), sha256="0" * 64, size=0)
        with session_scope() as session:
            user = repo.create_user(session=session, email="race@example.org")
            ids = [repo.create_job(session=session, user_id=user.id, options={}, audio=audio)[0].id
                   for _ in range(50)]

        def all_done() -> bool:
            with session_scope() as session:
                return all(repo.get_job(session=session, job_id=i, user_id=None).status == "succeeded" for i in ids)

        _wait(all_done, 120, "all 50 jobs", runners)
    finally:
        for r in runners:
            _stop(r)

    per_runner = [_finished_by(log) for log in logs]
    assert all(per_runner), f"both runners should have taken part: {[len(p) for p in per_runner]}"
    processed = per_runner[0] + per_runner[1]
    assert sorted(processed) == sorted(ids)  # each exactly once, none missing
    with session_scope() as session:
        for job_id in ids:
            job = repo.get_job(session=session, job_id=job_id, user_id=None)
            assert job.attempts == 1 and repo.count_segments(session=session, job_id=job_id) == 1
