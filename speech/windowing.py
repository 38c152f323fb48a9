"""Cut long audio into windows of at most 30 s at pauses, so every window stands alone.

Windows that stand alone can be transcribed in one batch, from one file or from many, which is
where the speed is; cutting inside a word would lose it, so cuts go into the gaps the VAD found
and, for speech that runs on longer than a window, into the quietest 100 ms near the end.
"""

from __future__ import annotations

import numpy as np

from speech.types import SAMPLE_RATE

MAX_WINDOW_S = 30.0
_QUIET_FRAME = SAMPLE_RATE // 10


def _quietest_cut(audio: np.ndarray, lo: int, hi: int) -> int:
    """Sample index of the quietest 100 ms frame in [lo, hi)."""
    n_frames = (hi - lo) // _QUIET_FRAME
    if n_frames <= 1:
        return hi
    frames = audio[lo : lo + n_frames * _QUIET_FRAME].reshape(n_frames, _QUIET_FRAME)
    energy = np.square(frames, dtype=np.float32).mean(axis=1)
    return lo + int(np.argmin(energy)) * _QUIET_FRAME + _QUIET_FRAME // 2


def _split_long(audio: np.ndarray, start: int, end: int, max_len: int) -> list[tuple[int, int]]:
    """Split one uninterrupted speech region longer than a window at its quietest moments."""
    pieces = []
    while end - start > max_len:
        cut = _quietest_cut(audio, start + max_len // 2, start + max_len)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def plan_windows(
    audio: np.ndarray, regions: list[tuple[int, int]], max_window_s: float = MAX_WINDOW_S
) -> list[tuple[int, int]]:
    """Group speech regions into windows (start, end) in samples, each <= max_window_s.

    Silence between windows is left out: Whisper invents text over long silence, and what
    is not decoded costs nothing.
    """
    max_len = int(max_window_s * SAMPLE_RATE)
    pieces: list[tuple[int, int]] = []
    for start, end in regions:
        pieces.extend(_split_long(audio, start, end, max_len))

    windows: list[tuple[int, int]] = []
    for start, end in pieces:
        if windows and end - windows[-1][0] <= max_len:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows
