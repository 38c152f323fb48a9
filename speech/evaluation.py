"""Scoring transcripts against references, the way Whisper's papers do.

Tests and benchmarks share this, so a threshold in a test and a figure in a benchmark mean the
same thing: lower-case, punctuation stripped, numbers and spellings normalised by Whisper's
English normaliser, then word-level edit distance over the whole set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jiwer


@lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return " ".join(_normalizer()(text).split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER as a fraction: all edits over all reference words."""
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if not pairs:
        return 0.0
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    return (out.substitutions + out.deletions + out.insertions) / sum(len(r.split()) for r, _ in pairs)


def word_count(text: str) -> int:
    return len(normalize(text).split())


@dataclass(frozen=True)
class ReferenceClip:
    path: Path
    reference: str


def reference_clips(data_dir: Path) -> list[ReferenceClip]:
    """Every single-speaker clip of the shared speech data that has a reference transcript."""
    clips: list[ReferenceClip] = []
    for audio in sorted(data_dir.rglob("*")):
        if audio.suffix not in (".wav", ".flac") or "concat_throughput" in audio.parts:
            continue
        txt = audio.with_suffix(".txt")
        stm = audio.with_suffix(".stm")
        if audio.parent.name == "pyannote_sample":
            continue  # a two-person call scored for diarization, not a read reference
        if txt.exists():
            clips.append(ReferenceClip(audio, txt.read_text().strip()))
        elif stm.exists():
            words = [" ".join(line.split()[5:]) for line in stm.read_text().splitlines() if line.strip()]
            clips.append(ReferenceClip(audio, " ".join(words)))
    return clips
