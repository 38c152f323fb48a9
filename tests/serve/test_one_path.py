"""One request, one path: the five entry points give the same answer for the same file.

A real two-speaker recording of 76 s (three windows; tests/data/conv2spk_75s.flac) goes through
- the CLI (`python -m speech transcribe --diarize --format diarized_json`),
- `POST /v1/audio/transcriptions` with `response_format=diarized_json` (the running service),
- `POST /v1/jobs` run by a `JobRunner` on the service's deployment handles (what the
  JobRunnerDeployment runs: `ModelCalls.pipeline`; here in the test process so that this test,
  not the session's idle runner replica, decides when the job runs),
- `POST /v1/jobs` run by the standalone runner process (`python -m serve.job_runner`),
- the bulk pipeline (`python -m pipelines.batch_transcribe --diarize`, its own local Ray),
and every `diarized_json` must be the same: segments, text, speaker labels, times within 0.01 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import SPEECH_DATA_DIR
from tests.serve.support import Service

ROOT = Path(__file__).resolve().parents[2]
CONV = SPEECH_DATA_DIR / "conv2spk_75s.flac"
TIMEOUT_S = 600


def _env(service: Service, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"STORAGE_BASE_PATH": str(service.storage), "ENVIRONMENT": "test",
                "RAY_AUTH_MODE": "disabled", "LOG_LEVEL": "WARNING", **extra})
    env.pop("LOG_FILE", None)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _comparable(body: str) -> dict:
    data = json.loads(body)
    return {"text": data["text"], "segments": [
        {"text": s["text"], "speaker": s["speaker"], "start": s["start"], "end": s["end"]}
        for s in data["segments"]]}


def _submit_job(service: Service) -> str:
    with CONV.open("rb") as fh:
        response = httpx.post(service.url("/v1/jobs"), headers=service.auth, timeout=60,
                              files={"file": (CONV.name, fh)}, data={"diarize": "true"})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _job_transcript(service: Service, job_id: str) -> str:
    job = httpx.get(service.url(f"/v1/jobs/{job_id}"), headers=service.auth, timeout=30).json()
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    response = httpx.get(service.url(f"/v1/jobs/{job_id}/transcript"), headers=service.auth,
                         params={"format": "diarized_json"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def _run_job_on_handles(service: Service) -> str:
    """The JobRunnerDeployment's code (JobRunner on ModelCalls) on the live handles."""
    from ray import serve

    from serve.job_runner import JobRunner
    from serve.model_calls import ModelCalls
    from speech.audio import AudioLimits

    job_id = _submit_job(service)
    models = ModelCalls(serve.get_deployment_handle("ASRDeployment", service.app_name),
                        serve.get_deployment_handle("DiarizationDeployment", service.app_name),
                        limits=AudioLimits())
    runner = JobRunner(models.pipeline, poll_s=0.05, heartbeat_s=5,
                       db_url=f"sqlite:///{(service.storage / 'service.db').resolve()}")
    assert asyncio.run(runner.run_once()) == job_id
    return _job_transcript(service, job_id)


def _run_job_standalone(service: Service) -> str:
    job_id = _submit_job(service)
    _run(["-m", "serve.job_runner", "--exit-when-idle", "--poll-s", "0.1"], _env(service))
    return _job_transcript(service, job_id)


def _bulk(service: Service, out: Path) -> str:
    from pipelines.records import read_records
    from speech.formats import render

    _run(["-m", "pipelines.batch_transcribe", "--input", str(CONV), "--output", str(out),
          "--diarize", "--ray-address", "local", "--num-cpus", "2"], _env(service))
    (record,) = read_records(out).values()
    assert record.status == "succeeded", record
    return render(record.transcript(), "diarized_json")


def test_five_entry_points_give_the_same_diarized_json(service: Service, tmp_path: Path) -> None:
    started = time.monotonic()
    results: dict[str, dict] = {}
    results["cli"] = _comparable(_run(["-m", "speech", "transcribe", str(CONV), "--diarize",
                                       "--format", "diarized_json", "--quiet"], _env(service)).stdout)
    with CONV.open("rb") as fh:
        sync = httpx.post(service.url("/v1/audio/transcriptions"), headers=service.auth,
                          timeout=TIMEOUT_S, files={"file": (CONV.name, fh)},
                          data={"model": "whisper-1", "response_format": "diarized_json"})
    assert sync.status_code == 200, sync.text
    results["sync route"] = _comparable(sync.text)
    results["job, runner on the handles"] = _comparable(_run_job_on_handles(service))
    results["job, standalone runner"] = _comparable(_run_job_standalone(service))
    results["bulk pipeline"] = _comparable(_bulk(service, tmp_path / "bulk.jsonl"))

    reference = results["cli"]
    speakers = {s["speaker"] for s in reference["segments"]}
    assert len(speakers) == 2, speakers  # two voices, labelled
    assert len(reference["segments"]) >= 6 and reference["text"]
    for name, got in results.items():
        assert got["text"] == reference["text"], (name, got["text"], reference["text"])
        assert len(got["segments"]) == len(reference["segments"]), (name, got["segments"])
        for mine, theirs in zip(got["segments"], reference["segments"], strict=True):
            assert (mine["text"], mine["speaker"]) == (theirs["text"], theirs["speaker"]), (name, mine, theirs)
            assert abs(mine["start"] - theirs["start"]) <= 0.01, (name, mine, theirs)
            assert abs(mine["end"] - theirs["end"]) <= 0.01, (name, mine, theirs)
    print(f"five entry points agree on {len(reference['segments'])} segments "
          f"({time.monotonic() - started:.0f} s)")
