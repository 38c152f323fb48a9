"""Every metric the service exports, defined once so names and labels cannot drift.

Two kinds:
- the ingress's HTTP and job metrics: prometheus-client objects in the ingress process, served
  at its `GET /metrics`;
- the replicas' model metrics: `ray.util.metrics` objects, which Ray exports on each node's
  metrics port with a `ray_` prefix (so `speech_asr_batch_size` is scraped as
  `ray_speech_asr_batch_size`). They only exist inside a Ray worker, so they are built by
  `ReplicaMetrics()` in the replica's constructor, not at import.

Labels are bounded sets (route templates, methods, statuses, model names); never user ids or
file names.

Two properties of Ray 2.60's export that the replica metrics work around or live with:
- a gauge is exported only for about two report intervals (~20 s) after its last `set()`, so a
  value set once (the model load time) or not changing while idle (queue length 0) would vanish:
  `ReplicaMetrics` re-sets its gauges' last values every `GAUGE_REFRESH_S` (`_HeldGauge`);
- a histogram's `_sum` is approximated from bucket midpoints (a batch of 1 adds 0.5), so the
  mean batch size is `rate(ray_speech_asr_windows_total) / rate(ray_speech_asr_batch_size_count)`,
  exact, not `_sum / _count`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STAGE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
                   30.0, 60.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
GAUGE_REFRESH_S = 5.0
"""How often a replica re-reports its gauges (half Ray's default 10 s report interval)."""

# --- ingress (prometheus-client) -------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "speech_http_requests", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"])
HTTP_REQUEST_DURATION = Histogram(
    "speech_http_request_duration_seconds", "Time from request to the last response byte.",
    ["route", "method"], buckets=LATENCY_BUCKETS_S)
REQUEST_STAGE_DURATION = Histogram(
    "speech_request_stage_seconds",
    "Where a synchronous request's time goes: store (upload to disk), decode, plan (VAD), asr "
    "(first window sent to last result, model queue included), diarize (beside asr), assemble "
    "(stitch + speakers), record (the finished request kept as a job).",
    ["stage"], buckets=STAGE_BUCKETS_S)


def observe_stage(stage: str, seconds: float) -> None:
    REQUEST_STAGE_DURATION.labels(stage=stage).observe(seconds)


UPLOAD_BYTES = Counter("speech_upload_bytes", "Bytes of audio accepted in uploads.")
JOBS = Gauge("speech_jobs", "Jobs by status.", ["status"])
JOB_QUEUE_DEPTH = Gauge("speech_job_queue_depth", "Jobs queued and not yet claimed.")
JOB_OLDEST_QUEUED_AGE = Gauge("speech_job_oldest_queued_age_seconds",
                              "Age of the oldest queued job (0 when none).")


def render_latest() -> tuple[bytes, str]:
    """The ingress's exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# --- replicas (ray.util.metrics) -------------------------------------------------------------
class _HeldGauge:
    """A `ray.util.metrics.Gauge` whose last value per tag set stays exported (see the module
    docstring): `set()` as usual; `refresh()` reports the held values again."""

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        with self._lock:
            self._gauge.set(value, tags=tags)
            self._values[tuple(sorted((tags or {}).items()))] = value

    def refresh(self) -> None:
        with self._lock:
            for tags, value in self._values.items():
                self._gauge.set(value, tags=dict(tags) or None)


class ReplicaMetrics:
    """The model replicas' metrics; construct inside a Ray worker (a replica's `__init__`).

    A daemon thread re-reports the gauges' last values every `refresh_s` seconds for as long as
    the replica lives."""

    def __init__(self, refresh_s: float = GAUGE_REFRESH_S) -> None:
        from ray.util import metrics as m

        self.asr_batch_size = m.Histogram(
            "speech_asr_batch_size", description="Windows per batched Whisper call.",
            boundaries=list(BATCH_SIZE_BUCKETS))
        self.asr_windows = m.Counter("speech_asr_windows_total",
                                     description="30 s windows transcribed.")
        self.asr_audio_seconds = m.Counter("speech_asr_audio_seconds_total",
                                           description="Seconds of audio transcribed.")
        self.asr_real_time_factor = _HeldGauge(m.Gauge(
            "speech_asr_real_time_factor",
            description="Audio seconds per compute second of the last batch (higher is faster)."))
        self.model_load_seconds = _HeldGauge(m.Gauge(
            "speech_model_load_seconds", description="Time the replica took to load its model.",
            tag_keys=("model",)))
        self.asr_queue_length = _HeldGauge(m.Gauge(
            "speech_asr_queue_length", description="Windows waiting for a batch on this replica."))
        self.asr_errors = m.Counter("speech_asr_errors_total",
                                    description="Batched Whisper calls that failed.")
        self.diarization_audio_seconds = m.Counter(
            "speech_diarization_audio_seconds_total", description="Seconds of audio diarized.")
        self._gauges = (self.asr_real_time_factor, self.model_load_seconds, self.asr_queue_length)
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_gauges, args=(refresh_s,), name="gauge-refresh",
                         daemon=True).start()

    def _refresh_gauges(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for gauge in self._gauges:
                try:
                    gauge.refresh()
                except Exception:  # noqa: BLE001 - metrics never take a replica down
                    logging.getLogger(__name__).debug("gauge refresh failed", exc_info=True)

    def close(self) -> None:
        """Stop re-reporting (tests; a replica's thread simply ends with its process)."""
        self._stop.set()
