"""Hostile input against the production-shaped stack, on the synchronous route and on job
submission: every case gets the status a production API owes it, and leaves nothing behind.

Statuses (as tests/serve/test_errors.py has them on a bare app): 400 for what does not decode and
for invalid options, 413 for a body past AUDIO_MAX_FILE_SIZE (while it streams), 408 for an
upload that stalls, 200 (sync) / 202 (job) for odd but real audio, which the engine's documented
policy decodes (a cut file decodes what arrived; any channel count and rate is downmixed and
resampled). No content type is refused as such (no 415): what matters is what the bytes are.

After every case: no file added to storage (none half-written in tmp/), no job, segment or word
row added. Accepted cases are followed to their end (a sync request is recorded as a succeeded
job; a job must succeed), then deleted through the API, and the same check runs.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.reliability.inputs import (
    BOUNDARY,
    JOBS,
    TRANSCRIBE,
    Snapshot,
    delete_job,
    flac_silence,
    multipart_head,
    post_form,
    replica_pids,
    rss_bytes,
    wait_for_job,
)
from tests.reliability.support import (
    JFK,
    MAX_DURATION_S,
    MAX_UPLOAD_BYTES,
    UPLOAD_STALL_TIMEOUT_S,
    Stack,
)
from tests.speech import audio_factory as af

ROUTES = ("sync", "job")


# --------------------------------------------------------------------------- inputs
@lru_cache(maxsize=1)
def _jfk() -> bytes:
    return JFK.read_bytes()


@lru_cache(maxsize=1)
def _mp3() -> bytes:
    return af.jfk_as("mp3")  # encoded with PyAV's libmp3lame


@lru_cache(maxsize=1)
def _clip() -> bytes:
    """Two seconds of speech as 16 kHz mono WAV: the audio of the file-name cases."""
    return af.jfk_resampled(16_000, 1, "wav", seconds=2.0)


@dataclass(frozen=True)
class Case:
    id: str
    file: Callable[[], tuple[str | bytes, bytes]]
    sync: int
    job: int
    fields: dict[str, str] = field(default_factory=dict)
    code: str | None = None
    """The error code a refusal must carry (None: any)."""
    param: str | None = "file"
    """The parameter a refusal must name."""
    filename: str | None = None
    """For accepted uploads: the name the job must record."""


CASES = [
    # not audio at all
    Case("empty-file", lambda: ("empty.wav", b""), 400, 400, code="empty_audio"),
    Case("one-byte", lambda: ("one.wav", b"\x00"), 400, 400, code="not_audio"),
    Case("random-bytes-named-wav", lambda: ("noise.wav", af.random_bytes()), 400, 400,
         code="not_audio"),
    Case("png-renamed-to-wav", lambda: ("photo.wav", af.png_image()), 400, 400, code="not_audio"),
    Case("zip-renamed-to-mp3", lambda: ("archive.mp3", af.zip_file()), 400, 400, code="not_audio"),
    # cut short: refused when nothing decodes, decoded up to the cut otherwise (engine policy)
    Case("flac-cut-inside-its-header", lambda: ("cut.flac", _jfk()[:100]), 400, 400,
         code="corrupt_audio"),
    Case("mp3-cut-after-300-bytes", lambda: ("cut.mp3", _mp3()[:300]), 400, 400,
         code="corrupt_audio"),
    Case("flac-cut-in-half", lambda: ("half.flac", af.truncated(_jfk(), 0.5)), 200, 202,
         filename="half.flac"),
    Case("mp3-cut-in-half", lambda: ("half.mp3", af.truncated(_mp3(), 0.5)), 200, 202,
         filename="half.mp3"),
    # headers that lie or are odd
    Case("wav-header-claiming-4-gb",
         lambda: ("huge.wav", af.wav_header(data_bytes=4_000_000_000, payload=bytes(32_000))),
         200, 202, filename="huge.wav"),
    Case("wav-with-0-channels",
         lambda: ("none.wav", af.wav_header(data_bytes=32_000, channels=0, payload=bytes(32_000))),
         400, 400, code="corrupt_audio"),
    Case("wav-with-8-channels", lambda: ("eight.wav", af.jfk_resampled(16_000, 8, seconds=1.5)),
         200, 202, filename="eight.wav"),
    Case("wav-at-192-khz", lambda: ("hires.wav", af.jfk_resampled(192_000, 1, seconds=1.5)),
         200, 202, filename="hires.wav"),
    # file names: metadata only (audio is stored by its digest); cleaned before they are kept
    Case("name-with-path-traversal", lambda: ("../../etc/passwd.wav", _clip()), 200, 202,
         filename="passwd.wav"),
    Case("name-with-nul", lambda: (b"clip\x00.wav", _clip()), 200, 202, filename="clip.wav"),
    Case("name-with-control-characters", lambda: (b"cl\x01ip\x1b[31m\x7f.wav", _clip()), 200, 202,
         filename="clip[31m.wav"),
    Case("name-with-right-to-left-override", lambda: ("\u202egnp.wav", _clip()), 200, 202,
         filename="gnp.wav"),
    Case("name-of-1000-characters", lambda: ("n" * 996 + ".wav", _clip()), 200, 202,
         filename="n" * 255),
    Case("name-of-64-kib", lambda: ("n" * 65_536 + ".wav", _clip()), 400, 400, param=None),
    # form fields
    Case("prompt-of-1-mb", lambda: ("clip.wav", _clip()), 400, 400, fields={"prompt": "p" * 2**20},
         param="prompt"),
    Case("language-of-1000-characters", lambda: ("clip.wav", _clip()), 400, 400,
         fields={"language": "e" * 1000}, param="language"),
    Case("unicode-model-name", lambda: ("clip.wav", _clip()), 400, 400,
         fields={"model": "ウィスパー-🎙️-large"}, param="model"),
    # options out of range
    Case("temperature-5", lambda: ("clip.wav", _clip()), 400, 400, fields={"temperature": "5"},
         param="temperature"),
    Case("unknown-language", lambda: ("clip.wav", _clip()), 400, 400, fields={"language": "xx"},
         param="language"),
    Case("num-speakers-minus-1", lambda: ("clip.wav", _clip()), 400, 400,
         fields={"diarize": "true", "num_speakers": "-1"}, param="num_speakers"),
    Case("min-speakers-over-max-speakers", lambda: ("clip.wav", _clip()), 400, 400,
         fields={"diarize": "true", "min_speakers": "3", "max_speakers": "2"},
         param="min_speakers"),
]


def _send(stack: Stack, route: str, fields: dict[str, str], file: tuple[str | bytes, bytes] | None,
          ) -> httpx.Response:
    path, base = (TRANSCRIBE, {"model": "whisper-1"}) if route == "sync" else (JOBS, {})
    response = post_form(stack, path, stack.alice, {**base, **fields}, file)
    stack.ledger.request(response.status_code)
    return response


def _assert_error(response: httpx.Response, status: int, *, code: str | None = None,
                  param: Any = ...) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def _finish_accepted(stack: Stack, route: str, response: httpx.Response, before: Snapshot,
                     filename: str | None) -> None:
    """An accepted upload ran to success and recorded the cleaned name; then it is deleted."""
    if route == "sync":
        from db.models import Job
        from db.session import session_scope

        with session_scope(stack.db_url) as session:
            new = [j for j in session.query(Job).filter(Job.id.not_in(before.jobs))]
            rows = [(j.id, j.source, j.status, j.filename) for j in new]
        assert len(rows) == 1 and rows[0][1:3] == ("sync", "succeeded"), rows
        job_id, recorded = rows[0][0], rows[0][3]
    else:
        job = wait_for_job(stack, stack.alice, response.json()["id"])
        assert job["status"] == "succeeded", job
        job_id, recorded = job["id"], job["filename"]
    assert recorded == filename, f"recorded file name {recorded!r}, expected {filename!r}"
    delete_job(stack, stack.alice, job_id)


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_hostile_upload_gets_its_status_and_leaves_nothing_half_written(
        stack: Stack, case: Case, route: str) -> None:
    expected = case.sync if route == "sync" else case.job
    file = case.file()
    before = Snapshot.take(stack)
    response = _send(stack, route, case.fields, file)
    stack.ledger.bad_input(f"{route}: {case.id}", expected, response.status_code)
    if expected >= 400:
        _assert_error(response, expected, code=case.code, param=case.param)
    else:
        assert response.status_code == expected, response.text[:500]
        _finish_accepted(stack, route, response, before, case.filename)
    before.assert_nothing_left(stack, f"{route}: {case.id}")
    if case.id == "name-with-path-traversal":
        assert not Path("/etc/passwd.wav").exists()
        assert not list(stack.storage.parent.rglob("passwd.wav"))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("case", "body", "content_type"), [
    ("empty-request-body", b"", f"multipart/form-data; boundary={BOUNDARY}"),
    ("json-instead-of-a-form", json.dumps({"model": "whisper-1", "file": "aGVsbG8="}).encode(),
     "application/json"),
    ("form-without-a-file", f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\""
                            f"\r\n\r\nwhisper-1\r\n--{BOUNDARY}--\r\n".encode(),
     f"multipart/form-data; boundary={BOUNDARY}"),
])
def test_a_request_without_a_file_part_is_a_400_naming_the_file(
        stack: Stack, route: str, case: str, body: bytes, content_type: str) -> None:
    before = Snapshot.take(stack)
    response = httpx.post(stack.url(TRANSCRIBE if route == "sync" else JOBS), content=body,
                          headers={"Content-Type": content_type, **stack.alice.headers}, timeout=60)
    stack.ledger.request(response.status_code)
    stack.ledger.bad_input(f"{route}: {case}", 400, response.status_code)
    _assert_error(response, 400, param="file")
    before.assert_nothing_left(stack, f"{route}: {case}")


def test_an_unknown_transcript_format_of_a_job_is_a_400(stack: Stack) -> None:
    """Jobs choose the output format when the transcript is fetched: that is where an unknown
    `response_format` goes (the sync route's case is in the table above)."""
    before = Snapshot.take(stack)
    submitted = _send(stack, "job", {}, ("clip.wav", _clip()))
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(stack, stack.alice, submitted.json()["id"])
    response = httpx.get(stack.url(f"{JOBS}/{job['id']}/transcript"), params={"format": "docx"},
                         headers=stack.alice.headers, timeout=30)
    stack.ledger.request(response.status_code)
    stack.ledger.bad_input("job: unknown transcript format", 400, response.status_code)
    _assert_error(response, 400, param="format")
    delete_job(stack, stack.alice, job["id"])
    before.assert_nothing_left(stack, "job: unknown transcript format")


def test_an_unknown_response_format_on_the_sync_route_is_a_400(stack: Stack) -> None:
    before = Snapshot.take(stack)
    response = _send(stack, "sync", {"response_format": "docx"}, ("clip.wav", _clip()))
    stack.ledger.bad_input("sync: unknown response_format", 400, response.status_code)
    _assert_error(response, 400, param="response_format")
    before.assert_nothing_left(stack, "sync: unknown response_format")


def test_a_refused_sync_upload_of_bytes_once_sent_as_a_job_leaves_no_file(stack: Stack) -> None:
    """The same bytes first as a job (run and deleted), then on the sync route with an option
    the model refuses: the refusal removes the file it stored (job submission used to keep an
    in-process hold on its upload forever, and the sync route then never let go of the file)."""
    clip = af.jfk_resampled(16_000, 1, "wav", seconds=2.5)  # bytes no other case sends
    before = Snapshot.take(stack)
    submitted = _send(stack, "job", {}, ("same.wav", clip))
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(stack, stack.alice, submitted.json()["id"])
    delete_job(stack, stack.alice, job["id"])
    before.assert_nothing_left(stack, "job sent, run and deleted")
    refused = _send(stack, "sync", {"language": "xx"}, ("same.wav", clip))  # tiny.en: English only
    stack.ledger.bad_input("sync: language the model lacks, bytes once sent as a job", 400,
                           refused.status_code)
    _assert_error(refused, 400, param="language")
    before.assert_nothing_left(stack, "sync refused after a job of the same bytes")


# --------------------------------------------------------------------------- six hours
def _asr_audio_seconds(stack: Stack) -> list[float]:
    """`audio_s` of every batch the ASR replica has logged so far (LOG_FILE, all processes)."""
    seconds = []
    for log in sorted(stack.storage.glob("service.log*")):
        for line in log.read_text(errors="replace").splitlines():
            if '"asr batch"' in line:
                try:
                    seconds.append(float(json.loads(line)["audio_s"]))
                except (ValueError, KeyError):
                    continue
    return seconds


@pytest.mark.parametrize("route", ROUTES)
def test_a_six_hour_recording_is_refused_by_its_length_at_once_and_never_reaches_the_model(
        stack: Stack, route: str) -> None:
    """A real six-hour FLAC of silence (43 kB, decodable to the end) against AUDIO_MAX_DURATION_S
    of two hours: 400 naming the length its header declares (refused by that, not by decoding
    it), no job and no file left. Then a 2 s clip is transcribed, and the batches the ASR
    replica logged since the refusal hold less than one 30 s window: had it been handed the six
    hours (720 windows, served first in first out), their batches would come before the clip's."""
    six_hours = flac_silence(6 * 3600)
    assert len(six_hours) < MAX_UPLOAD_BYTES // 50
    logged = len(_asr_audio_seconds(stack))
    before = Snapshot.take(stack)
    response = _send(stack, route, {}, ("six-hours.flac", six_hours))
    stack.ledger.bad_input(f"{route}: six-hour recording", 400, response.status_code)
    error = _assert_error(response, 400, code="audio_too_long", param="file")
    # "21600.0 s long" is the length the header declares (decoding would stop at the limit)
    assert "21600.0 s long" in error["message"] and f"{MAX_DURATION_S:g}" in error["message"], error
    before.assert_nothing_left(stack, f"{route}: six-hour recording")

    probe = _send(stack, "sync", {}, ("probe.wav", _clip()))
    assert probe.status_code == 200, probe.text
    new = _asr_audio_seconds(stack)[logged:]
    assert new and sum(new) < 30, f"the ASR replica transcribed {sum(new):.0f} s meanwhile: {new}"
    _finish_accepted(stack, "sync", probe, before, "probe.wav")
    before.assert_nothing_left(stack, "six-hour probe")


# --------------------------------------------------------------------------- 50 MiB streamed
UPLOAD_RATE = 32 * 2**20
"""Bytes per second the oversize client sends: a fast real upload. Unthrottled over loopback,
Ray's proxy reads a whole 50 MiB body into its own memory (it pulls the client's body with no
backpressure) before the replica has seen 4 MiB of it, which says nothing about the service."""


def _stream_oversize(stack: Stack, path: str, fields: dict[str, str],
                     total: int = 50 * 2**20) -> tuple[bytes, int, float | None]:
    """POST a chunked body of `total` bytes at UPLOAD_RATE, reading while sending. Returns the
    reply's head, the bytes sent when it came, and how long after it the server dropped the
    connection while the client kept sending (None: not within 20 s)."""
    url = urlparse(stack.service.base_url)
    head = multipart_head(fields, "big.wav")
    block = b"\0" * 65_536
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    sent, reply = 0, b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\n"
                      f"Authorization: Bearer {stack.alice.key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode()
                     + f"{len(head):x}\r\n".encode() + head + b"\r\n")
        t0 = time.monotonic()
        while b"\r\n\r\n" not in reply and time.monotonic() - t0 < 60:
            ahead = sent / UPLOAD_RATE - (time.monotonic() - t0)
            writable = [sock] if sent < total and ahead <= 0 else []
            readable, writable, _ = select.select([sock], writable, [], max(ahead, 0) or 5)
            if readable:
                data = sock.recv(65_536)
                if not data:
                    break
                reply += data
            elif writable:
                try:
                    sock.sendall(chunk)
                except OSError:  # the server closed: its answer is waiting to be read
                    sock.settimeout(10)
                    reply += sock.recv(65_536)
                    break
                sent += len(block)
        # the client goes on sending, as a naive one would: the server must hang up
        sock.setblocking(False)
        t1, dropped = time.monotonic(), None
        while dropped is None and time.monotonic() - t1 < 20:
            try:
                if sock.recv(65_536) == b"":
                    dropped = time.monotonic() - t1
            except BlockingIOError:
                pass
            except OSError:
                dropped = time.monotonic() - t1
            try:
                sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                dropped = time.monotonic() - t1
    return reply, sent, dropped


