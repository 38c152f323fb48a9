"""Rate limits: request 101 within a minute gets 429 + Retry-After, per client IP and per key, on
Redis and in-process; with Redis gone the service keeps serving on local limits, logs it once, and
readiness says degraded. The per-IP limit runs before authentication, the per-key one only for a
key that authenticated (random bearer tokens create no counters); the in-process counters forget
keys whose window has passed and never track more than their cap; Redis's expire by TTL.
(Client addresses behind proxies: tests/serve/test_client_ip.py, tests/serve/test_proxy_clients.py.)"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from db import repository
from db.migrate import upgrade_head
from serve import job_records, ratelimit
from serve.auth import hash_key, parse_key
from tests.db.support import REDIS_URL, configure, make_app, make_caller


@pytest.fixture
def app_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:
    def build(**env: str | None) -> TestClient:
        configure(monkeypatch, DB_URL=None, STORAGE_BASE_PATH=str(tmp_path / "storage"), ENVIRONMENT="test", **env)
        upgrade_head()
        ip = f"198.51.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"  # own counters on the shared Redis
        client = TestClient(make_app(), client=(ip, 50000))
        client.peer_ip = ip  # type: ignore[attr-defined]
        return client

    yield build
    configure(monkeypatch)


@pytest.mark.parametrize("redis_url", [None, REDIS_URL], ids=["in-process", "redis"])
def test_request_101_from_one_ip_within_a_minute_gets_429(app_with, redis_url: str | None) -> None:  # type: ignore[no-untyped-def]
    client = app_with(REDIS_URL=redis_url, RATE_LIMIT_KEY_PER_MINUTE="0")
    with client:
        statuses = [client.get("/v1/jobs").status_code for _ in range(100)]
        assert set(statuses) == {401}  # counted before authentication: guessing keys is limited too
        limited = client.get("/v1/jobs")
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert ratelimit.status() == {"backend": "redis" if redis_url else "local", "degraded": False}


def test_each_key_has_its_own_limit(app_with) -> None:  # type: ignore[no-untyped-def]
    client = app_with(REDIS_URL=REDIS_URL, RATE_LIMIT_PER_MINUTE="0", RATE_LIMIT_KEY_PER_MINUTE="3")
    alice, bob = make_caller("alice@example.org"), make_caller("bob@example.org")
    with client:
        assert [client.get("/v1/jobs", headers=alice.headers).status_code for _ in range(4)] == [200] * 3 + [429]
        assert client.get("/v1/jobs", headers=bob.headers).status_code == 200


def test_with_redis_down_limits_are_local_logged_and_readiness_is_degraded(  # type: ignore[no-untyped-def]
    app_with, caplog: pytest.LogCaptureFixture
) -> None:
    client = app_with(REDIS_URL="redis://127.0.0.1:1/0", RATE_LIMIT_PER_MINUTE="5")  # nothing listens on port 1
    alice = make_caller("alice@example.org")
    with caplog.at_level(logging.WARNING, logger="serve.ratelimit"), client:
        statuses = [client.get("/v1/jobs", headers=alice.headers).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert [r.getMessage() for r in caplog.records].count(
        "redis unreachable; rate limits are per process until it is back") == 1
    assert ratelimit.status()["degraded"] is True
    assert job_records.readiness()["status"] == "degraded"


def test_the_key_itself_never_reaches_redis(app_with) -> None:  # type: ignore[no-untyped-def]
    client = app_with(REDIS_URL=REDIS_URL)
    alice = make_caller("alice@example.org")
    with client:
        client.get("/v1/jobs", headers=alice.headers)
    r = redis.Redis.from_url(REDIS_URL)
    names = [k.decode() for k in r.scan_iter("ratelimit:*")]
    assert names and not any(alice.key in n or alice.key_id in n for n in names)


def _key_counter(key_id: str) -> str:
    return f"key:{hash_key(key_id)[:32]}"


@pytest.mark.parametrize("redis_url", [None, REDIS_URL], ids=["in-process", "redis"])
def test_only_keys_that_authenticated_are_counted_and_by_key_id(app_with, redis_url: str | None) -> None:  # type: ignore[no-untyped-def]
    client = app_with(REDIS_URL=redis_url, RATE_LIMIT_PER_MINUTE="0", RATE_LIMIT_KEY_PER_MINUTE="3")
    alice = make_caller("alice@example.org")
    random_tokens = [f"sk-key_{secrets.token_hex(8)}.{secrets.token_urlsafe(16)}" for _ in range(20)]
    random_tokens += ["hello", "sk-nothing"]
    # Alice's public key id with a wrong secret: must not use up her bucket.
    wrong_secret = alice.key.rsplit(".", 1)[0] + ".not-the-secret"
    with client:
        for token in [*random_tokens, *[wrong_secret] * 5]:
            response = client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401, (token, response.text)
        if redis_url is None:
            assert ratelimit.get_limiter().local.tracked() == 0, "a token that failed left a counter"
        statuses = [client.get("/v1/jobs", headers=alice.headers).status_code for _ in range(4)]
    assert statuses == [200] * 3 + [429]
    if redis_url is None:
        assert list(ratelimit.get_limiter().local._hits) == [_key_counter(alice.key_id)]
    else:
        r = redis.Redis.from_url(redis_url)
        for token in random_tokens:
            names = {f"ratelimit:key:{hash_key(token)[:32]}"}
            if parse_key(token):
                names.add(f"ratelimit:{_key_counter(parse_key(token))}")
            assert not any(r.exists(n) for n in names), token
        assert r.zcard(f"ratelimit:{_key_counter(alice.key_id)}") == 3


def test_authentication_runs_once_per_request(app_with, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The limiter's principal is the one the route uses (FastAPI caches it per request)."""
    client = app_with(REDIS_URL=None, RATE_LIMIT_PER_MINUTE="10", RATE_LIMIT_KEY_PER_MINUTE="10")
    alice = make_caller("alice@example.org")
    touched: list[str] = []
    touch = repository.touch_api_key
    monkeypatch.setattr(repository, "touch_api_key",
                        lambda **kw: (touched.append(kw["key_id"]), touch(**kw))[1])
    with client:
        assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
    assert touched == [alice.key_id]


