"""The HTTP ingress: a FastAPI app built inside the Serve replica, around handles to the models.

The app is built by `create_app(services)` at replica start (`__serve_build_asgi_app__`), so
every route reaches the ASR and diarization handles through one dependency (`get_services`),
the jobs router included, and the app can be built without Ray for unit tests.

A request's audio is stored (size-capped while streaming), decoded here once, put in the
object store once, and that one object goes to ASR and diarization concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from ray import serve

from config.settings import get_settings
from serve import metrics, openai_api
from serve.errors import (
    ApiError,
    DiarizationUnavailableError,
    OverloadedError,
    install_error_handlers,
    unwrap,
)
from serve.middleware import MULTIPART_OVERHEAD_BYTES, BodyLimitMiddleware, HttpMetricsMiddleware
from serve.openai_api import TranscriptionParams, check_model, get_services
from serve.storage import StoredAudio, delete_audio, release_upload, save_upload
from speech.errors import SpeechError
from speech.types import TranscribeOptions, Transcript

log = logging.getLogger("serve.ingress")

def v1_dependencies() -> list[Any]:
    """Dependencies of every /v1 route: the one place to change them.

    Rate limit first (floods of bad keys are limited too), then the API key (401 without one).
    """
    from serve.auth import current_user
    from serve.ratelimit import rate_limit

    return [rate_limit, current_user]


def _jobs_api() -> Any | None:
    """serve.jobs_api (issue 3) when this build has it."""
    try:
        from serve import jobs_api
    except ModuleNotFoundError as exc:
        if exc.name != "serve.jobs_api":
            raise
        return None
    return jobs_api


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class IngressConfig:
    """What the ingress needs beyond the handles; defaults come from Settings."""

    max_upload_bytes: int = field(default_factory=lambda: get_settings().AUDIO_MAX_FILE_SIZE)
    max_duration_s: float = field(default_factory=lambda: get_settings().AUDIO_MAX_DURATION_S)
    storage_base_path: Path = field(default_factory=lambda: get_settings().STORAGE_BASE_PATH)
    retry_after_s: float = 1.0
    """Retry-After for 503s when Serve does not say better."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IngressConfig:
        data = dict(data or {})
        if "storage_base_path" in data:
            data["storage_base_path"] = Path(data["storage_base_path"])
        return cls(**data)


# --------------------------------------------------------------------------- model calls
async def call_handle(call: Callable[[], Awaitable[Any]], *, retry_after_s: float = 1.0,
                      what: str = "transcription") -> Any:
    """Await a deployment call; Serve backpressure -> 503, engine errors -> themselves."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    try:
        return await call()
    except (BackPressureError, DeploymentUnavailableError) as exc:
        retry = getattr(exc, "retry_after_s", None) or retry_after_s
        raise OverloadedError(retry, what) from exc
    except Exception as exc:
        cause = unwrap(exc)
        if isinstance(cause, (SpeechError, ApiError)):
            raise cause from None
        if isinstance(cause, (BackPressureError, DeploymentUnavailableError)):
            raise OverloadedError(retry_after_s, what) from exc
        raise


async def run_transcription(asr: Any, diarizer: Any | None, audio: np.ndarray | Any,
                            options: TranscribeOptions, *, diarize: bool = False,
                            num_speakers: int | None = None, min_speakers: int | None = None,
                            max_speakers: int | None = None,
                            retry_after_s: float = 1.0) -> Transcript:
    """ASR and (if asked) diarization concurrently on one audio object, merged by overlap.

    `audio` may be an array or an ObjectRef to one; an array is put in the object store once
    here so both deployments read the same object. Shared with the job runner.
    """
    import ray

    if diarize and diarizer is None:
        raise DiarizationUnavailableError("this deployment was built without diarization")
    ref = audio if isinstance(audio, ray.ObjectRef) else ray.put(audio)
    asr_call = call_handle(lambda: asr.transcribe.remote(ref, options),
                           retry_after_s=retry_after_s)
    if not diarize:
        return await asr_call
    diar_call = call_handle(lambda: diarizer.diarize.remote(ref, num_speakers, min_speakers,
                                                            max_speakers),
                            retry_after_s=retry_after_s, what="diarization")
    transcript, turns = await asyncio.gather(asr_call, diar_call)
    from speech.speaker_merge import assign_speakers

    return assign_speakers(transcript, turns)


async def record_sync_result(*, request: Request, stored: StoredAudio, upload: UploadFile,
                             params: TranscriptionParams, transcript: Transcript) -> bool:
    """The seam to the jobs issue: record a finished synchronous request as a succeeded job.

    Returns True when the stored audio is now referenced by that job (kept), False to have it
    deleted (no jobs API in this build, or no authenticated user).
    """
    jobs_api = _jobs_api()
    if jobs_api is None:
        return False
    options = {**dataclasses.asdict(params.options()), "diarize": params.diarize,
               "num_speakers": params.num_speakers, "min_speakers": params.min_speakers,
               "max_speakers": params.max_speakers, "response_format": params.response_format}
    return await asyncio.to_thread(jobs_api.record_sync_request, request=request, stored=stored,
                                   options=options, transcript=transcript,
                                   filename=upload.filename)


# --------------------------------------------------------------------------- services
class Services:
    """Handles plus configuration: what every route needs, reached through `get_services`."""

    def __init__(self, asr: Any, diarizer: Any | None, config: IngressConfig) -> None:
        self.asr = asr
        self.diarizer = diarizer
        self.config = config
        self._model_info: dict[str, Any] | None = None

    async def model_info(self) -> dict[str, Any]:
        if self._model_info is None:
            self._model_info = await call_handle(lambda: self.asr.model_info.remote(),
                                                 retry_after_s=self.config.retry_after_s)
        return self._model_info

    async def decode(self, stored: StoredAudio) -> np.ndarray:
        from speech.audio import decode_audio

        return await asyncio.to_thread(decode_audio, stored.path,
                                       max_duration_s=self.config.max_duration_s)

    async def transcribe_upload(self, request: Request, upload: UploadFile,
                                params: TranscriptionParams) -> Transcript:
        """Store, decode, transcribe (+ diarize), record; nothing is left behind on failure."""
        info = await self.model_info()
        check_model(params.model, info["id"])
        stored = await save_upload(upload, max_bytes=self.config.max_upload_bytes,
                                   base_path=self.config.storage_base_path)
        metrics.UPLOAD_BYTES.inc(stored.size)
        keep = False
        try:
            audio = await self.decode(stored)
            transcript = await run_transcription(
                self.asr, self.diarizer, audio, params.options(), diarize=params.diarize,
                num_speakers=params.num_speakers, min_speakers=params.min_speakers,
                max_speakers=params.max_speakers, retry_after_s=self.config.retry_after_s)
            keep = await record_sync_result(request=request, stored=stored, upload=upload,
                                            params=params, transcript=transcript)
            return transcript
        finally:
            release_upload(stored, keep=keep, base_path=self.config.storage_base_path)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Models loaded and storage writable; each check's outcome by name."""
        checks: dict[str, Any] = {}
        try:
            info = await asyncio.wait_for(self.model_info(), timeout=5)
            checks["asr"] = {"ok": True, "model": info["id"]}
        except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
            checks["asr"] = {"ok": False, "error": type(exc).__name__}
        if self.diarizer is not None:
            try:
                d = await asyncio.wait_for(self.diarizer.model_info.remote(), timeout=5)
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
        jobs_api = _jobs_api()
        if jobs_api is not None:
            try:
                state = await asyncio.wait_for(asyncio.to_thread(jobs_api.readiness), timeout=5)
                checks["jobs"] = {"ok": state["database"] == "ok", **state}
            except Exception as exc:  # noqa: BLE001
                checks["jobs"] = {"ok": False, "error": type(exc).__name__}
        return all(c["ok"] for c in checks.values()), checks


