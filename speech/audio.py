"""Any audio users send -> 16 kHz mono float32, or a specific error saying what was wrong.

PyAV (FFmpeg) reads every container and codec; its resampler downmixes and resamples in one
pass. Bad input is refused before any model time is spent, long input before it is decoded.

Policy for damaged files (the decision the tests pin down):
- A file that ends early (an interrupted upload: cut FLAC, cut MP3, a WAV whose header claims
  more data than follows) decodes to the audio that is there, like `ffmpeg` and every player.
- Damage in the middle: packets the decoder rejects are skipped, and audio that went missing
  (by the timestamps) is replaced by silence of the same length, so the timestamps of
  everything after it stay true. Uncompressed PCM has no checks: damage there decodes as noise.
- `CorruptAudioError` when a file that looks like a known audio format (by its first bytes)
  cannot be opened (a cut MP4 without its index, an Ogg without its headers), when nothing
  decodes, or when more is lost than decoded (a transcript of it would be fiction).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import av
import av.logging
import numpy as np

from speech.errors import (
    AudioTooLargeError,
    AudioTooLongError,
    CorruptAudioError,
    EmptyAudioError,
    NoAudioStreamError,
    NotAudioError,
)
from speech.types import SAMPLE_RATE

log = logging.getLogger(__name__)

# FFmpeg logs every damaged frame to stderr by default; our errors already say what matters.
av.logging.set_level(None)

AudioSource = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO

_IMAGE_DEMUXERS = ("image2", "gif", "apng", "tty")
"""Demuxers FFmpeg uses for pictures and text: a file they open is not a media recording."""


@dataclass(frozen=True)
class AudioLimits:
    """What one recording may be: the service's AUDIO_MAX_FILE_SIZE and AUDIO_MAX_DURATION_S."""

    max_bytes: int | None = None
    max_duration_s: float | None = None


def load_audio(source: AudioSource, limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Decode with the size and duration limits: the one decode every entry point calls.

    The size of a path or of bytes is checked before anything is read; a file object's size is
    the caller's to cap while it streams (the HTTP upload does). Raises AudioTooLargeError, and
    whatever `decode_audio` raises.
    """
    size = _size_of(source)
    if limits.max_bytes is not None and size is not None and size > limits.max_bytes:
        raise AudioTooLargeError(f"the file is {size} bytes, over the limit of {limits.max_bytes} bytes")
    return decode_audio(source, max_duration_s=limits.max_duration_s)


def _size_of(source: AudioSource) -> int | None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            return os.stat(source).st_size
        except OSError:
            return None  # decode_audio says what is wrong with it
    return None


def decode_audio(source: AudioSource, *, max_duration_s: float | None = None) -> np.ndarray:
    """Decode `source` (bytes, a path or a binary file object) to 16 kHz mono float32.

    Raises EmptyAudioError, NotAudioError, NoAudioStreamError, CorruptAudioError, or
    AudioTooLongError when the audio (by its header if it declares one, else as decoded) is
    longer than `max_duration_s`.
    """
    with _open(source) as container:
        stream = _audio_stream(container)
        declared = _declared_duration_s(container, stream)
        if max_duration_s is not None and declared is not None and declared > max_duration_s:
            raise AudioTooLongError(
                f"audio is {declared:.1f} s long, over the limit of {max_duration_s:g} s"
            )
        return _decode(container, stream, declared, max_duration_s)


def audio_duration_s(samples: np.ndarray) -> float:
    """Seconds of audio in a decoded waveform."""
    return len(samples) / SAMPLE_RATE


@contextmanager
def _open(source: AudioSource) -> Iterator[av.container.InputContainer]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyAudioError("the audio file is empty (0 bytes)")
        file: object = io.BytesIO(bytes(source))
        head = bytes(source[:16])
    elif isinstance(source, (str, os.PathLike)):
        file = os.fspath(source)
        if os.path.getsize(file) == 0:  # FileNotFoundError for a missing path is the caller's bug
            raise EmptyAudioError(f"the audio file {os.path.basename(file)!r} is empty (0 bytes)")
        with open(file, "rb") as f:
            head = f.read(16)
    else:
        file = _readable(source)
        here = file.tell()
        head = file.read(16)
        file.seek(here)
    try:
        container = av.open(file, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        kind = _looks_like(head)
        if kind is not None:
            raise CorruptAudioError(
                f"the file looks like {kind} but cannot be read: it is cut short or damaged"
            ) from e
        raise NotAudioError("the file is not in any audio or video format we can read") from e
    try:
        yield container
    finally:
        container.close()


def _looks_like(head: bytes) -> str | None:
    """The audio format a file's first bytes announce, to tell a damaged audio file (400,
    'corrupt') from something that never was audio (400, 'not audio')."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "Ogg (Opus/Vorbis)"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "WebM/Matroska"
    if head[4:8] == b"ftyp":
        return "MP4/M4A"
    if head[:3] == b"ID3" or _mpeg_audio_header(head):
        return "MP3/AAC"
    return None


