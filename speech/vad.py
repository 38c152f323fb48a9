"""Voice activity detection: where the speech is, so windows are cut in pauses.

Two detectors with one interface (`load()`, `speech_regions(audio)`):
- `SileroVad`: the Silero model, robust to noise and music. It is recurrent over 32 ms chunks;
  called chunk by chunk from Python (its own `get_speech_timestamps`) it costs ~14 s per 10
  minutes of audio on 2 cores, more than the transcription. Fed as parallel streams of
  `stream_s` seconds in one batch it costs ~3 s of CPU per 10 minutes: still a fifth of the
  whole budget on a CPU, so it is the choice for noisy audio and GPUs.
- `EnergyVad`: frame energy against the recording's own noise floor, ~50 ms per 10 minutes;
  the default on CPU, where Whisper's no-speech guard covers what it lets through.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from speech.types import SAMPLE_RATE

CHUNK = 512  # samples per Silero step at 16 kHz (32 ms)
_TORCH_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    """Probability above which a chunk starts speech."""
    neg_threshold: float = 0.35
    """Probability below which speech ends (hysteresis)."""
    min_speech_s: float = 0.25
    min_silence_s: float = 0.15
    """Silences shorter than this stay inside one speech region. Short, so that regions are
    phrases and windows can be packed close to 30 s: the encoder always pays for 30 s."""
    pad_s: float = 0.1
    """Padding kept around each region so word onsets are not clipped."""
    stream_s: float = 30.0


class SileroVad:
    """Loads the packaged Silero model once; `speech_regions` is safe to call from threads."""

    def __init__(self, params: VadParams | None = None) -> None:
        self.params = params or VadParams()
        self._model = None
        self._lock = threading.Lock()

    def load(self) -> None:
        if self._model is None:
            from silero_vad import load_silero_vad  # sets torch's thread count to 1 on import

            self._model = load_silero_vad(onnx=True)
            torch.set_num_threads(_TORCH_THREADS)

    def speech_probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Probability of speech per 32 ms chunk, shape (ceil(n / CHUNK),)."""
        self.load()
        n_chunks = -(-len(audio) // CHUNK)
        if n_chunks == 0:
            return np.zeros(0, dtype=np.float32)
        per_stream = max(1, int(self.params.stream_s * SAMPLE_RATE) // CHUNK)
        n_streams = -(-n_chunks // per_stream)
        padded = np.zeros(n_streams * per_stream * CHUNK, dtype=np.float32)
        padded[: len(audio)] = audio
        # (streams, steps, CHUNK): row s is stream s, fed step by step as one batch.
        streams = torch.from_numpy(padded.reshape(n_streams, per_stream, CHUNK))
        probs = np.empty((n_streams, per_stream), dtype=np.float32)
        with self._lock, torch.inference_mode():
            self._model.reset_states(batch_size=n_streams)
            for step in range(per_stream):
                out = self._model(streams[:, step, :], SAMPLE_RATE)
                probs[:, step] = np.asarray(out).reshape(-1)
            self._model.reset_states()
        return probs.reshape(-1)[:n_chunks]

    def speech_regions(self, audio: np.ndarray) -> list[tuple[int, int]]:
        """Speech as (start_sample, end_sample) pairs, padded, merged and inside the audio."""
        probs = self.speech_probabilities(audio)
        return regions_from_probabilities(probs, len(audio), self.params)


class EnergyVad:
    """Speech where 20 ms frames rise clearly above the recording's noise floor."""

    FRAME = 320  # 20 ms

    def __init__(self, params: VadParams | None = None) -> None:
        self.params = params or VadParams()

    def load(self) -> None:
        """Nothing to load; here for the common interface."""

    def speech_probabilities(self, audio: np.ndarray) -> np.ndarray:
        """1.0 for frames judged speech, 0.0 otherwise, one per 20 ms."""
        n = len(audio) // self.FRAME
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        frames = audio[: n * self.FRAME].reshape(n, self.FRAME)
        db = 10.0 * np.log10(np.square(frames, dtype=np.float32).mean(axis=1) + 1e-10)
        floor, loud = np.percentile(db, [10, 95])
        if loud - floor < 10.0 and loud < -50.0:
            return np.zeros(n, dtype=np.float32)  # all quiet: nothing stands out
        threshold = floor + max(6.0, 0.3 * (loud - floor))
        return (db > threshold).astype(np.float32)

    def speech_regions(self, audio: np.ndarray) -> list[tuple[int, int]]:
        probs = self.speech_probabilities(audio)
        return regions_from_probabilities(probs, len(audio), self.params, chunk=self.FRAME)


def make_vad(kind: str, params: VadParams | None = None) -> SileroVad | EnergyVad:
    if kind == "silero":
        return SileroVad(params)
    if kind == "energy":
        return EnergyVad(params)
    raise ValueError(f"unknown VAD {kind!r}; choose silero or energy")


def regions_from_probabilities(
    probs: np.ndarray, n_samples: int, params: VadParams, chunk: int = CHUNK
) -> list[tuple[int, int]]:
    """Hysteresis thresholding of per-chunk probabilities into sample ranges."""
    raw: list[list[int]] = []
    in_speech = False
    start = 0
    for i, p in enumerate(probs):
        if not in_speech and p >= params.threshold:
            in_speech, start = True, i
        elif in_speech and p < params.neg_threshold:
            in_speech = False
            raw.append([start, i])
    if in_speech:
        raw.append([start, len(probs)])

    min_silence = params.min_silence_s * SAMPLE_RATE / chunk
    merged: list[list[int]] = []
    for region in raw:
        if merged and region[0] - merged[-1][1] < min_silence:
            merged[-1][1] = region[1]
        else:
            merged.append(region)

    pad = int(params.pad_s * SAMPLE_RATE)
    min_len = params.min_speech_s * SAMPLE_RATE
    out: list[tuple[int, int]] = []
    for s, e in merged:
        s_smp, e_smp = s * chunk, min(e * chunk, n_samples)
        if e_smp - s_smp < min_len:
            continue
        s_smp, e_smp = max(0, s_smp - pad), min(n_samples, e_smp + pad)
        if out and s_smp <= out[-1][1]:
            out[-1] = (out[-1][0], e_smp)
        else:
            out.append((s_smp, e_smp))
    return out
