"""What every route reaches through one dependency: the model calls and the ingress's limits.

The composition root (serve/ingress.py) builds one `Services` per replica and puts it on the app;
routers read it with `get_services` and never import the root.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request, UploadFile

from config.settings import get_settings
from serve import job_records, metrics
from serve.middleware import request_id
from serve.model_calls import STREAM_WINDOWS_IN_FLIGHT, WINDOWS_IN_FLIGHT, ModelCalls, call_handle
from serve.params import TranscriptionParams, check_model
from serve.storage import StoredAudio, release_upload, save_upload
from serve.streaming import transcript_events
from speech.audio import AudioLimits
from speech.pipeline import TranscriptionPipeline
from speech.types import Transcript

log = logging.getLogger("serve.context")


@dataclass(frozen=True)
class IngressConfig:
    """What the ingress needs beyond the handles; defaults come from Settings."""

    max_upload_bytes: int = field(default_factory=lambda: get_settings().AUDIO_MAX_FILE_SIZE)
    max_duration_s: float = field(default_factory=lambda: get_settings().AUDIO_MAX_DURATION_S)
    storage_base_path: Path = field(default_factory=lambda: get_settings().STORAGE_BASE_PATH)
    upload_stall_timeout_s: float = field(
        default_factory=lambda: get_settings().UPLOAD_STALL_TIMEOUT_S)
    """A request body that sends nothing for this long is answered 408."""
    upload_min_rate_bps: int = field(default_factory=lambda: get_settings().UPLOAD_MIN_RATE_BPS)
    """... or that, past its first `upload_stall_timeout_s`, averages fewer bytes per second."""
    retry_after_s: float = 1.0
    """Retry-After for 503s when Serve does not say better."""
    queue_timeout_s: float | None = 20.0
    """A synchronous request whose window waits longer than this for a model replica to take
    it is withdrawn from Serve's queue and answered 503 + Retry-After; the ASR replica also
    refuses at once when the windows already waiting there would take longer than this (its
    `max_wait_s`). Serve's queue limits are counts (max_ongoing/max_queued_requests); at low
    throughput they mean minutes of waiting, past any client's timeout. None: wait as long as
    Serve queues."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IngressConfig:
        data = dict(data or {})
        if "storage_base_path" in data:
            data["storage_base_path"] = Path(data["storage_base_path"])
        return cls(**data)

    @property
    def limits(self) -> AudioLimits:
        return AudioLimits(max_bytes=self.max_upload_bytes, max_duration_s=self.max_duration_s)


