"""OpenAI-compatible routes: /v1/audio/transcriptions, /v1/audio/translations, /v1/models.

Routes parse, call the transcription service, and turn the result into a response. Every form
field arrives as text and is validated here, so a bad value is a 400 in OpenAI's shape naming
the `param`, never a FastAPI 422.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from serve.errors import error_responses
from speech.errors import InvalidOptionError
from speech.types import Task, TranscribeOptions, Transcript

if TYPE_CHECKING:
    from serve.ingress import Services

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"]
RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
GRANULARITIES = ("word", "segment")
MODEL_ALIASES = ("whisper-1",)
"""Names OpenAI clients send by default; they mean "the loaded Whisper model"."""
MAX_SPEAKERS = 32
"""The engine's bound on speaker hints (speech.diarization.engine.MAX_SPEAKERS)."""
MAX_PROMPT_CHARS = 4000
"""Longest `prompt` taken (Whisper reads only its last ~224 tokens); jobs store at most this."""


@dataclass(frozen=True)
class TranscriptionParams:
    """A validated transcription/translation request (everything but the file)."""

    model: str
    task: Task = "transcribe"
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: float = 0.0
    timestamp_granularities: tuple[str, ...] = ()
    diarize: bool = False
    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def options(self) -> TranscribeOptions:
        """The engine's options for this request."""
        return TranscribeOptions(language=self.language, task=self.task,
                                 initial_prompt=self.prompt,
                                 word_timestamps="word" in self.timestamp_granularities,
                                 temperature=self.temperature)


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
        number = int(value)
    except ValueError:
        raise InvalidOptionError(param, f"'{param}' must be an integer, got {value!r}.") from None
    if not 1 <= number <= MAX_SPEAKERS:
        raise InvalidOptionError(param, f"'{param}' must be between 1 and {MAX_SPEAKERS}.")
    return number


def parse_params(*, task: Task, model: str | None, language: str | None = None,
                 prompt: str | None = None, response_format: str | None = None,
                 temperature: str | None = None,
                 timestamp_granularities: list[str] | None = None, stream: str | None = None,
                 diarize: str | None = None, num_speakers: str | None = None,
                 min_speakers: str | None = None, max_speakers: str | None = None,
                 ) -> TranscriptionParams:
    """Validate raw form values; InvalidOptionError(param, ...) names the first bad one."""
    if not model or not model.strip():
        raise InvalidOptionError("model", "Missing required parameter: 'model'.")
    fmt = (response_format or "json").strip()
    if fmt not in RESPONSE_FORMATS:
        raise InvalidOptionError("response_format", f"response_format must be one of "
                                 f"{', '.join(RESPONSE_FORMATS)}; got {fmt!r}.")
    temp = 0.0
    if temperature not in (None, ""):
        try:
            temp = float(temperature)  # type: ignore[arg-type]
        except ValueError:
            raise InvalidOptionError("temperature",
                                     f"temperature must be a number, got {temperature!r}.") from None
        if not 0.0 <= temp <= 1.0:
            raise InvalidOptionError("temperature", "temperature must be between 0 and 1.")
    grans = tuple(dict.fromkeys(g.strip() for g in (timestamp_granularities or []) if g.strip()))
    for g in grans:
        if g not in GRANULARITIES:
            raise InvalidOptionError("timestamp_granularities",
                                     f"timestamp_granularities must be word and/or segment; got {g!r}.")
    if grans and fmt != "verbose_json":
        raise InvalidOptionError("timestamp_granularities",
                                 "timestamp_granularities needs response_format=verbose_json.")
    if _bool("stream", stream):
        raise InvalidOptionError("stream", "Streaming transcription is not supported.")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidOptionError("prompt", f"prompt must be at most {MAX_PROMPT_CHARS} characters, "
                                 f"got {len(prompt)}.")
    lang = (language or "").strip().lower() or None
    if lang is not None and not (lang.isalpha() and 2 <= len(lang) <= 3):
        raise InvalidOptionError("language", f"language must be an ISO-639-1 code such as 'en', "
                                 f"got {language!r}.")
    want_diarize = _bool("diarize", diarize) or fmt == "diarized_json"
    n, lo, hi = (_int("num_speakers", num_speakers), _int("min_speakers", min_speakers),
                 _int("max_speakers", max_speakers))
    for name, value in (("num_speakers", n), ("min_speakers", lo), ("max_speakers", hi)):
        if value is not None and not want_diarize:
            raise InvalidOptionError(name, f"'{name}' needs diarize=true.")
    if n is not None and (lo is not None or hi is not None):
        raise InvalidOptionError("num_speakers",
                                 "Give either num_speakers or min_speakers/max_speakers, not both.")
    if lo is not None and hi is not None and lo > hi:
        raise InvalidOptionError("min_speakers", "min_speakers must not exceed max_speakers.")
    return TranscriptionParams(model=model.strip(), task=task, language=lang,
                               prompt=prompt or None, response_format=fmt, temperature=temp,
                               timestamp_granularities=grans, diarize=want_diarize,
                               num_speakers=n, min_speakers=lo, max_speakers=hi)