@pytest.mark.parametrize("route", ROUTES)
def test_a_50_mib_streamed_body_is_refused_with_413_long_before_it_is_all_sent_and_ingress_memory_stays_flat(
        stack: Stack, route: str) -> None:
    """No Content-Length: the limit can only act on the bytes as they come. The 413 comes while
    the client is still sending, and the server then hangs up rather than read the rest. Three
    such uploads: the second and third add no memory to the Ingress replica (the first may raise
    its high-water mark by what arrived before the 413: Ray's receive loop pulls eagerly)."""
    path, fields = (TRANSCRIBE, {"model": "whisper-1"}) if route == "sync" else (JOBS, {})
    pids = replica_pids(stack, "Ingress")
    assert len(pids) == 1, f"expected one Ingress replica process, found {pids}"
    before = Snapshot.take(stack)
    rss: list[int] = []
    for attempt in range(3):
        if attempt == 1:
            rss.append(rss_bytes(pids[0]))
        reply, sent, dropped = _stream_oversize(stack, path, fields)
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        stack.ledger.request(status or None)
        stack.ledger.bad_input(f"{route}: 50 MiB chunked body", 413, status)
        assert status == 413, reply[:300]
        assert sent < 25 * 2**20, f"the 413 came after {sent / 2**20:.1f} MiB of 50 MiB"
        assert dropped is not None, "the server kept reading the body after its 413"
    rss.append(rss_bytes(pids[0]))
    grew = (rss[1] - rss[0]) / 2**20
    assert grew < 16, f"the ingress replica kept {grew:.0f} MiB after two more 50 MiB uploads"
    before.assert_nothing_left(stack, f"{route}: 50 MiB chunked body")


