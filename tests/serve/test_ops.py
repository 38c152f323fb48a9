"""Operational endpoints: liveness, readiness, models, docs, metrics, unknown routes."""

from __future__ import annotations

import httpx

from tests.serve.support import JFK


def test_health_says_the_process_is_alive(service) -> None:  # noqa: ANN001
    assert httpx.get(service.url("/health")).json() == {"status": "ok"}


def test_ready_reports_each_dependency(service) -> None:  # noqa: ANN001
    response = httpx.get(service.url("/ready"), timeout=30)
    assert response.status_code == 200, response.text
    checks = response.json()["checks"]
    assert checks["asr"]["ok"] and checks["asr"]["model"] == "tiny.en"
    assert checks["storage"]["ok"]
    # The JobRunnerDeployment is in the graph, reached through its handle; idle here
    # (JOB_RUNNER_CONCURRENCY=0 in the test settings).
    runner = checks["runner"]
    assert runner["ok"] and runner["available"], runner
    assert runner["concurrency"] == 0 and runner["running"] == [] and runner["healthy"], runner


def test_models_lists_the_loaded_model(openai_client) -> None:  # noqa: ANN001
    ids = [m.id for m in openai_client.models.list()]
    assert ids == ["tiny.en"]


def test_docs_and_openapi_describe_the_api(service) -> None:  # noqa: ANN001
    assert httpx.get(service.url("/docs")).status_code == 200
    paths = httpx.get(service.url("/openapi.json")).json()["paths"]
    assert {"/v1/audio/transcriptions", "/v1/audio/translations", "/v1/models"} <= set(paths)


def test_unknown_route_is_a_404_in_openai_shape(service) -> None:  # noqa: ANN001
    response = httpx.get(service.url("/v1/nope"), headers=service.auth)
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_count_requests_by_route_template_and_status(service) -> None:  # noqa: ANN001
    with open(JFK, "rb") as f:
        ok = httpx.post(service.url("/v1/audio/transcriptions"), data={"model": "whisper-1"},
                        files={"file": ("jfk.flac", f)}, headers=service.auth, timeout=120)
    assert ok.status_code == 200
    text = httpx.get(service.url("/metrics")).text
    lines = text.splitlines()
    ok_line = [ln for ln in lines if ln.startswith("speech_http_requests_total{")
               and 'route="/v1/audio/transcriptions"' in ln and 'status="200"' in ln]
    assert ok_line and float(ok_line[0].rsplit(" ", 1)[1]) >= 1, ok_line
    assert any(ln.startswith("speech_http_request_duration_seconds_bucket{") for ln in lines)
    uploaded = [ln for ln in lines if ln.startswith("speech_upload_bytes_total ")]
    assert uploaded and float(uploaded[0].split()[1]) >= JFK.stat().st_size
    # The queue's gauges, read from the database at the scrape (the runner has no /metrics).
    assert any(ln.startswith("speech_job_queue_depth ") for ln in lines)
    assert any(ln.startswith('speech_jobs{status="queued"} ') for ln in lines)
