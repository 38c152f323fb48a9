"""One real service for the reliability suite, on the machine's PostgreSQL and a real Redis.

`stack` (package scope) starts, in order: a fresh PostgreSQL database of its own (migrated, with
an admin, two ordinary users and their keys), a `FaultProxy` in front of it, a private
`redis-server`, and `python -m serve` with its own local Ray cluster, the CPU profile of
`serve_config.yaml` and a job runner. Everything is stopped by its handle when the package's
tests are done, even when they fail. The suite's ledger is printed at the end of the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import yaml

from tests.reliability.support import (
    PG_ADMIN,
    ROOT,
    FaultProxy,
    Ledger,
    RedisServer,
    ServiceProcess,
)

MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MAX_DURATION_S = 2 * 3600.0
KEY_LIMIT_PER_MINUTE = 600
LEDGER = Ledger()


@dataclass
class User:
    email: str
    key_id: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Stack:
    service: ServiceProcess
    db_proxy: FaultProxy
    redis: RedisServer
    db_url: str
    """Direct to PostgreSQL (not through the proxy): the tests' own view of the database."""
    storage: Path
    admin: User
    alice: User
    bob: User
    ledger: Ledger

    def url(self, path: str) -> str:
        return self.service.url(path)

    def stored_files(self) -> list[Path]:
        """Audio and temporary uploads in storage (everything but the log files)."""
        return [p for p in self.storage.rglob("*") if p.is_file() and p.suffix != ".log"]


def _pg_admin(sql: str) -> None:
    conn = psycopg2.connect(**PG_ADMIN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _make_users(db_url: str) -> tuple[User, User, User]:
    from db import repository as repo
    from db.session import session_scope
    from serve.auth import create_key_for

    users = []
    with session_scope(db_url) as session:
        for email, admin in (("admin@example.com", True), ("alice@example.com", False),
                             ("bob@example.com", False)):
            user = repo.create_user(session=session, email=email, is_admin=admin)
            session.flush()
            key_id, key = create_key_for(session=session, user=user, name="reliability")
            users.append(User(email, key_id, key))
    return users[0], users[1], users[2]


def _service_config(path: Path, env: dict[str, str]) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[Stack]:
    from db.migrate import upgrade_head
    from db.session import dispose_all

    work = tmp_path_factory.mktemp("reliability")
    storage = work / "storage"
    storage.mkdir()
    db_name = f"reliability_{uuid.uuid4().hex[:10]}"
    _pg_admin(f'CREATE DATABASE "{db_name}"')
    proxy = FaultProxy((PG_ADMIN["host"], PG_ADMIN["port"])).start()
    redis = RedisServer(work)
    service: ServiceProcess | None = None
    try:
        db_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db_name}"
        upgrade_head(db_url)
        admin, alice, bob = _make_users(db_url)
        redis.start()
        env = {
            "ENVIRONMENT": "test",
            "DB_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{proxy.port}/{db_name}",
            "REDIS_URL": redis.url,
            "STORAGE_BASE_PATH": str(storage),
            "MODEL_CACHE_DIR": str(model_cache_dir),
            "AUDIO_MAX_FILE_SIZE": str(MAX_UPLOAD_BYTES),
            "AUDIO_MAX_DURATION_S": str(MAX_DURATION_S),
            "RATE_LIMIT_PER_MINUTE": "0",
            "RATE_LIMIT_KEY_PER_MINUTE": str(KEY_LIMIT_PER_MINUTE),
            "JOB_RUNNER_CONCURRENCY": "2",
            "JOB_LEASE_S": "10",
            "JOB_HEARTBEAT_S": "2",
            "JOB_POLL_S": "0.5",
            "WEBHOOK_ALLOW_INTERNAL": "false",
            "LOG_FILE": str(storage / "service.log"),
        }
        service = ServiceProcess(config=_service_config(work / "serve_config.yaml", env),
                                 env=env, log=work / "service.out.log")
        service.start()
        yield Stack(service=service, db_proxy=proxy, redis=redis, db_url=db_url,
                    storage=storage, admin=admin, alice=alice, bob=bob, ledger=LEDGER)
    finally:
        try:
            if service is not None:
                service.stop()
        finally:
            redis.stop()
            proxy.stop()
            dispose_all()
            _pg_admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LEDGER.counts or LEDGER.bad_inputs:
        terminalreporter.write_sep("=", "reliability ledger")
        terminalreporter.write_line(LEDGER.table())
