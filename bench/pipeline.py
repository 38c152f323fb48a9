"""Bulk pipeline speed: one long file against the same audio as ~250 utterance files.

The 54-minute LibriSpeech concatenation, and the same audio cut at its `segments.tsv` joins into
one WAV file per utterance (in a temp dir), each run through `pipelines.batch_transcribe` on a
private local Ray; then the engine alone, sequentially over the same utterance files in this
process (decode + `WhisperEngine.transcribe` one file at a time). Ray's start is outside the
timings; each pipeline run's time includes its actors' model load, as a real run's does.

Target (issue 4): many small files within 15% of the long file's rate, and not slower than the
sequential engine. Ray Data's per-stage stats are printed to show where the time goes.

Usage: .venv/bin/python bench/pipeline.py [--minutes 54.4] [--batch-windows 8] [--actors 1]
Ends with: RESULT long_rtfx=<f> many_small_rtfx=<f> sequential_rtfx=<f>
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.data import DATA, LONG, SEGMENTS, SR  # noqa: E402


def _write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")  # the source is 16-bit
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def prepare(tmp: Path, minutes: float) -> tuple[Path, Path, float]:
    """The long file (its first `minutes`) and its utterances as separate files."""
    from speech.audio import decode_audio

    audio = decode_audio(LONG)[: int(minutes * 60 * SR)]
    long_dir, small_dir = tmp / "long", tmp / "small"
    long_dir.mkdir()
    small_dir.mkdir()
    _write_wav(long_dir / "concat.wav", audio)
    rows = [line.split("\t") for line in SEGMENTS.read_text().splitlines()[1:] if line.strip()]
    n = 0
    for i, (start, end, *_rest) in enumerate(rows):
        s, e = int(float(start) * SR), int(float(end) * SR)
        if e > len(audio):
            break
        _write_wav(small_dir / f"utt{i:04d}.wav", audio[s:e])
        n += 1
    print(f"inputs: {len(audio) / SR / 60:.1f} min as 1 file, and {n} utterance files", flush=True)
    return long_dir, small_dir, len(audio) / SR


def run_pipeline(name: str, folder: Path, out: Path, args: argparse.Namespace) -> float:
    from pipelines.batch_transcribe import RunConfig, run

    cfg = RunConfig(inputs=[str(folder)], output=str(out / f"{name}.jsonl"), model=args.model,
                    batch_windows=args.batch_windows, actors=args.actors, progress_every_s=30)
    log = io.StringIO()
    s = run(cfg, out=log)
    assert s.failed == 0, log.getvalue()
    print(f"\n== pipeline, {name}: {s.files} files, {s.audio_s:.0f} s audio in {s.wall_s:.1f} s "
          f"= {s.rtfx:.1f}x real time", flush=True)
    print(s.stage_stats, flush=True)
    return s.rtfx


def run_sequential(folder: Path, model: str) -> float:
    from speech.asr import WhisperEngine
    from speech.audio import decode_audio
    from speech.types import TranscribeOptions

    engine = WhisperEngine(model)
    t0 = time.perf_counter()
    engine.load()
    audio_s = 0.0
    for path in sorted(folder.iterdir()):
        audio = decode_audio(path)
        audio_s += len(audio) / SR
        engine.transcribe([audio], TranscribeOptions())
    wall = time.perf_counter() - t0
    print(f"\n== engine alone, sequential over {folder.name}: {audio_s:.0f} s audio in {wall:.1f} s "
          f"(model load {engine.load_seconds:.1f} s included) = {audio_s / wall:.1f}x real time", flush=True)
    return audio_s / wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=60.0, help="use the first N minutes (default: all 54.4)")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--batch-windows", type=int, default=None)
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()

    os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit, before Ray starts
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        long_dir, small_dir, _ = prepare(tmp, args.minutes)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            long_rtfx = run_pipeline("long", long_dir, tmp, args)
            small_rtfx = run_pipeline("many_small", small_dir, tmp, args)
        finally:
            ray.shutdown()
        seq_rtfx = run_sequential(small_dir, args.model)
    print(f"\nmany small vs long: {small_rtfx / long_rtfx:.2f} (target >= 0.85); "
          f"vs sequential engine: {small_rtfx / seq_rtfx:.2f} (target >= 1.0)")
    print(f"RESULT long_rtfx={long_rtfx:.2f} many_small_rtfx={small_rtfx:.2f} sequential_rtfx={seq_rtfx:.2f}")


if __name__ == "__main__":
    main()
