"""Job progress per window, pushed through Redis, and event streams that resume (issue 14).

A real three-window, two-speaker recording (tests/data/conv2spk_75s.flac) is run by the runner on
the real engine (tiny.en); a follower of `GET /v1/jobs/{id}/events` sees one progress step per
window, in order, then the final state. Every event carries its state as id, so a follower that
reconnects with Last-Event-ID gets only what came after; the stream ends itself before Serve's
request timeout (JOB_EVENTS_MAX_S) and the reconnection goes on from there.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from serve.job_runner import JobRunner
from speech.pipeline import TranscriptionPipeline
from speech.types import TranscribeOptions
from tests.conftest import SPEECH_DATA_DIR
from tests.db.support import REDIS_URL, configure, make_app, make_caller, pg_url, submit  # noqa: F401

CONV = SPEECH_DATA_DIR / "conv2spk_75s.flac"


def _events(body: str) -> list[dict[str, str]]:
    """The events of an SSE body (comments and retry hints left out)."""
    return [dict(line.split(": ", 1) for line in block.splitlines())
            for block in body.split("\n\n") if "event: " in block]


@pytest.fixture
def redis_client(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[TestClient]:  # noqa: ANN001
    """The embedded database, with the machine's Redis for the pushed events."""
    from db.migrate import upgrade_head

    configure(monkeypatch, DB_URL=None, STORAGE_BASE_PATH=str(tmp_path / "storage"),
              REDIS_URL=REDIS_URL, ENVIRONMENT="test")
    upgrade_head()
    with TestClient(make_app()) as client:
        yield client
    configure(monkeypatch, REDIS_URL=None)


def test_progress_steps_once_per_window_and_the_follower_sees_each(redis_client: TestClient,
                                                                    tiny_engine) -> None:  # noqa: ANN001
    alice = make_caller("alice@example.org")
    job_id = submit(redis_client, alice, CONV, language="en")["id"]
    pipeline = TranscriptionPipeline.local(tiny_engine)
    n_windows = len(pipeline.planner.plan(pipeline.load(CONV), TranscribeOptions(language="en")))
    assert n_windows >= 3

    async def local() -> TranscriptionPipeline:
        return pipeline

    runner = JobRunner(local, heartbeat_s=30, poll_s=0.05)
    worker = threading.Thread(target=lambda: asyncio.run(runner.run_once()))
    body = ""
    with redis_client.stream("GET", f"/v1/jobs/{job_id}/events", headers=alice.headers) as stream:
        for chunk in stream.iter_text():
            body += chunk
            if worker.ident is None and "event: queued" in body:  # following: now run it
                worker.start()
    worker.join(timeout=300)
    events = _events(body)
    states = [(e["event"], json.loads(e["data"])["progress"]) for e in events]
    running = [p for status, p in states if status == "running"]
    assert states[0] == ("queued", 0.0) and states[-1] == ("succeeded", 1.0), states
    steps = [round((i + 1) / n_windows, 3) for i in range(n_windows)]
    assert [round(p, 3) for p in running if p > 0] == steps, states  # one per window, in order
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split(".")))) and len(set(ids)) == len(ids)

    # Reconnecting after the second step: only what came later.
    second = next(e["id"] for e in events if e["event"] == "running"
                  and round(json.loads(e["data"])["progress"], 3) == steps[1])
    resumed = redis_client.get(f"/v1/jobs/{job_id}/events",
                               headers={**alice.headers, "Last-Event-ID": second})
    assert [e["event"] for e in _events(resumed.text)] == ["succeeded"], resumed.text
    done = redis_client.get(f"/v1/jobs/{job_id}/events",
                            headers={**alice.headers, "Last-Event-ID": ids[-1]})
    assert _events(done.text) == [], done.text  # nothing new: the stream just ends


def test_a_stream_that_outlives_its_limit_is_resumed_not_lost(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """JOB_EVENTS_MAX_S stands in for Serve's request timeout: the stream ends with a retry hint;
    the reconnection with Last-Event-ID repeats nothing and sees the change made meanwhile."""
    from db import repository as repo
    from db.migrate import upgrade_head
    from db.session import session_scope

    configure(monkeypatch, DB_URL=None, STORAGE_BASE_PATH=str(tmp_path / "storage"), REDIS_URL=None,
              ENVIRONMENT="test", JOB_EVENTS_MAX_S="0.3")
    upgrade_head()
    with TestClient(make_app()) as client:
        alice = make_caller("alice@example.org")
        job_id = submit(client, alice)["id"]
        first = client.get(f"/v1/jobs/{job_id}/events", headers=alice.headers).text
        assert "retry: " in first and [e["event"] for e in _events(first)] == ["queued"], first
        last_id = _events(first)[-1]["id"]
        again = client.get(f"/v1/jobs/{job_id}/events", headers={**alice.headers, "Last-Event-ID": last_id}).text
        assert _events(again) == [] and "retry: " in again, again  # nothing repeated
        with session_scope() as session:
            repo.cancel_job(session=session, job=repo.get_job(session=session, job_id=job_id, user_id=None))
        final = client.get(f"/v1/jobs/{job_id}/events", headers={**alice.headers, "Last-Event-ID": last_id}).text
        assert [e["event"] for e in _events(final)] == ["cancelled"], final


@pytest.mark.parametrize("foreign", ["0" * 65, "abc", "1.2", ""])
def test_a_last_event_id_that_is_not_ours_starts_the_stream_afresh(foreign: str) -> None:
    from serve.job_events import event_id, is_after

    assert is_after(event_id("queued", 0.0, 0), foreign)
    assert not is_after(event_id("running", 0.5, 1), event_id("running", 0.5, 1))
    assert is_after(event_id("queued", 0.0, 2), event_id("succeeded", 1.0, 1))  # a retry is later


def test_a_job_queued_again_after_a_failed_attempt_is_news_to_its_follower() -> None:
    from serve.job_events import event_id, is_after

    running = event_id("running", 0.5, 1)
    requeued = event_id("queued", 0.5, 1)
    second = event_id("running", 0.0, 2)
    assert is_after(requeued, running) and is_after(second, requeued)
