"""The one path (speech/pipeline.py) reports where a recording's time went, stage by stage."""

from __future__ import annotations

import asyncio

from speech.pipeline import STAGES, TranscriptionPipeline
from speech.request import TranscriptionRequest
from speech.types import TranscribeOptions


def test_each_stage_a_request_runs_is_reported_once(tiny_engine, speech_data_dir) -> None:  # noqa: ANN001
    stages: list[tuple[str, float]] = []
    pipeline = TranscriptionPipeline.local(tiny_engine)
    pipeline.on_stage = lambda name, seconds: stages.append((name, seconds))
    request = TranscriptionRequest(options=TranscribeOptions(language="en"))
    transcript = asyncio.run(pipeline.run(request, speech_data_dir / "jfk" / "jfk.flac"))

    assert "ask not what your country" in transcript.text.lower()
    assert [name for name, _ in stages] == ["decode", "plan", "asr", "assemble"]  # no diarize asked
    assert set(name for name, _ in stages) <= set(STAGES)
    assert all(seconds >= 0 for _, seconds in stages)


def test_decoded_samples_skip_the_decode_stage(tiny_engine, decode, speech_data_dir) -> None:  # noqa: ANN001
    stages: list[str] = []
    pipeline = TranscriptionPipeline.local(tiny_engine)
    pipeline.on_stage = lambda name, seconds: stages.append(name)
    audio = decode(speech_data_dir / "jfk" / "jfk.flac")
    asyncio.run(pipeline.run(TranscriptionRequest(options=TranscribeOptions(language="en")), audio))
    assert stages == ["plan", "asr", "assemble"]
