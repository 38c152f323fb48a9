"""Where the benchmarks find the shared recordings (shared/ lies beside the repository)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "speech"
LONG = DATA / "concat_throughput" / "librispeech_tc100_concat_16k.flac"
"""54 minutes of LibriSpeech joined into one file; segments.tsv gives the joins."""
SEGMENTS = LONG.with_suffix(".segments.tsv")
SR = 16_000
