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

from serve.job_runner import JobRunner, engine_transcriber
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
    runner = JobRunner(engine_transcriber(engine), heartbeat_s=0.5, poll_s=0.05)
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
