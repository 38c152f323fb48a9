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
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# --- ingress (prometheus-client) -------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "speech_http_requests", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"])
HTTP_REQUEST_DURATION = Histogram(
    "speech_http_request_duration_seconds", "Time from request to the last response byte.",
    ["route", "method"], buckets=LATENCY_BUCKETS_S)
UPLOAD_BYTES = Counter("speech_upload_bytes", "Bytes of audio accepted in uploads.")
JOBS = Gauge("speech_jobs", "Jobs by status.", ["status"])
JOB_QUEUE_DEPTH = Gauge("speech_job_queue_depth", "Jobs queued and not yet claimed.")
JOB_OLDEST_QUEUED_AGE = Gauge("speech_job_oldest_queued_age_seconds",
                              "Age of the oldest queued job (0 when none).")


def render_latest() -> tuple[bytes, str]:
    """The ingress's exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# --- replicas (ray.util.metrics) -------------------------------------------------------------
class ReplicaMetrics:
    """The model replicas' metrics; construct inside a Ray worker (a replica's `__init__`)."""

    def __init__(self) -> None:
        from ray.util import metrics as m

        self.asr_batch_size = m.Histogram(
            "speech_asr_batch_size", description="Windows per batched Whisper call.",
            boundaries=list(BATCH_SIZE_BUCKETS))
        self.asr_windows = m.Counter("speech_asr_windows_total",
                                     description="30 s windows transcribed.")
        self.asr_audio_seconds = m.Counter("speech_asr_audio_seconds_total",
                                           description="Seconds of audio transcribed.")
        self.asr_real_time_factor = m.Gauge(
            "speech_asr_real_time_factor",
            description="Audio seconds per compute second of the last batch (higher is faster).")
        self.model_load_seconds = m.Gauge("speech_model_load_seconds",
                                          description="Time the replica took to load its model.",
                                          tag_keys=("model",))
        self.asr_queue_length = m.Gauge("speech_asr_queue_length",
                                        description="Windows waiting for a batch on this replica.")
        self.asr_errors = m.Counter("speech_asr_errors_total",
                                    description="Batched Whisper calls that failed.")
        self.diarization_audio_seconds = m.Counter(
            "speech_diarization_audio_seconds_total", description="Seconds of audio diarized.")
