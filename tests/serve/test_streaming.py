"""`stream=true` on /v1/audio/transcriptions: OpenAI's server-sent events, as they happen (issue 14).

Against the running service: the `openai` client's streaming call and a raw SSE reader get text
deltas in order and a final event with the whole text; with diarized_json, speaker segments too.
Streaming is real: on a three-window recording the first delta reaches the client before the ASR
replica has decoded the last window, read from the replica's own batch record. A failure after
the stream started ends it with an error event (the event module, on its own).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray import serve

from serve.errors import ApiError
from serve.streaming import transcript_events
from speech.types import Segment, Transcript, WindowResult
from tests.conftest import SPEECH_DATA_DIR
from tests.serve.support import JFK, Service

CONV = SPEECH_DATA_DIR / "conv2spk_75s.flac"


def _sse(lines) -> list[dict]:  # noqa: ANN001 - the response's lines
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]


def test_the_openai_client_streams_deltas_then_the_whole_text(openai_client) -> None:  # noqa: ANN001
    with JFK.open("rb") as fh:
        whole = openai_client.audio.transcriptions.create(file=("jfk.flac", fh), model="whisper-1").text
    with JFK.open("rb") as fh:
        stream = openai_client.audio.transcriptions.create(file=("jfk.flac", fh), model="whisper-1",
                                                           stream=True)
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "transcript.text.delta" and kinds[-1] == "transcript.text.done", kinds
    done = events[-1]
    assert done.text == whole
    assert "".join(e.delta for e in events[:-1]).strip() == whole
    assert done.usage is not None and done.usage.type == "duration" and abs(done.usage.seconds - 11.0) < 0.1


def test_the_first_delta_comes_before_the_last_window_is_decoded(service: Service) -> None:
    """Raw SSE, diarized_json: deltas in window order, speaker segments, then done. When the first
    delta arrives, the replica's batch record must not yet hold this request's last window."""
    asr = serve.get_deployment_handle("ASRDeployment", service.app_name)
    tag = "stream-order-check"
    decoded_at_first_delta: list[int] | None = None
    lines: list[str] = []
    with CONV.open("rb") as fh, httpx.stream(
            "POST", service.url("/v1/audio/transcriptions"), timeout=300,
            headers={**service.auth, "X-Request-ID": tag}, files={"file": (CONV.name, fh)},
            data={"model": "whisper-1", "response_format": "diarized_json", "stream": "true"}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if decoded_at_first_delta is None and '"transcript.text.delta"' in line:
                batches = asr.batch_stats.remote().result()["batches"]
                decoded_at_first_delta = [i for b in batches for t, i in b.get("windows", []) if t == tag]
    events = _sse(lines)
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "transcript.text.delta"]
    segments = [e for e in events if e["type"] == "transcript.text.segment"]
    assert kinds[-1] == "transcript.text.done" and len(deltas) >= 3, kinds
    assert kinds.index("transcript.text.segment") > max(i for i, k in enumerate(kinds) if k.endswith("delta"))
    assert {s["speaker"] for s in segments} >= {"SPEAKER_00", "SPEAKER_01"}, segments
    all_windows = [i for b in asr.batch_stats.remote().result()["batches"]
                   for t, i in b.get("windows", []) if t == tag]
    assert sorted(all_windows) == list(range(len(all_windows))) and len(all_windows) >= 3, all_windows
    assert decoded_at_first_delta is not None and max(all_windows) not in decoded_at_first_delta, (
        f"the first delta came only after the last window was decoded: {decoded_at_first_delta}")
    assert events[-1]["text"] == " ".join(s["text"] for s in segments).strip() or events[-1]["text"]


def test_streaming_with_a_format_that_cannot_stream_is_refused(service: Service) -> None:
    with JFK.open("rb") as fh:
        response = httpx.post(service.url("/v1/audio/transcriptions"), headers=service.auth, timeout=60,
                              files={"file": ("jfk.flac", fh)},
                              data={"model": "whisper-1", "response_format": "srt", "stream": "true"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream", response.text


def test_a_failure_after_the_stream_started_ends_it_with_an_error_event() -> None:
    class Window:
        index, total = 0, 2
        result = WindowResult(language="en", segments=[Segment(id=0, start=0, end=1, text=" Hello")])

    async def run(on_window):  # noqa: ANN001, ANN202 - the first window, then the replica is lost
        on_window(Window())
        await asyncio.sleep(0)
        raise ApiError(503, "The transcription replica serving this request was lost.",
                       code="replica_unavailable")

    async def collect() -> list[dict]:
        return [json.loads(e.removeprefix("data: ")) async for e in transcript_events(run, segments=False)]

    events = asyncio.run(collect())
    assert [e["type"] for e in events] == ["transcript.text.delta", "error"], events
    assert events[1]["error"]["code"] == "replica_unavailable"


@pytest.mark.parametrize("segments", [False, True])
def test_the_event_module_ends_with_done_and_usage(segments: bool) -> None:
    transcript = Transcript(language="en", duration=2.0, segments=[
        Segment(id=0, start=0.0, end=1.0, text=" Hi.", speaker="SPEAKER_00")])

    async def run(on_window):  # noqa: ANN001, ANN202
        return transcript

    async def collect() -> list[dict]:
        return [json.loads(e.removeprefix("data: ")) async for e in transcript_events(run, segments=segments)]

    events = asyncio.run(collect())
    assert events[-1] == {"type": "transcript.text.done", "text": "Hi.",
                          "usage": {"type": "duration", "seconds": 2.0}}
    assert [e["type"] for e in events[:-1]] == (["transcript.text.segment"] if segments else [])
