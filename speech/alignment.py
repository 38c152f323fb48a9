"""Word timestamps from cross-attention: dynamic time warping over the alignment heads.

Whisper's alignment heads attend, for each text token, to the audio frames where it was
spoken; the monotonic path through that attention map (DTW) gives each token a start time.
This is openai-whisper's `find_alignment`, with the DTW vectorised along anti-diagonals so
that it costs milliseconds per window in numpy instead of a Python double loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_S = 0.02  # one encoder frame (two mel frames of 10 ms)


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median along the last axis with reflect padding, as openai-whisper applies it."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.median(windows, axis=-1)


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic minimum-cost path through `cost` (tokens x frames); returns (rows, cols)."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf, dtype=np.float64)
    acc[0, 0] = 0.0
    # trace: 0 diagonal, 1 from above (i-1, j), 2 from left (i, j-1)
    trace = np.zeros((n + 1, m + 1), dtype=np.int8)
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        options = np.stack([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]])
        best = np.argmin(options, axis=0)
        acc[i, j] = cost[i - 1, j - 1] + options[best, np.arange(len(i))]
        trace[i, j] = best
    trace[0, :] = 2
    trace[:, 0] = 1
    rows, cols = [], []
    i, j = n, m
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        step = trace[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


@dataclass
class TokenTiming:
    start: float
    end: float


def token_timings(attention: np.ndarray, n_tokens: int, n_frames: int) -> list[TokenTiming]:
    """Start/end of each of the `n_tokens` text tokens.

    attention: (heads, prefix + n_tokens + 1, frames) cross-attention of the alignment heads for
    the sequence [prefix..., no_timestamps, text tokens..., eot].
    """
    weights = attention[:, :, :n_frames]
    std = weights.std(axis=-2, keepdims=True)
    mean = weights.mean(axis=-2, keepdims=True)
    weights = (weights - mean) / np.maximum(std, 1e-8)
    weights = median_filter(weights, 7)
    matrix = weights.mean(axis=0)
    # Row p predicts token p + 1: the rows from the last prefix token (no_timestamps) to the
    # last text token give the onsets of the n text tokens and of the closing eot.
    matrix = matrix[-(n_tokens + 2) : -1]
    rows, cols = dtw_path(-matrix)
    jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
    starts = cols[jumps] * FRAME_S  # one per row of matrix, n_tokens + 1 values
    starts = starts[: n_tokens + 1]
    return [TokenTiming(float(starts[k]), float(starts[k + 1])) for k in range(n_tokens)]
