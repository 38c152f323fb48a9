"""Load (issue 6, item 5): step the concurrency past the ASR deployment's queue capacity.

Mixed traffic from bench/loadgen.py (the driver bench/serve_load.py and bench/soak.py use):
concurrent clients send real short clips to the synchronous endpoint, every fifth request of
each client is a job polled to completion (at most 8 jobs a step). Concurrency steps 1, 4, 16,
64, 128 for a few seconds each; the last exceeds what the ASR deployment admits
(max_ongoing_requests + max_queued_requests per replica in serve_config.yaml), so the service
must shed the excess.

Per step: throughput, p50/p95 latency, status counts; the saturation point (the step after which
throughput stops growing by more than 10 % while p95 climbs) is printed with the table.

Asserted: every request is answered inside the generous client timeout (no hang, no lost
connection); the only refusals are 503 or 429, each with Retry-After; no 5xx other than 503;
nothing is shed under light load (1 and 4 clients); the top step is shed with 503; every job
accepted succeeds and exists exactly once.

What sheds: Serve's count limits (max_ongoing + max_queued_requests) and the time limit of
synchronous requests (IngressConfig.queue_timeout_s, 20 s: not taken by the ASR replica within
that, or more than that of windows already waiting there, is a 503). Without the time limit,
on a slow or shared machine (about 1 request/s) the 96 requests admitted meant waits past 60 s:
clients timed out instead of being shed.

The clients use 32 keys of one user, so the per-key rate limit (600/min) is not what sheds the
load: the shedding of an overloaded model is the subject here (the rate limit has its own tests).
"""

from __future__ import annotations

import time

import pytest
import yaml

from bench.data import short_clips
from bench.loadgen import NO_ANSWER, SHED, Level, drive, saturation, table
from tests.reliability.support import DATA, ROOT, Stack, user_keys

STEPS = (1, 4, 16, 64, 128)
STEP_S = 8.0
CLIENT_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 150.0
JOB_EVERY = 5
MAX_JOBS_PER_STEP = 8
LOAD_KEYS = 32
LOAD_USER = "load@example.com"
LIGHT_LOAD = 4
"""Up to this many clients nothing may be shed (the time limit is 20 s of waiting)."""
CLIPS = short_clips(DATA)
"""The load generator's real clips of 3-12 s, from tests/data."""


def asr_capacity() -> int:
    """Requests the ASR deployment admits before Serve sheds: (ongoing + queued) x replicas."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    asr = next(d for d in config["applications"][0]["deployments"]
               if d["name"] == "ASRDeployment")
    return (asr["max_ongoing_requests"] + asr["max_queued_requests"]) * asr.get("num_replicas", 1)


def _record(stack: Stack, level: Level) -> None:
    for status, n in level.statuses.items():
        for _ in range(n):
            stack.ledger.request(None if status == NO_ANSWER else status)
    for status, n in level.job_submits.items():
        if status != 202:  # refused submissions are requests that failed (with a reason or not)
            for _ in range(n):
                stack.ledger.request(None if status == NO_ANSWER else status)


def _api_jobs_in_database(stack: Stack) -> dict[str, str]:
    from sqlalchemy import select

    from db.models import Job, User
    from db.session import session_scope

    with session_scope(stack.db_url) as session:
        rows = session.execute(
            select(Job.id, Job.status).join(User, User.id == Job.user_id)
            .where(User.email == LOAD_USER, Job.source == "api")).all()
    return {job_id: status for job_id, status in rows}


def test_load_steps_shed_past_saturation(stack: Stack, capsys: pytest.CaptureFixture) -> None:
    capacity = asr_capacity()
    assert STEPS[-1] > capacity, "the top step must exceed the ASR queue capacity"
    headers = [u.headers for u in user_keys(stack.db_url, LOAD_USER, LOAD_KEYS, name="load")]
    url = stack.service.base_url

    started = time.monotonic()
    warm = drive(url, 2, 3.0, CLIPS, headers=headers, timeout_s=CLIENT_TIMEOUT_S)
    _record(stack, warm)
    levels = []
    for n in STEPS:
        level = drive(url, n, STEP_S, CLIPS, headers=headers, job_every=JOB_EVERY,
                      max_jobs=MAX_JOBS_PER_STEP, timeout_s=CLIENT_TIMEOUT_S,
                      job_timeout_s=JOB_TIMEOUT_S)
        _record(stack, level)
        levels.append(level)
    elapsed = time.monotonic() - started

    jobs = {job_id: status for lv in levels for job_id, status in lv.jobs.items()}
    in_db = _api_jobs_in_database(stack)
    succeeded = sum(1 for s in jobs.values() if s == "succeeded")
    failed = sum(1 for s in jobs.values() if s in ("failed", "cancelled"))
    lost = sum(1 for s in jobs.values() if s == "lost") + len(set(jobs) - set(in_db))
    stack.ledger.jobs(sent=len(jobs), succeeded=succeeded, failed=failed, lost=lost,
                      duplicated=len(set(in_db) - set(jobs)))

    sat = saturation(levels)
    with capsys.disabled():
        print(f"\n\nload steps ({STEP_S:g} s each, client timeout {CLIENT_TIMEOUT_S:g} s, "
              f"1 in {JOB_EVERY} requests a job; ASR admits {capacity}; {elapsed:.0f} s):")
        print(table(levels, sat))
        print(f"saturation: {sat.clients} clients, {sat.rps:.2f} req/s, "
              f"p95 {sat.pct(0.95):.2f} s\n")

    problems = []
    for lv in [warm, *levels]:
        if lv.unanswered:
            problems.append(f"{lv.clients} clients: {lv.unanswered} requests without an answer")
        odd = {s: n for s, n in lv.statuses.items() if s not in (200, *SHED)}
        odd.update({f"job {s}": n for s, n in lv.job_submits.items() if s not in (202, *SHED)})
        odd.update({f"poll {s}": n for s, n in lv.poll_statuses.items() if s not in SHED})
        if odd:
            problems.append(f"{lv.clients} clients: unexpected answers {odd}")
        if lv.missing_retry_after:
            problems.append(f"{lv.clients} clients: {lv.missing_retry_after} 503/429 "
                            "without Retry-After")
        if lv.clients <= LIGHT_LOAD and lv.shed:
            problems.append(f"{lv.clients} clients: {lv.shed} shed under light load")
        if lv.errors:
            problems.append(f"{lv.clients} clients, first errors: {lv.errors}")
    top = levels[-1]
    if not top.statuses.get(503):
        problems.append(f"{top.clients} clients (> {capacity} admitted): nothing shed with 503 "
                        f"({dict(top.statuses)})")
    if any(lv.ok == 0 for lv in levels):
        problems.append("a step with no successful request")
    bad_jobs = {j: (s, e) for lv in levels for j, s in lv.jobs.items() if s != "succeeded"
                for e in [lv.job_errors.get(j)]}
    if bad_jobs:
        problems.append(f"jobs not succeeded: {bad_jobs}")
    if set(in_db) != set(jobs):
        problems.append(f"jobs accepted {len(jobs)}, in the database {len(in_db)}: "
                        f"missing {sorted(set(jobs) - set(in_db))[:5]}, "
                        f"unknown {sorted(set(in_db) - set(jobs))[:5]}")
    assert jobs, "no job was submitted"
    assert not problems, "\n".join(problems)
