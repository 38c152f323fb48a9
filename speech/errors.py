"""Errors the engine raises for bad input, each with a stable machine-readable code.

The service maps `code` to an HTTP status in one place; the CLI prints `str(error)`.
"""

from __future__ import annotations


class SpeechError(Exception):
    """Base of every expected failure of the engine (bad input, bad option, missing model)."""

    code = "speech_error"


class AudioError(SpeechError, ValueError):
    """The input cannot be turned into audio samples."""

    code = "invalid_audio"


class EmptyAudioError(AudioError):
    code = "empty_audio"


class NotAudioError(AudioError):
    code = "not_audio"


class NoAudioStreamError(AudioError):
    code = "no_audio_stream"


class CorruptAudioError(AudioError):
    """Truncated or damaged: the container opened but its audio could not be decoded."""

    code = "corrupt_audio"


class AudioTooLongError(AudioError):
    code = "audio_too_long"


class AudioTooLargeError(AudioError):
    """The file is larger than the size limit (checked before it is read)."""

    code = "file_too_large"


class InvalidOptionError(SpeechError, ValueError):
    """An option value the engine cannot honour (unknown language, bad speaker hint, ...)."""

    code = "invalid_option"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Crosses process boundaries (Ray replicas) intact: default pickling would call
        # __init__ with the message alone.
        return (type(self), (self.param, str(self)))


class ModelNotFoundError(SpeechError):
    code = "model_not_found"


class DiarizationUnavailableError(SpeechError):
    """This deployment cannot diarize (engine missing or its model failed to load)."""

    code = "diarization_unavailable"
