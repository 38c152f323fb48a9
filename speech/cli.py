"""`python -m speech transcribe ...`: the engine alone, no Ray, no service.

Files (or folders, searched recursively) are decoded a group at a time and each group's windows
are transcribed in one batch, so a folder of short clips runs as fast as one long file. The
work itself is `speech.pipeline.TranscriptionPipeline`, the same sequence every entry point runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from speech.audio import AudioLimits
from speech.errors import SpeechError
from speech.formats import FORMATS, render
from speech.pipeline import TranscriptionPipeline
from speech.request import SpeakerHints, TranscriptionRequest, check_request
from speech.types import SAMPLE_RATE, TranscribeOptions

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".webm", ".mp4", ".mka"}
FILES_PER_GROUP = 16
_EXTENSION = {"json": "json", "verbose_json": "json", "diarized_json": "json", "text": "txt"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speech", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe audio files or folders")
    t.add_argument("inputs", nargs="+", type=Path, metavar="FILE")
    t.add_argument("--format", default="text", choices=FORMATS)
    t.add_argument("--model", default=None, help="packaged name, local directory or hub id")
    t.add_argument("--language", default=None, help="ISO code; detected when omitted")
    t.add_argument("--task", default="transcribe", choices=("transcribe", "translate"))
    t.add_argument("--word-timestamps", action="store_true")
    t.add_argument("--initial-prompt", default=None)
    t.add_argument("--beam-size", type=int, default=1)
    t.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"))
    t.add_argument("--output-dir", type=Path, default=None)
    t.add_argument("--diarize", action="store_true", help="label speakers (pyannote)")
    t.add_argument("--num-speakers", type=int, default=None)
    t.add_argument("--min-speakers", type=int, default=None)
    t.add_argument("--max-speakers", type=int, default=None)
    t.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders replaced by the audio files below them (sorted)."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.suffix.lower() in AUDIO_SUFFIXES)
        else:
            files.append(path)
    return files


def _groups(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _output_path(output_dir: Path, audio: Path, fmt: str) -> Path:
    return output_dir / f"{audio.stem}.{_EXTENSION.get(fmt, fmt)}"


def build_pipeline(args: argparse.Namespace) -> TranscriptionPipeline:
    """Engines from the settings (the CLI is the one part of speech/ that reads them)."""
    from config.settings import get_settings
    from speech.asr import WhisperEngine

    settings = get_settings()
    engine = WhisperEngine(args.model or settings.WHISPER_MODEL_PATH,
                           device=args.device or settings.AI_DEVICE, cache_dir=settings.MODEL_CACHE_DIR)
    diarizer = None
    if args.diarize:
        from speech.diarization import DiarizationEngine

        diarizer = DiarizationEngine(settings.DIARIZATION_MODEL_PATH, device=engine.device,
                                     hf_token=settings.HF_TOKEN)
    limits = AudioLimits(max_bytes=settings.AUDIO_MAX_FILE_SIZE,
                         max_duration_s=settings.AUDIO_MAX_DURATION_S)
    return TranscriptionPipeline.local(engine, diarizer, limits=limits)


def request_from_args(args: argparse.Namespace) -> TranscriptionRequest:
    options = TranscribeOptions(language=args.language, task=args.task,
                                initial_prompt=args.initial_prompt,
                                word_timestamps=args.word_timestamps, beam_size=args.beam_size)
    hints = SpeakerHints(args.num_speakers, args.min_speakers, args.max_speakers)
    return TranscriptionRequest(options=options, diarize=args.diarize, speakers=hints)


def transcribe_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    files = expand_inputs(args.inputs)
    if not files:
        print("error: no audio files found", file=sys.stderr)
        return 2
    if len(files) > 1 and args.output_dir is None:
        print("error: several inputs need --output-dir", file=sys.stderr)
        return 2
    request = request_from_args(args)
    try:
        check_request(request)  # before any model loads
        pipeline = build_pipeline(args)
        pipeline.check(request)
    except SpeechError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    audio_seconds, failures = 0.0, 0
    languages: Counter[str] = Counter()
    bar = tqdm(total=len(files), unit="file", disable=args.quiet, file=sys.stderr)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    for group in _groups(files, FILES_PER_GROUP):
        decoded = []
        for path in group:
            try:
                decoded.append((path, pipeline.load(path)))
            except (SpeechError, OSError) as err:
                failures += 1
                print(f"error: {path}: {err}", file=sys.stderr)
                bar.update(1)
        if not decoded:
            continue
        transcripts = asyncio.run(pipeline.run_many(request, [a for _, a in decoded]))
        for (path, audio), transcript in zip(decoded, transcripts, strict=True):
            audio_seconds += len(audio) / SAMPLE_RATE
            languages[transcript.language] += 1
            text = render(transcript, args.format, file_id=path.stem)
            if args.output_dir is None:
                sys.stdout.write(text if text.endswith("\n") else text + "\n")
            else:
                _output_path(args.output_dir, path, args.format).write_text(text, encoding="utf-8")
            bar.update(1)
    bar.close()
    wall = time.perf_counter() - started
    if not args.quiet:
        rtf = audio_seconds / wall if wall > 0 else 0.0
        detected = ",".join(f"{lang}:{n}" for lang, n in languages.most_common()) or "-"
        print(
            f"files={len(files)} failed={failures} audio_s={audio_seconds:.1f} wall_s={wall:.1f} "
            f"real_time_factor={rtf:.1f}x language={detected}",
            file=sys.stderr,
        )
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    from config.logging_setup import configure_logging
    from config.settings import get_settings

    args = build_parser().parse_args(argv)
    configure_logging(get_settings().LOG_LEVEL if not getattr(args, "quiet", False) else "WARNING")
    if args.command == "transcribe":
        return transcribe_command(args)
    return 2