def _mpeg_audio_header(head: bytes) -> bool:
    """A plausible MPEG audio (MP3) or ADTS (AAC) frame header: 11 sync bits and no reserved
    values, so that random bytes rarely pass."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
    if layer == 0:  # ADTS: fixed sync of 12 bits, sampling index below 13
        return head[1] & 0xF0 == 0xF0 and (head[2] >> 2) & 0x0F < 13
    bitrate, rate = head[2] >> 4, (head[2] >> 2) & 0b11
    return version != 0b01 and bitrate not in (0, 0b1111) and rate != 0b11


def _readable(source: BinaryIO) -> BinaryIO:
    """A file object FFmpeg can seek in (an upload stream is read into memory) and not empty."""
    if not source.seekable():
        data = source.read()
        if not data:
            raise EmptyAudioError("the audio stream is empty (0 bytes)")
        return io.BytesIO(data)
    here = source.tell()
    end = source.seek(0, io.SEEK_END)
    source.seek(here)
    if end - here <= 0:
        raise EmptyAudioError("the audio file is empty (0 bytes)")
    return source


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream:
    audio = container.streams.audio
    if audio:
        try:
            return container.streams.best("audio") or audio[0]
        except (AttributeError, av.error.FFmpegError):
            return audio[0]
    fmt = container.format.name
    if fmt.endswith("_pipe") or fmt in _IMAGE_DEMUXERS:
        raise NotAudioError(f"the file is an image or text ({fmt}), not audio")
    kinds = sorted({s.type for s in container.streams})
    has = f"only {', '.join(kinds)} streams" if kinds else "no streams at all"
    raise NoAudioStreamError(f"the file ({fmt}) has no audio track: it contains {has}")


def _declared_duration_s(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> float | None:
    """Length the container claims (exact for most, estimated from bitrate for raw MP3/AAC)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


_SWR_OPTIONS = {"rematrix_maxval": "1.0"}
"""Downmix by averaging channels (gains normalised to sum to 1), as FFmpeg does for integer
output and so for openai-whisper's `ffmpeg -ac 1`; float output would otherwise sum stereo at
+3 dB and clip loud recordings."""


class _Resampler:
    """FFmpeg's resampler, rebuilt when a stream changes rate or layout mid-way (chained Ogg,
    some MP3s), which PyAV's AudioResampler refuses. Yields float32 views of its output."""

    def __init__(self) -> None:
        self._inner: av.AudioResampler | None = None
        self._shape: tuple[str, str, int] | None = None

    def __call__(self, frame: av.AudioFrame | None) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        if frame is None:
            return self._flush()
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if shape != self._shape:
            out += self._flush()
            self._inner = av.AudioResampler(
                format="flt", layout="mono", rate=SAMPLE_RATE, options=_SWR_OPTIONS
            )
            self._shape = shape
        frame.pts = None  # timing is ours to keep; stale pts only make FFmpeg complain
        return out + [_samples(f) for f in self._inner.resample(frame)]

    def reset(self) -> None:
        self._inner = None
        self._shape = None

    def _flush(self) -> list[np.ndarray]:
        if self._inner is None:
            return []
        frames, self._inner = self._inner.resample(None), None
        return [_samples(f) for f in frames]


def _samples(frame: av.AudioFrame) -> np.ndarray:
    """The samples of a packed mono float frame, without the copy `to_ndarray` makes."""
    return np.frombuffer(frame.planes[0], dtype=np.float32, count=frame.samples)


