"""API keys: a Bearer key on every /v1 route, 401 in OpenAI's error shape for none, a wrong one or a
revoked one; keys stored hashed, never logged; the admin CLI creates, lists and revokes them."""

from __future__ import annotations

import logging
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from db import repository as repo
from db.models import ApiKey, User
from db.session import session_scope
from serve import admin
from serve.auth import bootstrap_local_key, hash_key, require_admin
from serve.errors import install_error_handlers
from tests.db.support import backend, client, make_caller, pg_url  # noqa: F401 - fixtures


def test_missing_wrong_and_malformed_keys_get_401(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    alice = make_caller("alice@example.org")
    wrong_secret = alice.key.rsplit(".", 1)[0] + ".not-the-secret"
    cases = {
        "none": {},
        "not bearer": {"Authorization": f"Basic {alice.key}"},
        "malformed": {"Authorization": "Bearer hello"},
        "wrong secret": {"Authorization": f"Bearer {wrong_secret}"},
    }
    with caplog.at_level(logging.DEBUG):
        for name, headers in cases.items():
            response = client.get("/v1/jobs", headers=headers)
            assert response.status_code == 401, name
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["message"], name
            assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
    assert all(alice.key not in repr(r.__dict__) and wrong_secret not in repr(r.__dict__) for r in caplog.records)
    with session_scope() as session:
        reasons = [e.details["reason"] for e in repo.list_audit_events(session=session, action="auth.failed")]
    assert reasons == ["missing", "missing", "invalid", "invalid"]


def test_a_revoked_key_stops_working_at_once(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
    assert admin.run(["revoke-key", alice.key_id]) == f"revoked {alice.key_id}"
    response = client.get("/v1/jobs", headers=alice.headers)
    assert response.status_code == 401
    with session_scope() as session:
        assert [e.details["reason"] for e in repo.list_audit_events(session=session, action="auth.failed")] == [
            "revoked"]


def test_only_a_keyed_hash_of_the_key_is_stored(backend: str) -> None:  # noqa: F811
    alice = make_caller("alice@example.org")
    with session_scope() as session:
        row = session.get(ApiKey, alice.key_id)
        assert row.key_hash == hash_key(alice.key) and alice.key.split(".", 1)[1] not in row.key_hash


def test_admin_cli_creates_lists_and_revokes_keys(backend: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert admin.main(["create-user", "ops@example.org", "--admin"]) == 0
    assert admin.main(["create-user", "ops@example.org"]) == 1  # exists
    assert admin.main(["create-key", "ops@example.org", "--name", "ci"]) == 0
    out = capsys.readouterr().out
    key = out.split("store it now): ", 1)[1].strip()
    key_id = out.split("key id: ", 1)[1].split()[0]
    assert admin.main(["list-keys", "ops@example.org"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and key not in listing
    assert admin.main(["revoke-key", key_id]) == 0
    assert admin.main(["revoke-key", "key_nope"]) == 1
    assert admin.main(["create-key", "nobody@example.org"]) == 1
    with session_scope() as session:
        actions = [e.action for e in repo.list_audit_events(session=session)]
    assert actions == ["user.created", "key.created", "key.revoked"]


def test_admin_only_routes_refuse_ordinary_keys(backend: str) -> None:  # noqa: F811
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/admin/ping")
    def ping(user: Annotated[User, Depends(require_admin)]) -> dict[str, str]:
        return {"ok": user.email}

    root, alice = make_caller("root@example.org", admin=True), make_caller("alice@example.org")
    with TestClient(app) as c:
        assert c.get("/v1/admin/ping", headers=root.headers).status_code == 200
        refused = c.get("/v1/admin/ping", headers=alice.headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_permissions"


def test_the_embedded_default_creates_one_local_key_on_first_start(backend: str) -> None:  # noqa: F811
    with session_scope() as session:
        key = bootstrap_local_key(session=session)
    with session_scope() as session:
        assert bootstrap_local_key(session=session) is None
    assert key and key.startswith("sk-key_")
