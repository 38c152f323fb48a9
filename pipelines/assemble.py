"""Windows back into one transcript per file, in the driver, as soon as a file's last window lands.

Putting a file together is `speech.pipeline.assemble` itself (stitch, then the speaker merge:
the code every other entry point runs): it needs each window's offset and length and the
file's length, not the samples, so zero-cost stand-ins (`np.broadcast_to`) take their place. Doing it in the driver rather than in
a groupby keeps the run streaming: a file is written (and safe from a crash) the moment it is
done, instead of after an all-to-all shuffle of every window of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.records import FileRecord
from pipelines.stages import FILE_ROW, result_from_json, turns_from_json
from speech.pipeline import assemble
from speech.request import TranscriptionRequest
from speech.types import Window


def _stand_in(n_samples: int) -> np.ndarray:
    """An array of the right length that owns no memory (stitch reads lengths only)."""
    return np.broadcast_to(np.float32(0.0), (n_samples,))


@dataclass
class _Pending:
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)


class Assembler:
    def __init__(self, *, request: TranscriptionRequest, run_key: str) -> None:
        self.request = request
        self.run_key = run_key
        self._pending: dict[str, _Pending] = {}

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def add(self, row: dict[str, Any]) -> FileRecord | None:
        """Take one row; returns the file's record when this row completes it (skipped files: None)."""
        path = row["path"]
        if row["status"] == "skipped":
            return None
        if row["status"] == "failed":
            self._pending.pop(path, None)  # a failed batch fails its file, whatever else arrived
            return FileRecord.failed(path=path, sha256=row["sha256"], size=row["size"], error=row["error"],
                                     error_code=row["error_code"], run_key=self.run_key)
        if row["window_index"] == FILE_ROW:  # decoded, no speech in it
            return self._finish(row, [])
        pending = self._pending.setdefault(path, _Pending())
        pending.rows[row["window_index"]] = row
        if len(pending.rows) < row["n_windows"]:
            return None
        del self._pending[path]
        return self._finish(row, [pending.rows[i] for i in range(row["n_windows"])])

    def _finish(self, row: dict[str, Any], window_rows: list[dict[str, Any]]) -> FileRecord:
        windows = [Window(_stand_in(r["n_samples"]), r["offset_s"], self.request.asr_options, r["window_index"])
                   for r in window_rows]
        results = [result_from_json(r["result"]) for r in window_rows]
        transcript = assemble(self.request, row["duration_s"], windows, results, turns_from_json(row["turns"]))
        return FileRecord.succeeded(path=row["path"], sha256=row["sha256"], size=row["size"],
                                    transcript=transcript, run_key=self.run_key)
