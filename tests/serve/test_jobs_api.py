"""/v1/jobs through HTTP, on the embedded default (SQLite, no Redis) and on the real PostgreSQL.

A job is queued with real audio, followed, listed, cancelled and deleted; nobody sees another
user's job (404, so ids do not leak); an Idempotency-Key makes a retried POST return the same job.
"""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from config.settings import get_settings
from db import repository as repo
from db.session import session_scope
from serve.storage import audio_path
from tests.db.support import JFK, SHORT, TINY_EN_INFO, backend, client, make_app, make_caller, pg_url, submit  # noqa: F401


def _stored_files() -> list:
    root = get_settings().STORAGE_BASE_PATH / "audio"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_a_submitted_job_is_queued_and_readable_by_its_owner(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    job = submit(client, alice, language="en", diarize="true", num_speakers="2")
    assert job["status"] == "queued" and job["object"] == "job" and job["attempts"] == 0
    assert job["options"]["language"] == "en" and job["options"]["diarize"] is True
    assert abs(job["duration"] - 1.10) < 0.05  # probed at submission, from the real recording
    got = client.get(f"/v1/jobs/{job['id']}", headers=alice.headers)
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    listed = client.get("/v1/jobs?status=queued", headers=alice.headers).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]] and listed["has_more"] is False
    assert client.get("/v1/jobs?status=succeeded", headers=alice.headers).json()["data"] == []


