"""decode_audio: every container users send becomes 16 kHz mono float32, and every bad input
is refused with its own error, before any model time is spent."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import correlate, resample_poly

from speech.audio import audio_duration_s, decode_audio
from speech.errors import (
    AudioTooLongError,
    CorruptAudioError,
    EmptyAudioError,
    NoAudioStreamError,
    NotAudioError,
)
from speech.types import SAMPLE_RATE
from tests.speech import audio_factory as af

JFK_SECONDS = 11.0
TOLERANCE_S = 0.05


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return decode_audio(af.JFK_FLAC)


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag_s: float = TOLERANCE_S) -> float:
    """Normalised correlation of two waveforms at the best lag within `max_lag_s` (lossy
    codecs without priming info, such as raw ADTS AAC, shift audio by a frame)."""
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    full = correlate(a, b, mode="full", method="fft")
    lag = int(max_lag_s * SAMPLE_RATE)
    centre = n - 1
    return float(full[centre - lag : centre + lag + 1].max() / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- what comes out -------------------------------------------------------------------------


def test_reference_decode_equals_an_independent_downmix_and_resample(reference: np.ndarray) -> None:
    pcm, rate = af.jfk_pcm()  # 44.1 kHz stereo, read without our resampler
    independent = resample_poly(pcm.mean(axis=0), SAMPLE_RATE // 100, rate // 100)
    assert reference.dtype == np.float32 and reference.ndim == 1
    assert len(reference) == len(independent) == int(JFK_SECONDS * SAMPLE_RATE)
    # channels are averaged (not summed at +3 dB), so levels match the recording
    assert np.abs(reference - independent).max() < 0.01


@pytest.mark.parametrize("container", af.CONTAINERS)
def test_every_container_decodes_the_speech_at_its_length(container: str, reference) -> None:
    audio = decode_audio(af.jfk_as(container))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio_duration_s(audio) - JFK_SECONDS) <= TOLERANCE_S, audio_duration_s(audio)
    assert best_correlation(audio, reference) > 0.95


@pytest.mark.parametrize(
    ("rate", "channels", "container"),
    [(8_000, 1, "wav"), (8_000, 1, "mp3"), (22_050, 2, "wav"), (44_100, 6, "flac"), (192_000, 8, "wav")],
)
def test_any_rate_and_channel_count_is_resampled_and_downmixed(
    rate: int, channels: int, container: str, reference: np.ndarray
) -> None:
    audio = decode_audio(af.jfk_resampled(rate, channels, container, seconds=4.0))
    assert abs(audio_duration_s(audio) - 4.0) <= TOLERANCE_S
    assert best_correlation(audio, reference[: len(audio)]) > 0.95
    assert np.abs(audio).max() <= 1.0


def test_the_sound_track_of_a_video_is_decoded(reference: np.ndarray) -> None:
    audio = decode_audio(af.video_with_speech())
    assert abs(audio_duration_s(audio) - JFK_SECONDS) <= TOLERANCE_S
    assert best_correlation(audio, reference) > 0.95


def test_bytes_paths_and_file_objects_decode_alike(tmp_path: Path, reference) -> None:
    data = af.jfk_as("mp3")
    path = tmp_path / "upload.mp3"
    path.write_bytes(data)

    class Upload(io.RawIOBase):
        """A stream that cannot seek, as a request body arrives."""

        def __init__(self, payload: bytes) -> None:
            self._inner = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            return self._inner.readinto(b)

    sources = [data, bytearray(data), memoryview(data), path, str(path), io.BytesIO(data), Upload(data)]
    decoded = [decode_audio(s) for s in sources]
    with path.open("rb") as f:
        decoded.append(decode_audio(f))
    for audio in decoded:
        np.testing.assert_array_equal(audio, decoded[0])


# --- bad input, each with its own error -----------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "says"),
    [
        (lambda: b"", EmptyAudioError, "empty"),
        (lambda: io.BytesIO(), EmptyAudioError, "empty"),
        (af.empty_wav, EmptyAudioError, "no samples"),
        (af.random_bytes, NotAudioError, "not in any audio"),
        (af.text_file, NotAudioError, "not in any audio"),
        (af.zip_file, NotAudioError, "not in any audio"),
        (af.png_image, NotAudioError, "image"),
        (lambda: af.video_only("mp4"), NoAudioStreamError, "video"),
        (lambda: af.video_only("webm"), NoAudioStreamError, "video"),
        (af.subtitles_only, NoAudioStreamError, "subtitle"),
        (lambda: af.jfk_as("flac")[:100], CorruptAudioError, "FLAC"),
        (lambda: af.truncated(af.jfk_as("m4a"), 0.5), CorruptAudioError, "MP4"),
        (lambda: af.truncated(af.jfk_as("ogg"), 0.02), CorruptAudioError, "Ogg"),
        (lambda: af.damaged_middle(af.jfk_as("flac"), start=0.1, length=0.8), CorruptAudioError, "damaged"),
        (lambda: af.damaged_middle(af.jfk_as("webm"), start=0.2, length=0.3), CorruptAudioError, "damaged"),
    ],
    ids=[
        "empty-bytes", "empty-file-object", "wav-with-zero-samples", "random-bytes", "text", "zip",
        "png", "mp4-video-only", "webm-video-only", "subtitles-only", "flac-cut-in-its-header",
        "m4a-cut-before-its-index", "ogg-cut-in-its-headers", "flac-mostly-noise", "webm-mostly-lost",
    ],
)
def test_bad_input_gets_its_specific_error(make, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says) as caught:
        decode_audio(make())
    assert caught.type is error  # not a sibling that happens to match


def test_an_empty_file_on_disk_is_empty_audio(tmp_path: Path) -> None:
    path = tmp_path / "nothing.wav"
    path.touch()
    with pytest.raises(EmptyAudioError, match="nothing.wav"):
        decode_audio(path)


def test_error_codes_are_stable_for_the_http_layer() -> None:
    codes = {
        e.code
        for e in (EmptyAudioError, NotAudioError, NoAudioStreamError, CorruptAudioError, AudioTooLongError)
    }
    assert codes == {"empty_audio", "not_audio", "no_audio_stream", "corrupt_audio", "audio_too_long"}


# --- damaged but usable: decode what is there, keep timestamps true --------------------------


@pytest.mark.parametrize("container", ["wav", "flac", "mp3", "aac", "webm"])
def test_a_cut_upload_decodes_what_arrived(container: str, reference: np.ndarray) -> None:
    audio = decode_audio(af.truncated(af.jfk_as(container), 0.5))
    assert 0.4 * JFK_SECONDS < audio_duration_s(audio) < 0.6 * JFK_SECONDS
    assert best_correlation(audio, reference[: len(audio)]) > 0.95


def test_a_wav_header_claiming_hours_over_a_short_body_decodes_the_body() -> None:
    audio = decode_audio(af.wav_declaring_hours(6, real_seconds=1.0), max_duration_s=3600)
    assert audio_duration_s(audio) == pytest.approx(1.0)


@pytest.mark.parametrize("container", ["flac", "m4a", "ogg"])
def test_damage_in_the_middle_is_skipped_and_later_audio_keeps_its_time(
    container: str, reference: np.ndarray
) -> None:
    audio = decode_audio(af.damaged_middle(af.jfk_as(container), start=0.4, length=0.1))
    assert abs(audio_duration_s(audio) - JFK_SECONDS) <= TOLERANCE_S
    tail = slice(int(8.0 * SAMPLE_RATE), int(10.5 * SAMPLE_RATE))  # well after the damage
    assert best_correlation(audio[tail], reference[tail], max_lag_s=0.01) > 0.95


def test_damaged_input_does_not_write_ffmpeg_logs(capfd: pytest.CaptureFixture[str]) -> None:
    decode_audio(af.damaged_middle(af.jfk_as("mp3")))
    with pytest.raises(CorruptAudioError):
        decode_audio(af.truncated(af.jfk_as("m4a"), 0.5))
    assert capfd.readouterr().err == ""


# --- length limits --------------------------------------------------------------------------


def test_a_six_hour_file_is_refused_from_its_header_without_decoding() -> None:
    six_hours = af.mp3_silence(hours=6)  # real, decodable to the end
    with pytest.raises(AudioTooLongError, match=r"21600\.0 s long, over the limit of 3600 s"):
        decode_audio(six_hours, max_duration_s=3600)


def test_a_header_declaring_hours_is_refused_even_if_the_body_is_short() -> None:
    with pytest.raises(AudioTooLongError, match="21600.0 s long"):
        decode_audio(af.flac_declaring(6 * 3600 * 8_000), max_duration_s=3600)


def test_a_header_declaring_years_over_one_second_decodes_that_second() -> None:
    audio = decode_audio(af.flac_declaring(2**36 - 1))  # the largest length FLAC can declare
    assert audio_duration_s(audio) == pytest.approx(1.0)


def test_the_long_recording_is_refused_by_its_header() -> None:
    with pytest.raises(AudioTooLongError, match=r"76\.5 s long"):
        decode_audio(af.LONG_FLAC, max_duration_s=60)


def test_without_a_declared_length_decoding_stops_at_the_limit() -> None:
    unknown_length = af.flac_declaring(0, af.tone(20.0, rate=8_000, container="flac"))
    with pytest.raises(AudioTooLongError, match=r"decoding stopped at 5\.0 s"):
        decode_audio(unknown_length, max_duration_s=5)


def test_without_a_declared_length_long_audio_still_decodes_whole() -> None:
    unknown_length = af.flac_declaring(0, af.tone(100.0, rate=8_000, container="flac"))
    audio = decode_audio(unknown_length)  # past the buffer's first allocation of 60 s
    assert audio_duration_s(audio) == pytest.approx(100.0, abs=TOLERANCE_S)


def test_audio_within_the_limit_is_decoded(reference: np.ndarray) -> None:
    np.testing.assert_array_equal(decode_audio(af.JFK_FLAC, max_duration_s=11.5), reference)
