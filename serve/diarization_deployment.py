"""The diarization replica: pyannote loaded once, one recording at a time per replica.

The ingress calls it concurrently with the ASR replica on the same decoded audio (one object in
the object store) and merges the turns into the transcript. pyannote's pipeline is not made for
concurrent calls on one instance, so calls run one at a time in a worker thread; more throughput
comes from more replicas (`autoscaling_config`), not from threads.

If the diarization model cannot load (missing package, bad path, gated hub id without a token,
broken checkpoint: any exception), the replica still starts, reports `available: false` with the
reason, and answers every call with `DiarizationUnavailableError`: transcription keeps working and
`diarize=true` is refused with 501 at validation, instead of a failed application.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from config.settings import get_settings
from serve.errors import DiarizationUnavailableError, from_speech_error
from speech.errors import SpeechError
from serve.metrics import ReplicaMetrics
from speech.types import SAMPLE_RATE, SpeakerTurn

log = logging.getLogger("serve.diarization")


@serve.deployment(
    name="DiarizationDeployment",
    max_ongoing_requests=4,
    max_queued_requests=32,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
)
class DiarizationDeployment:
    """Wraps `speech.diarization.DiarizationEngine`."""

    def __init__(self, model: str | None = None, device: str | None = None) -> None:
        from config.logging_setup import configure_logging

        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
        self._metrics = ReplicaMetrics()
        self._lock = asyncio.Lock()
        self._engine: Any = None
        self._reason = ""
        from speech.asr import resolve_device
        from speech.diarization import load_diarizer

        model = model or settings.DIARIZATION_MODEL_PATH
        t0 = time.perf_counter()
        engine, reason = load_diarizer(model, resolve_device(device or settings.AI_DEVICE),
                                       settings.HF_TOKEN)
        if engine is None:
            self._reason = reason or "diarization is not available"
            log.warning("diarization unavailable", extra={"reason": self._reason})
            return
        load_s = time.perf_counter() - t0
        self._metrics.model_load_seconds.set(load_s, tags={"model": f"diarization:{model}"})
        log.info("diarization replica ready", extra={"model": model, "load_seconds": round(load_s, 2)})
        self._engine = engine

    async def diarize(self, audio: np.ndarray, num_speakers: int | None = None,
                      min_speakers: int | None = None,
                      max_speakers: int | None = None) -> list[SpeakerTurn]:
        """Speaker turns of one recording (seconds on the recording's clock)."""
        if self._engine is None:
            raise from_speech_error(
                DiarizationUnavailableError(self._reason or "diarization is not available"))
        async with self._lock:
            try:
                turns = await asyncio.to_thread(self._engine.diarize, audio,
                                                num_speakers=num_speakers,
                                                min_speakers=min_speakers,
                                                max_speakers=max_speakers)
            except SpeechError as exc:  # raised as an ApiError, which pickles intact
                raise from_speech_error(exc) from None
        self._metrics.diarization_audio_seconds.inc(len(audio) / SAMPLE_RATE)
        return list(turns)

    def available(self) -> bool:
        return self._engine is not None

    def model_info(self) -> dict[str, Any]:
        return {"available": self._engine is not None, "reason": self._reason or None}
