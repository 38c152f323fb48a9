"""Fixtures shared by the jobs/persistence tests (tests/db and tests/serve/test_jobs*, test_auth*, ...).

Import the fixtures a test module needs from here. The real PostgreSQL (127.0.0.1:5432, trust auth)
gets one fresh database per test session, dropped afterwards, so parallel runs never collide;
each test then starts from empty tables. The embedded default is a fresh SQLite file per test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from config.settings import get_settings
from db import repository as repo
from db.migrate import upgrade_head
from db.session import dispose_all, get_engine, session_scope
from serve import jobs_api, ratelimit
from serve.auth import create_key_for
from serve.context import IngressConfig, Services
from serve.errors import install_error_handlers
from tests.conftest import SPEECH_DATA_DIR

PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "test"}
REDIS_URL = "redis://127.0.0.1:6379/0"
DATA_DIR = SPEECH_DATA_DIR
JFK = DATA_DIR / "jfk" / "jfk.flac"
JFK_TEXT = (DATA_DIR / "jfk" / "jfk.txt").read_text().strip()
SHORT = DATA_DIR / "pocketsphinx" / "cards" / "001.wav"
TABLES = "words, segments, jobs, api_keys, users, audit_events"


def pg_admin(sql: str) -> None:
    """Run one statement as the server's admin (CREATE/DROP DATABASE), outside a transaction."""
    conn = psycopg2.connect(**PG_ADMIN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of our own for this test session, migrated to head, dropped at the end."""
    name = f"jobs_test_{uuid.uuid4().hex[:10]}"
    pg_admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    upgrade_head(url)
    yield url
    dispose_all()
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def configure(monkeypatch: pytest.MonkeyPatch, **env: str | None) -> None:
    """Set (or unset, with None) environment settings and rebuild everything cached from them."""
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    ratelimit.reset_limiter()
    dispose_all()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """Each test runs on the embedded default (SQLite, no Redis) and on the real PostgreSQL."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        with get_engine(url).begin() as conn:
            conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        configure(monkeypatch, DB_URL=url, STORAGE_BASE_PATH=str(tmp_path / "storage"), REDIS_URL=None,
                  ENVIRONMENT="test")
    else:
        configure(monkeypatch, DB_URL=None, STORAGE_BASE_PATH=str(tmp_path / "storage"), REDIS_URL=None,
                  ENVIRONMENT="test")
        upgrade_head()
    yield request.param
    dispose_all()
    get_settings.cache_clear()
    ratelimit.reset_limiter()


@pytest.fixture
def pg_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str) -> Iterator[str]:
    """The real PostgreSQL alone, for what SQLite cannot show (SKIP LOCKED races, crash recovery)."""
    with get_engine(pg_url).begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    configure(monkeypatch, DB_URL=pg_url, STORAGE_BASE_PATH=str(tmp_path / "storage"), REDIS_URL=None,
              ENVIRONMENT="test")
    yield pg_url
    dispose_all()
    get_settings.cache_clear()


TINY_EN_INFO = {"id": "tiny.en", "multilingual": False, "languages": ["en"], "device": "cpu",
                "vad": "energy"}
"""What the ASR replica's `model_info` says for the packaged tiny.en (checked against the real
engine in tests/serve/test_jobs_api.py)."""


class _Answer:
    def __init__(self, value: object) -> None:
        self.value = value

    def remote(self, *_: object) -> object:
        async def answer() -> object:
            return self.value

        return answer()


class ReplicaInfo:
    """A model deployment's handle that answers `model_info` only: the jobs router checks a job's
    options against the served models at submission and runs no model itself."""

    def __init__(self, info: dict) -> None:
        self.model_info = _Answer(info)


def make_app(*, diarization: bool = True) -> FastAPI:
    """An app with just the jobs router, wired the way the ingress wires it: the services on
    app.state, here with handles that describe tiny.en (and a working diarizer) without models."""
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(jobs_api.router)
    diarizer = ReplicaInfo({"available": True, "reason": None}) if diarization else None
    app.state.services = Services(ReplicaInfo(TINY_EN_INFO), diarizer, IngressConfig())
    return app


@pytest.fixture
def client(backend: str) -> Iterator[TestClient]:
    with TestClient(make_app()) as c:
        yield c


@dataclass
class Caller:
    email: str
    key_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_caller(email: str, *, admin: bool = False) -> Caller:
    with session_scope() as session:
        user = repo.get_user_by_email(session=session, email=email) or repo.create_user(
            session=session, email=email, is_admin=admin)
        key_id, key = create_key_for(session=session, user=user)
    return Caller(email, key_id, key)


def submit(client: TestClient, caller: Caller, path: Path = SHORT, **form: str) -> dict:
    """POST /v1/jobs with a real recording; returns the JSON (asserting 202)."""
    with path.open("rb") as fh:
        response = client.post("/v1/jobs", headers=caller.headers, files={"file": (path.name, fh)}, data=form)
    assert response.status_code == 202, response.text
    return response.json()


def env_for_subprocess(**extra: str) -> dict[str, str]:
    """The current settings' environment for a runner subprocess."""
    s = get_settings()
    env = dict(os.environ)
    env.update({"STORAGE_BASE_PATH": str(s.STORAGE_BASE_PATH), "ENVIRONMENT": "test", "RAY_AUTH_MODE": "disabled"})
    if s.DB_URL:
        env["DB_URL"] = s.DB_URL
    env.update(extra)
    return env
