"""Diarization accuracy and speed on the real recordings: DER and real-time factor per file set.

    .venv/bin/python -m bench.diarization [--sets dev,ami] [--threads 2]

For each file: one run without hints (cold: segmentation + embeddings + clustering, timed), then
one with the true speaker count (warm: embeddings come from the pipeline's cache, so this times
clustering only). Prints per-file DER, pooled DER per set and mode, real-time factor, and the
share of time each step takes. DER: pyannote.metrics, collar 0.5 s, overlap scored.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.data import DATA, require
from speech.audio import decode_audio
from speech.diarization import DiarizationEngine
from speech.diarization.scoring import der_metric, reference, score
from speech.types import SAMPLE_RATE



@dataclass(frozen=True)
class Recording:
    audio: Path
    rttm: Path
    uri: str


def file_sets() -> dict[str, list[Recording]]:
    """dev: the tuning files; ami: 14 real meeting excerpts of 30 s."""
    conv = DATA / "synthetic_conv_librispeech"
    ami = DATA / "pyannote_tests"
    rttm = {"dev": "development", "trn": "train", "tst": "test"}
    return {
        "dev": [
            Recording(DATA / "pyannote_sample/sample.wav", DATA / "pyannote_sample/sample.rttm", "sample"),
            Recording(conv / "conv2spk.wav", conv / "conv2spk.rttm", "conv2spk"),
            Recording(conv / "conv3spk.wav", conv / "conv3spk.rttm", "conv3spk"),
        ],
        "ami": [
            Recording(wav, ami / f"debug.{rttm[wav.stem[:3]]}.rttm", wav.stem)
            for wav in sorted(ami.glob("*.wav"))
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="dev,ami")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/diarization.md)")
    args = parser.parse_args()
    sets = file_sets()
    require(*(p for name in args.sets.split(",") for rec in sets[name] for p in (rec.audio, rec.rttm)))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    engine = DiarizationEngine("packaged")
    started = time.perf_counter()
    engine.load()
    print(f"load {time.perf_counter() - started:.1f}s, torch threads {torch.get_num_threads()}")
    for name in args.sets.split(","):
        blind, hinted = der_metric(), der_metric()
        audio_s = cold_s = warm_s = seg_s = emb_s = 0.0
        print(f"\n== {name}")
        print(f"{'file':<10} {'dur':>6} {'spk':>4} {'found':>5} {'DER':>6} {'DER|n':>6} {'RTF':>6}")
        for rec in file_sets()[name]:
            audio = decode_audio(rec.audio)
            duration = len(audio) / SAMPLE_RATE
            ref = reference(rec.rttm, rec.uri)
            n = len(ref.labels())
            t0 = time.perf_counter()
            turns = engine.diarize(audio)
            t1 = time.perf_counter()
            timings = dict(engine.last_timings)
            hinted_turns = engine.diarize(audio, num_speakers=n)
            t2 = time.perf_counter()
            d_blind = score(blind, ref, turns, duration)
            d_hint = score(hinted, ref, hinted_turns, duration)
            found = len({t.speaker for t in turns})
            audio_s += duration
            cold_s += t1 - t0
            warm_s += t2 - t1
            seg_s += timings.get("segmentation_s", 0.0)
            emb_s += timings.get("embeddings_s", 0.0)
            print(
                f"{rec.uri:<10} {duration:6.1f} {n:4d} {found:5d} {100 * d_blind:5.1f}% "
                f"{100 * d_hint:5.1f}% {(t1 - t0) / duration:6.3f}"
            )
        rest = cold_s - seg_s - emb_s
        print(
            f"{name} pooled DER: {100 * abs(blind):.1f}% without hints, {100 * abs(hinted):.1f}% "
            f"with num_speakers | RTF {cold_s / audio_s:.3f} cold ({cold_s:.1f}s for {audio_s:.0f}s), "
            f"{warm_s / audio_s:.4f} re-clustering with a hint"
        )
        print(
            f"{name} time: segmentation {100 * seg_s / cold_s:.0f}%, embeddings "
            f"{100 * emb_s / cold_s:.0f}%, clustering + reconstruction {100 * rest / cold_s:.0f}%"
        )


if __name__ == "__main__":
    main()
