"""Bulk pipeline speed: one long file against the same audio as ~250 utterance files.

The 54-minute LibriSpeech concatenation, and the same audio cut at its `segments.tsv` joins into
one WAV file per utterance (in a temp dir), each run through `pipelines.batch_transcribe` on a
private local Ray with the pipeline's default actors; then the engine alone, sequentially over
the same utterance files in this process (decode + `WhisperEngine.transcribe` one file at a
time). Ray's start is outside the timings; each pipeline run's time includes its actors' model
load, as a real run's does.

The two pipeline inputs run `--repeats` times in alternating order (the machine is shared and
noisy; whichever runs second finds warm worker processes): the figures are medians.

Where the time goes, per input: the model's unit of work is a 30 s window (a 12 s utterance
pays for a whole one in the encoder), so the table gives windows, actor-seconds inside the
engine (and the encoder's share of them, from the encoder's cost per window measured here),
task-seconds of the CPU stage (read, hash, decode, cut), and how busy the actors were.

Target (issue 4): many small files within 15% of the long file's rate, and not slower than the
sequential engine.

Usage: .venv/bin/python bench/pipeline.py [--minutes 54.4] [--repeats 3] [--batch-windows 8] [--actors N]
Ends with: RESULT long_rtfx=<f> many_small_rtfx=<f> sequential_rtfx=<f>
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.data import DATA, LONG, SEGMENTS, SR, require  # noqa: E402


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


def run_pipeline(name: str, folder: Path, out: Path, args: argparse.Namespace):  # -> Summary
    from pipelines.batch_transcribe import RunConfig, run

    output = out / f"{name}.jsonl"
    output.unlink(missing_ok=True)  # every repeat transcribes everything again
    cfg = RunConfig(inputs=[str(folder)], output=str(output), model=args.model,
                    batch_windows=args.batch_windows, actors=args.actors, progress_every_s=30)
    log = io.StringIO()
    s = run(cfg, out=log)
    assert s.failed == 0 and s.succeeded == s.files, log.getvalue()
    print(f"  pipeline, {name}: {s.files} files, {s.audio_s:.0f} s audio in {s.wall_s:.1f} s "
          f"= {s.rtfx:.1f}x real time", flush=True)
    return s


def encoder_ms_per_window(model: str, threads: int) -> float:
    """The encoder's cost of one 30 s window, as the actors run it (one window per call)."""
    import torch

    from speech.asr import Window, WhisperEngine
    from speech.types import TranscribeOptions

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = WhisperEngine(model)
        engine.load()
        window = Window(np.zeros(SR * 30, dtype=np.float32), 0.0, TranscribeOptions(), 0)
        with torch.inference_mode():
            engine._encode([window])  # warm
            t0 = time.perf_counter()
            for _ in range(10):
                engine._encode([window])
        return (time.perf_counter() - t0) / 10 * 1000
    finally:
        torch.set_num_threads(before)


def where_the_time_goes(runs: dict[str, list], encoder_ms: float) -> str:
    """One row per input, medians over the repeats."""
    def med(name: str, f) -> float:  # noqa: ANN001
        return statistics.median(f(s) for s in runs[name])

    lines = [f"| input | files | windows | wall s | x real time | engine actor-s | encoder share "
             f"| CPU stage task-s | actors busy |", "|---|---|---|---|---|---|---|---|---|"]
    for name in runs:
        s0 = runs[name][0]
        enc = s0.windows * encoder_ms / 1000
        busy = med(name, lambda s: s.model_s / (s.actors * s.wall_s))
        lines.append(f"| {name} | {s0.files} | {s0.windows} | {med(name, lambda s: s.wall_s):.1f} "
                     f"| {med(name, lambda s: s.rtfx):.1f} | {med(name, lambda s: s.model_s):.1f} "
                     f"| {enc / med(name, lambda s: s.model_s):.0%} | {med(name, lambda s: s.decode_s):.1f} "
                     f"| {busy:.0%} |")
    return "\n".join(lines)


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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-windows", type=int, default=None)
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    require(LONG, SEGMENTS)

    os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit, before Ray starts
    import ray

    runs: dict[str, list] = {"long": [], "many_small": []}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        long_dir, small_dir, _ = prepare(tmp, args.minutes)
        folders = {"long": long_dir, "many_small": small_dir}
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            for rep in range(args.repeats):
                order = ["long", "many_small"] if rep % 2 == 0 else ["many_small", "long"]
                print(f"\nrepeat {rep + 1}/{args.repeats}", flush=True)
                for name in order:
                    runs[name].append(run_pipeline(name, folders[name], tmp, args))
                last = {n: runs[n][-1].rtfx for n in runs}
                print(f"  many small / long: {last['many_small'] / last['long']:.2f}", flush=True)
        finally:
            ray.shutdown()
        seq_rtfx = run_sequential(small_dir, args.model)
        threads = runs["long"][0].threads or 1
        encoder_ms = encoder_ms_per_window(args.model, threads)
    long_rtfx = statistics.median(s.rtfx for s in runs["long"])
    small_rtfx = statistics.median(s.rtfx for s in runs["many_small"])
    ratios = [s.rtfx / l.rtfx for s, l in zip(runs["many_small"], runs["long"], strict=True)]
    print(f"\nwhere the time goes (medians of {args.repeats}; {runs['long'][0].actors} Whisper actor(s); "
          f"encoder {encoder_ms:.0f} ms per 30 s window at {threads} thread(s)):")
    print(where_the_time_goes(runs, encoder_ms))
    print(f"\nmany small vs long: {small_rtfx / long_rtfx:.2f} (per repeat: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.85); "
          f"vs sequential engine: {small_rtfx / seq_rtfx:.2f} (target >= 1.0)")
    print(f"RESULT long_rtfx={long_rtfx:.2f} many_small_rtfx={small_rtfx:.2f} sequential_rtfx={seq_rtfx:.2f}")


if __name__ == "__main__":
    main()
