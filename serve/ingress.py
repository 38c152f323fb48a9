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
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from config.settings import get_settings
from serve import metrics, openai_api
from serve.errors import (
    ApiError,
    DiarizationUnavailableError,
    OverloadedError,
    ReplicaUnavailableError,
    install_error_handlers,
    unwrap,
)
from serve.middleware import MULTIPART_OVERHEAD_BYTES, BodyLimitMiddleware, HttpMetricsMiddleware
from serve.openai_api import TranscriptionParams, check_model, get_services
from serve.storage import StoredAudio, release_upload, save_upload
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
    upload_stall_timeout_s: float = field(
        default_factory=lambda: get_settings().UPLOAD_STALL_TIMEOUT_S)
    """A request body that sends nothing for this long is answered 408."""
    upload_min_rate_bps: int = field(default_factory=lambda: get_settings().UPLOAD_MIN_RATE_BPS)
    """... or that, past its first `upload_stall_timeout_s`, averages fewer bytes per second."""
    retry_after_s: float = 1.0
    """Retry-After for 503s when Serve does not say better."""
    queue_timeout_s: float | None = 20.0
    """A synchronous request that waits longer than this for a model replica to take it is
    withdrawn from Serve's queue and answered 503 + Retry-After; the ASR replica also refuses
    it at once when the windows already waiting there would take longer than this (its
    `max_wait_s`). Serve's queue limits are counts (max_ongoing/max_queued_requests); at low
    throughput they mean minutes of waiting, past any client's timeout. None: wait as long as
    Serve queues."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IngressConfig:
        data = dict(data or {})
        if "storage_base_path" in data:
            data["storage_base_path"] = Path(data["storage_base_path"])
        return cls(**data)


# --------------------------------------------------------------------------- model calls
REPLICA_LOSS_RETRIES = 1
"""Calls are idempotent (transcribe, diarize, model_info): one whose replica died mid-call is
sent once more (Serve routes it to a live or replacement replica) before the caller gets 503."""
REPLICA_LOSS_RETRY_AFTER_S = 5.0
"""Retry-After when the replica was lost: a replacement loads its model first."""


async def call_handle(call: Callable[[], Awaitable[Any]], *, retry_after_s: float = 1.0,
                      what: str = "transcription", queue_timeout_s: float | None = None) -> Any:
    """Await a deployment call; Serve backpressure -> 503, engine errors -> themselves, the
    replica dying under the call -> sent again once, then 503 `replica_unavailable`.

    `call` must make a new call each time it is invoked (a lambda around `.remote(...)`)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    for attempt in range(REPLICA_LOSS_RETRIES + 1):
        try:
            response = call()
            if queue_timeout_s is not None:
                await _assigned_within(response, queue_timeout_s, retry_after_s, what)
            return await response
        except (BackPressureError, DeploymentUnavailableError) as exc:
            retry = getattr(exc, "retry_after_s", None) or retry_after_s
            raise OverloadedError(retry, what) from exc
        except Exception as exc:
            cause = unwrap(exc)
            if isinstance(cause, (SpeechError, ApiError)):
                raise cause from None
            if isinstance(cause, (BackPressureError, DeploymentUnavailableError)):
                raise OverloadedError(retry_after_s, what) from exc
            if not isinstance(exc, RayActorError) and not isinstance(cause, RayActorError):
                raise
            if attempt < REPLICA_LOSS_RETRIES:
                log.warning("replica lost during a call; sending it again",
                            extra={"what": what, "error": type(exc).__name__})
                continue
            raise ReplicaUnavailableError(max(retry_after_s, REPLICA_LOSS_RETRY_AFTER_S),
                                          what) from exc
    raise AssertionError("unreachable")


async def _assigned_within(response: Any, timeout_s: float, retry_after_s: float,
                           what: str) -> None:
    """Wait until Serve has given the call to a replica; past `timeout_s` withdraw it from the
    queue (nothing was computed) and shed with 503. Only for a Serve DeploymentResponse."""
    assigned = getattr(response, "_to_object_ref", None)  # resolves on assignment (DeveloperAPI)
    if assigned is None or not getattr(response, "by_reference", False):
        return
    try:
        await asyncio.wait_for(assigned(), timeout_s)
    except asyncio.TimeoutError:
        response.cancel()
        log.warning("call not taken by a replica in time; shed",
                    extra={"what": what, "queue_timeout_s": timeout_s})
        raise OverloadedError(retry_after_s, what) from None


