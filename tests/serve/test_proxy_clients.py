"""Client addresses behind proxies, over real sockets: the ingress's app (`serve.ingress.create_app`,
both routers with their real dependencies and middleware, model handles that only describe
tiny.en) under uvicorn on 127.0.0.1, with uvicorn's defaults as Ray's HTTP proxy runs it.
Callers are told apart by the loopback address they connect from (all of 127.0.0.0/8 is local):
a "proxy" and an untrusted peer each get a random one of their own, so the counters on the shared
Redis are theirs alone.

- A spoofed X-Forwarded-For from an untrusted peer is ignored: every request counts against the
  peer, whatever address the header names, and the audit and log lines name the peer.
- Two clients behind one trusted proxy get separate buckets (their forwarded addresses), and the
  proxy's own address gets none of their requests.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn

from db import repository as repo
from db.session import session_scope
from serve import ratelimit
from serve.context import IngressConfig, Services
from tests.db.support import REDIS_URL, TINY_EN_INFO, ReplicaInfo, configure

LIMIT = 3


def _loopback() -> str:
    """A random loopback address other than 127.0.0.1 (which uvicorn itself trusts)."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def _documentation_v6() -> str:
    """A random address of 2001:db8::/32 (documentation), canonical form."""
    net = ipaddress.IPv6Network("2001:db8::/32")
    return str(net[uuid.uuid4().int % net.num_addresses])


class Served:
    """The app under uvicorn on a socket of its own, stopped by its handle."""

    def __init__(self) -> None:
        from serve.ingress import create_app

        diarizer = ReplicaInfo({"available": True, "reason": None})
        app = create_app(Services(ReplicaInfo(TINY_EN_INFO), diarizer, IngressConfig()))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def start(self) -> Served:
        self.thread.start()
        for _ in range(600):
            if self.server.started or not self.thread.is_alive():
                break
            self.thread.join(0.1)
        assert self.server.started, "uvicorn did not start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def client(self, local_address: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30,
                            transport=httpx.HTTPTransport(local_address=local_address))


@pytest.fixture(params=[None, REDIS_URL], ids=["in-process", "redis"])
def served(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:
    started: list[Served] = []

    def start(trusted_proxies: str) -> Served:
        configure(monkeypatch, DB_URL=None, STORAGE_BASE_PATH=str(tmp_path / "storage"), ENVIRONMENT="test",
                  REDIS_URL=request.param, RATE_LIMIT_PER_MINUTE=str(LIMIT), RATE_LIMIT_KEY_PER_MINUTE="0",
                  TRUSTED_PROXIES=trusted_proxies)
        started.append(Served().start())
        return started[-1]

    yield start
    for s in started:
        s.stop()
    configure(monkeypatch, TRUSTED_PROXIES=None)


def _bad_key(n: int) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-key_{n:016x}.wrong"}


def _paths() -> Iterator[str]:
    """Both routers (openai_api through v1_dependencies, jobs_api through its own), in turn."""
    while True:
        yield "/v1/models"
        yield "/v1/jobs"


def _failed_auth_ips() -> list[str | None]:
    with session_scope() as session:
        return [e.ip for e in repo.list_audit_events(session=session, action="auth.failed")]


def _counter_exists(address: str) -> bool:
    limiter = ratelimit.get_limiter()
    if limiter.redis_url is None:
        return f"ip:{address}" in limiter.local._hits  # noqa: SLF001
    return bool(redis.Redis.from_url(limiter.redis_url).exists(f"ratelimit:ip:{address}"))


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(  # type: ignore[no-untyped-def]
    served, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, peer = _loopback(), _loopback()
    service = served(f"{proxy}/32")
    paths = _paths()
    spoofed = [_documentation_v6() for _ in range(LIMIT + 1)]
    with caplog.at_level(logging.WARNING, logger="serve.auth"), service.client(peer) as client:
        statuses = [client.get(next(paths), headers={**_bad_key(i), "X-Forwarded-For": fake}).status_code
                    for i, fake in enumerate(spoofed)]
    assert statuses == [401] * LIMIT + [429]  # one bucket, the peer's, whatever the header says
    assert _failed_auth_ips() == [peer] * LIMIT
    logged = [r.client_ip for r in caplog.records if r.getMessage() == "authentication failed"]
    assert logged == [peer] * LIMIT
    assert _counter_exists(peer) and not any(_counter_exists(fake) for fake in spoofed)


def test_two_clients_behind_one_trusted_proxy_get_separate_buckets(  # type: ignore[no-untyped-def]
    served, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = _loopback()
    service = served(f"10.0.0.0/8, {proxy}/32")
    alice, bob, spoof = _documentation_v6(), _documentation_v6(), _documentation_v6()
    paths = _paths()
    with caplog.at_level(logging.WARNING, logger="serve.auth"), service.client(proxy) as through_proxy:
        def via(forwarded_for: str, n: int) -> int:
            return through_proxy.get(next(paths), headers={**_bad_key(n), "X-Forwarded-For": forwarded_for}
                                     ).status_code

        alice_statuses = [via(alice, i) for i in range(LIMIT + 1)]
        # Bob's first request comes through a trusted inner hop (10.1.1.1) and carries an address
        # he wrote himself on the left: he is still Bob, and still has his own bucket.
        bob_statuses = [via(f"{spoof}, {bob}, 10.1.1.1", 100)] + [via(bob, 100 + i) for i in range(1, LIMIT + 1)]
        proxy_itself = through_proxy.get("/v1/models", headers=_bad_key(999)).status_code
    assert alice_statuses == [401] * LIMIT + [429]
    assert bob_statuses == [401] * LIMIT + [429]
    assert proxy_itself == 401  # none of its clients' requests counted against the proxy
    expected = [alice] * LIMIT + [bob] * LIMIT + [proxy]
    assert _failed_auth_ips() == expected
    assert [r.client_ip for r in caplog.records if r.getMessage() == "authentication failed"] == expected
    assert _counter_exists(alice) and _counter_exists(bob) and not _counter_exists(spoof)