class Services:
    """Model calls plus configuration: what every route needs, reached through `get_services`."""

    def __init__(self, asr: Any, diarizer: Any | None, config: IngressConfig,
                 runner: Any | None = None) -> None:
        self.config = config
        self.models = ModelCalls(asr, diarizer, limits=config.limits,
                                 retry_after_s=config.retry_after_s)
        self.runner = runner
        """The JobRunnerDeployment's handle (None: not bound); only /ready uses it."""

    async def model_info(self) -> dict[str, Any]:
        return await self.models.model_info()

    async def _prepare(self, request: Request, upload: UploadFile, params: TranscriptionParams,
                       windows_in_flight: int) -> tuple[TranscriptionPipeline, StoredAudio]:
        """Check against the models, then store: a refused request stores nothing."""
        info = await self.models.model_info()
        check_model(params.model, info["id"])
        pipeline = await self.models.pipeline(queue_timeout_s=self.config.queue_timeout_s,
                                              windows_in_flight=windows_in_flight,
                                              tag=request_id(request.scope),
                                              on_stage=metrics.observe_stage)
        pipeline.check(params.request)
        t0 = time.perf_counter()
        stored = await save_upload(upload, max_bytes=self.config.max_upload_bytes,
                                   base_path=self.config.storage_base_path)
        metrics.observe_stage("store", time.perf_counter() - t0)
        metrics.UPLOAD_BYTES.inc(stored.size)
        return pipeline, stored

    async def _record(self, request: Request, upload: UploadFile, params: TranscriptionParams,
                      stored: StoredAudio, transcript: Transcript) -> bool:
        """Keep the finished request as a succeeded job; True when that job now holds the audio."""
        t0 = time.perf_counter()
        try:
            return await asyncio.to_thread(
                job_records.record_sync_request, request=request, stored=stored,
                options=params.stored_options(), transcript=transcript, filename=upload.filename)
        finally:
            metrics.observe_stage("record", time.perf_counter() - t0)

    async def transcribe_upload(self, request: Request, upload: UploadFile,
                                params: TranscriptionParams) -> Transcript:
        """Check, store, transcribe (+ diarize), record; nothing is left behind on failure."""
        pipeline, stored = await self._prepare(request, upload, params, WINDOWS_IN_FLIGHT)
        keep = False
        try:
            transcript = await pipeline.run(params.request, stored.path)
            keep = await self._record(request, upload, params, stored, transcript)
            return transcript
        finally:
            release_upload(stored, keep=keep, base_path=self.config.storage_base_path)

    async def stream_upload(self, request: Request, upload: UploadFile,
                            params: TranscriptionParams) -> AsyncIterator[str]:
        """The same, as server-sent events (serve/streaming.py). What can be refused is refused
        before the stream starts (a plain 4xx); the upload is released when the stream ends,
        however it ends."""
        pipeline, stored = await self._prepare(request, upload, params, STREAM_WINDOWS_IN_FLIGHT)
        try:  # audio that does not decode is a 400 too, not an event
            audio = await asyncio.to_thread(pipeline.load, stored.path)
        except BaseException:
            release_upload(stored, keep=False, base_path=self.config.storage_base_path)
            raise

        async def events() -> AsyncIterator[str]:
            keep = False

            async def finished(transcript: Transcript) -> None:
                nonlocal keep
                keep = await self._record(request, upload, params, stored, transcript)

            try:
                async for event in transcript_events(
                        lambda on_window: pipeline.run(params.request, audio, on_window=on_window),
                        segments=params.response_format == "diarized_json", finished=finished):
                    yield event
            finally:
                release_upload(stored, keep=keep, base_path=self.config.storage_base_path)

        return events()

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Models loaded and storage writable; each check's outcome by name."""
        checks: dict[str, Any] = {}
        try:
            info = await asyncio.wait_for(self.models.model_info(), timeout=5)
            checks["asr"] = {"ok": True, "model": info["id"]}
        except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
            checks["asr"] = {"ok": False, "error": type(exc).__name__}
        if self.models.diarizer is not None:
            try:
                d = await asyncio.wait_for(call_handle(lambda: self.models.diarizer.model_info.remote(),
                                                       what="diarization"), timeout=5)
                checks["diarization"] = {"ok": True, "available": d["available"]}
            except Exception as exc:  # noqa: BLE001
                checks["diarization"] = {"ok": False, "error": type(exc).__name__}
        try:
            base = self.config.storage_base_path
            base.mkdir(parents=True, exist_ok=True)
            probe = base / f".ready-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
            checks["storage"] = {"ok": True}
        except OSError as exc:
            checks["storage"] = {"ok": False, "error": str(exc)}
        try:
            state = await asyncio.wait_for(asyncio.to_thread(job_records.readiness), timeout=5)
            checks["jobs"] = {"ok": state["database"] == "ok", **state}
        except Exception as exc:  # noqa: BLE001
            checks["jobs"] = {"ok": False, "error": type(exc).__name__}
        if self.runner is not None:
            # Reported, never a reason to be unready: this replica's HTTP API works without the
            # runner, and jobs wait queued while Serve replaces it.
            try:
                state = await asyncio.wait_for(self.runner.status.remote(), timeout=5)
                checks["runner"] = {"ok": True, "available": True, **state}
            except Exception as exc:  # noqa: BLE001
                checks["runner"] = {"ok": True, "available": False, "error": type(exc).__name__}
        return all(c["ok"] for c in checks.values()), checks


def get_services(request: Request) -> Services:
    """FastAPI dependency: the ingress's model calls and configuration."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
