"""Who may do what, against the production-shaped stack: missing, malformed and revoked keys,
another user's jobs, admin-only routes, the per-key rate limit, and webhooks aimed inside.

- Every /v1 route needs a key: none, a malformed one or a revoked one is a 401 (with
  `WWW-Authenticate: Bearer`). Revoking works at once, through the admin API and through the
  operators' CLI (`python -m serve.admin revoke-key`).
- Another user's job is a 404 on every job route, indistinguishable from a job that never
  existed, so ids do not leak (docs/jobs.md says so and the code does so); nothing of it changes.
- Admin routes are a 403 for ordinary keys.
- 601 requests from one key within a minute: the 601st is a 429 with Retry-After; other keys
  are not affected.
- Client addresses (the stack trusts a proxy on 127.0.0.2, TRUSTED_PROXIES): an X-Forwarded-For
  from an untrusted peer is ignored, and two clients behind the trusted proxy are counted in
  separate per-IP buckets (the service's counters in Redis, and its audit events, say so).
- A job whose callback_url resolves to an internal address is a 400 naming callback_url (the stack
  runs with WEBHOOK_ALLOW_INTERNAL=false), and nothing is stored.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from tests.reliability.inputs import JOBS, TRANSCRIBE, Snapshot, delete_job, post_form, wait_for_job
from tests.reliability.support import (
    JFK,
    KEY_LIMIT_PER_MINUTE,
    ROOT,
    TRUSTED_PROXY,
    Caller,
    Stack,
    user_keys,
)

ROUTES = [  # every /v1 route, with a harmless body where one is needed
    ("GET", "/v1/models"),
    ("POST", TRANSCRIBE),
    ("POST", "/v1/audio/translations"),
    ("GET", JOBS),
    ("POST", JOBS),
    ("GET", f"{JOBS}/job_0123456789abcdef01234567"),
    ("GET", f"{JOBS}/job_0123456789abcdef01234567/transcript"),
    ("GET", f"{JOBS}/job_0123456789abcdef01234567/events"),
    ("POST", f"{JOBS}/job_0123456789abcdef01234567/cancel"),
    ("DELETE", f"{JOBS}/job_0123456789abcdef01234567"),
    ("GET", "/v1/admin/queue"),
    ("POST", "/v1/admin/keys/key_0123456789abcdef/revoke"),
]


def _call(stack: Stack, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    kwargs: dict[str, Any] = {}
    if method == "POST" and path in (TRANSCRIBE, "/v1/audio/translations", JOBS):
        kwargs = {"data": {"model": "whisper-1"}, "files": {"file": ("jfk.flac", JFK.read_bytes())}}
    response = httpx.request(method, stack.url(path), headers=headers, timeout=60, **kwargs)
    stack.ledger.request(response.status_code)
    return response


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, f"{response.request.method} {response.request.url}: " \
                                           f"{response.status_code} {response.text[:300]}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def _fresh_key(stack: Stack, email: str) -> Caller:
    return user_keys(stack.db_url, email, 1, name="test_access")[0]


# --------------------------------------------------------------------------- keys
@pytest.mark.parametrize(("case", "header"), [
    ("no key", None),
    ("scheme without a key", "Bearer"),
    ("basic scheme", "Basic YWxpY2U6c2VjcmV0"),
    ("not an sk- key", "Bearer hunter2"),
    ("prefix only", "Bearer sk-"),
    ("unknown key id", "Bearer sk-key_0123456789abcdef.c2VjcmV0c2VjcmV0c2VjcmV0"),
    ("10 kB key", "Bearer sk-key_" + "a" * 10_000),
    ("non-ascii key", "Bearer sk-key_ünïcødé.sécret"),
])
def test_a_missing_or_malformed_key_is_a_401_on_every_route(stack: Stack, case: str,
                                                            header: str | None) -> None:
    headers: dict[str, Any] = {} if header is None else {"Authorization": header.encode("utf-8")}
    before = Snapshot.take(stack)
    for method, path in ROUTES:
        response = _call(stack, method, path, headers)
        stack.ledger.bad_input(f"{case}: {method} {path}", 401, response.status_code)
        _assert_error(response, 401, "invalid_api_key")
        assert response.headers.get("WWW-Authenticate") == "Bearer"
    before.assert_nothing_left(stack, case)


def test_a_key_with_the_right_id_and_a_wrong_secret_is_a_401(stack: Stack) -> None:
    forged = f"sk-{stack.alice.key_id}.{'x' * 43}"
    response = _call(stack, "GET", "/v1/models", {"Authorization": f"Bearer {forged}"})
    stack.ledger.bad_input("right key id, wrong secret", 401, response.status_code)
    _assert_error(response, 401, "invalid_api_key")


def test_a_key_revoked_through_the_admin_api_is_refused_at_once(stack: Stack) -> None:
    key = _fresh_key(stack, "alice@example.com")
    assert _call(stack, "GET", "/v1/models", key.headers).status_code == 200
    revoked = _call(stack, "POST", f"/v1/admin/keys/{key.key_id}/revoke", stack.admin.headers)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked"] is True and revoked.json()["id"] == key.key_id
    for method, path in ROUTES:
        response = _call(stack, method, path, key.headers)
        stack.ledger.bad_input(f"revoked key: {method} {path}", 401, response.status_code)
        _assert_error(response, 401, "invalid_api_key")
    assert _call(stack, "GET", "/v1/models", stack.alice.headers).status_code == 200  # her other key


def test_a_key_revoked_with_the_operators_cli_is_refused_at_once(stack: Stack) -> None:
    key = _fresh_key(stack, "alice@example.com")
    assert _call(stack, "GET", JOBS, key.headers).status_code == 200
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DB_URL": stack.db_url, "ENVIRONMENT": "test"}
    done = subprocess.run([sys.executable, "-m", "serve.admin", "revoke-key", key.key_id], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"revoked {key.key_id}" in done.stdout, done.stderr[-2000:]
    response = _call(stack, "GET", JOBS, key.headers)
    stack.ledger.bad_input("key revoked with serve.admin", 401, response.status_code)
    _assert_error(response, 401, "invalid_api_key")


# --------------------------------------------------------------------------- other users' jobs
@pytest.fixture
def alices_job(stack: Stack):  # noqa: ANN201
    before = Snapshot.take(stack)
    response = post_form(stack, JOBS, stack.alice, {}, ("jfk.flac", JFK.read_bytes()))
    stack.ledger.request(response.status_code)
    assert response.status_code == 202, response.text
    job = wait_for_job(stack, stack.alice, response.json()["id"])
    assert job["status"] == "succeeded", job
    yield job
    delete_job(stack, stack.alice, job["id"])
    before.assert_nothing_left(stack, "alice's job")


JOB_ROUTES = [("GET", ""), ("GET", "/transcript"), ("GET", "/events"), ("POST", "/cancel"),
              ("DELETE", "")]


def test_another_users_job_is_a_404_on_every_job_route_like_a_job_that_never_existed(
        stack: Stack, alices_job: dict) -> None:
    job_id = alices_job["id"]
    never = "job_" + "0" * 24
    for method, suffix in JOB_ROUTES:
        foreign = _call(stack, method, f"{JOBS}/{job_id}{suffix}", stack.bob.headers)
        stack.ledger.bad_input(f"bob on alice's job: {method} {suffix or '/'}", 404,
                               foreign.status_code)
        error = _assert_error(foreign, 404, "job_not_found")
        missing = _assert_error(_call(stack, method, f"{JOBS}/{never}{suffix}", stack.bob.headers),
                                404, "job_not_found")
        assert error["message"].replace(job_id, "<id>") == missing["message"].replace(never, "<id>")
        assert error["param"] == missing["param"] == "job_id"
    listed = _call(stack, "GET", f"{JOBS}?limit=100", stack.bob.headers).json()["data"]
    assert job_id not in [j["id"] for j in listed]
    # nothing bob did reached it
    mine = _call(stack, "GET", f"{JOBS}/{job_id}", stack.alice.headers)
    assert mine.status_code == 200 and mine.json()["status"] == "succeeded"
    transcript = _call(stack, "GET", f"{JOBS}/{job_id}/transcript?format=text", stack.alice.headers)
    assert transcript.status_code == 200 and "country" in transcript.text.lower()


# --------------------------------------------------------------------------- admin
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/admin/queue"),
    ("POST", "/v1/admin/keys/{bob}/revoke"),
])
def test_admin_routes_are_a_403_for_ordinary_keys_and_work_for_admins(stack: Stack, method: str,
                                                                      path: str) -> None:
    path = path.format(bob=stack.bob.key_id)
    for user in (stack.alice, stack.bob):
        response = _call(stack, method, path, user.headers)
        stack.ledger.bad_input(f"ordinary key: {method} {path}", 403, response.status_code)
        _assert_error(response, 403, "insufficient_permissions")
    assert _call(stack, "GET", "/v1/models", stack.bob.headers).status_code == 200  # still valid
    if method == "GET":
        stats = _call(stack, method, path, stack.admin.headers)
        assert stats.status_code == 200 and stats.json()["object"] == "queue", stats.text
    else:  # an admin may revoke: a throwaway key of bob's, not the one the suite uses
        spare = _fresh_key(stack, "bob@example.com")
        ok = _call(stack, method, f"/v1/admin/keys/{spare.key_id}/revoke", stack.admin.headers)
        assert ok.status_code == 200, ok.text
        missing = _call(stack, method, "/v1/admin/keys/key_ffffffffffffffff/revoke", stack.admin.headers)
        _assert_error(missing, 404, "key_not_found")


# --------------------------------------------------------------------------- rate limit
def test_601_requests_from_one_key_in_a_minute_end_in_429_with_retry_after(stack: Stack) -> None:
    """A fresh key of its own (the suite's keys are not throttled); the limit is per key, so a
    second fresh key of the same user is not affected. That all 601 fell in one window is the
    limiter's own word: its 429 says a slot frees within the 60 s window (Retry-After), which a
    sliding log only says while the window holds 600 of the key's requests."""
    key, other = user_keys(stack.db_url, "burst@example.com", 2, name="burst")
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=8)) as client:
        def one(_: int) -> int:
            return client.get(stack.url("/v1/models"), headers=key.headers).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(KEY_LIMIT_PER_MINUTE)))
        last = client.get(stack.url("/v1/models"), headers=key.headers)
        neighbour = client.get(stack.url("/v1/models"), headers=other.headers)
    for status in (*statuses, last.status_code, neighbour.status_code):
        stack.ledger.request(status)
    assert statuses.count(200) == KEY_LIMIT_PER_MINUTE, sorted(set(statuses))
    stack.ledger.bad_input(f"request {KEY_LIMIT_PER_MINUTE + 1} in a minute", 429, last.status_code)
    _assert_error(last, 429, "rate_limit_exceeded")
    assert 1 <= int(last.headers["Retry-After"]) <= 60, last.headers
    assert neighbour.status_code == 200, neighbour.text


