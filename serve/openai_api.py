"""OpenAI-compatible routes: /v1/audio/transcriptions, /v1/audio/translations, /v1/models.

Routes parse (serve/params.py), run the one pipeline (serve/context.py -> speech.pipeline), and
turn the result into a response. A bad value is a 400 in OpenAI's shape naming the `param`,
never a FastAPI 422.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve import streaming
from serve.context import ServicesDep
from serve.errors import error_responses
from serve.params import MODEL_ALIASES, TranscriptionParams, parse_params
from speech.errors import InvalidOptionError
from speech.types import Transcript


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


Text = Annotated[str | None, Form()]

router = APIRouter(tags=["audio"], responses=error_responses(401, 429, 503))

TRANSCRIPT_CONTENT: dict[str, Any] = {
    "application/json": {"schema": {"type": "object"}},
    "text/plain": {"schema": {"type": "string"}},
    "application/x-subrip": {"schema": {"type": "string"}},
    "text/vtt": {"schema": {"type": "string"}},
    "text/event-stream": {"schema": {"type": "string"}},
}
"""What a transcript comes back as, by `response_format` (speech.formats.media_type), or with
`stream=true` as server-sent events."""
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
    if params.stream:
        events = await services.stream_upload(request, file, params)
        return StreamingResponse(events, media_type=streaming.MEDIA_TYPE,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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
    try:
        transcript = await services.transcribe_upload(request, file, params)
    except InvalidOptionError as exc:
        if exc.param != "task":
            raise
        # this route has no `task` field: the model the caller chose cannot translate
        raise InvalidOptionError("model", str(exc)) from None
    return render_response(transcript, params)


@router.get("/v1/models", summary="Models this service has loaded")
async def list_models(services: ServicesDep) -> dict[str, Any]:
    info = await services.model_info()
    return {"object": "list", "data": [
        {"id": info["id"], "object": "model", "created": 0, "owned_by": "speech-service",
         "aliases": list(MODEL_ALIASES), "multilingual": info["multilingual"]},
    ]}
