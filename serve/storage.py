"""Uploaded audio on disk: streamed, size-capped while streaming, content-addressed.

An upload is copied chunk by chunk into a temporary file under `STORAGE_BASE_PATH/tmp` while
its SHA-256 is computed; past `max_bytes` the copy stops with a 413 and the temporary file is
removed. A complete upload is renamed to `audio/<sha[:2]>/<sha>`, so the same bytes are stored
once. `StoredAudio.created` says whether this upload created the file.

Identical bytes may be uploaded by concurrent requests. Within a process every `save_*` takes a
hold on the digest and `release_upload` drops it; the file is deleted only when the last holder
lets go without keeping it, and only if one of them created it (audio that was already stored,
e.g. by a job, is never deleted by a request). Across processes the jobs' database rows are the
references.

Storage is bounded by `STORAGE_QUOTA_BYTES` (0: unlimited): the bytes of stored audio plus the
uploads in progress, measured when an upload starts. An upload that would pass it stops with a
507 as soon as it does; so does one that meets a full disk (ENOSPC/EDQUOT) on the way. Either way
its temporary file is removed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from config.settings import get_settings
from serve.errors import InsufficientStorageError, UploadTooLargeError

CHUNK_BYTES = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

_holds_lock = threading.Lock()
_holds: dict[str, list] = {}
"""digest -> [requests holding it, whether one of them created the file]"""


class _Upload(Protocol):
    """What `save_upload` needs of FastAPI's `UploadFile`: a readable binary file."""

    file: BinaryIO


@dataclass(frozen=True)
class StoredAudio:
    path: Path
    sha256: str
    size: int
    created: bool = True
    """False when identical bytes were already stored (by an earlier request or job)."""


def audio_path(sha256: str, base_path: Path | None = None) -> Path:
    """Where the audio with this digest lives."""
    base = Path(base_path if base_path is not None else get_settings().STORAGE_BASE_PATH)
    return base / "audio" / sha256[:2] / sha256


async def save_upload(upload: _Upload, *, max_bytes: int, base_path: Path | None = None,
                      quota_bytes: int | None = None) -> StoredAudio:
    """Stream `upload` to storage; UploadTooLargeError (413) as soon as it passes `max_bytes`,
    InsufficientStorageError (507) as soon as storage would pass its quota or the disk is full."""
    return await asyncio.to_thread(save_stream, upload.file, max_bytes=max_bytes, base_path=base_path,
                                   quota_bytes=quota_bytes)


def storage_used_bytes(base_path: Path | None = None) -> int:
    """What the quota counts: bytes of stored audio (`audio/`) and uploads in progress (`tmp/`)."""
    base = Path(base_path if base_path is not None else get_settings().STORAGE_BASE_PATH)
    total = 0
    for top in (base / "audio", base / "tmp"):
        for root, _dirs, files in os.walk(top):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:  # deleted meanwhile (a finished upload, a purge)
                    pass
    return total


def _quota_error(quota: int) -> InsufficientStorageError:
    return InsufficientStorageError(
        f"The service's audio storage is full: this upload would pass its quota of {quota} bytes. "
        "Retry after finished jobs are deleted, or ask the operator to raise STORAGE_QUOTA_BYTES.")


def save_stream(stream: BinaryIO, *, max_bytes: int, base_path: Path | None = None,
                quota_bytes: int | None = None) -> StoredAudio:
    """Blocking core of `save_upload`, also usable for any binary stream (jobs, CLI).

    `quota_bytes` defaults to STORAGE_QUOTA_BYTES (0: unlimited)."""
    try:
        return _save_stream(stream, max_bytes=max_bytes, base_path=base_path, quota_bytes=quota_bytes)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise InsufficientStorageError(
                "The service's audio storage is out of disk space; the upload was not stored. "
                "Retry later.") from exc
        raise


def _save_stream(stream: BinaryIO, *, max_bytes: int, base_path: Path | None,
                 quota_bytes: int | None) -> StoredAudio:
    settings = get_settings()
    base = Path(base_path if base_path is not None else settings.STORAGE_BASE_PATH)
    quota = settings.STORAGE_QUOTA_BYTES if quota_bytes is None else quota_bytes
    room = quota - storage_used_bytes(base) if quota else None
    if room is not None and room <= 0:
        raise _quota_error(quota)
    tmp_dir = base / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(prefix="upload-", dir=tmp_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLargeError(max_bytes)
                if room is not None and size > room:
                    raise _quota_error(quota)
                digest.update(chunk)
                out.write(chunk)
        sha = digest.hexdigest()
        final = audio_path(sha, base)
        with _holds_lock:
            final.parent.mkdir(parents=True, exist_ok=True)
            created = not final.exists()
            if created:
                os.replace(tmp, final)
            hold = _holds.setdefault(sha, [0, False])
            hold[0] += 1
            hold[1] = hold[1] or created
        return StoredAudio(path=final, sha256=sha, size=size, created=created)
    finally:
        tmp.unlink(missing_ok=True)


def release_upload(stored: StoredAudio, *, keep: bool, base_path: Path | None = None) -> bool:
    """Drop this request's hold on `stored`; True if the file was deleted.

    `keep=True` when something durable (a job row) now references the audio.
    """
    with _holds_lock:
        hold = _holds.get(stored.sha256)
        if hold is None:
            return False
        hold[0] -= 1
        if keep:
            hold[1] = False  # referenced now: no request may delete it
        if hold[0] > 0:
            return False
        del _holds[stored.sha256]
        if not hold[1]:
            return False
        return delete_audio(stored.sha256, base_path=base_path)


def delete_audio(sha256: str, *, base_path: Path | None = None) -> bool:
    """Remove stored audio; True if a file was removed."""
    path = audio_path(sha256, base_path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    try:
        path.parent.rmdir()  # only succeeds when the shard directory is now empty
    except OSError:
        pass
    return True