# --------------------------------------------------------------------------- client addresses
UNTRUSTED_PEER = "127.0.0.3"
"""A loopback address no test but these connects from; not in the stack's TRUSTED_PROXIES."""


def _documentation_v6() -> str:
    """A random address of 2001:db8::/32 (documentation), in canonical form."""
    net = ipaddress.IPv6Network("2001:db8::/32")
    return str(net[uuid.uuid4().int % net.num_addresses])


def _from(stack: Stack, local_address: str, forwarded_for: str | None, key: str) -> int:
    """GET /v1/models connecting from `local_address`, with an X-Forwarded-For if given."""
    headers = {"Authorization": f"Bearer {key}"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    with httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address=local_address)) as client:
        status = client.get(stack.url("/v1/models"), headers=headers).status_code
    stack.ledger.request(status)
    return status


def _unknown_key() -> tuple[str, str]:
    key_id = f"key_{uuid.uuid4().hex[:16]}"
    return key_id, f"sk-{key_id}.not-a-real-secret"


def _ip_counter(stack: Stack, address: str) -> int:
    """Requests counted against `address` in the last minute, in the service's Redis."""
    return redis.Redis.from_url(stack.redis.url).zcard(f"ratelimit:ip:{address}")


def _failed_auth_ips(stack: Stack, key_ids: list[str]) -> list[str | None]:
    from db import repository as repo
    from db.session import session_scope

    with session_scope(stack.db_url) as session:
        events = repo.list_audit_events(session=session, action="auth.failed")
        by_key = {e.target: e.ip for e in events if e.target in key_ids}
    return [by_key.get(k) for k in key_ids]


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(stack: Stack) -> None:
    before = _ip_counter(stack, UNTRUSTED_PEER)
    spoofed = [_documentation_v6() for _ in range(3)] + [TRUSTED_PROXY]
    keys = [_unknown_key() for _ in spoofed]
    statuses = [_from(stack, UNTRUSTED_PEER, fake, key) for fake, (_, key) in zip(spoofed, keys)]
    assert statuses == [401] * len(spoofed)
    assert _ip_counter(stack, UNTRUSTED_PEER) - before == len(spoofed), "counted against the peer"
    assert not any(_ip_counter(stack, fake) for fake in spoofed[:-1])
    assert _failed_auth_ips(stack, [k for k, _ in keys]) == [UNTRUSTED_PEER] * len(spoofed)


