"""A transcription as OpenAI's server-sent events, window by window as the pipeline finishes them.

`transcript.text.delta` carries each window's text as soon as it and the windows before it are
final (in order); with `diarized_json`, `transcript.text.segment` events follow once speakers are
merged; `transcript.text.done` ends the stream with the whole text and `usage` of type
`duration`. A failure after the stream started ends it with one `error` event in OpenAI's error
shape (the `openai` client raises it as APIError), never a hung connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from serve.errors import SERVER_ERROR, ApiError, error_body, from_speech_error
from speech.errors import SpeechError
from speech.pipeline import OnWindow, WindowDone
from speech.types import Transcript

log = logging.getLogger("serve.streaming")

MEDIA_TYPE = "text/event-stream"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event, data only (OpenAI's transcription events carry their type inside)."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _segments(transcript: Transcript) -> list[dict[str, Any]]:
    return [{"type": "transcript.text.segment", "id": f"seg_{i}", "start": s.start, "end": s.end,
             "text": s.text.strip(), "speaker": s.speaker or "UNKNOWN"}
            for i, s in enumerate(s for s in transcript.segments if s.text.strip())]


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SpeechError):
        exc = from_speech_error(exc)
    if isinstance(exc, ApiError):
        return {"type": "error", **exc.body()}
    return {"type": "error", **error_body("The transcription failed.", type=SERVER_ERROR,
                                          code="internal_error")}


async def transcript_events(run: Callable[[OnWindow], Awaitable[Transcript]], *, segments: bool,
                            finished: Callable[[Transcript], Awaitable[None]] | None = None,
                            ) -> AsyncIterator[str]:
    """Run `run(on_window)` and turn its progress into events; `finished` is awaited with the
    transcript before the final event (e.g. to record it). Cancelled with the client."""
    queue: asyncio.Queue[WindowDone | None] = asyncio.Queue()
    task = asyncio.ensure_future(run(queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (done := await queue.get()) is not None:
            text = "".join(s.text for s in done.result.segments)
            if text.strip():
                yield sse({"type": "transcript.text.delta", "delta": text})
        transcript = task.result()
        if finished is not None:
            await finished(transcript)
        if segments:
            for event in _segments(transcript):
                yield sse(event)
        yield sse({"type": "transcript.text.done", "text": transcript.text,
                   "usage": {"type": "duration", "seconds": round(transcript.duration, 3)}})
    except Exception as exc:  # noqa: BLE001 - after the headers, errors go in the stream
        if not isinstance(exc, (SpeechError, ApiError)):
            log.exception("streamed transcription failed")
        yield sse(_error(exc))
    finally:
        if not task.done():  # the client left: no orphaned model calls
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
