"""The ASR replica: Whisper loaded once, windows of all concurrent requests batched together.

Callers (the ingress, the job runner) plan a recording's windows themselves
(`speech.pipeline`), so VAD and stitching never hold this replica; they send windows, a few calls
at a time, and each window is submitted to one `MicroBatcher` (serve/batching.py: why not
`@serve.batch`), which mixes windows of every request in flight and takes the next batch when
the model is free. The model call runs in a worker thread (`asyncio.to_thread`) so the event
loop keeps accepting windows meanwhile.

Batch size and wait come from `user_config` (`reconfigure`), so they change without a redeploy;
so does `threads_when_alone`: torch threads for a batch that holds every request in flight here
while the rest of the machine was idle during the last batch (`serve/spare_cores.py`; a lone
request on the CPU profile's two cores is decoded up to 20 % sooner with both), while batches that
share the machine with other requests' upload, decoding and planning keep the one thread per CPU
Ray gave the replica.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from config.settings import get_settings
from serve.batching import MicroBatcher
from serve.errors import OverloadedError
from serve.metrics import ReplicaMetrics
from serve.spare_cores import SpareCores
from speech.types import SAMPLE_RATE, TranscribeOptions, Window, WindowResult

log = logging.getLogger("serve.asr")

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.05
BATCH_HISTORY = 512


@dataclass(frozen=True)
class _Item:
    """One window queued for a batch, tagged with the request it belongs to."""

    request_id: str
    window: Window
    tag: str | None = None
    """The caller's name for the request (its Serve request id), kept in the batch record."""
    queued_at: float = field(default_factory=time.perf_counter)


