"""Webhooks: a signed POST when a job finishes, received by a real local HTTP server; a failing
receiver is retried with backoff; internal targets are refused unless configuration allows them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from db import repository as repo
from db.session import session_scope
from serve import webhooks
from serve.job_runner import JobRunner
from tests.fakes import fake_pipeline
from speech.errors import InvalidOptionError
from tests.db.support import backend, configure, make_app, make_caller, pg_url, submit  # noqa: F401


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers `fail_first` requests with 500, then 200."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[bytes, str]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((body, self.headers.get(webhooks.SIGNATURE_HEADER, "")))
                self.send_response(500 if len(outer.received) <= outer.fail_first else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


def test_signatures_verify_and_tampering_is_detected() -> None:
    secret = b"s3cret"
    header = webhooks.sign(b'{"a":1}', secret=secret)
    assert webhooks.verify(b'{"a":1}', header, secret=secret)
    assert not webhooks.verify(b'{"a":2}', header, secret=secret)
    assert not webhooks.verify(b'{"a":1}', header, secret=b"other")
    old = webhooks.sign(b"{}", secret=secret, timestamp=int(time.time()) - 3600)
    assert not webhooks.verify(b"{}", old, secret=secret)


def test_internal_targets_are_refused_unless_allowed() -> None:
    for url in ("http://127.0.0.1/x", "http://[::1]/x", "http://10.1.2.3/x", "http://192.168.0.1/x",
                "http://169.254.169.254/x", "http://localhost/x", "http://0.0.0.0/x"):
        with pytest.raises(InvalidOptionError) as err:
            webhooks.check_callback_url(url, allow_internal=False)
        assert err.value.param == "callback_url"
    assert webhooks.check_callback_url("http://127.0.0.1/x", allow_internal=True)
    assert webhooks.check_callback_url("https://93.184.215.14/hook", allow_internal=False)  # a public address


def test_a_failing_receiver_is_retried_until_it_accepts(backend: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                        receiver: Receiver) -> None:
    configure(monkeypatch, WEBHOOK_ALLOW_INTERNAL="true")
    delivered, attempts = asyncio.run(webhooks.deliver(receiver.url, {"type": "ping"}, backoff_s=0.05))
    assert (delivered, attempts) == (True, 3) and len(receiver.received) == 3
    assert all(webhooks.verify(body, sig, secret=webhooks.webhook_secret()) for body, sig in receiver.received)


def test_a_finished_job_is_posted_to_its_callback_with_a_valid_signature(  # noqa: F811
    backend: str, monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    """The no-op engine stands in for the model: this tests delivery, not transcription."""
    configure(monkeypatch, WEBHOOK_ALLOW_INTERNAL="true", WEBHOOK_BACKOFF_S="0.05")
    alice = make_caller("alice@example.org")
    with TestClient(make_app()) as client:
        job_id = submit(client, alice, callback_url=receiver.url)["id"]

    async def run() -> None:
        runner = JobRunner(fake_pipeline(), poll_s=0.05)
        assert await runner.run_once() == job_id
        await asyncio.gather(*runner._tasks)

    asyncio.run(run())
    body, signature = receiver.received[-1]
    assert webhooks.verify(body, signature, secret=webhooks.webhook_secret())
    payload = json.loads(body)
    assert payload["type"] == "job.succeeded" and payload["job"]["id"] == job_id
    assert len(receiver.received) == 3  # two 500s, then accepted
    with session_scope() as session:
        job = repo.get_job(session=session, job_id=job_id, user_id=None)
        assert (job.webhook_status, job.webhook_attempts) == ("delivered", 3)


def test_a_webhook_whose_sender_died_is_sent_by_another_runner(  # noqa: F811
    backend: str, monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    """Nothing lost: the job finished but its runner died before delivering."""
    from datetime import timedelta

    from db.models import Job, utcnow

    configure(monkeypatch, WEBHOOK_ALLOW_INTERNAL="true", WEBHOOK_BACKOFF_S="0.05")
    alice = make_caller("alice@example.org")
    with TestClient(make_app()) as client:
        job_id = submit(client, alice, callback_url=receiver.url)["id"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.webhook_status = "succeeded", "pending"
    with session_scope() as session:  # as if it finished ten minutes ago
        session.get(Job, job_id).updated_at = utcnow() - timedelta(minutes=10)
    with session_scope() as session:
        assert repo.claim_stale_webhooks(session=session, stale_after_s=300) == [job_id]
    with session_scope() as session:
        assert repo.claim_stale_webhooks(session=session, stale_after_s=300) == []  # taken over once

    async def run() -> None:
        runner = JobRunner(fake_pipeline())
        await runner._send_webhook(job_id)

    asyncio.run(run())
    assert json.loads(receiver.received[-1][0])["job"]["id"] == job_id
    with session_scope() as session:
        assert repo.get_job(session=session, job_id=job_id, user_id=None).webhook_status == "delivered"