class _Buffer:
    """Growing float32 buffer: sized once from the declared duration when there is one, grown
    geometrically otherwise, so decoding never concatenates quadratically or holds two copies
    of a long file."""

    def __init__(self, expected_samples: int | None) -> None:
        self._data = np.empty(max(expected_samples or 0, SAMPLE_RATE * 60), dtype=np.float32)
        self.size = 0

    def append(self, part: np.ndarray) -> None:
        end = self.size + len(part)
        if end > len(self._data):
            grown = np.empty(max(end, int(len(self._data) * 1.5)), dtype=np.float32)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : end] = part
        self.size = end

    def pad(self, n: int) -> None:
        self.append(np.zeros(n, dtype=np.float32))

    def result(self) -> np.ndarray:
        if len(self._data) > self.size + SAMPLE_RATE * 60:  # do not pin unused memory
            return self._data[: self.size].copy()
        return self._data[: self.size]


_RESERVE_MAX_S = 4 * 3600
"""A header can lie (FLAC can declare 2**36 samples): reserve at most this much up front."""

_GAP_S = 0.1
"""Jumps in timestamps shorter than this are jitter (codec priming, rounding), not lost audio."""


def _decode(
    container: av.container.InputContainer,
    stream: av.audio.stream.AudioStream,
    declared: float | None,
    max_duration_s: float | None,
) -> np.ndarray:
    """Decode packet by packet into one growing buffer.

    Damaged packets and frames are skipped; where the timestamps show that audio went missing
    (skipped packets, or data the demuxer dropped while resyncing), silence of the same length
    is put in its place so that every later timestamp stays true.
    """
    limit = None if max_duration_s is None else int(max_duration_s * SAMPLE_RATE)
    reserve = None if declared is None else int((min(declared, _RESERVE_MAX_S) + 1) * SAMPLE_RATE)
    out = _Buffer(reserve if limit is None or reserve is None else min(reserve, limit + 1))
    tb = float(stream.time_base) if stream.time_base is not None else None
    filled = 0  # samples of silence put in for lost audio
    good = bad = 0
    resample = _Resampler()
    expected: float | None = None  # where the next frame should start, seconds

    def check_limit() -> None:
        if limit is not None and out.size > limit:
            raise AudioTooLongError(
                f"audio is longer than the limit of {max_duration_s:g} s "
                f"(decoding stopped at {out.size / SAMPLE_RATE:.1f} s)"
            )

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as e:  # the container itself is cut or damaged: stop here
            log.info("audio container ends early (%s); keeping %.1f s", e, out.size / SAMPLE_RATE)
            bad += 1
            break
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            bad += 1
            continue
        if packet.size:
            good += 1
        for frame in frames:
            start = frame.pts * tb if frame.pts is not None and tb is not None else None
            if start is not None and expected is not None and expected >= 0:
                gap = start - expected
                # trust a jump only up to where the container says the audio ends
                bound = declared + 1.0 if declared is not None else expected + 30.0
                if _GAP_S < gap and start <= bound:
                    silence = int(round(gap * SAMPLE_RATE))
                    filled += silence
                    out.pad(silence)
                    check_limit()
                expected = max(expected, start)
            try:
                parts = resample(frame)
            except av.error.FFmpegError:  # a garbled frame (impossible layout or rate)
                bad += 1
                resample.reset()
                continue
            for part in parts:
                out.append(part)
            check_limit()
            length = frame.samples / frame.sample_rate if frame.sample_rate else 0.0
            if start is not None:
                expected = start + length if expected is None else max(expected, start + length)
            elif expected is not None:  # no timestamp (damaged region): it follows the last one
                expected += length
    try:
        for part in resample(None):
            out.append(part)
    except av.error.FFmpegError:
        pass
    check_limit()
    return _verdict(out, filled=filled, good=good, bad=bad)


def _verdict(out: _Buffer, *, filled: int, good: int, bad: int) -> np.ndarray:
    """The decoded audio, or the error that says why there is none worth transcribing."""
    decoded = out.size - filled
    if decoded == 0:
        if bad or filled:
            raise CorruptAudioError("the audio track is damaged: no part of it could be decoded")
        raise EmptyAudioError("the audio track contains no samples")
    if bad > good or filled > decoded:
        raise CorruptAudioError(
            f"the audio track is mostly damaged: {bad} of {bad + good} packets failed to decode "
            f"and {filled / SAMPLE_RATE:.1f} s of {out.size / SAMPLE_RATE:.1f} s were lost"
        )
    if bad or filled:
        log.info(
            "skipped %d damaged audio packets; %.2f s of lost audio replaced by silence",
            bad,
            filled / SAMPLE_RATE,
        )
    return out.result()


__all__ = ["AudioSource", "audio_duration_s", "decode_audio"]