@pytest.mark.parametrize("redis_url", [None, REDIS_URL], ids=["in-process", "redis"])
def test_a_client_over_its_ip_limit_is_refused_before_its_key_is_looked_at(  # type: ignore[no-untyped-def]
    app_with, redis_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = app_with(REDIS_URL=redis_url, RATE_LIMIT_PER_MINUTE="2", RATE_LIMIT_KEY_PER_MINUTE="100")
    alice = make_caller("alice@example.org")
    looked_up: list[str] = []
    get_key = repository.get_api_key
    monkeypatch.setattr(repository, "get_api_key",
                        lambda **kw: (looked_up.append(kw["key_id"]), get_key(**kw))[1])
    with client:
        statuses = [client.get("/v1/jobs", headers=alice.headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert looked_up == [alice.key_id] * 2


def test_redis_counters_expire_one_window_after_their_last_request(app_with) -> None:  # type: ignore[no-untyped-def]
    client = app_with(REDIS_URL=REDIS_URL, RATE_LIMIT_PER_MINUTE="5", RATE_LIMIT_KEY_PER_MINUTE="4")
    alice = make_caller("alice@example.org")
    with client:
        statuses = [client.get("/v1/jobs", headers=alice.headers).status_code for _ in range(5)]
    assert statuses == [200] * 4 + [429]  # the refused one left the counters' TTL as it was
    r = redis.Redis.from_url(REDIS_URL)
    for name in (f"ratelimit:ip:{client.peer_ip}", f"ratelimit:{_key_counter(alice.key_id)}"):
        ttl_ms = r.pttl(name)
        assert 0 < ttl_ms <= int(ratelimit.WINDOW_S * 1000), (name, ttl_ms)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_in_process_counters_are_bounded_and_forgotten_after_their_window() -> None:
    clock = FakeClock()
    limiter = ratelimit.LocalLimiter(max_keys=500, clock=clock)
    sizes = []
    for i in range(5000):  # e.g. a spray of distinct addresses
        assert limiter.hit(f"ip:{i}", limit=3, window_s=60) is None
        sizes.append(limiter.tracked())
        clock.now += 0.001
    assert max(sizes) == 500 and limiter.tracked() == 500
    clock.now += 60
    assert limiter.tracked() == 0
    assert limiter.hit("ip:new", limit=3, window_s=60) is None
    assert limiter.tracked() == 1


def test_in_process_counters_expire_by_window_not_before() -> None:
    clock = FakeClock()
    limiter = ratelimit.LocalLimiter(clock=clock)
    for _ in range(3):
        assert limiter.hit("key:busy", limit=3, window_s=60) is None
    assert limiter.hit("key:busy", limit=3, window_s=60) == pytest.approx(60)
    for i in range(100):
        limiter.hit(f"ip:{i}", limit=3, window_s=60)
    assert limiter.tracked() == 101
    clock.now += 59
    assert limiter.hit("key:busy", limit=3, window_s=60) == pytest.approx(1)  # still limited
    assert limiter.tracked() == 101
    clock.now += 1
    assert limiter.tracked() == 0  # every window has passed
    assert limiter.hit("key:busy", limit=3, window_s=60) is None


def test_past_the_cap_the_least_recently_counted_key_is_forgotten_first() -> None:
    clock = FakeClock()
    limiter = ratelimit.LocalLimiter(max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        assert limiter.hit(key, limit=1) is None
        clock.now += 1
    assert limiter.hit("a", limit=2) is None  # "a" counted again: now "b" is the oldest
    assert limiter.hit("d", limit=1) is None
    assert set(limiter._hits) == {"c", "a", "d"}  # noqa: SLF001
    assert limiter.hit("c", limit=1) is not None  # kept, and still limited
