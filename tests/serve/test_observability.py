"""Observability of the running service: the metrics real requests move, and logs that keep
secrets, transcripts and users' file names out.

Two metric sources (serve/metrics.py): the ingress's prometheus-client metrics at its own
`GET /metrics`, and the replicas' `ray.util.metrics`, which Ray exports with a `ray_` prefix on
the node's metrics export port, every few seconds (so those are polled). Other tests of the
session send audio too, so every check compares before/after values.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.serve.support import JFK, SHORT_CLIPS, log_file

RAY_EXPORT_WAIT_S = 90.0
TRANSCRIPTIONS = "/v1/audio/transcriptions"


# ------------------------------------------------------------------------------ helpers
def _labels(text: str) -> dict[str, str]:
    """`a="1",b="x"` -> {"a": "1", "b": "x"} (values here never hold quotes or commas)."""
    out = {}
    for part in filter(None, text.split('",')):
        key, _, value = part.partition('="')
        out[key.strip(",")] = value.rstrip('"')
    return out


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus exposition text -> (sample name, labels, value) for every sample."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        samples.append((name, _labels(labels.rstrip("}")), float(value)))
    return samples


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of a sample over every series (replicas, workers) whose labels include `labels`."""
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


def ray_metrics_url() -> str:
    """The metrics export endpoint of the test cluster's one node (Ray's own address book)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return parse_metrics(response.text)


def transcribe(service, path: Path, name: str | None = None) -> httpx.Response:  # noqa: ANN001
    with open(path, "rb") as f:
        response = httpx.post(service.url(TRANSCRIPTIONS), data={"model": "whisper-1"},
                              files={"file": (name or path.name, f)}, headers=service.auth,
                              timeout=300)
    assert response.status_code == 200, response.text
    return response


def duration_s(path: Path) -> float:
    from speech.audio import decode_audio
    from speech.types import SAMPLE_RATE

    return len(decode_audio(path)) / SAMPLE_RATE


def poll(check: Callable[[], str | None], timeout_s: float) -> None:
    """Call `check` until it returns None (all good); fail with its last complaint."""
    deadline = time.monotonic() + timeout_s
    while True:
        problem = check()
        if problem is None:
            return
        assert time.monotonic() < deadline, problem
        time.sleep(2)


# ------------------------------------------------------------------------------ metrics
def test_requests_move_the_replica_and_ingress_metrics(service) -> None:  # noqa: ANN001
    clips = [JFK, *SHORT_CLIPS[:2]]
    sent_s = sum(duration_s(c) for c in clips)
    ray_url = ray_metrics_url()
    ingress_url = service.url("/metrics")

    # Ray's export lags the replicas: wait until what earlier tests did has landed, so the
    # "before" values are not missing some of it (which would inflate the deltas).
    def settled() -> tuple[list, list]:
        first = scrape(ray_url)
        time.sleep(12)  # more than one report interval (10 s)
        return first, scrape(ray_url)

    a, before = settled()
    while total(a, "ray_speech_asr_windows_total") != total(before, "ray_speech_asr_windows_total"):
        a, before = settled()
    ingress_before = scrape(ingress_url)

    for clip in clips:
        transcribe(service, clip)

    ingress_after = scrape(ingress_url)
    route = {"route": TRANSCRIPTIONS, "method": "POST"}
    assert (total(ingress_after, "speech_http_requests_total", status="200", **route)
            - total(ingress_before, "speech_http_requests_total", status="200", **route)) == len(clips)
    assert (total(ingress_after, "speech_http_request_duration_seconds_count", **route)
            - total(ingress_before, "speech_http_request_duration_seconds_count", **route)) == len(clips)
    assert (total(ingress_after, "speech_upload_bytes_total") - total(ingress_before, "speech_upload_bytes_total")
            >= sum(c.stat().st_size for c in clips))

    def grew(after: list, name: str) -> float:
        return total(after, name) - total(before, name)

    seen: dict[str, float] = {}

    def replica_metrics_arrived() -> str | None:
        after = scrape(ray_url)
        seen.clear()
        for name in ("ray_speech_asr_audio_seconds_total", "ray_speech_asr_windows_total",
                     "ray_speech_asr_batch_size_count", "ray_speech_asr_batch_size_sum"):
            seen[name] = grew(after, name)
        seen["batches_in_+Inf_bucket"] = (total(after, "ray_speech_asr_batch_size_bucket", le="+Inf")
                                          - total(before, "ray_speech_asr_batch_size_bucket", le="+Inf"))
        # gauges set long ago (at replica start, or while idle) must still be exported
        seen["load_s"] = max((v for n, lab, v in after if n == "ray_speech_model_load_seconds"
                              and lab.get("model") == "tiny.en"), default=0.0)
        seen["queue_series"] = sum(1 for n, _, _ in after if n == "ray_speech_asr_queue_length")
        windows, batches = seen["ray_speech_asr_windows_total"], seen["ray_speech_asr_batch_size_count"]
        ok = (seen["ray_speech_asr_audio_seconds_total"] >= sent_s - 0.01
              and windows >= len(clips)
              # one observation per batch, each of at least one window; Ray 2.60 approximates a
              # histogram's _sum from bucket midpoints, so _sum is only checked to have moved
              and 1 <= batches <= windows
              and seen["batches_in_+Inf_bucket"] == batches
              and seen["ray_speech_asr_batch_size_sum"] > 0
              and seen["load_s"] > 0
              and seen["queue_series"] >= 1)
        return None if ok else f"after {len(clips)} requests of {sent_s:.2f} s: {seen}"

    poll(replica_metrics_arrived, RAY_EXPORT_WAIT_S)
    print(f"replica metrics after {len(clips)} requests ({sent_s:.2f} s of audio): {seen}")


# ------------------------------------------------------------------------------ logs
SECRET_NAME = "secret-name-7f3a.flac"
JFK_WORDS = ("ask not what your country", "fellow americans")


def all_logs(service) -> dict[Path, str]:  # noqa: ANN001
    """Every log the cluster wrote: the service's JSON log file and all of Ray's session logs
    (ingress and replica logs, worker stdout/stderr, Serve's access logs, the raylet's ...)."""
    import ray

    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [log_file(service.storage), *sorted(p for p in logs_dir.rglob("*") if p.is_file())]
    return {p: p.read_text(errors="replace") for p in files if p.exists()}


def test_logs_hold_the_access_line_but_no_key_transcript_or_file_name(service) -> None:  # noqa: ANN001
    response = transcribe(service, JFK, name=SECRET_NAME)
    assert "ask not what your country" in response.json()["text"].lower()  # there was text to leak
    request_id = response.headers["x-request-id"]

    def access_line() -> str | None:
        for text in all_logs(service).values():
            for line in text.splitlines():
                if request_id in line and f"POST {TRANSCRIPTIONS} 200" in line:
                    return line
        return None

    deadline = time.monotonic() + 30  # log handlers may buffer a little
    while (line := access_line()) is None:
        assert time.monotonic() < deadline, f"no access log line for request {request_id}"
        time.sleep(1)
    print("access log:", line)

    logs = all_logs(service)
    service_log = logs.get(log_file(service.storage), "")
    assert '"logger": "serve.asr"' in service_log, "the service's JSON log file stayed empty"
    ours = [json.loads(ln) for ln in service_log.splitlines()
            if '"serve.access"' in ln and request_id in ln]
    assert ours, f"no JSON access line for request {request_id}"
    assert ours[0]["method"] == "POST" and ours[0]["route"] == TRANSCRIPTIONS
    assert ours[0]["status"] == 200 and ours[0]["duration_s"] > 0
    assert isinstance(ours[0]["user_id"], int)
    secrets = {"the API key": service.api_key, "the file name": SECRET_NAME.removesuffix(".flac"),
               **{f"transcript text {w!r}": w for w in JFK_WORDS}}
    leaks = [f"{what} in {path}: {next(ln for ln in text.splitlines() if needle in ln.lower())[:300]}"
             for path, text in logs.items() for what, secret in secrets.items()
             if (needle := secret.lower()) in text.lower()]
    assert not leaks, "\n".join(leaks)


def test_replica_gauges_are_reported_again_with_their_last_values() -> None:
    """Ray 2.60 stops exporting a gauge ~20 s after its last set(): the replicas hold theirs."""
    from serve.metrics import _HeldGauge

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[float, dict | None]] = []

        def set(self, value: float, tags: dict | None = None) -> None:
            self.calls.append((value, tags))

    recorder = Recorder()
    gauge = _HeldGauge(recorder)
    gauge.set(12.5, tags={"model": "tiny.en"})
    gauge.set(3.0, tags={"model": "diarization:packaged"})
    gauge.set(4.0, tags={"model": "tiny.en"})
    recorder.calls.clear()
    gauge.refresh()
    assert sorted(recorder.calls, key=str) == sorted(
        [(4.0, {"model": "tiny.en"}), (3.0, {"model": "diarization:packaged"})], key=str)
