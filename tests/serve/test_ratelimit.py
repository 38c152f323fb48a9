"""Rate limits: request 101 within a minute gets 429 + Retry-After, per client IP and per key, on
Redis and in-process; with Redis gone the service keeps serving on local limits, logs it once, and
readiness says degraded."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from db.migrate import upgrade_head
from serve import job_records, ratelimit
from tests.db.support import REDIS_URL, configure, make_app, make_caller


@pytest.fixture
def app_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:
    def build(**env: str | None) -> TestClient:
        configure(monkeypatch, DB_URL=None, STORAGE_BASE_PATH=str(tmp_path / "storage"), ENVIRONMENT="test", **env)
        upgrade_head()
        ip = f"198.51.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"  # own counters on the shared Redis
        return TestClient(make_app(), client=(ip, 50000))

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