def check_model(requested: str, loaded: str) -> None:
    """Only the loaded model (or OpenAI's default name for it) can be asked for."""
    if requested not in (loaded, *MODEL_ALIASES):
        raise InvalidOptionError("model", f"Model {requested!r} is not served here; "
                                 f"use {loaded!r} (or 'whisper-1').")


def render_response(transcript: Transcript, params: TranscriptionParams) -> Response:
    """The body in the asked format, with OpenAI's media types."""
    from speech.formats import media_type, render

    fmt = params.response_format
    body = render(transcript, fmt)
    if fmt == "verbose_json" and params.timestamp_granularities:
        data = json.loads(body)
        if "segment" not in params.timestamp_granularities:
            data.pop("segments", None)
        if "word" not in params.timestamp_granularities:
            data.pop("words", None)
        return JSONResponse(data)
    return Response(content=body, media_type=media_type(fmt))


def get_services(request: Request) -> Services:
    """FastAPI dependency: the ingress's handles and configuration."""
    return request.app.state.services


ServicesDep = Annotated[Any, Depends(get_services)]
Text = Annotated[str | None, Form()]

router = APIRouter(tags=["audio"], responses=error_responses(401, 429, 503))

TRANSCRIPT_CONTENT: dict[str, Any] = {
    "application/json": {"schema": {"type": "object"}},
    "text/plain": {"schema": {"type": "string"}},
    "application/x-subrip": {"schema": {"type": "string"}},
    "text/vtt": {"schema": {"type": "string"}},
}
"""What a transcript comes back as, by `response_format` (speech.formats.media_type)."""
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The transcript in the asked format", "content": TRANSCRIPT_CONTENT},
    **error_responses(400, 408, 413, 501, 507),
}


@router.post("/v1/audio/transcriptions", summary="Transcribe audio (OpenAI-compatible)",
             responses=UPLOAD_RESPONSES)
async def create_transcription(
    request: Request,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="Audio in any common container.")],
    model: Annotated[str, Form(description="The loaded model id, or 'whisper-1'.")],
    language: Text = None,
    prompt: Text = None,
    response_format: Annotated[str | None, Form(description="json | text | srt | verbose_json "
                                                "| vtt | diarized_json")] = None,
    temperature: Text = None,
    timestamp_granularities: Annotated[list[str] | None,
                                       Form(alias="timestamp_granularities[]")] = None,
    stream: Text = None,
    diarize: Annotated[str | None, Form(description="Extension: label speakers.")] = None,
    num_speakers: Text = None,
    min_speakers: Text = None,
    max_speakers: Text = None,
) -> Response:
    params = parse_params(task="transcribe", model=model, language=language, prompt=prompt,
                          response_format=response_format, temperature=temperature,
                          timestamp_granularities=timestamp_granularities, stream=stream,
                          diarize=diarize, num_speakers=num_speakers,
                          min_speakers=min_speakers, max_speakers=max_speakers)
    transcript = await services.transcribe_upload(request, file, params)
    return render_response(transcript, params)


@router.post("/v1/audio/translations", summary="Translate audio to English (OpenAI-compatible)",
             responses=UPLOAD_RESPONSES)
async def create_translation(
    request: Request,
    services: ServicesDep,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()],
    prompt: Text = None,
    response_format: Text = None,
    temperature: Text = None,
) -> Response:
    params = parse_params(task="translate", model=model, prompt=prompt,
                          response_format=response_format, temperature=temperature)
    if params.response_format == "diarized_json":
        raise InvalidOptionError("response_format", "diarized_json is for transcriptions only.")
    info = await services.model_info()
    if not info["multilingual"]:
        raise InvalidOptionError("model", f"Model {info['id']!r} is English-only and cannot "
                                 "translate; serve a multilingual model (e.g. base).")
    transcript = await services.transcribe_upload(request, file, params)
    return render_response(transcript, params)


@router.get("/v1/models", summary="Models this service has loaded")
async def list_models(services: ServicesDep) -> dict[str, Any]:
    info = await services.model_info()
    return {"object": "list", "data": [
        {"id": info["id"], "object": "model", "created": 0, "owned_by": "speech-service",
         "aliases": list(MODEL_ALIASES), "multilingual": info["multilingual"]},
    ]}