def test_the_same_idempotency_key_twice_gives_one_job(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    headers = {**alice.headers, "Idempotency-Key": "upload-42"}
    responses = []
    for _ in range(2):
        with SHORT.open("rb") as fh:
            responses.append(client.post("/v1/jobs", headers=headers, files={"file": (SHORT.name, fh)}))
    assert [r.status_code for r in responses] == [202, 200]
    assert responses[0].json()["id"] == responses[1].json()["id"]
    assert len(client.get("/v1/jobs", headers=alice.headers).json()["data"]) == 1


def test_another_users_job_is_not_found_on_every_route(client: TestClient) -> None:
    alice, bob = make_caller("alice@example.org"), make_caller("bob@example.org")
    job_id = submit(client, alice)["id"]
    for method, path in [("GET", ""), ("GET", "/transcript"), ("GET", "/events"), ("POST", "/cancel"),
                         ("DELETE", "")]:
        response = client.request(method, f"/v1/jobs/{job_id}{path}", headers=bob.headers)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs", headers=bob.headers).json()["data"] == []
    assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()["status"] == "queued"


def test_pages_follow_the_cursor_newest_first(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    ids = [submit(client, alice)["id"] for _ in range(3)]
    first = client.get("/v1/jobs?limit=2", headers=alice.headers).json()
    second = client.get(f"/v1/jobs?limit=2&cursor={first['next_cursor']}", headers=alice.headers).json()
    assert [j["id"] for j in first["data"] + second["data"]] == ids[::-1]
    assert second["has_more"] is False
    bad = client.get("/v1/jobs?cursor=not-a-cursor", headers=alice.headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"


def test_not_audio_is_refused_and_leaves_nothing_behind(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    response = client.post("/v1/jobs", headers=alice.headers,
                           files={"file": ("notes.wav", b"these are not audio samples" * 100)})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "file"
    assert _stored_files() == []
    assert client.get("/v1/jobs", headers=alice.headers).json()["data"] == []


def test_bad_options_name_the_parameter(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    cases = [({"temperature": "5"}, "temperature"), ({"language": "xx"}, "language"),
             ({"diarize": "true", "num_speakers": "-1"}, "num_speakers"),
             ({"diarize": "true", "min_speakers": "3", "max_speakers": "2"}, "min_speakers"),
             ({"task": "summarise"}, "task")]
    for data, param in cases:
        with SHORT.open("rb") as fh:
            response = client.post("/v1/jobs", headers=alice.headers, files={"file": (SHORT.name, fh)}, data=data)
        assert response.status_code == 400, (data, response.text)
        assert response.json()["error"]["param"] == param, response.text
    assert _stored_files() == []


def test_options_the_served_model_cannot_honour_are_refused_at_submission(client: TestClient) -> None:
    """Issue 13 bug 2: tiny.en is English-only, so French or translation can never succeed; the
    job is refused now (400 invalid_option), not queued to fail three times later."""
    alice = make_caller("alice@example.org")
    for data, param in (({"language": "fr"}, "language"), ({"task": "translate"}, "task"),
                        ({"model": "large-v9"}, "model")):
        with SHORT.open("rb") as fh:
            response = client.post("/v1/jobs", headers=alice.headers, files={"file": (SHORT.name, fh)}, data=data)
        assert response.status_code == 400, (data, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_option"), response.text
    assert _stored_files() == []
    assert client.get("/v1/jobs", headers=alice.headers).json()["data"] == []


def test_diarization_that_is_not_available_is_refused_at_submission(backend: str) -> None:  # noqa: F811
    alice = make_caller("alice@example.org")
    with TestClient(make_app(diarization=False)) as no_diarizer, SHORT.open("rb") as fh:
        response = no_diarizer.post("/v1/jobs", headers=alice.headers, files={"file": (SHORT.name, fh)},
                                    data={"diarize": "true"})
    assert response.status_code == 501, response.text
    assert response.json()["error"]["code"] == "diarization_unavailable"


def test_the_stand_in_replica_describes_the_real_tiny_en(tiny_engine) -> None:  # noqa: ANN001
    """The jobs router's tests answer `model_info` with TINY_EN_INFO: it must be the real one."""
    caps = tiny_engine.capabilities()
    assert (caps.model, caps.multilingual, list(caps.languages), caps.device, caps.vad) == \
        tuple(TINY_EN_INFO[k] for k in ("id", "multilingual", "languages", "device", "vad"))


def test_cancel_then_events_report_the_final_state(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    job_id = submit(client, alice)["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)
    assert again.status_code == 409
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=alice.headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())
    events = [dict(line.split(": ", 1) for line in block.splitlines())
              for block in body.split("\n\n") if "event: " in block]
    assert len(events) == 1 and events[0]["event"] == "cancelled", body
    assert json.loads(events[0]["data"])["id"] == job_id
    assert events[0]["id"].split(".")[1] == "2"  # the id is the state: a final one
    transcript = client.get(f"/v1/jobs/{job_id}/transcript", headers=alice.headers)
    assert transcript.status_code == 409 and transcript.json()["error"]["code"] == "job_not_finished"


def test_delete_removes_the_job_its_audio_and_is_audited(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    kept = submit(client, alice, JFK)
    shared = submit(client, alice, JFK)  # same bytes: one stored file, two jobs
    only = submit(client, alice, SHORT)
    assert client.delete(f"/v1/jobs/{shared['id']}", headers=alice.headers).json()["deleted"] is True
    jfk_sha = kept["id"] and _sha_of(kept["id"])
    assert audio_path(jfk_sha).exists()  # still used by `kept`
    short_sha = _sha_of(only["id"])
    assert client.delete(f"/v1/jobs/{only['id']}", headers=alice.headers).status_code == 200
    assert not audio_path(short_sha).exists()
    assert client.get(f"/v1/jobs/{only['id']}", headers=alice.headers).status_code == 404
    with session_scope() as session:
        assert {e.target for e in repo.list_audit_events(session=session, action="job.deleted")} == {
            shared["id"], only["id"]}


def _sha_of(job_id: str) -> str:
    with session_scope() as session:
        return repo.get_job(session=session, job_id=job_id, user_id=None).audio_sha256


def test_callback_urls_to_internal_addresses_are_refused(client: TestClient) -> None:
    alice = make_caller("alice@example.org")
    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "http://10.0.0.5/x",
                "http://localhost/x", "ftp://example.org/x"):
        with SHORT.open("rb") as fh:
            response = client.post("/v1/jobs", headers=alice.headers, files={"file": (SHORT.name, fh)},
                                   data={"callback_url": url})
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"]["param"] == "callback_url"
