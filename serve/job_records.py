"""Jobs as the HTTP side records them: synchronous requests kept as jobs, file names as metadata,
the database's start-up and readiness. Shared by the routers and the composition root, so
neither imports the other for it."""

from __future__ import annotations

import unicodedata
from typing import Any

from fastapi import Request

from config.settings import get_settings
from db import repository as repo
from db.session import get_sessionmaker, ping
from serve import ratelimit
from serve.storage import StoredAudio
from speech.types import Transcript

FILENAME_MAX_CHARS = 255
"""The `jobs.filename` column's width."""


def clean_filename(name: str | None) -> str | None:
    """A client's file name as metadata: its last path component, without control characters
    (NUL cannot even be stored) or invisible format characters (a right-to-left override makes
    "\u202egnp.wav" display as "vaw.png"), at most FILENAME_MAX_CHARS. Audio is stored by its
    digest, so the name never reaches the file system."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch) not in ("Cc", "Cf")).strip()
    return base[:FILENAME_MAX_CHARS] or None


def in_session(fn: Any, /, **kwargs: Any) -> Any:
    """Run a repository function in its own session and commit (blocking: use a thread)."""
    with get_sessionmaker()() as session:
        out = fn(session=session, **kwargs)
        session.commit()
        return out


def record_sync_request(*, request: Request, stored: StoredAudio | None, options: dict[str, Any],
                        transcript: Transcript, filename: str | None = None) -> bool:
    """The synchronous endpoint's work, recorded as a succeeded job of the authenticated user.

    Blocking (run it in a thread). Returns True when the stored audio is now referenced (keep it).
    """
    user = getattr(request.state, "user", None)
    if user is None:
        return False
    with get_sessionmaker()() as session:
        repo.record_sync_job(session=session, user=user, stored_audio=stored, options=options,
                             transcript=transcript, filename=clean_filename(filename))
        session.commit()
    return stored is not None


def readiness() -> dict[str, Any]:
    """For /ready: database reachable; rate limits on Redis or degraded to local."""
    limits = ratelimit.status()
    db_ok = ping()
    return {"database": "ok" if db_ok else "unreachable", "rate_limits": limits,
            "status": "ready" if db_ok and not limits["degraded"] else ("degraded" if db_ok else "unavailable")}


def prepare_database() -> str | None:
    """Start-up: migrate to head; on the embedded default, create a local key once and return it."""
    from db.migrate import upgrade_head
    from serve.auth import bootstrap_local_key

    settings = get_settings()
    upgrade_head()
    if settings.DB_URL:
        return None
    return in_session(bootstrap_local_key)
