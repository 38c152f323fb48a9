"""ASR speed and completeness: this engine against transformers and faster-whisper.

Same weights (packaged tiny.en; faster-whisper runs the CTranslate2 original), same audio (the
first 10 minutes of the 54-minute LibriSpeech concatenation), same machine, one run. Each
contender runs in its own subprocess so that load time and peak memory are its own.

"Words kept" compares each contender's word count with a per-utterance transcription of the same
audio (each utterance of segments.tsv cut out and transcribed alone by faster-whisper): long-form
decoders that skip a window show up there even when the text they did produce is right.
WER is measured separately on the clips with human references.

Usage: .venv/bin/python bench/asr.py [--minutes 10] [--repeats 3] [--batch-sizes 8,16,24]
Ends with: RESULT engine_rtfx=.. faster_whisper_rtfx=.. ratio=.. engine_wer=.. faster_whisper_wer=..
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.data import DATA, LONG, SEGMENTS, SR, require  # noqa: E402


def _long_audio(minutes: float):
    from speech.audio import decode_audio

    return decode_audio(LONG)[: int(minutes * 60 * SR)]


def _utterances(minutes: float) -> list[tuple[float, float]]:
    rows = [line.split("\t") for line in SEGMENTS.read_text().splitlines()[1:] if line.strip()]
    return [(float(s), float(e)) for s, e, *_ in rows if float(e) <= minutes * 60]


def _clips():
    from speech.audio import decode_audio
    from speech.evaluation import reference_clips

    clips = reference_clips(DATA)
    return clips, [decode_audio(c.path) for c in clips]


# ------------------------------------------------------------------ contenders
def run_engine(audio, clip_audio, batch_size: int) -> dict:
    from speech.asr import WhisperEngine
    from speech.types import TranscribeOptions

    t0 = time.perf_counter()
    engine = WhisperEngine("tiny.en", max_batch_size=batch_size)
    engine.load()
    load_s = time.perf_counter() - t0
    opts = TranscribeOptions(language="en")

    def once() -> str:
        return engine.transcribe([audio], opts)[0].text

    return {"load_s": load_s, "run": once, "clips": lambda: [t.text for t in engine.transcribe(clip_audio, opts)]}


def run_transformers_pipeline(audio, clip_audio, batch_size: int) -> dict:
    import torch
    from transformers import pipeline

    from config.settings import get_settings
    from speech.model_store import resolve_whisper_model

    t0 = time.perf_counter()
    path = resolve_whisper_model("tiny.en", get_settings().MODEL_CACHE_DIR)
    asr = pipeline("automatic-speech-recognition", model=path, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0

    def transcribe(x) -> str:
        out = asr(
            {"raw": x, "sampling_rate": SR},
            chunk_length_s=30,
            batch_size=batch_size,
            return_timestamps=True,
        )
        return out["text"]

    return {"load_s": load_s, "run": lambda: transcribe(audio), "clips": lambda: [transcribe(a) for a in clip_audio]}


def _fw_model():
    from faster_whisper import WhisperModel

    from speech.model_store import ct2_source_dir

    return WhisperModel(str(ct2_source_dir("tiny.en")), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 2)


def run_faster_whisper(audio, clip_audio, batch_size: int) -> dict:
    t0 = time.perf_counter()
    model = _fw_model()
    load_s = time.perf_counter() - t0

    def transcribe(x) -> str:
        segments, _ = model.transcribe(x, beam_size=1, language="en")
        return "".join(s.text for s in segments)

    return {"load_s": load_s, "run": lambda: transcribe(audio), "clips": lambda: [transcribe(a) for a in clip_audio]}


def run_faster_whisper_batched(audio, clip_audio, batch_size: int) -> dict:
    from faster_whisper import BatchedInferencePipeline

    t0 = time.perf_counter()
    model = BatchedInferencePipeline(_fw_model())
    load_s = time.perf_counter() - t0

    def transcribe(x) -> str:
        segments, _ = model.transcribe(x, beam_size=1, language="en", batch_size=batch_size)
        return "".join(s.text for s in segments)

    return {"load_s": load_s, "run": lambda: transcribe(audio), "clips": lambda: [transcribe(a) for a in clip_audio]}


CONTENDERS = {
    "engine": run_engine,
    "transformers_pipeline": run_transformers_pipeline,
    "faster_whisper_int8": run_faster_whisper,
    "faster_whisper_batched": run_faster_whisper_batched,
}


def child(name: str, minutes: float, repeats: int, batch_size: int) -> None:
    """Runs one contender and prints one JSON line; the parent collects them."""
    from speech.evaluation import word_count, word_error_rate

    audio = _long_audio(minutes)
    clips, clip_audio = _clips()
    c = CONTENDERS[name](audio, clip_audio, batch_size)
    c["run"]()  # warm-up: first-call allocations and lazy imports are not throughput
    walls, text = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        text = c["run"]()
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    wer = word_error_rate([x.reference for x in clips], c["clips"]())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "name": name,
                "batch_size": batch_size,
                "rtfx": len(audio) / SR / wall,
                "wall_s": wall,
                "walls": walls,
                "load_s": c["load_s"],
                "peak_mb": peak_mb,
                "words": word_count(text),
                "wer": wer,
            }
        )
    )


def per_utterance_words(minutes: float) -> int:
    """Reference word count: every utterance transcribed alone (nothing to skip)."""
    from speech.evaluation import word_count

    audio = _long_audio(minutes)
    model = _fw_model()
    total = 0
    for s, e in _utterances(minutes):
        segments, _ = model.transcribe(audio[int(s * SR) : int(e * SR)], beam_size=1, language="en")
        total += word_count("".join(x.text for x in segments))
    return total


def _spawn(name: str, args, batch_size: int) -> dict:
    cmd = [
        sys.executable, __file__, "--child", name, "--minutes", str(args.minutes),
        "--repeats", str(args.repeats), "--batch-size", str(batch_size),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="8,16,24")
    parser.add_argument("--child", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    require(LONG, SEGMENTS)
    if args.child:
        child(args.child, args.minutes, args.repeats, args.batch_size)
        return

    print(f"audio: first {args.minutes:g} min of {LONG.name}; {os.cpu_count()} CPUs; median of {args.repeats} runs")
    ref_words = per_utterance_words(args.minutes)
    print(f"per-utterance transcription (faster-whisper, each utterance alone): {ref_words} words")
    results = []
    engine_runs = [_spawn("engine", args, int(b)) for b in args.batch_sizes.split(",")]
    for r in engine_runs:
        print(f"  engine batch {r['batch_size']:>3}: {r['rtfx']:.1f}x")
    results.append(max(engine_runs, key=lambda r: r["rtfx"]))
    results.append(_spawn("transformers_pipeline", args, 8))
    results.append(_spawn("faster_whisper_int8", args, 1))
    results.append(_spawn("faster_whisper_batched", args, 8))

    print(f"\n{'contender':<24}{'batch':>6}{'RTFx':>8}{'wall s':>8}{'load s':>8}{'peak MB':>9}{'words':>7}{'kept':>8}{'WER':>7}")
    for r in results:
        kept = r["words"] / ref_words if ref_words else 0.0
        r["kept"] = kept
        print(
            f"{r['name']:<24}{r['batch_size']:>6}{r['rtfx']:>8.1f}{r['wall_s']:>8.2f}{r['load_s']:>8.1f}"
            f"{r['peak_mb']:>9.0f}{r['words']:>7}{kept:>8.1%}{r['wer']:>7.3f}"
        )
    engine = results[0]
    # faster-whisper's fastest configuration that loses nothing (>= 98% of the words)
    fw = [r for r in results if r["name"].startswith("faster_whisper") and r["kept"] >= 0.98]
    fw_best = max(fw, key=lambda r: r["rtfx"]) if fw else results[2]
    print(f"\nratio vs {fw_best['name']}: {engine['rtfx'] / fw_best['rtfx']:.2f}")
    print(
        f"RESULT engine_rtfx={engine['rtfx']:.2f} faster_whisper_rtfx={fw_best['rtfx']:.2f} "
        f"ratio={engine['rtfx'] / fw_best['rtfx']:.3f} engine_wer={engine['wer']:.4f} "
        f"faster_whisper_wer={fw_best['wer']:.4f}"
    )


if __name__ == "__main__":
    main()