# --------------------------------------------------------------------------- the app
def create_app(services: Services) -> FastAPI:
    """The whole HTTP surface around `services`."""
    jobs_api = _jobs_api()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner = await _start_jobs(services) if jobs_api is not None else None
        try:
            yield
        finally:
            if runner is not None:
                await runner.stop()

    app = FastAPI(title="Speech transcription service", version="1.0", lifespan=lifespan,
                  description="OpenAI-compatible speech-to-text with diarization, on Ray Serve.")
    app.state.services = services
    install_error_handlers(app)
    deps = [Depends(d) for d in v1_dependencies()] if jobs_api is not None else []
    app.include_router(openai_api.router, dependencies=deps)
    if jobs_api is not None:
        app.include_router(jobs_api.router)

    @app.get("/health", tags=["ops"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="Readiness: models loaded, dependencies reachable")
    async def ready(s: Services = Depends(get_services)) -> JSONResponse:
        ok, checks = await s.readiness()
        return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks},
                            status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": "5"})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics of this ingress replica")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    app.add_middleware(BodyLimitMiddleware,
                       limit_bytes=services.config.max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    app.add_middleware(HttpMetricsMiddleware)
    return app


async def _start_jobs(services: Services) -> Any | None:
    """Migrate the database (idempotent, serialised on PostgreSQL) and start this replica's
    job runner on the same ASR/diarization handles; None when JOB_RUNNER_CONCURRENCY is 0."""
    from db.migrate import upgrade_head
    from serve.job_runner import JobRunner, handles_transcriber

    await asyncio.to_thread(upgrade_head)
    concurrency = get_settings().JOB_RUNNER_CONCURRENCY
    if services.asr is None or concurrency <= 0:
        return None
    runner = JobRunner(handles_transcriber(services.asr, services.diarizer),
                       concurrency=concurrency,
                       delete_audio=lambda sha: delete_audio(sha, base_path=services.config.storage_base_path))
    runner.start()
    return runner


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress()
class Ingress:
    """The Serve ingress deployment: holds the handles, builds the app in the replica."""

    def __init__(self, asr: Any, diarizer: Any | None = None,
                 config: dict[str, Any] | None = None) -> None:
        from config.logging_setup import configure_logging

        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
        self._services = Services(asr, diarizer, IngressConfig.from_dict(config))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._services)
