"""Bring a database to the newest schema with Alembic (service start-up and tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(ALEMBIC_INI))
    cfg.attributes["configure_logger"] = False
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    """On a SQLite file, an exclusive lock on `<file>.migrate.lock` for the block (replicas of
    one machine migrating at the same moment); elsewhere nothing."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        yield
        return
    import fcntl

    lock = Path(parsed.database + ".migrate.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def upgrade_head(url: str | None = None) -> None:
    """`alembic upgrade head` against `url` (default: the configured database).

    Replicas that start at the same moment (the Ingress and the JobRunnerDeployment both
    migrate) are serialised: by an advisory lock on PostgreSQL, a file lock on a SQLite file.
    """
    from config.settings import get_settings

    url = url or get_settings().database_url
    with _sqlite_file_lock(url):
        _upgrade(url)


def _upgrade(url: str) -> None:
    from sqlalchemy import text

    from db.session import make_engine

    cfg = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(74201)"))
                conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(74201)"))
                    conn.commit()
    finally:
        engine.dispose()
