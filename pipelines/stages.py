"""The Ray Data stages of a bulk run, one small callable per stage (STYLE.md, Ray Data notes).

Rows carry one window each (or one file-level row for a file that failed, was skipped, or has
no speech), so the Whisper actors batch windows of many files together:

    decode_files (CPU tasks: read, sha256, decode[, split])
      [-> DiarizeStage (actor pool: turns per file) -> split_files (CPU tasks)]
      -> WhisperStage (actor pool: `WhisperEngine.transcribe_windows` over a batch of windows)

The driver puts each file's windows back together (`pipelines.assemble`, with
`speech.pipeline.assemble`: the steps are speech's, only their placement is Ray Data's). Columns are plain
typed values (str, int, float, bytes) so every block converts to Arrow without surprises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from functools import lru_cache
from typing import Any

import numpy as np

from speech.asr import resolve_device
from speech.audio import AudioLimits, load_audio
from speech.request import SpeakerHints
from speech.types import SAMPLE_RATE, Segment, SpeakerTurn, TranscribeOptions, Window, WindowResult, Word
from speech.windowing import WindowPlanner, vad_kind_for

log = logging.getLogger(__name__)

WINDOW_BYTES = 30 * SAMPLE_RATE * 4
"""Bytes of one full window's samples (float32): what a window row weighs in a block."""

FILE_ROW = -1
"""`window_index` of a row that stands for a whole file (failed, skipped, silent, or not yet split)."""

COLUMNS: dict[str, Any] = {
    "path": "", "sha256": "", "size": 0, "status": "ok", "error": "", "error_code": "",
    "duration_s": 0.0, "n_windows": 0, "window_index": FILE_ROW, "offset_s": 0.0, "n_samples": 0,
    "samples": b"", "speech": "", "turns": "", "result": "", "decode_s": 0.0, "model_s": 0.0,
}
"""Every row has every column; the value here is what a row that does not use it holds."""


