"""The one transcription path: check -> decode -> plan windows -> ASR -> stitch -> diarize -> merge.

Every entry point runs this: the CLI and the standalone job runner with engines in this process
(`LocalAsr`, `LocalDiarizer`), the HTTP routes and the job runner inside Serve with deployment
handles behind the same two small protocols (serve/model_calls.py). The bulk pipeline runs the
same steps as Ray Data stages: `WindowPlanner.plan` in CPU tasks, `transcribe_windows` in the
Whisper actors, `assemble` in the driver.

Results come window by window, in order, as the model finishes them (`on_window`): job progress
and streamed text build on that, not only on the finished Transcript.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from speech.audio import AudioLimits, AudioSource, load_audio
from speech.request import Capabilities, SpeakerHints, TranscriptionRequest, check_request
from speech.speaker_merge import assign_speakers
from speech.types import SAMPLE_RATE, SpeakerTurn, Transcript, Window, WindowResult
from speech.windowing import WindowPlanner, stitch

if TYPE_CHECKING:
    from speech.asr import WhisperEngine
    from speech.diarization import DiarizationEngine


class AsrModel(Protocol):
    """Decodes windows: a local engine, or the ASR deployment through its handle."""

    batch_size: int
    """Windows sent per call."""
    max_in_flight: int
    """Calls one recording keeps in flight at once."""

    async def transcribe_windows(self, windows: list[Window]) -> list[WindowResult]: ...


class Diarizer(Protocol):
    """Speaker turns of one recording: a local engine, or the diarization deployment."""

    async def diarize(self, audio: np.ndarray, hints: SpeakerHints) -> list[SpeakerTurn]: ...


class LocalAsr:
    """A `WhisperEngine` in this process: windows go in batches of its own batch size, one
    batch at a time (the engine holds a lock; batching across callers is Serve's job)."""

    max_in_flight = 1

    def __init__(self, engine: WhisperEngine) -> None:
        self.engine = engine
        self.batch_size = engine.max_batch_size

    async def transcribe_windows(self, windows: list[Window]) -> list[WindowResult]:
        return await asyncio.to_thread(self.engine.transcribe_windows, windows)


class LocalDiarizer:
    """A `DiarizationEngine` in this process, run in a worker thread beside the ASR."""

    def __init__(self, engine: DiarizationEngine) -> None:
        self.engine = engine

    async def diarize(self, audio: np.ndarray, hints: SpeakerHints) -> list[SpeakerTurn]:
        return await asyncio.to_thread(self.engine.diarize, audio, **hints.as_kwargs())


@dataclass(frozen=True)
class WindowDone:
    """One window's result, handed out as soon as it and every window before it are done."""

    recording: int
    """Which recording of the call (0 for `run`)."""
    index: int
    total: int
    """Windows of that recording."""
    window: Window
    result: WindowResult


OnWindow = Callable[[WindowDone], None]

STAGES = ("decode", "plan", "asr", "diarize", "assemble")
OnStage = Callable[[str, float], None]
"""(stage, seconds) for each of STAGES a call ran: where a request's time goes. `asr` runs from
the first window sent to the last result back (model queue included); `diarize` runs beside it,
from its start to its turns."""


def assemble(request: TranscriptionRequest, duration_s: float, windows: Sequence[Window],
             results: Sequence[WindowResult], turns: list[SpeakerTurn] | None) -> Transcript:
    """A recording's transcript from its window results and (when diarizing) its turns."""
    transcript = stitch(duration_s, windows, results, request.asr_options)
    if request.diarize:
        transcript = assign_speakers(transcript, list(turns or []))
    return transcript


class TranscriptionPipeline:
    """The models behind one entry point, and the sequence every request runs through them."""

    def __init__(self, asr: AsrModel, capabilities: Capabilities, *,
                 diarizer: Diarizer | None = None, limits: AudioLimits = AudioLimits(),
                 planner: WindowPlanner | None = None, on_stage: OnStage | None = None) -> None:
        self.asr = asr
        self.diarizer = diarizer
        self.capabilities = capabilities
        self.limits = limits
        self.planner = planner or WindowPlanner(capabilities.vad)
        self.on_stage = on_stage

    @classmethod
    def local(cls, engine: WhisperEngine, diarizer: DiarizationEngine | None = None, *,
              diarization_reason: str | None = None,
              limits: AudioLimits = AudioLimits()) -> TranscriptionPipeline:
        """Engines in this process (CLI, standalone runner, tests); the engine's own planner."""
        caps = engine.capabilities(diarization=diarizer is not None,
                                   diarization_reason=diarization_reason)
        return cls(LocalAsr(engine), caps, diarizer=LocalDiarizer(diarizer) if diarizer else None,
                   limits=limits, planner=engine.planner)

    def check(self, request: TranscriptionRequest) -> None:
        """Refuse what these models cannot do (raises InvalidOptionError and friends)."""
        check_request(request, self.capabilities)

    def load(self, source: AudioSource) -> np.ndarray:
        """Decode within this pipeline's size and duration limits."""
        return load_audio(source, self.limits)

    async def run(self, request: TranscriptionRequest, source: AudioSource | np.ndarray, *,
                  on_window: OnWindow | None = None) -> Transcript:
        """One recording (a path, bytes, or decoded samples) through the whole sequence."""
        return (await self.run_many(request, [source], on_window=on_window))[0]

    async def run_many(self, request: TranscriptionRequest,
                       sources: Sequence[AudioSource | np.ndarray], *,
                       on_window: OnWindow | None = None) -> list[Transcript]:
        """Several recordings with the same request; their windows share model batches."""
        self.check(request)
        t0 = time.perf_counter()
        audios = [s if isinstance(s, np.ndarray) else await asyncio.to_thread(self.load, s)
                  for s in sources]
        if any(not isinstance(s, np.ndarray) for s in sources):  # streaming decodes before
            t0 = self._stage("decode", t0)
        plans = [await asyncio.to_thread(self.planner.plan, a, request.asr_options) for a in audios]
        t0 = self._stage("plan", t0)
        diarizing = [self._diarize(request, a) for a in audios] if request.diarize else []
        try:
            flat = [(k, i, w) for k, ws in enumerate(plans) for i, w in enumerate(ws)]
            results: list[list[WindowResult | None]] = [[None] * len(ws) for ws in plans]
            async for (k, i, window), result in self._decode(flat):
                results[k][i] = result
                if on_window is not None:
                    on_window(WindowDone(k, i, len(plans[k]), window, result))
            self._stage("asr", t0)
            turns = [await t for t in diarizing] if diarizing else [None] * len(audios)
        finally:
            for task in diarizing:
                task.cancel()
        t0 = time.perf_counter()
        transcripts = [assemble(request, len(a) / SAMPLE_RATE, ws, rs, t)  # type: ignore[arg-type]
                       for a, ws, rs, t in zip(audios, plans, results, turns, strict=True)]
        self._stage("assemble", t0)
        return transcripts

    def _stage(self, name: str, since: float) -> float:
        """Report a stage that ran from `since` until now; returns now."""
        now = time.perf_counter()
        if self.on_stage is not None:
            self.on_stage(name, now - since)
        return now

    def _diarize(self, request: TranscriptionRequest, audio: np.ndarray) -> asyncio.Task[list[SpeakerTurn]]:
        if self.diarizer is None:  # check() refuses this first; kept for a clear failure
            raise RuntimeError("diarization requested from a pipeline without a diarizer")
        return asyncio.ensure_future(self._timed("diarize", self.diarizer.diarize(audio, request.speakers)))

    async def _timed(self, name: str, work: Awaitable[list[SpeakerTurn]]) -> list[SpeakerTurn]:
        t0 = time.perf_counter()
        out = await work
        self._stage(name, t0)
        return out

    async def _decode(self, items: list[tuple[int, int, Window]]
                      ) -> AsyncIterator[tuple[tuple[int, int, Window], WindowResult]]:
        """Windows in calls of `asr.batch_size`, `asr.max_in_flight` calls at a time; results
        handed out in window order as each call finishes."""
        size = max(1, self.asr.batch_size)
        chunks = [items[j : j + size] for j in range(0, len(items), size)]
        gate = asyncio.Semaphore(max(1, self.asr.max_in_flight))

        async def call(chunk: list[tuple[int, int, Window]]) -> list[WindowResult]:
            async with gate:
                return await self.asr.transcribe_windows([w for *_, w in chunk])

        tasks = [asyncio.ensure_future(call(c)) for c in chunks]
        try:
            for chunk, task in zip(chunks, tasks, strict=True):
                for item, result in zip(chunk, await task, strict=True):
                    yield item, result
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