# --------------------------------------------------------------------------- stalled upload
def _held_upload(stack: Stack, route: str, name: str, trickle_every_s: float | None) -> tuple[int | None, dict, float]:
    """Headers and the first 1000 bytes of a declared 100 kB body, then nothing (or one byte
    every `trickle_every_s`): (status, error, seconds from the first 1000 bytes to the answer)."""
    path, fields = (TRANSCRIBE, {"model": "whisper-1"}) if route == "sync" else (JOBS, {})
    url = urlparse(stack.service.base_url)
    head = multipart_head(fields, name)
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = len(head) + 100_000 + len(tail)
    reply = b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\n"
                      f"Authorization: Bearer {stack.alice.key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                      f"Content-Length: {length}\r\n\r\n").encode() + head + b"\0" * 1000)
        t0 = time.monotonic()
        sock.settimeout(trickle_every_s or UPLOAD_STALL_TIMEOUT_S + 30)
        while time.monotonic() - t0 < UPLOAD_STALL_TIMEOUT_S + 30:
            try:
                data = sock.recv(65_536)
            except TimeoutError:
                if trickle_every_s is None:
                    break
                try:
                    sock.sendall(b"\0")
                except OSError:
                    pass  # answered and closed in the meantime: read the answer
                continue
            if not data:
                break
            reply += data
            if b"\r\n\r\n" in reply and reply.rstrip().endswith(b"}"):
                break
        waited = time.monotonic() - t0
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] if status else {}
    return status, error, waited


