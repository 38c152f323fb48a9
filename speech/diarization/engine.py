"""Who spoke when: the diarization engine the service, the CLI and the bulk jobs call.

A plain class with `load()` and `diarize()`; Ray wraps it, it does not live inside it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speech.errors import AudioError, EmptyAudioError, ModelNotFoundError
from speech.request import validate_hints
from speech.types import SAMPLE_RATE, SpeakerTurn

log = logging.getLogger(__name__)

PACKAGED = "packaged"


def load_diarizer(spec: str = PACKAGED, device: str = "cpu",
                  hf_token: str | None = None) -> tuple[DiarizationEngine | None, str | None]:
    """A loaded engine, or None and the reason it could not load. Transcription goes on without
    diarization: callers report the reason to whoever asks for speakers."""
    engine = DiarizationEngine(spec, device=device, hf_token=hf_token)
    try:
        engine.load()
    except Exception as exc:  # noqa: BLE001 - any load failure means "unavailable", said once
        log.warning("diarization model could not be loaded", exc_info=True,
                    extra={"model": spec, "error": type(exc).__name__})
        return None, f"Diarization is unavailable: model {spec!r} failed to load ({type(exc).__name__}: {exc})."
    return engine, None


class DiarizationEngine:
    """pyannote speaker diarization from `spec`: "packaged", a local pipeline directory, or a hub id."""

    def __init__(self, spec: str = PACKAGED, device: str = "cpu", hf_token: str | None = None) -> None:
        self.spec = spec
        self.device = device
        self.hf_token = hf_token
        self._pipeline: Any = None
        self.load_time_s: float | None = None
        self.last_timings: dict[str, float] = {}
        """Seconds per step of the last `diarize` (packaged pipeline only), for bench/."""

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def load(self) -> None:
        """Build the pipeline once (idempotent); the packaged default needs no network."""
        if self._pipeline is not None:
            return
        started = time.perf_counter()
        if self.spec == PACKAGED:
            self._pipeline = _packaged_pipeline()
        else:
            self._pipeline = _pretrained_pipeline(self.spec, self.hf_token)
        self._pipeline.to(torch.device(self.device))
        self.load_time_s = time.perf_counter() - started
        log.info("diarization model loaded", extra={"spec": self.spec, "load_s": self.load_time_s})

    def diarize(
        self,
        audio: np.ndarray,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
    ) -> list[SpeakerTurn]:
        """16 kHz mono float32 -> speaker turns (overlaps kept), labelled SPEAKER_00.. by first turn."""
        validate_hints(num_speakers, min_speakers, max_speakers)
        waveform = _as_waveform(audio)
        self.load()
        output = self._pipeline(
            {"waveform": waveform, "sample_rate": SAMPLE_RATE, "uri": "audio"},
            num_speakers=num_speakers,
            min_speakers=min_speakers,
            max_speakers=max_speakers,
        )
        self.last_timings = dict(getattr(self._pipeline, "timings", {}))
        annotation = getattr(output, "speaker_diarization", output)
        return turns_from_annotation(annotation)


def turns_from_annotation(annotation: Any) -> list[SpeakerTurn]:
    """pyannote Annotation -> time-ordered turns with labels renumbered by first appearance."""
    tracks = sorted(
        ((seg.start, seg.end, label) for seg, _, label in annotation.itertracks(yield_label=True)),
        key=lambda t: (t[0], t[1]),
    )
    names: dict[Any, str] = {}
    turns = []
    for start, end, label in tracks:
        name = names.setdefault(label, f"SPEAKER_{len(names):02d}")
        turns.append(SpeakerTurn(start=round(float(start), 3), end=round(float(end), 3), speaker=name))
    return turns


def _as_waveform(audio: np.ndarray) -> torch.Tensor:
    samples = np.asarray(audio)
    if samples.ndim != 1:
        raise AudioError(f"expected mono samples (1-D), got shape {samples.shape}")
    if samples.size == 0:
        raise EmptyAudioError("no audio samples to diarize")
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]


def _packaged_pipeline() -> Any:
    from pyannote.audio import Model

    from speech.diarization.checkpoints import packaged_checkpoints
    from speech.diarization.embedding import CamPlusPlus
    from speech.diarization.pipeline import OfflineSpeakerDiarization, PipelineParams

    paths = packaged_checkpoints()
    segmentation = Model.from_pretrained(str(paths.segmentation))
    if segmentation is None:
        raise ModelNotFoundError(f"could not load segmentation checkpoint {paths.segmentation}")
    return OfflineSpeakerDiarization(segmentation, CamPlusPlus.from_checkpoint(paths.embedding), PipelineParams())


def _pretrained_pipeline(spec: str, hf_token: str | None) -> Any:
    """A local pyannote pipeline directory (config.yaml) or a hub id (needs network + token)."""
    from pyannote.audio import Pipeline

    path = Path(spec)
    if path.exists() and not (path / "config.yaml").is_file():
        raise ModelNotFoundError(f"{spec} is not a pyannote pipeline directory (no config.yaml)")
    try:
        pipeline = Pipeline.from_pretrained(str(path) if path.exists() else spec, token=hf_token)
    except Exception as error:  # hub and parsing errors come in many types
        raise ModelNotFoundError(f"could not load diarization pipeline {spec!r}: {error}") from error
    if pipeline is None:
        raise ModelNotFoundError(f"could not load diarization pipeline {spec!r}")
    return pipeline
