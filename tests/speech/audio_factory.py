"""Builders of real, odd and broken audio inputs for tests, as plain bytes.

Every builder encodes with PyAV (the same FFmpeg the service decodes with), so a test that
uses one exercises a real container, never a hand-mocked decoder. Other suites (the HTTP
tests, the bulk pipeline tests) import these to send the same inputs through their layers.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from fractions import Fraction
from functools import lru_cache

import av
import numpy as np

from tests.conftest import SPEECH_DATA_DIR as DATA_DIR

JFK_FLAC = DATA_DIR / "jfk" / "jfk.flac"
LONG_FLAC = DATA_DIR / "conv2spk_75s.flac"
"""A real 76.5 s recording: longer than a one-minute limit, refused by its header's length."""

CONTAINERS = ("wav", "flac", "mp3", "m4a", "aac", "ogg", "opus", "webm")
"""Every container users send, by the file extension they arrive with."""

# extension -> (FFmpeg muxer, codec, sample format the encoder takes, rates it accepts or None)
_ENCODINGS: dict[str, tuple[str, str, str, tuple[int, ...] | None]] = {
    "wav": ("wav", "pcm_s16le", "s16", None),
    "flac": ("flac", "flac", "s16", None),
    "mp3": ("mp3", "libmp3lame", "fltp", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
    "m4a": ("ipod", "aac", "fltp", None),
    "aac": ("adts", "aac", "fltp", None),
    "ogg": ("ogg", "libopus", "flt", (8000, 12000, 16000, 24000, 48000)),
    "opus": ("opus", "libopus", "flt", (8000, 12000, 16000, 24000, 48000)),
    "webm": ("webm", "libopus", "flt", (8000, 12000, 16000, 24000, 48000)),
}


@lru_cache(maxsize=1)
def jfk_pcm() -> tuple[np.ndarray, int]:
    """The JFK recording at its own rate as float32 (channels, samples), decoded without
    resampling: the reference every re-encoded copy is compared with."""
    with av.open(str(JFK_FLAC)) as container:
        stream = container.streams.audio[0]
        chunks = [_planar(f) for f in container.decode(stream)]
        rate = stream.rate
    pcm = np.concatenate(chunks, axis=1).astype(np.float32)
    if np.issubdtype(chunks[0].dtype, np.integer):
        pcm /= float(np.iinfo(chunks[0].dtype).max) + 1.0
    return pcm, rate


def _planar(frame: av.AudioFrame) -> np.ndarray:
    """A frame's samples as (channels, samples), whether FFmpeg stored them planar or packed."""
    arr = frame.to_ndarray()
    if frame.format.is_planar:
        return arr
    return arr.reshape(-1, len(frame.layout.channels)).T


def encode(
    pcm: np.ndarray,
    rate: int,
    container: str = "wav",
    *,
    codec: str | None = None,
    bit_rate: int | None = None,
) -> bytes:
    """Encode float32 `pcm` shaped (channels, samples) into `container` (an extension from
    CONTAINERS); codecs that only take some rates get the nearest accepted rate."""
    fmt, default_codec, sample_fmt, rates = _ENCODINGS[container]
    codec = codec or default_codec
    pcm = np.atleast_2d(np.asarray(pcm, dtype=np.float32))
    channels = pcm.shape[0]
    out_rate = rate if rates is None else min(rates, key=lambda r: abs(r - rate))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=out_rate, layout=_layout(channels), format=sample_fmt)
        if bit_rate:
            stream.codec_context.bit_rate = bit_rate
        resampler = av.AudioResampler(format=sample_fmt, layout=_layout(channels), rate=out_rate)
        block = 4096
        for start in range(0, pcm.shape[1], block):
            part = np.ascontiguousarray(pcm[:, start : start + block].T.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(part, format="flt", layout=_layout(channels))
            frame.rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for f in resampler.resample(frame):
                out.mux(stream.encode(f))
        for f in resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return buf.getvalue()


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}.get(channels, f"{channels}c")


@lru_cache(maxsize=None)
def jfk_as(container: str) -> bytes:
    """The JFK recording (44.1 kHz stereo) re-encoded into `container`."""
    pcm, rate = jfk_pcm()
    return encode(pcm, rate, container)