def test_two_clients_behind_one_trusted_proxy_get_separate_buckets(stack: Stack) -> None:
    alice_ip, bob_ip, spoof = _documentation_v6(), _documentation_v6(), _documentation_v6()
    before_proxy = _ip_counter(stack, TRUSTED_PROXY)
    alice_keys = [_unknown_key() for _ in range(2)]
    bob_keys = [_unknown_key() for _ in range(3)]
    statuses = [_from(stack, TRUSTED_PROXY, alice_ip, key) for _, key in alice_keys]
    # Bob's own X-Forwarded-For stays on the left of the address the proxy appends: still Bob.
    statuses += [_from(stack, TRUSTED_PROXY, f"{spoof}, {bob_ip}", key) for _, key in bob_keys]
    assert statuses == [401] * 5
    # A client that authenticates is counted by its address as well (and per key).
    assert _from(stack, TRUSTED_PROXY, alice_ip, stack.alice.key) == 200
    assert (_ip_counter(stack, alice_ip), _ip_counter(stack, bob_ip)) == (3, 3)
    assert _ip_counter(stack, spoof) == 0
    assert _ip_counter(stack, TRUSTED_PROXY) == before_proxy, "the proxy's own bucket took their requests"
    assert _failed_auth_ips(stack, [k for k, _ in alice_keys + bob_keys]) == [alice_ip] * 2 + [bob_ip] * 3


