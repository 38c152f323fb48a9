"""The schema is built only by Alembic, and what Alembic builds is exactly what the models say."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from db.migrate import upgrade_head
from db.models import Base
from tests.db.support import pg_url  # noqa: F401 - fixture


def _diff(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return diff


def test_upgrade_head_builds_the_models_schema_on_postgres(pg_url: str) -> None:  # noqa: F811
    # pg_url was created empty and migrated by `upgrade_head` alone.
    assert _diff(pg_url) == []


def test_upgrade_head_builds_the_models_schema_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade_head(url)
    assert _diff(url) == []
    upgrade_head(url)  # running it again is a no-op


def test_the_indexes_the_operations_guide_names_exist(pg_url: str) -> None:  # noqa: F811
    engine = create_engine(pg_url)
    insp = inspect(engine)
    indexes = {t: {tuple(i["column_names"]): i["unique"] for i in insp.get_indexes(t)}
               for t in ("jobs", "users", "segments")}
    engine.dispose()
    assert ("user_id", "status") in indexes["jobs"]
    assert ("created_at",) in indexes["jobs"]
    assert indexes["users"][("email",)] is True
    assert ("job_id",) in indexes["segments"]
