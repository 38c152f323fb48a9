"""Plain data types shared by the engine, the service and the bulk pipeline.

They carry no behaviour beyond (de)serialisation so that every layer (HTTP, database, Parquet)
can store and rebuild them without importing a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

SAMPLE_RATE = 16_000
"""Every decoded waveform in the engine is mono float32 at this rate."""

Task = Literal["transcribe", "translate"]


@dataclass
class Word:
    start: float
    end: float
    word: str
    """Text of the word as Whisper produced it, including its leading space."""
    probability: float = 1.0
    speaker: str | None = None


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    seek: int = 0
    words: list[Word] = field(default_factory=list)
    speaker: str | None = None


@dataclass
class SpeakerTurn:
    start: float
    end: float
    speaker: str


@dataclass
class Transcript:
    language: str
    duration: float
    segments: list[Segment]
    task: Task = "transcribe"
    speakers: list[SpeakerTurn] | None = None
    """Diarization turns when diarization was asked for, else None."""
    language_probs: dict[str, float] | None = None
    """When the language was detected: the likeliest languages (ISO codes, most likely first)
    with their probabilities, averaged over the windows weighted by duration; None when the
    caller gave the language or the model is English-only."""

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["text"] = self.text
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        segments = [
            Segment(**{**s, "words": [Word(**w) for w in s.get("words", [])]})
            for s in data["segments"]
        ]
        speakers = data.get("speakers")
        return cls(
            language=data["language"],
            duration=data["duration"],
            segments=segments,
            task=data.get("task", "transcribe"),
            speakers=[SpeakerTurn(**t) for t in speakers] if speakers is not None else None,
            language_probs=dict(data["language_probs"]) if data.get("language_probs") else None,
        )


@dataclass(frozen=True)
class TranscribeOptions:
    """What a caller may ask of one transcription; the same object on every path."""

    language: str | None = None
    """ISO code such as "en"; None detects it (multilingual models only)."""
    task: Task = "transcribe"
    initial_prompt: str | None = None
    word_timestamps: bool = False
    beam_size: int = 1
    """1 is greedy decoding (the default); more is beam search."""
    temperature: float = 0.0

    def cache_key(self) -> str:
        """Stable text form, for result caches and resumable bulk runs."""
        return (
            f"lang={self.language}|task={self.task}|prompt={self.initial_prompt}|"
            f"words={int(self.word_timestamps)}|beam={self.beam_size}|t={self.temperature}"
        )


@dataclass
class Window:
    """One <= 30 s piece of one input, ready to be batched with any other window."""

    samples: np.ndarray
    offset_s: float
    options: TranscribeOptions
    index: int = 0
    speech: tuple[tuple[float, float], ...] = ()
    """Where the VAD heard speech, in seconds from the window start (word onsets snap to it)."""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass
class WindowResult:
    """What the model made of one window; times are relative to the window start."""

    language: str
    segments: list[Segment] = field(default_factory=list)
    token_probs: list[list[float]] = field(default_factory=list, repr=False)
    """Per segment, the probability of each of its text tokens (for word probabilities)."""
    language_probs: dict[str, float] | None = None
    """The window's likeliest languages with their probabilities, when detection ran."""
