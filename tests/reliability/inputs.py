"""Hostile inputs for the reliability suite, and the checks that a refused one left nothing behind.

- `multipart()`: a multipart/form-data body built by hand. httpx percent-escapes control
  characters and quotes in file names; a hostile client does not, so neither do these tests.
- `flac_silence()`: a real FLAC of silence, any length, in a few bytes per 7 s (CONSTANT
  subframes), so that a six-hour recording fits far under the upload limit and decodes.
- `Snapshot`: what a request may leave behind (stored audio, temporary uploads, job rows, and the
  segment and word rows of jobs that did not exist before), taken before a request and compared
  after it.
- `replica_pids()` / `rss_bytes()`: the service's own Serve processes (only those of this stack's
  session: other stacks may run on the same machine) and their resident memory.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from tests.reliability.support import Stack, Caller

TRANSCRIBE = "/v1/audio/transcriptions"
JOBS = "/v1/jobs"
BOUNDARY = "reliabilityBoundary7MA4YWxk"


# --------------------------------------------------------------------------- request bodies
def multipart(fields: dict[str, str | bytes], file: tuple[str | bytes, bytes] | None = None,
              ) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a multipart form with `fields` and, when given, a `file` part whose
    name goes on the wire byte for byte."""
    out = b""
    for key, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n".encode()
                + data + b"\r\n")
    if file is not None:
        name, data = file
        raw = name.encode() if isinstance(name, str) else name
        out += (f"--{BOUNDARY}\r\n".encode()
                + b'Content-Disposition: form-data; name="file"; filename="' + raw + b'"\r\n'
                + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    out += f"--{BOUNDARY}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def multipart_head(fields: dict[str, str], filename: str = "upload.wav") -> bytes:
    """The start of a multipart body up to the file's bytes (for streamed and stalled bodies)."""
    out = b""
    for key, value in fields.items():
        out += f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n".encode()
    return out + (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                  f"filename=\"{filename}\"\r\nContent-Type: audio/wav\r\n\r\n").encode()


def post_form(stack: Stack, path: str, user: Caller | None, fields: dict[str, str | bytes],
              file: tuple[str | bytes, bytes] | None, timeout_s: float = 120) -> httpx.Response:
    body, headers = multipart(fields, file)
    if user is not None:
        headers.update(user.headers)
    return httpx.post(stack.url(path), content=body, headers=headers, timeout=timeout_s)


# --------------------------------------------------------------------------- audio
def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def flac_silence(seconds: float, rate: int = 8_000, block: int = 57_600) -> bytes:
    """A valid 16-bit mono FLAC of `seconds` of digital silence: STREAMINFO with the true length,
    then one frame of `block` samples per CONSTANT subframe (11 bytes a frame). FFmpeg decodes it
    to the end; six hours take 43 kB. (FFmpeg's own encoder spends 300 bytes a frame on silence.)"""
    rate_codes = {8_000: 0x4, 16_000: 0x5, 22_050: 0x6, 24_000: 0x7, 32_000: 0x8, 44_100: 0x9,
                  48_000: 0xA}
    total = int(seconds * rate)
    streaminfo = struct.pack(">HH", block, block) + bytes(6)  # frame sizes: unknown
    streaminfo += ((rate << 44) | (0 << 41) | (15 << 36) | total).to_bytes(8, "big") + bytes(16)
    parts = [b"fLaC", bytes([0x80, 0, 0, len(streaminfo)]), streaminfo]
    number, left = 0, total
    while left > 0:
        n = min(block, left)
        # sync + fixed blocking; block size: 16 bits at the end; rate; mono, 16-bit samples
        head = (bytes([0xFF, 0xF8, 0x70 | rate_codes[rate], 0x08])
                + chr(number).encode("utf-8", "surrogatepass") + struct.pack(">H", n - 1))
        frame = head + bytes([_crc8(head)]) + b"\x00" + b"\x00\x00"  # CONSTANT subframe of 0
        parts.append(frame + struct.pack(">H", _crc16(frame)))
        number, left = number + 1, left - n
    return b"".join(parts)


# --------------------------------------------------------------------------- what is left behind
def _audio_files(stack: Stack) -> frozenset[Path]:
    """Stored audio and temporary uploads: what a request may add to storage."""
    found: set[Path] = set()
    for top in (stack.storage / "audio", stack.storage / "tmp"):
        if top.exists():
            found.update(p for p in top.rglob("*") if p.is_file())
    return frozenset(found)


@dataclass(frozen=True)
class Snapshot:
    files: frozenset[Path]
    jobs: frozenset[str]

    @classmethod
    def take(cls, stack: Stack) -> Snapshot:
        from db.models import Job
        from db.session import session_scope

        with session_scope(stack.db_url) as session:
            jobs = frozenset(session.scalars(select(Job.id)))
        return cls(files=_audio_files(stack), jobs=jobs)

    def new_rows(self, stack: Stack) -> dict[str, int]:
        """Rows added since: jobs, and segments and words of jobs that were not there."""
        from db.models import Job, SegmentRow, WordRow
        from db.session import session_scope

        with session_scope(stack.db_url) as session:
            jobs = session.scalar(select(func.count()).select_from(Job)
                                  .where(Job.id.not_in(self.jobs))) or 0
            segments = session.scalar(select(func.count()).select_from(SegmentRow)
                                      .where(SegmentRow.job_id.not_in(self.jobs))) or 0
            words = session.scalar(
                select(func.count()).select_from(WordRow).join(SegmentRow,
                                                               WordRow.segment_id == SegmentRow.id,
                                                               isouter=True)
                .where((SegmentRow.id.is_(None)) | SegmentRow.job_id.not_in(self.jobs))) or 0
        return {"jobs": jobs, "segments": segments, "words": words}

    def assert_nothing_left(self, stack: Stack, case: str) -> None:
        """No file added to storage (none half-written in tmp/ either) and no row added."""
        added = sorted(str(p.relative_to(stack.storage)) for p in _audio_files(stack) - self.files)
        assert not added, f"{case}: left files in storage: {added}"
        rows = self.new_rows(stack)
        assert rows == {"jobs": 0, "segments": 0, "words": 0}, f"{case}: left rows: {rows}"


# --------------------------------------------------------------------------- jobs
def wait_for_job(stack: Stack, user: Caller, job_id: str, timeout_s: float = 180) -> dict[str, Any]:
    """The job once it has finished (any final status)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(stack.url(f"{JOBS}/{job_id}"), headers=user.headers, timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout_s} s"
        time.sleep(0.5)


def delete_job(stack: Stack, user: Caller, job_id: str) -> None:
    response = httpx.delete(stack.url(f"{JOBS}/{job_id}"), headers=user.headers, timeout=30)
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- processes
def replica_pids(stack: Stack, deployment: str) -> list[int]:
    """Pids of the live replica processes of `deployment` in this stack's process session."""
    assert stack.service.proc is not None
    session = stack.service.proc.pid  # started with start_new_session: its pid is the session id
    title = f"ray::ServeReplica:speech:{deployment}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ProcessLookupError):
            continue
        if cmdline.startswith(title):
            pids.append(int(entry.name))
    return pids


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
