"""Every failure is an OpenAI-shaped error with the right status, and leaves no file behind."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import openai
import pytest

from tests.serve.support import ASR_MAX_ONGOING, ASR_MAX_QUEUED, JFK, MAX_UPLOAD_BYTES, SHORT_CLIPS
from tests.speech import audio_factory as af

TRANSCRIBE = "/v1/audio/transcriptions"


def post(service, content: bytes, name: str = "upload.wav", **form: str) -> httpx.Response:  # noqa: ANN001
    return httpx.post(service.url(TRANSCRIBE), data={"model": "whisper-1", **form},
                      files={"file": (name, content)}, headers=service.auth, timeout=120)


def assert_openai_error(response: httpx.Response, status: int, param: str | None,
                        code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(autouse=True)
def nothing_left_behind(service, request):  # noqa: ANN001, ANN201
    """Successful requests are kept as jobs with their audio; a failed one adds no file."""
    before = set(service.stored_files())
    yield
    after = set(service.stored_files())
    assert not [p for p in after if p.parent.name == "tmp"], "a temporary upload was left"
    if "overload" in request.node.name:  # its successful requests keep their (one) clip
        assert len(after - before) <= 1
    else:
        assert after == before, "a failed request left files in storage"


@pytest.mark.parametrize(("content", "name", "code"), [
    (af.text_file(), "notes.txt", "not_audio"),
    (af.random_bytes(), "noise.mp3", None),
    (af.png_image(), "picture.png", None),
    (b"", "empty.wav", "empty_audio"),
    (af.video_only(), "silent.mp4", "no_audio_stream"),
])
def test_what_is_not_audio_is_a_400_naming_the_file(service, content: bytes, name: str,  # noqa: ANN001
                                                    code: str | None) -> None:
    error = assert_openai_error(post(service, content, name), 400, "file", code)
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_raises_bad_request_for_non_audio(openai_client) -> None:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.transcriptions.create(file=("notes.txt", af.text_file()),
                                                  model="whisper-1")
    assert info.value.status_code == 400 and info.value.body["param"] == "file"


@pytest.mark.parametrize(("form", "param"), [
    ({"response_format": "docx"}, "response_format"),
    ({"temperature": "2"}, "temperature"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),  # needs verbose_json
    ({"response_format": "verbose_json", "timestamp_granularities[]": "phoneme"},
     "timestamp_granularities"),
    ({"language": "fr"}, "language"),  # tiny.en is English-only
    ({"model": "gpt-4o-transcribe"}, "model"),
    ({"stream": "true", "response_format": "vtt"}, "stream"),  # vtt cannot stream
    ({"diarize": "true", "min_speakers": "3", "max_speakers": "2"}, "min_speakers"),
])
def test_unsupported_parameter_values_are_a_400_naming_the_parameter(service, form: dict,  # noqa: ANN001
                                                                      param: str) -> None:
    content = JFK.read_bytes()
    assert_openai_error(post(service, content, "jfk.flac", **form), 400, param)


def test_a_missing_file_is_a_400(service) -> None:  # noqa: ANN001
    response = httpx.post(service.url(TRANSCRIBE), data={"model": "whisper-1"}, timeout=30,
                          headers=service.auth)
    assert_openai_error(response, 400, "file")


def test_a_request_without_an_api_key_is_a_401(service) -> None:  # noqa: ANN001
    response = httpx.post(service.url(TRANSCRIBE), data={"model": "whisper-1"},
                          files={"file": ("jfk.flac", JFK.read_bytes())}, timeout=30)
    assert_openai_error(response, 401, None)


def test_an_upload_over_the_limit_is_a_413(service) -> None:  # noqa: ANN001
    too_big = af.tone(MAX_UPLOAD_BYTES / 32_000 + 5)  # 16 kHz 16-bit mono: 32 kB per second
    assert len(too_big) > MAX_UPLOAD_BYTES
    assert_openai_error(post(service, too_big, "long.wav"), 413, "file", "file_too_large")


def test_a_chunked_upload_is_stopped_while_streaming(service) -> None:  # noqa: ANN001
    """No Content-Length: the limit is enforced on the bytes as they arrive."""
    boundary = "speechboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()

    def body():  # noqa: ANN202
        yield head
        for _ in range(MAX_UPLOAD_BYTES // 65536 + 32):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(service.url(TRANSCRIBE), content=body(), timeout=60,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                   **service.auth})
    assert_openai_error(response, 413, "file", "file_too_large")


def test_a_declared_oversize_body_is_refused_before_it_is_sent(service) -> None:  # noqa: ANN001
    """Content-Length of 10 GB and only the headers sent: the 413 comes back anyway, while the
    client has sent 5 bytes of the body and waits (the socket timeout only bounds the wait)."""
    url = urlparse(service.base_url)
    request = (f"POST {TRANSCRIBE} HTTP/1.1\r\nHost: {url.hostname}\r\n"
               "Content-Type: multipart/form-data; boundary=x\r\n"
               f"Authorization: Bearer {service.api_key}\r\n"
               f"Content-Length: {10 * 1024 ** 3}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request + b"--x\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_overload_is_a_503_with_retry_after(service) -> None:  # noqa: ANN001
    """More requests in flight than the ASR replica takes plus its queue: the rest get 503."""
    clip = SHORT_CLIPS[1].read_bytes()
    n = 2 * (ASR_MAX_ONGOING + ASR_MAX_QUEUED)
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda _: post(service, clip, "clip.wav"), range(n)))
    statuses = sorted({r.status_code for r in responses})
    assert set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "no request was refused"
    for r in rejected:
        assert_openai_error(r, 503, None, "overloaded")
        assert int(r.headers["Retry-After"]) >= 1
    assert any(r.status_code == 200 for r in responses)