def to_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> a columnar batch with a fixed schema (empty batches keep their columns)."""
    out: dict[str, np.ndarray] = {}
    for name, default in COLUMNS.items():
        values = [row.get(name, default) for row in rows]
        if isinstance(default, (str, bytes)):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
        else:
            out[name] = np.asarray(values, dtype=np.int64 if isinstance(default, int) else np.float64)
    return out


def to_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{k: _plain(batch[k][i]) for k in names} for i in range(n)]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def failure(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """The file-level row of a file that failed: the reason kept, the audio dropped."""
    code = getattr(exc, "code", None) or type(exc).__name__
    return {**row, "status": "failed", "error": str(exc) or type(exc).__name__, "error_code": code,
            "window_index": FILE_ROW, "n_windows": 0, "samples": b"", "n_samples": 0}


# ------------------------------------------------------------------------------- decoding
def decode_files(
    batch: dict[str, np.ndarray],
    *,
    done: frozenset[str],
    options: TranscribeOptions,
    device: str,
    limits: AudioLimits,
    split: bool,
) -> dict[str, np.ndarray]:
    """Read, hash and decode each file; with `split`, also cut it into windows (one row each).

    A file whose sha256 is in `done` is not decoded (row status `skipped`). Any error of one file
    becomes that file's `failed` row; the batch goes on.
    """
    from pipelines.inputs import read_bytes

    out: list[dict[str, Any]] = []
    for path in batch["path"]:
        row: dict[str, Any] = {"path": str(path)}
        started = time.perf_counter()
        first = len(out)
        try:
            data = read_bytes(row["path"])
            row.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
            if row["sha256"] in done:
                out.append({**row, "status": "skipped"})
                continue
            audio = load_audio(data, limits)
            del data
            row["duration_s"] = len(audio) / SAMPLE_RATE
            if split:
                out.extend(window_rows(row, audio, options, device=device))
            else:
                out.append({**row, "samples": audio.tobytes(), "n_samples": len(audio)})
        except Exception as exc:  # noqa: BLE001 - one bad file is recorded, never stops the batch
            out.append(failure(row, exc))
        finally:
            out[first]["decode_s"] = time.perf_counter() - started  # on the file's first row only
    return to_columns(out)


def split_files(
    batch: dict[str, np.ndarray], *, options: TranscribeOptions, device: str
) -> dict[str, np.ndarray]:
    """File rows holding the whole decoded audio -> one row per window (after diarization)."""
    out: list[dict[str, Any]] = []
    for row in to_rows(batch):
        if row["status"] != "ok":
            out.append(row)
            continue
        first = len(out)
        try:
            audio = np.frombuffer(row["samples"], dtype=np.float32)
            out.extend(window_rows(row, audio, options, device=device))
        except Exception as exc:  # noqa: BLE001
            out.append(failure(row, exc))
        out[first]["decode_s"] = row["decode_s"]  # counted once per file
    return to_columns(out)


@lru_cache(maxsize=4)
def _planner(device: str) -> WindowPlanner:
    """The planner the Whisper engine on `device` would use (same VAD), without its model."""
    planner = WindowPlanner(vad_kind_for(resolve_device(device)))
    planner.load()
    return planner


def window_rows(
    row: dict[str, Any], audio: np.ndarray, options: TranscribeOptions, *, device: str
) -> list[dict[str, Any]]:
    """One row per window of `WindowPlanner.plan`: the samples, the offset and the speech the
    VAD heard in the window (the engine snaps word onsets to it and decodes again what a
    segment skipped over, so without it the text and times differ)."""
    windows = _planner(device).plan(audio, options)
    base = {**row, "n_windows": len(windows), "samples": b"", "n_samples": 0, "decode_s": 0.0}
    if not windows:
        return [{**base, "window_index": FILE_ROW}]  # no speech: an empty transcript, no model time
    return [
        {**base, "window_index": w.index, "offset_s": w.offset_s, "n_samples": len(w.samples),
         "samples": w.samples.tobytes(), "speech": json.dumps(w.speech)}
        for w in windows
    ]


def speech_from_json(text: str) -> tuple[tuple[float, float], ...]:
    return tuple((a, b) for a, b in json.loads(text)) if text else ()


# ---------------------------------------------------------------------------- transcription
def result_to_json(result: WindowResult) -> str:
    return json.dumps({"language": result.language, "language_probs": result.language_probs,
                       "segments": [dataclasses.asdict(s) for s in result.segments]})


def result_from_json(text: str) -> WindowResult:
    data = json.loads(text)
    segments = [Segment(**{**s, "words": [Word(**w) for w in s.get("words", [])]}) for s in data["segments"]]
    return WindowResult(language=data["language"], segments=segments,
                        language_probs=data.get("language_probs"))


class WhisperStage:
    """One Whisper engine per actor, loaded once; each call is one batch of windows from many files."""

    def __init__(self, *, model: str, device: str, cache_dir: str | None, batch_windows: int,
                 options: TranscribeOptions, threads: int | None = None) -> None:
        import torch

        from speech.asr import WhisperEngine

        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP threads to the actor's logical CPUs
        self.engine = WhisperEngine(model, device=device, cache_dir=cache_dir, max_batch_size=batch_windows)
        self.engine.load()
        self.engine.check_options(options)
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = to_rows(batch)
        work = [r for r in rows if r["status"] == "ok" and r["window_index"] != FILE_ROW]
        if work:
            windows = [
                Window(np.frombuffer(r["samples"], dtype=np.float32), r["offset_s"], self.options, r["window_index"],
                       speech_from_json(r["speech"]))
                for r in work
            ]
            try:
                started = time.perf_counter()
                results = self.engine.transcribe_windows(windows)
                share = (time.perf_counter() - started) / len(work)  # the batch's time, per window
                for r, res in zip(work, results, strict=True):
                    r["result"], r["model_s"] = result_to_json(res), share
            except Exception as exc:  # noqa: BLE001 - the files of this batch fail, the run goes on
                log.exception("transcription of a batch of %d windows failed", len(work))
                for r in work:
                    r.update(failure(r, exc))
        for r in rows:
            r["samples"], r["speech"] = b"", ""
        return to_columns(rows)


# ----------------------------------------------------------------------------- diarization
class DiarizeStage:
    """One diarization engine per actor; each call diarizes whole files (turns as JSON)."""

    def __init__(self, *, spec: str, device: str, hf_token: str | None, hints: SpeakerHints,
                 threads: int | None = None) -> None:
        import torch

        from speech.diarization import DiarizationEngine

        if threads:
            torch.set_num_threads(threads)
        self.engine = DiarizationEngine(spec, device=device, hf_token=hf_token)
        self.engine.load()
        self.hints = hints

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = to_rows(batch)
        for i, r in enumerate(rows):
            if r["status"] != "ok":
                continue
            try:
                audio = np.frombuffer(r["samples"], dtype=np.float32)
                turns = self.engine.diarize(audio, **self.hints.as_kwargs())
                r["turns"] = json.dumps([dataclasses.asdict(t) for t in turns])
            except Exception as exc:  # noqa: BLE001
                rows[i] = failure(r, exc)
        return to_columns(rows)


def turns_from_json(text: str) -> list[SpeakerTurn] | None:
    return None if not text else [SpeakerTurn(**t) for t in json.loads(text)]
