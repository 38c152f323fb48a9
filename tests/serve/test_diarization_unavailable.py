"""Issue 13 bug 5: a diarization model that fails to load does not take the application down.

The replica starts anyway and says why it cannot diarize; a request for speakers is refused with
501 `diarization_unavailable` at validation (before any audio is stored or decoded), while
transcription goes on. Checked on the deployment's own class (what Serve constructs) and on the
model calls the ingress and the job runner build their pipeline from.
"""

from __future__ import annotations

import asyncio

import pytest

from serve.diarization_deployment import DiarizationDeployment
from serve.errors import ApiError, from_speech_error
from serve.model_calls import ModelCalls
from speech.audio import AudioLimits
from speech.errors import DiarizationUnavailableError
from speech.request import TranscriptionRequest
from tests.db.support import TINY_EN_INFO, ReplicaInfo


@pytest.fixture(scope="module")
def broken_replica() -> object:
    return DiarizationDeployment.func_or_class("/nonexistent/pyannote-pipeline", "cpu")


def test_the_replica_starts_and_says_why_it_cannot_diarize(broken_replica) -> None:  # noqa: ANN001
    info = broken_replica.model_info()
    assert info["available"] is False
    assert "/nonexistent/pyannote-pipeline" in info["reason"] and "failed to load" in info["reason"]
    with pytest.raises(ApiError) as refused:
        asyncio.run(broken_replica.diarize(None))
    assert (refused.value.status_code, refused.value.code) == (501, "diarization_unavailable")


def test_speakers_are_refused_with_501_and_transcription_still_validates(broken_replica) -> None:  # noqa: ANN001
    class Handle:  # the replica behind a handle: its model_info as the ingress asks for it
        def __init__(self, replica: object) -> None:
            self.model_info = ReplicaInfo(replica.model_info()).model_info  # type: ignore[attr-defined]

    models = ModelCalls(ReplicaInfo(TINY_EN_INFO), Handle(broken_replica), limits=AudioLimits())
    pipeline = asyncio.run(models.pipeline())
    assert pipeline.capabilities.diarization is False
    pipeline.check(TranscriptionRequest())  # plain transcription is fine
    with pytest.raises(DiarizationUnavailableError) as refused:
        pipeline.check(TranscriptionRequest(diarize=True))
    error = from_speech_error(refused.value)
    assert (error.status_code, error.code, error.param) == (501, "diarization_unavailable", "diarize")
    assert "failed to load" in error.message
