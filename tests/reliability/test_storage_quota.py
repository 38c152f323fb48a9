"""The "fill the storage" fault: a quota (STORAGE_QUOTA_BYTES) and a full disk are a 507 that
leaves nothing behind.

On serve/storage.py directly: the quota stops an upload as soon as it would pass it, a storage
already at its quota refuses before reading anything, and a real full disk (a 256 KiB tmpfs,
mounted in a private mount namespace of a child process so nothing leaks onto the machine) is a
507 too, with the partial file removed. End to end: the stack runs with a quota far above what
the suite stores; a sparse file fills storage up to it, and both upload routes answer 507.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from serve.errors import InsufficientStorageError
from serve.storage import save_stream, storage_used_bytes
from tests.reliability.inputs import JOBS, TRANSCRIBE, Snapshot, delete_job, post_form
from tests.reliability.support import JFK, ROOT, STORAGE_QUOTA_BYTES

def _files(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- serve/storage.py
def test_an_upload_that_would_pass_the_quota_stops_with_507_and_leaves_only_what_was_there(
        tmp_path: Path) -> None:
    first = save_stream(io.BytesIO(b"a" * 6000), max_bytes=1 << 20, base_path=tmp_path,
                        quota_bytes=10_000)
    assert storage_used_bytes(tmp_path) == 6000
    with pytest.raises(InsufficientStorageError) as refused:
        save_stream(io.BytesIO(b"b" * 5000), max_bytes=1 << 20, base_path=tmp_path,
                    quota_bytes=10_000)
    assert refused.value.status_code == 507 and refused.value.code == "insufficient_storage"
    assert "quota" in refused.value.message
    assert _files(tmp_path) == [str(first.path.relative_to(tmp_path))]


def test_uploads_that_fill_the_quota_exactly_are_stored(tmp_path: Path) -> None:
    save_stream(io.BytesIO(b"a" * 6000), max_bytes=1 << 20, base_path=tmp_path, quota_bytes=10_000)
    save_stream(io.BytesIO(b"b" * 4000), max_bytes=1 << 20, base_path=tmp_path, quota_bytes=10_000)
    assert storage_used_bytes(tmp_path) == 10_000


def test_storage_at_its_quota_refuses_before_reading_the_upload(tmp_path: Path) -> None:
    save_stream(io.BytesIO(b"a" * 100), max_bytes=1000, base_path=tmp_path, quota_bytes=100)
    stream = io.BytesIO(b"c" * 10)
    with pytest.raises(InsufficientStorageError):
        save_stream(stream, max_bytes=1000, base_path=tmp_path, quota_bytes=100)
    assert stream.tell() == 0
    assert not list((tmp_path / "tmp").iterdir())


def test_uploads_in_progress_count_against_the_quota(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "upload-in-progress").write_bytes(b"x" * 900)
    with pytest.raises(InsufficientStorageError):
        save_stream(io.BytesIO(b"y" * 200), max_bytes=1000, base_path=tmp_path, quota_bytes=1000)


def test_a_quota_of_zero_means_unlimited(tmp_path: Path) -> None:
    stored = save_stream(io.BytesIO(b"z" * 50_000), max_bytes=1 << 20, base_path=tmp_path,
                         quota_bytes=0)
    assert stored.size == 50_000


_DISK_FULL_CHILD = textwrap.dedent("""
    import io, json, os, subprocess, sys
    from pathlib import Path
    mount = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        from serve.errors import InsufficientStorageError
        from serve.storage import save_stream
        try:
            save_stream(io.BytesIO(os.urandom(1 << 20)), max_bytes=8 << 20, base_path=mount,
                        quota_bytes=0)
            outcome = {"status": None}
        except InsufficientStorageError as exc:
            outcome = {"status": exc.status_code, "code": exc.code, "message": exc.message,
                       "cause": type(exc.__cause__).__name__,
                       "errno": getattr(exc.__cause__, "errno", None)}
        outcome["files"] = [str(p) for p in mount.rglob("*") if p.is_file()]
        print(json.dumps(outcome))
    finally:
        subprocess.run(["umount", str(mount)], check=False)
""")


def test_a_full_disk_while_writing_is_a_507_and_the_partial_file_is_removed(tmp_path: Path) -> None:
    """A real ENOSPC: a 256 KiB tmpfs as storage and a 1 MiB upload, in a child process with a
    mount namespace of its own (the mount vanishes with it)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("issue 6: environment only, needs root and unshare(1) to mount a small tmpfs in a private namespace")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([unshare, "--mount", "--propagation", "private", sys.executable, "-c",
                           _DISK_FULL_CHILD, str(mount)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0 and "mount" in done.stderr and "permission" in done.stderr.lower():
        pytest.skip(f"issue 6: environment only, mounting a tmpfs is not permitted here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 507, outcome
    assert outcome["code"] == "insufficient_storage" and outcome["errno"] == 28, outcome  # ENOSPC
    assert outcome["files"] == [], "the partial upload was left on the full disk"
    assert not any(mount.iterdir()), "the tmpfs leaked out of the child's mount namespace"


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("route", ["sync", "job"])
def test_an_upload_past_the_storage_quota_is_a_507_and_leaves_nothing(stack, route: str) -> None:  # noqa: ANN001
    """Storage filled to 1 KiB under the quota (a sparse file: no real disk used); a 300 kB clip
    is then refused with 507 on both routes; with the filler gone the same upload is taken."""
    audio = JFK.read_bytes()
    before = Snapshot.take(stack)
    used = storage_used_bytes(stack.storage)
    filler = stack.storage / "audio" / "zz" / "quota-filler"
    filler.parent.mkdir(parents=True, exist_ok=True)
    try:
        with filler.open("wb") as f:
            f.truncate(STORAGE_QUOTA_BYTES - used - 1024)
        before = Snapshot(files=before.files | {filler}, jobs=before.jobs)
        path, fields = (TRANSCRIBE, {"model": "whisper-1"}) if route == "sync" else (JOBS, {})
        stack.ledger.fault("storage filled to its quota")
        response = post_form(stack, path, stack.alice, fields, ("jfk.flac", audio))
        # a bad input answered as it must (507), not counted with the requests: the table's
        # "5xx other than 503" row is for answers nobody asked for
        stack.ledger.bad_input(f"{route}: upload past the storage quota", 507, response.status_code)
        if response.status_code != 507:
            stack.ledger.request(response.status_code)
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_storage" and error["param"] == "file", error
        assert "quota" in error["message"]
        before.assert_nothing_left(stack, f"{route} past the quota")
    finally:
        filler.unlink(missing_ok=True)
        try:
            filler.parent.rmdir()
        except OSError:
            pass
    if route == "job":  # room again: the same upload is queued (and removed again)
        again = post_form(stack, JOBS, stack.alice, {}, ("jfk.flac", audio))
        stack.ledger.request(again.status_code)
        assert again.status_code == 202, again.text
        httpx.post(stack.url(f"{JOBS}/{again.json()['id']}/cancel"), headers=stack.alice.headers,
                   timeout=30)
        delete_job(stack, stack.alice, again.json()["id"])
