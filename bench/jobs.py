"""Job queue figures on the real PostgreSQL: claim latency, and throughput through the runner with
the model replaced by a no-op engine (the queue's own ceiling) and with the real engine.

    .venv/bin/python bench/jobs.py [--jobs 300] [--real-jobs 6] [--concurrency 4] [--skip-real]

Uses a throw-away database on 127.0.0.1:5432 (dropped at the end) unless --db-url is given.
Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2  # noqa: E402

from bench.data import DATA, require  # noqa: E402

CLIP = DATA / "lhotse_fixtures" / "2412-153948-0000.flac"  # 11.7 s of read speech


def _admin(sql: str) -> None:
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _queue(n: int, audio_path: Path, options: dict) -> list[str]:
    from db import repository as repo
    from db.session import session_scope
    from serve.storage import StoredAudio

    audio = StoredAudio(path=audio_path, sha256=uuid.uuid4().hex * 2, size=0)
    with session_scope() as session:
        user = repo.get_user_by_email(session=session, email="bench@example.org") or repo.create_user(
            session=session, email="bench@example.org")
        return [repo.create_job(session=session, user_id=user.id, options=options, audio=audio)[0].id
                for _ in range(n)]


def claim_latency(n: int) -> dict[str, float]:
    """Claims from a queue of n jobs, one at a time, as a runner does."""
    from db import repository as repo
    from db.session import session_scope

    _queue(n, Path("/nonexistent"), {})
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with session_scope() as session:
            job = repo.claim_next_job(session=session, owner="bench", lease_s=60)
        times.append(time.perf_counter() - t0)
        assert job is not None
        with session_scope() as session:  # out of the way of the throughput runs below
            repo.delete_job(session=session, job=repo.get_job(session=session, job_id=job.id, user_id=None))
    times.sort()
    return {"p50_ms": 1000 * times[len(times) // 2], "p95_ms": 1000 * times[int(len(times) * 0.95)],
            "mean_ms": 1000 * statistics.mean(times)}


async def _drain(transcribe, n: int, audio_path: Path, options: dict, concurrency: int) -> float:  # type: ignore[no-untyped-def]
    from db.models import Job
    from db.session import session_scope
    from serve.job_runner import JobRunner
    from sqlalchemy import func, select

    ids = _queue(n, audio_path, options)
    runner = JobRunner(transcribe, concurrency=concurrency, poll_s=0.02, owner=f"bench-{uuid.uuid4().hex[:6]}")
    t0 = time.perf_counter()
    runner.start()
    while True:
        with session_scope() as session:
            done = session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.id.in_(ids), Job.status.in_(("succeeded", "failed"))))
        if done == n:
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - t0
    await runner.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db-url", default=None)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--real-jobs", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    if not args.skip_real:
        require(CLIP)

    temp_db = None
    if args.db_url is None:
        temp_db = f"jobs_bench_{uuid.uuid4().hex[:8]}"
        _admin(f'CREATE DATABASE "{temp_db}"')
        args.db_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{temp_db}"
    os.environ["DB_URL"] = args.db_url  # before settings are first read
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    try:
        from db.migrate import upgrade_head
        from db.session import dispose_all
        from tests.fakes import fake_pipeline

        upgrade_head(args.db_url)
        lat = claim_latency(200)
        print(f"claim latency (postgres, 200 claims): p50 {lat['p50_ms']:.2f} ms, p95 {lat['p95_ms']:.2f} ms, "
              f"mean {lat['mean_ms']:.2f} ms")

        elapsed = asyncio.run(_drain(fake_pipeline(), args.jobs, Path("/nonexistent"), {}, args.concurrency))
        print(f"queue alone (tests' fake pipeline, no model): {args.jobs} jobs in {elapsed:.2f} s = {args.jobs / elapsed:.1f} jobs/s "
              f"(runner concurrency {args.concurrency})")

        if not args.skip_real:
            from speech.asr import WhisperEngine
            from speech.audio import audio_duration_s, decode_audio
            from speech.pipeline import TranscriptionPipeline

            engine = WhisperEngine(device="cpu")
            t0 = time.perf_counter()
            engine.load()
            print(f"real engine ({engine.model_name}) loaded in {time.perf_counter() - t0:.1f} s")
            clip_s = audio_duration_s(decode_audio(CLIP))
            pipeline = TranscriptionPipeline.local(engine)

            async def local() -> TranscriptionPipeline:
                return pipeline

            elapsed = asyncio.run(_drain(local, args.real_jobs, CLIP, {"language": "en"}, args.concurrency))
            print(f"real engine: {args.real_jobs} jobs of {clip_s:.1f} s in {elapsed:.2f} s = "
                  f"{args.real_jobs / elapsed:.2f} jobs/s, {args.real_jobs * clip_s / elapsed:.1f} audio-s/s "
                  f"(one model call at a time in this process)")
        dispose_all()
    finally:
        if temp_db:
            _admin(f'DROP DATABASE IF EXISTS "{temp_db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