@pytest.mark.parametrize("route", ROUTES)
def test_an_upload_that_stalls_mid_body_is_answered_408_after_the_stall_timeout(
        stack: Stack, route: str) -> None:
    """Headers and the first 1000 bytes of a declared 100 kB body, then nothing: the ingress
    answers 408 (OpenAI-shaped) UPLOAD_STALL_TIMEOUT_S after the last byte, instead of holding
    the request until Ray's 10-minute request timeout."""
    before = Snapshot.take(stack)
    status, error, waited = _held_upload(stack, route, "stalled.wav", trickle_every_s=None)
    stack.ledger.request(status)
    stack.ledger.bad_input(f"{route}: upload stalled mid-body", 408, status or 0)
    assert status == 408, f"after {waited:.0f} s: {error}"
    # the stall detector, with the configured timeout (not the rate floor, not Ray's timeout)
    assert error["code"] == "upload_timeout", error
    assert f"sent nothing for {UPLOAD_STALL_TIMEOUT_S:g} s" in error["message"], error
    before.assert_nothing_left(stack, f"{route}: stalled upload")


@pytest.mark.parametrize("route", ROUTES)
def test_an_upload_trickled_a_byte_at_a_time_is_answered_408_by_the_rate_floor(
        stack: Stack, route: str) -> None:
    """The same body, then one byte every 2 s: it never stalls, but past the first
    UPLOAD_STALL_TIMEOUT_S it averages far under UPLOAD_MIN_RATE_BPS (1000 bytes/s by default),
    so it is cut off about a second later (the 1000 bytes bought one) instead of holding a
    request for Ray's 10 minutes (a slowloris)."""
    before = Snapshot.take(stack)
    status, error, waited = _held_upload(stack, route, "trickled.wav", trickle_every_s=2.0)
    stack.ledger.request(status)
    stack.ledger.bad_input(f"{route}: upload trickled a byte every 2 s", 408, status or 0)
    assert status == 408, f"after {waited:.0f} s: {error}"
    # the rate floor (the stall detector never fires: a byte comes every 2 s)
    assert error["code"] == "upload_timeout" and "arrived slower than" in error["message"], error
    assert "bytes/s" in error["message"] and "sent nothing" not in error["message"], error
    before.assert_nothing_left(stack, f"{route}: trickled upload")
