"""Uploads are stored content-addressed, capped while streaming, and never left half-written."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from serve.errors import UploadTooLargeError
from serve.storage import audio_path, delete_audio, release_upload, save_stream


class CountingStream(io.RawIOBase):
    """An endless upload that counts how much of it was read."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = 1 << 16 if n is None or n < 0 else n
        self.read_bytes += n
        return b"\0" * n


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_upload_is_stored_under_its_sha256(tmp_path: Path) -> None:
    data = b"RIFF" + bytes(range(256)) * 100
    stored = save_stream(io.BytesIO(data), max_bytes=1 << 20, base_path=tmp_path)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data) and stored.created
    assert stored.path == audio_path(stored.sha256, tmp_path)
    assert stored.path.read_bytes() == data
    assert files_under(tmp_path) == [stored.path]


def test_identical_upload_is_stored_once_and_not_claimed_as_new(tmp_path: Path) -> None:
    first = save_stream(io.BytesIO(b"same bytes"), max_bytes=100, base_path=tmp_path)
    second = save_stream(io.BytesIO(b"same bytes"), max_bytes=100, base_path=tmp_path)
    assert first.path == second.path
    assert first.created and not second.created
    assert len(files_under(tmp_path)) == 1


def test_too_large_upload_stops_reading_at_the_cap_and_leaves_nothing(tmp_path: Path) -> None:
    stream = CountingStream()
    with pytest.raises(UploadTooLargeError) as info:
        save_stream(stream, max_bytes=3 << 20, base_path=tmp_path)
    assert info.value.status_code == 413 and info.value.param == "file"
    assert stream.read_bytes <= (3 << 20) + (1 << 20)  # at most one chunk past the cap
    assert files_under(tmp_path) == []


def test_upload_of_exactly_the_cap_is_accepted(tmp_path: Path) -> None:
    stored = save_stream(io.BytesIO(b"x" * 1000), max_bytes=1000, base_path=tmp_path)
    assert stored.size == 1000


def test_delete_audio_removes_the_file_and_its_empty_shard(tmp_path: Path) -> None:
    stored = save_stream(io.BytesIO(b"abc"), max_bytes=10, base_path=tmp_path)
    assert delete_audio(stored.sha256, base_path=tmp_path)
    assert not stored.path.exists() and not stored.path.parent.exists()
    assert not delete_audio(stored.sha256, base_path=tmp_path)


def test_concurrent_identical_uploads_keep_the_file_until_the_last_one_is_done(tmp_path: Path) -> None:
    first = save_stream(io.BytesIO(b"same"), max_bytes=10, base_path=tmp_path)
    second = save_stream(io.BytesIO(b"same"), max_bytes=10, base_path=tmp_path)
    assert not release_upload(first, keep=False, base_path=tmp_path)
    assert second.path.exists()
    assert release_upload(second, keep=False, base_path=tmp_path)
    assert files_under(tmp_path) == []


def test_audio_that_was_already_stored_is_never_deleted_by_a_request(tmp_path: Path) -> None:
    kept = save_stream(io.BytesIO(b"job audio"), max_bytes=20, base_path=tmp_path)
    release_upload(kept, keep=True, base_path=tmp_path)  # a job references it
    again = save_stream(io.BytesIO(b"job audio"), max_bytes=20, base_path=tmp_path)
    assert not again.created
    assert not release_upload(again, keep=False, base_path=tmp_path)
    assert kept.path.exists()
