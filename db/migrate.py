"""Bring a database to the newest schema with Alembic (service start-up and tests)."""

from __future__ import annotations

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


def upgrade_head(url: str | None = None) -> None:
    """`alembic upgrade head` against `url` (default: the configured database).

    On PostgreSQL an advisory lock serialises replicas that start at the same moment.
    """
    from sqlalchemy import text

    from config.settings import get_settings
    from db.session import make_engine

    url = url or get_settings().database_url
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
