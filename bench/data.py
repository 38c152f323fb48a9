"""Where the benchmarks find their recordings: the project's shared data, beside the repository.

The benchmarks measure on the large recordings of `shared/data/speech` (54 minutes of
LibriSpeech, the 2- to 10-speaker conversations, the AMI excerpts), which are not in the
repository; the tests use the small copies in tests/data instead. A benchmark started without
that folder stops with `require()`'s message (where it looked, what it needs) rather than a
traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "speech"
"""The project's shared data folder shared/data/speech, expected beside the repository."""
LONG = DATA / "concat_throughput" / "librispeech_tc100_concat_16k.flac"
"""54 minutes of LibriSpeech joined into one file; segments.tsv gives the joins."""
SEGMENTS = LONG.with_suffix(".segments.tsv")
SR = 16_000


def short_clips(data: Path = DATA) -> list[Path]:
    """Real speech of 3-12 s with references (LibriVox, LibriSpeech, JFK) under `data`."""
    return [*sorted((data / "pocketsphinx" / "librivox").glob("*.wav")),
            data / "lhotse_fixtures" / "2412-153948-0000.flac",
            data / "picovoice_leopard" / "test.wav", data / "jfk" / "jfk.flac"]


def require(*paths: Path) -> None:
    """Exit with a message naming what is missing and where the data comes from, unless every
    path (and the shared data folder itself) exists."""
    missing = [p for p in (DATA, *paths) if not p.exists()]
    if not missing:
        return
    what = (f"the folder {DATA} does not exist" if DATA in missing
            else "missing: " + ", ".join(str(p) for p in missing))
    sys.exit(
        f"benchmark data not found: {what}.\n"
        f"The benchmarks read the project's shared speech recordings (shared/data/speech, with its\n"
        f"README.md and MANIFEST.tsv), expected beside this repository at {DATA}.\n"
        f"Put a copy of the project's shared/data/speech there (or link it), then run the benchmark\n"
        f"again. The tests do not need it: they use the small recordings in tests/data."
    )
