"""Diarization error rate against reference RTTM, the way the acceptance criteria score it.

Collar 0.5 s in total (0.25 s each side of every reference boundary), overlap scored.
"""

from __future__ import annotations

from pathlib import Path

from pyannote.core import Annotation, Segment, Timeline
from pyannote.database.util import load_rttm
from pyannote.metrics.diarization import DiarizationErrorRate

from speech.types import SpeakerTurn

COLLAR_S = 0.5
SKIP_OVERLAP = False


def reference(rttm: Path, uri: str) -> Annotation:
    """The reference turns of one recording (`uri` as written in the RTTM file)."""
    return load_rttm(str(rttm))[uri]


def annotation(turns: list[SpeakerTurn], uri: str = "audio") -> Annotation:
    out = Annotation(uri=uri)
    for i, turn in enumerate(turns):
        out[Segment(turn.start, turn.end), i] = turn.speaker
    return out


def der_metric() -> DiarizationErrorRate:
    """Accumulating metric: call it per file, `abs(metric)` is the pooled DER."""
    return DiarizationErrorRate(collar=COLLAR_S, skip_overlap=SKIP_OVERLAP)


def score(
    metric: DiarizationErrorRate, ref: Annotation, turns: list[SpeakerTurn], duration: float
) -> float:
    """Add one file to `metric` (scored over [0, duration]) and return its own DER."""
    uem = Timeline([Segment(0.0, duration)])
    return float(metric(ref, annotation(turns, ref.uri), uem=uem))