async def run_transcription(asr: Any, diarizer: Any | None, audio: np.ndarray | Any,
                            options: TranscribeOptions, *, diarize: bool = False,
                            num_speakers: int | None = None, min_speakers: int | None = None,
                            max_speakers: int | None = None,
                            retry_after_s: float = 1.0,
                            queue_timeout_s: float | None = None) -> Transcript:
    """ASR and (if asked) diarization concurrently on one audio object, merged by overlap.

    `audio` may be an array or an ObjectRef to one; an array is put in the object store once
    here so both deployments read the same object. Shared with the job runner.
    """
    import ray

    if diarize and diarizer is None:
        raise DiarizationUnavailableError("this deployment was built without diarization")
    ref = audio if isinstance(audio, ray.ObjectRef) else ray.put(audio)
    # With a queue timeout (synchronous requests) the replica also refuses at once when the
    # windows already waiting there would take longer than that.
    asr_args = () if queue_timeout_s is None else (queue_timeout_s,)
    asr_call = call_handle(lambda: asr.transcribe.remote(ref, options, *asr_args),
                           retry_after_s=retry_after_s, queue_timeout_s=queue_timeout_s)
    if not diarize:
        return await asr_call
    diar_call = call_handle(lambda: diarizer.diarize.remote(ref, num_speakers, min_speakers,
                                                            max_speakers),
                            retry_after_s=retry_after_s, what="diarization",
                            queue_timeout_s=queue_timeout_s)
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

    def __init__(self, asr: Any, diarizer: Any | None, config: IngressConfig,
                 runner: Any | None = None) -> None:
        self.asr = asr
        self.diarizer = diarizer
        self.config = config
        self.runner = runner
        """The JobRunnerDeployment's handle (None: not bound); only /ready uses it."""
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
                max_speakers=params.max_speakers, retry_after_s=self.config.retry_after_s,
                queue_timeout_s=self.config.queue_timeout_s)
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
        if self.runner is not None:
            # Reported, never a reason to be unready: this replica's HTTP API works without the
            # runner, and jobs wait queued while Serve replaces it.
            try:
                state = await asyncio.wait_for(self.runner.status.remote(), timeout=5)
                checks["runner"] = {"ok": True, "available": True, **state}
            except Exception as exc:  # noqa: BLE001
                checks["runner"] = {"ok": True, "available": False, "error": type(exc).__name__}
        return all(c["ok"] for c in checks.values()), checks


# --------------------------------------------------------------------------- the app
def create_app(services: Services) -> FastAPI:
    """The whole HTTP surface around `services`."""
    jobs_api = _jobs_api()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if jobs_api is not None:
            await _migrate()
        yield

    app = FastAPI(title="Speech transcription service", version="1.0", lifespan=lifespan,
                  description="OpenAI-compatible speech-to-text with diarization, on Ray Serve.")
    app.state.services = services
    install_error_handlers(app)
    deps = [Depends(d) for d in v1_dependencies()] if jobs_api is not None else []
    app.include_router(openai_api.router, dependencies=deps)
    if jobs_api is not None:
        app.include_router(jobs_api.router)
        app.include_router(jobs_api.admin_router)

    @app.get("/health", tags=["ops"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="Readiness: models loaded, dependencies reachable",
             responses={503: {"description": "Not ready: each check's outcome, and Retry-After",
                              "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def ready(s: Services = Depends(get_services)) -> JSONResponse:
        ok, checks = await s.readiness()
        return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks},
                            status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": "5"})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics of this ingress replica",
             response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        if jobs_api is not None:
            await _publish_job_gauges()
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    app.add_middleware(BodyLimitMiddleware,
                       limit_bytes=services.config.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
                       stall_timeout_s=services.config.upload_stall_timeout_s,
                       min_rate_bps=services.config.upload_min_rate_bps)
    app.add_middleware(HttpMetricsMiddleware)
    return app


async def _migrate() -> None:
    """Migrate the database at replica start (idempotent, serialised): the routes need the
    schema, and under `serve run`/`serve deploy` nothing else may have migrated it. Jobs are
    not run here: that is the JobRunnerDeployment's (serve/job_runner_deployment.py)."""
    from db.migrate import upgrade_head

    await asyncio.to_thread(upgrade_head)


async def _publish_job_gauges() -> None:
    """Refresh the job gauges (speech_job_*) from the database for a scrape: they describe the
    shared queue, and the runners serve no /metrics of their own. When the database does not
    answer within 5 s the last values stay (the scrape itself never fails)."""
    from db import repository as repo
    from db.session import session_scope
    from serve.job_runner import publish_queue_gauges

    def read() -> dict[str, Any]:
        with session_scope() as session:
            return repo.queue_stats(session=session)

    try:
        publish_queue_gauges(await asyncio.wait_for(asyncio.to_thread(read), timeout=5))
    except Exception as exc:  # noqa: BLE001 - metrics must render without the database
        log.debug("job gauges not refreshed", extra={"error": type(exc).__name__})


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress()
class Ingress:
    """The Serve ingress deployment: holds the handles, builds the app in the replica."""

    def __init__(self, asr: Any, diarizer: Any | None = None,
                 config: dict[str, Any] | None = None, runner: Any | None = None) -> None:
        from config.logging_setup import configure_logging

        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FILE)
        self._services = Services(asr, diarizer, IngressConfig.from_dict(config), runner)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._services)
