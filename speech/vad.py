"""Voice activity detection with Silero VAD, run as many parallel streams.

Silero is a recurrent model fed 32 ms chunks one after another; called chunk by chunk from
Python (its own `get_speech_timestamps`) it costs ~14 s per 10 minutes of audio on 2 cores,
more than the transcription itself. Cutting the audio into independent streams of
`stream_s` seconds and feeding them as one batch makes the same work ~20x cheaper; the state
reset at each stream start costs a few chunks of warm-up, which the hysteresis absorbs.
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
    min_silence_s: float = 0.3
    """Silences shorter than this stay inside one speech region."""
    pad_s: float = 0.2
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


def regions_from_probabilities(
    probs: np.ndarray, n_samples: int, params: VadParams
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

    min_silence = params.min_silence_s * SAMPLE_RATE / CHUNK
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
        s_smp, e_smp = s * CHUNK, min(e * CHUNK, n_samples)
        if e_smp - s_smp < min_len:
            continue
        s_smp, e_smp = max(0, s_smp - pad), min(n_samples, e_smp + pad)
        if out and s_smp <= out[-1][1]:
            out[-1] = (out[-1][0], e_smp)
        else:
            out.append((s_smp, e_smp))
    return out
