"""Calls to the model deployments: handles, retries, backpressure, and the pipeline on top.

`ModelCalls` is what the HTTP routes and the job runner inside Serve share: it asks the replicas
what they can do (`speech.request.Capabilities`) and builds `speech.pipeline.TranscriptionPipeline`
on the handles, so a request runs the same sequence as in the CLI, with windows planned here and
decoded in the ASR replica's cross-request batches. Nothing here knows about HTTP routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from serve.errors import ApiError, OverloadedError, ReplicaUnavailableError, unwrap
from speech.audio import AudioLimits
from speech.errors import SpeechError
from speech.pipeline import OnStage, TranscriptionPipeline
from speech.request import Capabilities, SpeakerHints
from speech.types import SpeakerTurn, Window, WindowResult
from speech.windowing import WindowPlanner

log = logging.getLogger("serve.model_calls")

REPLICA_LOSS_RETRIES = 1
"""Calls are idempotent (windows, diarize, model_info): one whose replica died mid-call is
sent once more (Serve routes it to a live or replacement replica) before the caller gets 503."""
REPLICA_LOSS_RETRY_AFTER_S = 5.0
"""Retry-After when the replica was lost: a replacement loads its model first."""
WINDOWS_IN_FLIGHT = 16
"""Window calls one recording keeps in flight: the replica batches them with other requests'
windows; more would only queue there, and count against its max_queued_requests."""
STREAM_WINDOWS_IN_FLIGHT = 2
"""For a streamed request: its windows go in order, two at a time, so the first text is final
(and sent) after about one batch instead of after the whole file."""


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


class HandleAsr:
    """`speech.pipeline.AsrModel` on the ASR deployment: one window a call, several in flight,
    so each window is batched with whatever else the replica has, and finishes on its own."""

    batch_size = 1

    def __init__(self, handle: Any, *, retry_after_s: float = 1.0,
                 queue_timeout_s: float | None = None, max_in_flight: int = WINDOWS_IN_FLIGHT,
                 tag: str | None = None) -> None:
        self.handle = handle
        self.retry_after_s = retry_after_s
        self.queue_timeout_s = queue_timeout_s
        self.max_in_flight = max_in_flight
        self.tag = tag
        """Names the request's windows in the replica's batch record."""

    async def transcribe_windows(self, windows: list[Window]) -> list[WindowResult]:
        # With a queue timeout (synchronous requests) the replica also refuses at once when the
        # windows already waiting there would take longer than that.
        return await call_handle(
            lambda: self.handle.transcribe_windows.remote(windows, self.queue_timeout_s, self.tag),
            retry_after_s=self.retry_after_s, queue_timeout_s=self.queue_timeout_s)


class HandleDiarizer:
    """`speech.pipeline.Diarizer` on the diarization deployment."""

    def __init__(self, handle: Any, *, retry_after_s: float = 1.0,
                 queue_timeout_s: float | None = None) -> None:
        self.handle = handle
        self.retry_after_s = retry_after_s
        self.queue_timeout_s = queue_timeout_s

    async def diarize(self, audio: np.ndarray, hints: SpeakerHints) -> list[SpeakerTurn]:
        return await call_handle(
            lambda: self.handle.diarize.remote(audio, hints.num_speakers, hints.min_speakers,
                                               hints.max_speakers),
            retry_after_s=self.retry_after_s, what="diarization",
            queue_timeout_s=self.queue_timeout_s)


class ModelCalls:
    """The model deployments' handles, what they can do, and pipelines on them."""

    def __init__(self, asr: Any, diarizer: Any | None, *, limits: AudioLimits,
                 retry_after_s: float = 1.0) -> None:
        self.asr = asr
        self.diarizer = diarizer
        self.limits = limits
        self.retry_after_s = retry_after_s
        self._model_info: dict[str, Any] | None = None
        self._diarization: tuple[bool, str | None] | None = None
        self._planner: WindowPlanner | None = None

    async def model_info(self) -> dict[str, Any]:
        """The ASR replica's model (id, languages, device, VAD); asked once."""
        if self._model_info is None:
            self._model_info = await call_handle(lambda: self.asr.model_info.remote(),
                                                 retry_after_s=self.retry_after_s)
        return self._model_info

    async def diarization_info(self) -> tuple[bool, str | None]:
        """(available, reason it is not); asked once, since a replica that failed to load its
        model keeps answering so."""
        if self.diarizer is None:
            return False, "Diarization is not deployed in this service."
        if self._diarization is None:
            info = await call_handle(lambda: self.diarizer.model_info.remote(),
                                     retry_after_s=self.retry_after_s, what="diarization")
            self._diarization = (bool(info["available"]), info.get("reason"))
        return self._diarization

    async def capabilities(self) -> Capabilities:
        info = await self.model_info()
        available, reason = await self.diarization_info()
        return Capabilities(model=info["id"], multilingual=bool(info["multilingual"]),
                            languages=tuple(info["languages"]), diarization=available,
                            diarization_reason=reason, device=info["device"], vad=info["vad"])

    async def pipeline(self, *, queue_timeout_s: float | None = None,
                       windows_in_flight: int = WINDOWS_IN_FLIGHT,
                       tag: str | None = None,
                       on_stage: OnStage | None = None) -> TranscriptionPipeline:
        """The one sequence on these handles. `queue_timeout_s` (synchronous requests): shed a
        call that no replica takes in time instead of holding the caller. `windows_in_flight`:
        fewer for a streamed request, so its first windows finish (and are sent) first."""
        caps = await self.capabilities()
        if self._planner is None or self._planner.vad_kind != caps.vad:
            self._planner = WindowPlanner(caps.vad)  # the VAD the ASR engine would plan with
        opts = {"retry_after_s": self.retry_after_s, "queue_timeout_s": queue_timeout_s}
        diarizer = HandleDiarizer(self.diarizer, **opts) if self.diarizer is not None else None
        asr = HandleAsr(self.asr, **opts, max_in_flight=windows_in_flight, tag=tag)
        return TranscriptionPipeline(asr, caps, diarizer=diarizer, limits=self.limits,
                                     planner=self._planner, on_stage=on_stage)
