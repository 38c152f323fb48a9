"""HTTP form fields -> speech's request type: the transport half of validation.

Every form field arrives as text. This module turns the text into typed values (a bad value is
a 400 in OpenAI's shape naming its `param`, never a FastAPI 422), checks what belongs to the
HTTP surface (response format, timestamp granularities, streaming), builds the one
`speech.request.TranscriptionRequest`, and leaves the option rules to `speech.request.check_request`.
The transcription routes and the jobs route both parse here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speech.errors import InvalidOptionError
from speech.request import SpeakerHints, TranscriptionRequest, check_request
from speech.types import TranscribeOptions

RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
GRANULARITIES = ("word", "segment")
STREAM_FORMATS = ("json", "text", "diarized_json")
"""What OpenAI streams: text deltas and the whole text, plus speaker segments for diarized_json."""
MODEL_ALIASES = ("whisper-1",)
"""Names OpenAI clients send by default; they mean "the loaded Whisper model"."""


@dataclass(frozen=True)
class TranscriptionParams:
    """A parsed transcription/translation request (everything but the file)."""

    model: str
    request: TranscriptionRequest
    response_format: str = "json"
    timestamp_granularities: tuple[str, ...] = ()
    stream: bool = False
    """Server-sent events: text per window as it is final, then the whole (serve/streaming.py)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def stored_options(self) -> dict[str, Any]:
        """What a job row keeps of this request."""
        return {"model": self.model, **self.request.to_dict(),
                "response_format": self.response_format}


def _bool(param: str, value: str | None) -> bool:
    if value is None or value == "":
        return False
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InvalidOptionError(param, f"'{param}' must be true or false, got {value!r}.")


def _int(param: str, value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidOptionError(param, f"'{param}' must be an integer, got {value!r}.") from None


def _float(param: str, value: str | None, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise InvalidOptionError(param, f"{param} must be a number, got {value!r}.") from None


def parse_params(*, task: str | None, model: str | None, language: str | None = None,
                 prompt: str | None = None, response_format: str | None = None,
                 temperature: str | None = None,
                 timestamp_granularities: list[str] | None = None, stream: str | None = None,
                 diarize: str | None = None, num_speakers: str | None = None,
                 min_speakers: str | None = None, max_speakers: str | None = None,
                 ) -> TranscriptionParams:
    """Parse raw form values and check them; InvalidOptionError(param, ...) names the first bad
    one. What the loaded models can do is checked later, against their capabilities."""
    if not model or not model.strip():
        raise InvalidOptionError("model", "Missing required parameter: 'model'.")
    fmt = (response_format or "json").strip()
    if fmt not in RESPONSE_FORMATS:
        raise InvalidOptionError("response_format", f"response_format must be one of "
                                 f"{', '.join(RESPONSE_FORMATS)}; got {fmt!r}.")
    grans = tuple(dict.fromkeys(g.strip() for g in (timestamp_granularities or []) if g.strip()))
    for g in grans:
        if g not in GRANULARITIES:
            raise InvalidOptionError("timestamp_granularities",
                                     f"timestamp_granularities must be word and/or segment; got {g!r}.")
    if grans and fmt != "verbose_json":
        raise InvalidOptionError("timestamp_granularities",
                                 "timestamp_granularities needs response_format=verbose_json.")
    streaming = _bool("stream", stream)
    if streaming and fmt not in STREAM_FORMATS:
        raise InvalidOptionError("stream", f"stream=true answers with events for "
                                 f"{', '.join(STREAM_FORMATS)}; got response_format={fmt!r}.")
    lang = (language or "").strip().lower() or None
    if lang is not None and not (lang.isalpha() and 2 <= len(lang) <= 3):
        raise InvalidOptionError("language", f"language must be an ISO-639-1 code such as 'en', "
                                 f"got {language!r}.")
    options = TranscribeOptions(language=lang, task=(task or "transcribe"),  # type: ignore[arg-type]
                                initial_prompt=prompt or None,
                                word_timestamps="word" in grans,
                                temperature=_float("temperature", temperature, 0.0))
    hints = SpeakerHints(_int("num_speakers", num_speakers), _int("min_speakers", min_speakers),
                         _int("max_speakers", max_speakers))
    request = TranscriptionRequest(options=options,
                                   diarize=_bool("diarize", diarize) or fmt == "diarized_json",
                                   speakers=hints)
    check_request(request)
    return TranscriptionParams(model=model.strip(), request=request, response_format=fmt,
                               timestamp_granularities=grans, stream=streaming)


def check_model(requested: str, loaded: str) -> None:
    """Only the loaded model (or OpenAI's default name for it) can be asked for."""
    if requested not in (loaded, *MODEL_ALIASES):
        raise InvalidOptionError("model", f"Model {requested!r} is not served here; "
                                 f"use {loaded!r} (or 'whisper-1').")

