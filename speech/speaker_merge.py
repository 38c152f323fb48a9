"""Put diarization speakers on a transcript: on every word, on every segment, split where they change.

Rules (issue 7): a word belongs to the speaker whose turns overlap it most (summed over that
speaker's turns, so a fragmented turn still counts whole); a word no turn touches goes to the
nearest turn. A segment with words is cut wherever the word speaker changes; a segment without
words takes the speaker overlapping it most. Labels are renumbered SPEAKER_00, SPEAKER_01, ...
in order of first appearance in time, so the same conversation always reads the same way.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from speech.types import Segment, SpeakerTurn, Transcript

_BLOCK = 512
"""Words scored against all turns at once; bounds memory at _BLOCK x len(turns)."""


def assign_speakers(transcript: Transcript, turns: list[SpeakerTurn]) -> Transcript:
    """A new transcript with `speakers` set and every word and segment labelled."""
    renamed = relabel_by_first_appearance(turns)
    out = copy.deepcopy(transcript)
    out.speakers = renamed
    if not renamed:
        return out
    labels = sorted({t.speaker for t in renamed})
    starts = np.array([t.start for t in renamed])
    ends = np.array([t.end for t in renamed])
    owner = np.array([labels.index(t.speaker) for t in renamed])

    def speakers_of(intervals: list[tuple[float, float]]) -> list[str]:
        return [labels[i] for i in _best_speaker(intervals, starts, ends, owner, len(labels))]

    words = [w for s in out.segments for w in s.words]
    for word, speaker in zip(words, speakers_of([(w.start, w.end) for w in words])):
        word.speaker = speaker
    segments: list[Segment] = []
    bare = [s for s in out.segments if not s.words]
    bare_speakers = dict(zip(map(id, bare), speakers_of([(s.start, s.end) for s in bare])))
    for segment in out.segments:
        if segment.words:
            segments.extend(_split_by_speaker(segment))
        else:
            segment.speaker = bare_speakers[id(segment)]
            segments.append(segment)
    for i, segment in enumerate(segments):
        segment.id = i
    out.segments = segments
    return out


def relabel_by_first_appearance(turns: list[SpeakerTurn]) -> list[SpeakerTurn]:
    """Turns sorted by time with labels SPEAKER_00.. in the order speakers first speak."""
    ordered = sorted(turns, key=lambda t: (t.start, t.end))
    names: dict[str, str] = {}
    for turn in ordered:
        names.setdefault(turn.speaker, f"SPEAKER_{len(names):02d}")
    return [SpeakerTurn(t.start, t.end, names[t.speaker]) for t in ordered]


def _best_speaker(
    intervals: list[tuple[float, float]],
    starts: np.ndarray,
    ends: np.ndarray,
    owner: np.ndarray,
    num_speakers: int,
) -> list[int]:
    """Per interval: the speaker with the most overlap, else the one with the nearest turn."""
    chosen: list[int] = []
    for block in range(0, len(intervals), _BLOCK):
        part = np.array(intervals[block : block + _BLOCK], dtype=float).reshape(-1, 2)
        lo, hi = part[:, :1], part[:, 1:]
        overlap = np.clip(np.minimum(hi, ends) - np.maximum(lo, starts), 0.0, None)
        # overlap: (words, turns); summed per speaker -> (words, speakers)
        per_speaker = np.zeros((len(part), num_speakers))
        np.add.at(per_speaker.T, owner, overlap.T)
        gap = np.maximum(np.maximum(starts - hi, lo - ends), 0.0)
        nearest = owner[np.argmin(gap, axis=1)]
        best = np.where(per_speaker.max(axis=1) > 0, per_speaker.argmax(axis=1), nearest)
        chosen.extend(int(i) for i in best)
    return chosen


def _split_by_speaker(segment: Segment) -> list[Segment]:
    """One segment per run of same-speaker words; the outer bounds keep the segment's own."""
    runs: list[list] = []
    for word in segment.words:
        if runs and runs[-1][-1].speaker == word.speaker:
            runs[-1].append(word)
        else:
            runs.append([word])
    if len(runs) == 1:
        segment.speaker = runs[0][0].speaker
        return [segment]
    pieces = []
    for i, run in enumerate(runs):
        pieces.append(
            replace(
                segment,
                start=segment.start if i == 0 else run[0].start,
                end=segment.end if i == len(runs) - 1 else run[-1].end,
                text="".join(w.word for w in run),
                tokens=[],
                words=run,
                speaker=run[0].speaker,
            )
        )
    return pieces