# --------------------------------------------------------------------------- webhooks
def _loopback_hostname() -> str:
    """The machine's own name when it resolves to an internal address, else `localhost`."""
    name = socket.gethostname()
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)}
    except OSError:
        return "localhost"
    import ipaddress

    return name if addrs and all(not ipaddress.ip_address(a).is_global for a in addrs) else "localhost"


@pytest.mark.parametrize(("case", "url"), [
    ("loopback", "http://127.0.0.1:8080/hook"),
    ("private 10/8", "http://10.1.2.3/hook"),
    ("private 192.168/16", "https://192.168.1.10/hook"),
    ("cloud metadata", "http://169.254.169.254/latest/meta-data/"),
    ("localhost", "http://localhost/hook"),
    ("localhost in capitals", "http://LOCALHOST:9000/hook"),
    ("ipv6 loopback", "http://[::1]:8080/hook"),
    ("ipv4-mapped ipv6 loopback", "http://[::ffff:127.0.0.1]/hook"),
    ("unspecified address", "http://0.0.0.0/hook"),
    ("decimal loopback", "http://2130706433/hook"),
    ("short hex loopback", "http://0x7f.1/hook"),
    ("hostname resolving to loopback", f"http://{_loopback_hostname()}/hook"),
    ("credentials in the url", "https://user:pass@example.com/hook"),
    ("file scheme", "file:///etc/passwd"),
    ("gopher scheme", "gopher://127.0.0.1:6379/_INFO"),
])
def test_a_webhook_aimed_at_an_internal_address_is_a_400_and_stores_nothing(
        stack: Stack, case: str, url: str) -> None:
    before = Snapshot.take(stack)
    response = post_form(stack, JOBS, stack.alice, {"callback_url": url},
                         ("jfk.flac", JFK.read_bytes()))
    stack.ledger.request(response.status_code)
    stack.ledger.bad_input(f"callback_url: {case}", 400, response.status_code)
    error = _assert_error(response, 400)
    assert error["param"] == "callback_url", error
    before.assert_nothing_left(stack, f"callback_url {case}")