@serve.deployment(
    name="ASRDeployment",
    max_ongoing_requests=32,
    max_queued_requests=64,
    ray_actor_options={"num_cpus": 1},
    user_config={"max_batch_size": DEFAULT_MAX_BATCH_SIZE,
                 "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_TIMEOUT_S},
    health_check_period_s=10,
)
class ASRDeployment:
    """Wraps `speech.asr.WhisperEngine`; Ray lives here, not in the engine."""

    def __init__(self, model: str | None = None, device: str | None = None) -> None:
        from config.logging_setup import configure_logging
        from speech.asr import WhisperEngine

        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
        self._metrics = ReplicaMetrics()
        self._engine = WhisperEngine(model or settings.WHISPER_MODEL_PATH,
                                     device or settings.AI_DEVICE,
                                     settings.MODEL_CACHE_DIR)
        t0 = time.perf_counter()
        self._engine.load()
        self._warm_up()
        load_s = time.perf_counter() - t0
        self._metrics.model_load_seconds.set(load_s, tags={"model": self._engine.model_name})
        import torch

        self._threads = torch.get_num_threads()
        log.info("asr replica ready", extra={"model": self._engine.model_name,
                                             "load_seconds": round(load_s, 2),
                                             "torch_threads": self._threads})
        self._queued = 0
        self._computing = 0
        self._waiting: dict[str, int] = {}
        """Request id -> its windows not yet taken by a batch."""
        self._window_s: float | None = None
        """Model time per window of recent batches (moving average): what a window waiting
        here costs, for `max_wait_s`. Conservative (small batches cost more per window), so a
        synchronous request is shed rather than held past its client's timeout."""
        self._batching = {"max_batch_size": DEFAULT_MAX_BATCH_SIZE,
                          "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_TIMEOUT_S,
                          "threads_when_alone": None}
        self._batcher: MicroBatcher[_Item, WindowResult] = MicroBatcher(
            self._batched_windows, max_batch_size=DEFAULT_MAX_BATCH_SIZE,
            batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
        self._batches: collections.deque[dict[str, Any]] = collections.deque(maxlen=BATCH_HISTORY)
        self._spare = SpareCores()

    def _warm_up(self) -> None:
        """Pay first-call costs (kernels, caches) before taking traffic, so the first requests
        are not serialised behind them and batch like the rest."""
        second = np.zeros(SAMPLE_RATE, dtype=np.float32)
        self._engine.transcribe_windows([Window(second, 0.0, TranscribeOptions())])

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply `user_config`: `max_batch_size`, `batch_wait_timeout_s`, `threads_when_alone`."""
        size = int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        wait = float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_TIMEOUT_S))
        alone = config.get("threads_when_alone")
        if alone is not None and int(alone) < 1:
            raise ValueError(f"threads_when_alone must be at least 1, got {alone}")
        self._batcher.configure(max_batch_size=size, batch_wait_timeout_s=wait)
        self._batching = {"max_batch_size": size, "batch_wait_timeout_s": wait,
                          "threads_when_alone": None if alone is None else int(alone)}
        log.info("asr batching configured", extra=self._batching)

    async def transcribe_windows(self, windows: list[Window], max_wait_s: float | None = None,
                                 tag: str | None = None) -> list[WindowResult]:
        """Decode windows (planned by the caller, `speech.pipeline`), each batched with whatever
        else is in flight here; results in the same order.

        `max_wait_s` (synchronous requests): when the windows already here would take longer
        than that to clear (estimated from recent batches), refuse at once with 503 +
        Retry-After rather than hold the caller past its timeout. Jobs pass None and wait."""
        if max_wait_s is not None and self._window_s is not None:
            ahead = self._queued + self._computing + len(windows)
            wait_s = ahead * self._window_s
            if wait_s > max_wait_s:
                raise OverloadedError(max(1.0, min(wait_s - max_wait_s, 30.0)))
        request_id = uuid.uuid4().hex
        self._waiting[request_id] = len(windows)
        self._set_queued(len(windows))
        try:
            return list(await asyncio.gather(*(self._batcher.submit(_Item(request_id, w, tag))
                                               for w in windows)))
        finally:  # cancelled (caller gone, deadline): its windows left the queue unbatched
            self._set_queued(-self._waiting.pop(request_id, 0))

    async def _batched_windows(self, items: list[_Item]) -> list[WindowResult]:
        """One model call for windows of possibly many requests."""
        taken = 0
        for item in items:
            left = self._waiting.get(item.request_id, 0)
            if left:
                self._waiting[item.request_id] = left - 1
                taken += 1
        self._set_queued(-taken)
        windows = [item.window for item in items]
        audio_s = sum(len(w.samples) for w in windows) / SAMPLE_RATE
        requests = len({item.request_id for item in items})
        in_flight = len(self._waiting)  # requests here, this batch's included
        others_cores = self._spare.others_cores  # what the rest of the machine used last batch
        alone = requests == in_flight and not self._queued and self._spare.idle
        threads = self._batching["threads_when_alone"] if alone else None
        t0 = time.perf_counter()
        queued_s = sum(t0 - item.queued_at for item in items) / len(items)  # mean wait for a batch
        self._computing += len(items)
        self._spare.start()
        try:
            results = await asyncio.to_thread(self._engine.transcribe_windows, windows, threads=threads)
        except Exception:
            self._metrics.asr_errors.inc()
            log.exception("asr batch failed", extra={"batch_size": len(items)})
            raise
        finally:
            self._computing -= len(items)
            self._spare.stop()
        compute_s = time.perf_counter() - t0
        per_window = compute_s / len(items)
        self._window_s = (per_window if self._window_s is None
                          else 0.7 * self._window_s + 0.3 * per_window)
        self._metrics.asr_batch_size.observe(len(items))
        self._metrics.asr_windows.inc(len(items))
        self._metrics.asr_audio_seconds.inc(audio_s)
        if compute_s > 0:
            self._metrics.asr_real_time_factor.set(audio_s / compute_s)
        self._batches.append({"batch_size": len(items), "requests": requests,
                              "audio_s": round(audio_s, 3), "compute_s": round(compute_s, 3),
                              "queued_s": round(queued_s, 3), "in_flight_requests": in_flight,
                              "threads": threads or self._threads,
                              "others_cores_before": None if others_cores is None else round(others_cores, 2),
                              "windows": [[item.tag, item.window.index] for item in items]})
        log.info("asr batch", extra={"batch_size": len(items), "requests": requests,
                                     "audio_s": round(audio_s, 3), "compute_s": round(compute_s, 3)})
        return results

    def _set_queued(self, delta: int) -> None:
        self._queued += delta
        self._metrics.asr_queue_length.set(self._queued)

    def model_info(self) -> dict[str, Any]:
        """What the model can do (`GET /v1/models`, `/ready`, request validation), and the VAD
        callers must plan windows with so they cut exactly as this engine would."""
        engine = self._engine
        return {"id": engine.model_name, "multilingual": bool(engine.is_multilingual),
                "languages": engine.languages(), "device": engine.device,
                "vad": engine.planner.vad_kind}

    def batch_stats(self) -> dict[str, Any]:
        """Recent batches (size, distinct requests, which request's which windows): the evidence
        that requests share batches, and of when a request's windows were decoded."""
        batches = list(self._batches)
        return {"batches": batches, **self._batching}

    def check_health(self) -> None:
        """Serve's health check: the model must be loaded."""
        if self._engine.model is None:
            raise RuntimeError("whisper model is not loaded")
