"""Cut long audio into windows of at most 30 s at pauses, so every window stands alone.

Windows that stand alone can be transcribed in one batch, from one file or from many, which is
where the speed is; cutting inside a word would lose it, so cuts go into the gaps the VAD found
and, for speech that runs on longer than a window, into the quietest 100 ms near the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from speech.types import SAMPLE_RATE, Segment, TranscribeOptions, Transcript, Window, WindowResult
from speech.vad import VadParams, make_vad

MAX_WINDOW_S = 30.0
_QUIET_FRAME = SAMPLE_RATE // 10
_CONTEXT = SAMPLE_RATE  # at most 1 s of surrounding silence kept on each side of a window


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
    if not regions:
        return []
    if len(audio) <= max_len:
        return [(0, len(audio))]  # short input: one window, with all its context
    pieces: list[tuple[int, int]] = []
    for start, end in regions:
        pieces.extend(_split_long(audio, start, end, max_len))

    windows: list[tuple[int, int]] = []
    for start, end in pieces:
        if windows and end - windows[-1][0] <= max_len:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return _with_context(windows, len(audio), max_len)


def _with_context(windows: list[tuple[int, int]], n_samples: int, max_len: int) -> list[tuple[int, int]]:
    """Widen each window into the silence around it (up to 1 s a side, half of each gap).

    Whisper transcribes the first and last words of a window better with a little silence
    around them than with the speech cut flush at both ends.
    """
    out = []
    for i, (start, end) in enumerate(windows):
        prev_end = windows[i - 1][1] if i > 0 else 0
        next_start = windows[i + 1][0] if i + 1 < len(windows) else n_samples
        room = max_len - (end - start)
        left = min(_CONTEXT, (start - prev_end) // 2 if i > 0 else start, room // 2)
        right = min(_CONTEXT, (next_start - end) // 2 if i + 1 < len(windows) else n_samples - end, room - left)
        out.append((start - max(0, left), end + max(0, right)))
    return out


def speech_within(regions: Sequence[tuple[int, int]], start: int, end: int) -> tuple[tuple[float, float], ...]:
    """The VAD regions overlapping [start, end), clipped, in seconds from `start`."""
    return tuple(
        ((max(s, start) - start) / SAMPLE_RATE, (min(e, end) - start) / SAMPLE_RATE)
        for s, e in regions
        if e > start and s < end
    )


def vad_kind_for(device: str) -> str:
    """The VAD the engine plans with on `device`: Silero costs a fifth of the CPU budget, on a
    GPU machine it is noise next to the model."""
    return "silero" if device == "cuda" else "energy"


class WindowPlanner:
    """Cuts one recording into the windows the ASR decodes. Needs the VAD only, never the model,
    so callers plan where the audio is (ingress, job runner, bulk CPU tasks) and the model
    replicas only decode."""

    def __init__(self, vad: str = "energy", vad_params: VadParams | None = None) -> None:
        self.vad_kind = vad
        self.vad = make_vad(vad, vad_params)

    def load(self) -> None:
        self.vad.load()

    def plan(self, audio: np.ndarray, options: TranscribeOptions) -> list[Window]:
        """Windows of at most 30 s cut at pauses; silence between them is left out."""
        self.load()
        regions = self.vad.speech_regions(audio)
        spans = plan_windows(audio, regions, MAX_WINDOW_S)
        return [
            Window(audio[s:e], s / SAMPLE_RATE, options, i, speech_within(regions, s, e))
            for i, (s, e) in enumerate(spans)
        ]


def stitch(
    duration_s: float,
    windows: Sequence[Window],
    results: Sequence[WindowResult],
    options: TranscribeOptions,
) -> Transcript:
    """One transcript from a recording's windows, times moved to the recording's clock. Needs
    each window's offset and the recording's length, never the samples."""
    segments: list[Segment] = []
    for window, result in zip(windows, results, strict=True):
        off = window.offset_s
        for seg in result.segments:
            words = [
                replace(w, start=round(min(w.start + off, duration_s), 3),
                        end=round(min(w.end + off, duration_s), 3))
                for w in seg.words
            ]
            segments.append(
                replace(seg, id=len(segments), start=round(min(seg.start + off, duration_s), 3),
                        end=round(min(seg.end + off, duration_s), 3), seek=int(round(off * 100)),
                        words=words)
            )
    language = options.language or majority_language(windows, results)
    probs = None if options.language else language_probabilities(windows, results)
    return Transcript(language=language, duration=duration_s, segments=segments, task=options.task,
                      language_probs=probs)


def majority_language(windows: Sequence[Window], results: Sequence[WindowResult]) -> str:
    """The language detected over most of the recording's speech (duration-weighted vote)."""
    votes: Counter[str] = Counter()
    for w, r in zip(windows, results, strict=True):
        votes[r.language] += w.duration_s
    return votes.most_common(1)[0][0] if votes else "en"


LANGUAGE_PROBS_TOP = 3
"""How many of the likeliest languages a transcript reports."""


def language_probabilities(windows: Sequence[Window], results: Sequence[WindowResult],
                           top: int = LANGUAGE_PROBS_TOP) -> dict[str, float] | None:
    """The detected languages' probabilities over the recording: each window's, weighted by its
    duration, averaged over the windows that ran detection; the `top` likeliest, most likely
    first. None when no window ran detection (language given, or an English-only model)."""
    total: Counter[str] = Counter()
    weight = 0.0
    for w, r in zip(windows, results, strict=True):
        if not r.language_probs:
            continue
        weight += w.duration_s
        for lang, p in r.language_probs.items():
            total[lang] += p * w.duration_s
    if weight <= 0:
        return None
    return {lang: round(p / weight, 4) for lang, p in total.most_common(top)}
