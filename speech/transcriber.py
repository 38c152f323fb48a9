"""One call for what was said, when, and by whom: ASR and diarization on the same audio.

Diarization runs in a worker thread while Whisper decodes (both release the GIL inside torch),
then each word gets its speaker. The CLI and the bulk pipeline call this; the Serve graph does
the same with two deployments instead of two threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from speech.asr import WhisperEngine
from speech.types import TranscribeOptions, Transcript

if TYPE_CHECKING:
    from config.settings import Settings
    from speech.diarization import DiarizationEngine


class Transcriber:
    def __init__(self, asr: WhisperEngine, diarizer: DiarizationEngine | None = None) -> None:
        self.asr = asr
        self.diarizer = diarizer

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        model: str | None = None,
        device: str | None = None,
        diarization: bool = False,
    ) -> Transcriber:
        device = device or settings.AI_DEVICE
        asr = WhisperEngine(
            model or settings.WHISPER_MODEL_PATH, device=device, cache_dir=settings.MODEL_CACHE_DIR
        )
        diarizer = None
        if diarization:
            from speech.diarization import DiarizationEngine

            diarizer = DiarizationEngine(
                settings.DIARIZATION_MODEL_PATH, device=asr.device, hf_token=settings.HF_TOKEN
            )
        return cls(asr, diarizer)

    def load(self) -> None:
        self.asr.load()
        if self.diarizer is not None:
            self.diarizer.load()

    def check(
        self,
        options: TranscribeOptions,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
    ) -> None:
        """Refuse bad options before any audio is decoded or any model runs."""
        self.asr.load()
        self.asr.check_options(options)
        if self.diarizer is not None:
            from speech.diarization import validate_hints

            validate_hints(num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers)

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        options: TranscribeOptions,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
    ) -> list[Transcript]:
        if self.diarizer is None:
            return self.asr.transcribe(audios, options)
        from speech.speaker_merge import assign_speakers

        hints = dict(num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers)
        if not options.word_timestamps:
            # speakers are assigned word by word
            options = TranscribeOptions(**{**options.__dict__, "word_timestamps": True})
        with ThreadPoolExecutor(max_workers=1) as pool:
            turns_future = pool.submit(lambda: [self.diarizer.diarize(a, **hints) for a in audios])
            transcripts = self.asr.transcribe(audios, options)
            all_turns = turns_future.result()
        return [assign_speakers(t, turns) for t, turns in zip(transcripts, all_turns, strict=True)]
