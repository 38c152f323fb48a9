"""The runner end to end with the real engine (tiny.en) on a real recording: a queued job is claimed,
transcribed, stored; its progress streams as server-sent events; its transcript comes back in every
output format, and its text matches the reference."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator

import jiwer
import pytest
from fastapi.testclient import TestClient

from serve.job_runner import JobRunner
from speech.pipeline import TranscriptionPipeline
from tests.db.support import JFK, JFK_TEXT, backend, client, make_caller, pg_url, submit  # noqa: F401


@pytest.fixture(scope="module")
def engine() -> Iterator[object]:
    from speech.asr import WhisperEngine

    whisper = WhisperEngine(device="cpu")
    whisper.load()
    yield whisper


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z' ]+", " ", text.lower()).strip()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_job_runs_streams_its_progress_and_renders_every_format(client: TestClient, engine: object) -> None:
    alice = make_caller("alice@example.org")
    job_id = submit(client, alice, JFK, language="en", **{"timestamp_granularities[]": "word"})["id"]
    pipeline = TranscriptionPipeline.local(engine)

    async def local() -> TranscriptionPipeline:
        return pipeline

    runner = JobRunner(local, heartbeat_s=0.5, poll_s=0.05)
    worker = threading.Thread(target=lambda: asyncio.run(runner.run_once()))

    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=alice.headers) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
                if events == ["queued"]:
                    worker.start()
    worker.join(timeout=120)
    assert events[0] == "queued" and events[-1] == "succeeded" and "running" in events

    job = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    assert (job["status"], job["attempts"], job["progress"], job["language"]) == ("succeeded", 1, 1.0, "en")
    assert abs(job["duration"] - 11.0) < 0.1

    def fetch(fmt: str):  # type: ignore[no-untyped-def]
        return client.get(f"/v1/jobs/{job_id}/transcript", params={"format": fmt}, headers=alice.headers)

    text = json.loads(fetch("json").text)["text"]
    wer = jiwer.wer(_normalise(JFK_TEXT), _normalise(text))
    assert wer <= 0.15, f"WER {wer:.2f}: {text!r}"
    assert fetch("text").text.strip() == text
    verbose = json.loads(fetch("verbose_json").text)
    assert verbose["language"] in ("en", "english") and verbose["words"], verbose.keys()
    assert "-->" in fetch("srt").text and fetch("vtt").text.startswith("WEBVTT")
    assert fetch("tsv").status_code == 200
    for needs_speakers in ("diarized_json", "rttm"):
        assert fetch(needs_speakers).status_code == 400  # diarization was not asked for
    unknown = fetch("docx")
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "format"


def _queued_job(options: dict) -> str:
    """A job put straight into the queue (as one submitted before a model change would be)."""
    from db import repository as repo
    from db.session import session_scope
    from serve.storage import save_stream

    with JFK.open("rb") as fh:
        stored = save_stream(fh, max_bytes=10**8)
    with session_scope() as session:
        user = repo.get_user_by_email(session=session, email="q@example.org") or repo.create_user(
            session=session, email="q@example.org")
        job, _ = repo.create_job(session=session, user_id=user.id, options=options, audio=stored)
        return job.id


def _job(job_id: str):  # type: ignore[no-untyped-def]
    from db import repository as repo
    from db.session import session_scope

    with session_scope() as session:
        return repo.get_job(session=session, job_id=job_id, user_id=None)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("options", "code"), [
    ({"language": "fr"}, "invalid_option"),      # tiny.en is English-only
    ({"task": "translate"}, "invalid_option"),
    ({"temperature": "hot"}, "invalid_option"),  # a stored value no route would accept
])
def test_a_job_the_model_cannot_honour_fails_on_its_first_attempt(
        backend: str, engine: object, options: dict, code: str) -> None:  # noqa: F811
    """Issue 13 bug 2: refused options are not transient; the job is not decoded three times."""
    job_id = _queued_job(options)
    pipeline = TranscriptionPipeline.local(engine)  # type: ignore[arg-type]

    async def local() -> TranscriptionPipeline:
        return pipeline

    asyncio.run(JobRunner(local, poll_s=0.05).run_once())
    job = _job(job_id)
    assert (job.status, job.attempts) == ("failed", 1), job.error
    assert job.error.startswith(f"{code}:"), job.error


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_replicas_refusal_fails_the_job_at_once_and_an_outage_is_retried(backend: str) -> None:  # noqa: F811
    """What a replica raises arrives as an ApiError: a 4xx is the request's fault (no retry), a
    5xx may pass (retried, attempt counted)."""
    from serve.errors import ApiError

    class Refusing:
        def __init__(self, error: ApiError) -> None:
            self.error = error

        async def run(self, *_: object, **__: object) -> None:
            raise self.error

    for error, status in (
            (ApiError(400, "Language 'fr' is not supported.", param="language", code="invalid_option"), "failed"),
            (ApiError(500, "replica crashed", code="internal_error"), "queued")):
        job_id = _queued_job({})

        async def factory(error: ApiError = error) -> Refusing:
            return Refusing(error)

        asyncio.run(JobRunner(factory, poll_s=0.05).run_once())
        job = _job(job_id)
        assert (job.status, job.attempts) == (status, 1), job.error
        assert error.message in (job.error or ""), job.error


def test_the_standalone_runner_can_diarize() -> None:
    """Issue 13 bug 1: `python -m serve.job_runner` built its pipeline without a diarizer, so
    diarize jobs 'succeeded' without speakers. Its pipeline now has the packaged diarizer (the
    five-entry-point test runs a diarize job through the process itself)."""
    from serve.job_runner import local_pipeline

    pipeline = local_pipeline()
    assert pipeline.capabilities.diarization is True, pipeline.capabilities.diarization_reason
    assert pipeline.diarizer is not None
