"""One record per input file, the JSON Lines output, and the per-file subtitle files.

The output is append-only while a run goes on (each line flushed as its file finishes, so an
interrupted run keeps everything it finished) and compacted to one line per path at the end.
A later run reads it back to skip what is already done.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from speech.types import Transcript

RESULTS_NAME = "results.jsonl"
"""The file written inside --output when --output is a folder."""


@dataclass
class FileRecord:
    """What a run did with one input file (a line of the JSONL output)."""

    path: str
    sha256: str | None
    status: str
    """`succeeded` or `failed`."""
    error: str | None
    language: str | None
    duration: float | None
    segments: list[dict[str, Any]]
    run_key: str
    """Model, options and diarization of the run that produced it: what resuming compares."""
    error_code: str | None = None
    size: int | None = None
    text: str = ""
    speakers: list[dict[str, Any]] | None = None
    task: str = "transcribe"
    mtime_ns: int | None = None
    """Local files: modification time when read, for the quick check that skips re-hashing."""
    finished_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def succeeded(cls, *, path: str, sha256: str, size: int, transcript: Transcript, run_key: str) -> FileRecord:
        d = transcript.to_dict()
        return cls(path=path, sha256=sha256, size=size, status="succeeded", error=None,
                   language=transcript.language, duration=transcript.duration, segments=d["segments"],
                   text=transcript.text, speakers=d["speakers"], task=transcript.task, run_key=run_key)

    @classmethod
    def failed(cls, *, path: str, sha256: str | None, size: int | None, error: str, error_code: str,
               run_key: str) -> FileRecord:
        return cls(path=path, sha256=sha256 or None, size=size, status="failed", error=error,
                   error_code=error_code, language=None, duration=None, segments=[], run_key=run_key)

    def transcript(self) -> Transcript:
        """The engine's Transcript back (succeeded records only)."""
        return Transcript.from_dict({"language": self.language, "duration": self.duration,
                                     "segments": self.segments, "task": self.task, "speakers": self.speakers})

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> FileRecord:
        data = json.loads(line)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def resolve_output(output: str) -> Path:
    """--output as the JSONL file: a path ending in .jsonl, else a folder holding results.jsonl."""
    path = Path(output)
    if path.suffix == ".jsonl":
        return path
    return path / RESULTS_NAME


def read_records(path: Path) -> dict[str, FileRecord]:
    """The last record per input path of an earlier run (a torn last line is ignored)."""
    records: dict[str, FileRecord] = {}
    if not path.exists():
        return records
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = FileRecord.from_json(line)
            except (ValueError, TypeError):
                continue  # an interrupted write
            records[rec.path] = rec
    return records


class JsonlWriter:
    """Appends records as files finish (flushed each time); `compact` leaves one line per path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: FileRecord) -> None:
        self._fh.write(record.to_json() + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def compact(self) -> None:
        records = read_records(self.path)
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for path in sorted(records):
                fh.write(records[path].to_json() + "\n")
        os.replace(tmp, self.path)


def subtitle_path(out_dir: Path, input_path: str, root: str | None, fmt: str) -> Path:
    """Where the per-file `fmt` output of an input goes: its path under the input root, mirrored."""
    name = input_path.split("://", 1)[-1]
    if root and input_path.startswith(root):
        rel = input_path[len(root):].lstrip("/")
    else:
        rel = os.path.basename(name)
    return out_dir / f"{rel}.{fmt}"


def write_formats(record: FileRecord, formats: list[str], out_dir: Path, root: str | None) -> None:
    from speech.formats import render

    if record.status != "succeeded" or not formats:
        return
    transcript = record.transcript()
    for fmt in formats:
        target = subtitle_path(out_dir, record.path, root, fmt)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(transcript, fmt, file_id=Path(record.path).stem), encoding="utf-8")