def jfk_resampled(rate: int, channels: int, container: str = "wav", seconds: float = 4.0) -> bytes:
    """The first `seconds` of JFK at another rate and channel count (channels beyond two
    carry the mix, attenuated, so any downmix still sounds like the speech)."""
    pcm, src_rate = jfk_pcm()
    from scipy.signal import resample_poly

    g = np.gcd(rate, src_rate)
    mix = pcm[:, : int(seconds * src_rate)].mean(axis=0)
    mono = resample_poly(mix, rate // g, src_rate // g).astype(np.float32)
    out = np.stack([mono * (1.0 if c < 2 else 0.5) for c in range(channels)])
    return encode(out, rate, container)


def tone(seconds: float, rate: int = 16_000, channels: int = 1, container: str = "wav") -> bytes:
    """A 440 Hz sine, for inputs where the content does not matter but the length does."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = np.tile(0.3 * np.sin(2 * np.pi * 440 * t, dtype=np.float64), (channels, 1))
    return encode(pcm.astype(np.float32), rate, container)


def wav_header(
    *, data_bytes: int, rate: int = 16_000, channels: int = 1, payload: bytes = b""
) -> bytes:
    """A 16-bit PCM WAV whose header declares `data_bytes` of audio followed by `payload`:
    a header that lies about the length (a '6-hour' file in a few bytes, or a cut upload)."""
    byte_rate = rate * channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, byte_rate, channels * 2, 16)
    riff_size = min(4 + 8 + len(fmt) + 8 + data_bytes, 0xFFFFFFFF)
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", min(data_bytes, 0xFFFFFFFF)) + payload
    )


def wav_declaring_hours(hours: float, *, rate: int = 8_000, real_seconds: float = 1.0) -> bytes:
    """A WAV that says it lasts `hours` but carries `real_seconds` of silence: cheap stand-in
    for a very long upload, refused on its header alone."""
    payload = bytes(int(real_seconds * rate) * 2)
    return wav_header(data_bytes=int(hours * 3600 * rate) * 2, rate=rate, payload=payload)


def empty_wav() -> bytes:
    """A well-formed WAV with an audio stream of zero samples."""
    return wav_header(data_bytes=0)


def truncated(data: bytes, fraction: float) -> bytes:
    """The first `fraction` of a file, as an interrupted upload leaves it."""
    return data[: int(len(data) * fraction)]


def damaged_middle(data: bytes, *, start: float = 0.4, length: float = 0.1, seed: int = 0) -> bytes:
    """`data` with a span in the middle overwritten by noise (disk or transfer damage)."""
    rng = np.random.default_rng(seed)
    a, n = int(len(data) * start), int(len(data) * length)
    return data[:a] + rng.integers(0, 256, n, dtype=np.uint8).tobytes() + data[a + n :]


def random_bytes(n: int = 8192, seed: int = 2) -> bytes:
    """Noise that no demuxer recognises (fixed seed: some random prefixes look like MP3)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def text_file() -> bytes:
    return ("This is a meeting agenda, not a recording.\n" * 40).encode()


def zip_file() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", "hello " * 200)
    return buf.getvalue()


def png_image(width: int = 8, height: int = 8) -> bytes:
    """A real (tiny, red) PNG: FFmpeg opens it as a one-frame video."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = (b"\x00" + b"\xff\x00\x00" * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def video_only(container: str = "mp4", seconds: float = 1.0) -> bytes:
    """A real video file with a picture stream and no sound track."""
    buf = io.BytesIO()
    fps = 10
    with av.open(buf, mode="w", format=container) as out:
        codec = "mpeg4" if container in ("mp4", "mov") else "libvpx"
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((48, 64, 3), (i * 20) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def video_with_speech() -> bytes:
    """An MP4 with a picture track first and the JFK speech (AAC) second, as a phone or a
    screen recorder sends it."""
    pcm, rate = jfk_pcm()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=5)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=rate, layout="stereo", format="fltp")
        for i in range(int(pcm.shape[1] / rate * 5)):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
        interleaved = np.ascontiguousarray(pcm.T.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout="stereo")
        frame.rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            out.mux(audio.encode(f))
        out.mux(audio.encode(None))
    return buf.getvalue()


def subtitles_only() -> bytes:
    """A Matroska file whose only stream is subtitles (remuxed from SubRip text)."""
    srt = b"1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n2\n00:00:02,000 --> 00:00:03,500\nBye.\n\n"
    buf = io.BytesIO()
    with av.open(io.BytesIO(srt), format="srt") as src, av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream_from_template(src.streams[0])
        for packet in src.demux(src.streams[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return buf.getvalue()


def flac_declaring(total_samples: int, data: bytes | None = None) -> bytes:
    """A FLAC (by default 1 s of 8 kHz tone) whose STREAMINFO claims `total_samples`; 0 is
    the format's 'length unknown', as a live encoder writes it."""
    data = bytearray(data if data is not None else tone(1.0, rate=8_000, container="flac"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO must be the first block"
    field = 8 + 10  # sample rate (20 bits), channels (3), bits (5), total samples (36)
    packed = int.from_bytes(data[field : field + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | (total_samples & ((1 << 36) - 1))
    data[field : field + 8] = packed.to_bytes(8, "big")
    data[field + 8 : field + 24] = bytes(16)  # MD5 of the audio: 0 means 'not computed'
    return bytes(data)


def mp3_silence(hours: float) -> bytes:
    """A real `hours`-long silent MP3 (8 kHz, 8 kbit/s: about 3.6 MB per hour), made by
    repeating one encoded silent frame: built in milliseconds, decodable to the end."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3", options={"write_xing": "0", "id3v2_version": "0"}) as out:
        stream = out.add_stream("libmp3lame", rate=8_000, layout="mono", format="s16p")
        stream.codec_context.bit_rate = 8_000
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8_000 * 3), np.int16), format="s16p", layout="mono")
        frame.rate = 8_000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    frames = _mp3_frames(buf.getvalue())
    silent = frames[len(frames) // 2]  # a middle frame: no encoder delay, empty bit reservoir
    samples_per_frame = 576  # MPEG-2.5 layer III
    return silent * int(hours * 3600 * 8_000 / samples_per_frame)


def _mp3_frames(data: bytes) -> list[bytes]:
    """Split an MPEG-2.5 layer III stream (as mp3_silence encodes it) into frames."""
    frames, i = [], 0
    while i + 4 <= len(data):
        if data[i] != 0xFF or data[i + 1] & 0xE0 != 0xE0:
            i += 1
            continue
        bitrate = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)[data[i + 2] >> 4]
        rate = (11025, 12000, 8000)[(data[i + 2] >> 2) & 3]
        padding = (data[i + 2] >> 1) & 1
        size = 72_000 * bitrate // rate + padding
        frames.append(data[i : i + size])
        i += size
    return frames
