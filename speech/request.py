"""One transcription request, the same object on every path, and the one place it is validated.

Every entry point (CLI, HTTP routes, job runner, bulk pipeline) turns its own transport into a
`TranscriptionRequest` and calls `check_request` once, up front: without capabilities it checks
what needs no model (value ranges, speaker hints, known language codes); with the loaded models'
`Capabilities` it also checks what they can do (the language, translation, diarization).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from speech.errors import DiarizationUnavailableError, InvalidOptionError
from speech.languages import LANGUAGE_NAMES
from speech.types import TranscribeOptions

MAX_SPEAKERS = 32
"""Upper bound on any speaker hint: past it a hint is a typo, not a meeting."""
MAX_PROMPT_CHARS = 4000
"""Longest prompt taken (Whisper reads only its last ~224 tokens); jobs store at most this."""
MAX_BEAM_SIZE = 10


@dataclass(frozen=True)
class SpeakerHints:
    """How many speakers the caller expects; all None lets the diarizer decide."""

    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None

    def as_kwargs(self) -> dict[str, int | None]:
        return asdict(self)

    def given(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass(frozen=True)
class TranscriptionRequest:
    """What a caller asks of one recording: decoding options, and speakers or not."""

    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    diarize: bool = False
    speakers: SpeakerHints = field(default_factory=SpeakerHints)

    @property
    def asr_options(self) -> TranscribeOptions:
        """The options the ASR runs with. Speakers are assigned word by word, so diarizing
        forces word timestamps: the one rule that makes every path split segments alike."""
        if self.diarize and not self.options.word_timestamps:
            return replace(self.options, word_timestamps=True)
        return self.options

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON form (stored with jobs): the API's names, so `prompt` for the prompt."""
        options = asdict(self.options)
        options["prompt"] = options.pop("initial_prompt")
        return {**options, "diarize": self.diarize, **self.speakers.as_kwargs()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscriptionRequest:
        """The inverse of `to_dict`; unknown keys (e.g. a job's `model`) are ignored. Values
        are not checked here: `check_request` does that, once, for every path."""
        fields = {f: data[f] for f in TranscribeOptions.__dataclass_fields__ if f in data}
        if "initial_prompt" not in fields and data.get("prompt") is not None:
            fields["initial_prompt"] = data["prompt"]
        hints = {f: data.get(f) for f in SpeakerHints.__dataclass_fields__}
        return cls(options=TranscribeOptions(**fields), diarize=bool(data.get("diarize", False)),
                   speakers=SpeakerHints(**hints))

    def cache_key(self) -> str:
        """Stable text form, for result caches and resumable bulk runs."""
        hints = ",".join(f"{k}={v}" for k, v in self.speakers.as_kwargs().items())
        return f"{self.options.cache_key()}|diarize={'-' if not self.diarize else hints}"


@dataclass(frozen=True)
class Capabilities:
    """What the loaded models can do; the second half of a request's validation."""

    model: str
    multilingual: bool
    languages: tuple[str, ...]
    diarization: bool
    diarization_reason: str | None = None
    """Why diarization is unavailable (shown to callers who ask for it)."""
    device: str = "cpu"
    vad: str = "energy"
    """The VAD kind the ASR engine plans windows with; planners elsewhere must use the same."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "languages": list(self.languages)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities:
        return cls(**{**data, "languages": tuple(data["languages"])})


def validate_hints(num_speakers: int | None, min_speakers: int | None,
                   max_speakers: int | None) -> None:
    """Refuse impossible speaker-count hints before any model time is spent."""
    for name, value in (("num_speakers", num_speakers), ("min_speakers", min_speakers),
                        ("max_speakers", max_speakers)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidOptionError(name, f"{name} must be a whole number, got {value!r}.")
        if not 1 <= value <= MAX_SPEAKERS:
            raise InvalidOptionError(name, f"{name} must be between 1 and {MAX_SPEAKERS}, got {value}.")
    if num_speakers is not None and (min_speakers is not None or max_speakers is not None):
        raise InvalidOptionError("num_speakers",
                                 "Give either num_speakers or min_speakers/max_speakers, not both.")
    if min_speakers is not None and max_speakers is not None and min_speakers > max_speakers:
        raise InvalidOptionError("min_speakers", f"min_speakers ({min_speakers}) is larger than "
                                 f"max_speakers ({max_speakers}).")


def _check_options(options: TranscribeOptions) -> None:
    if options.task not in ("transcribe", "translate"):
        raise InvalidOptionError("task", f"task must be transcribe or translate, got {options.task!r}.")
    if options.language is not None and options.language not in LANGUAGE_NAMES:
        raise InvalidOptionError("language", f"Unknown language {options.language!r}; use an "
                                 "ISO-639-1 code such as 'en'.")
    if isinstance(options.temperature, bool) or not isinstance(options.temperature, (int, float)) \
            or not 0.0 <= options.temperature <= 1.0:
        raise InvalidOptionError("temperature", "temperature must be between 0 and 1.")
    if isinstance(options.beam_size, bool) or not isinstance(options.beam_size, int) \
            or not 1 <= options.beam_size <= MAX_BEAM_SIZE:
        raise InvalidOptionError("beam_size", f"beam_size must be between 1 and {MAX_BEAM_SIZE}.")
    prompt = options.initial_prompt
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidOptionError("prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters, "
                                 f"got {len(prompt)}.")


def _check_capabilities(request: TranscriptionRequest, caps: Capabilities) -> None:
    options = request.options
    if options.language is not None and options.language not in caps.languages:
        shown = ", ".join(caps.languages[:20]) + (" ..." if len(caps.languages) > 20 else "")
        raise InvalidOptionError("language", f"Language {options.language!r} is not supported by "
                                 f"model {caps.model}; supported: {shown}.")
    if options.task == "translate" and not caps.multilingual:
        raise InvalidOptionError("task", f"Model {caps.model} is English-only and cannot translate; "
                                 "serve a multilingual model (e.g. base).")
    if request.diarize and not caps.diarization:
        raise DiarizationUnavailableError(caps.diarization_reason
                                          or "Diarization is not available in this deployment.")


def check_request(request: TranscriptionRequest, capabilities: Capabilities | None = None) -> None:
    """Refuse a request that cannot be honoured, before any audio is decoded or model runs."""
    _check_options(request.options)
    hints = request.speakers
    validate_hints(hints.num_speakers, hints.min_speakers, hints.max_speakers)
    if hints.given() and not request.diarize:
        name = next(k for k, v in hints.as_kwargs().items() if v is not None)
        raise InvalidOptionError(name, f"'{name}' needs diarize=true.")
    if capabilities is not None:
        _check_capabilities(request, capabilities)
