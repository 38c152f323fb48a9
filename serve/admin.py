"""Operator CLI for users and API keys.

    python -m serve.admin create-user EMAIL [--admin]
    python -m serve.admin create-key EMAIL [--name NAME]   # prints the key once
    python -m serve.admin list-keys EMAIL
    python -m serve.admin revoke-key KEY_ID

Works on the configured database (DB_URL, or the embedded SQLite file), migrating it first.
"""

from __future__ import annotations

import argparse
import sys

from db import repository as repo
from db.migrate import upgrade_head
from db.session import session_scope
from serve.auth import create_key_for


class AdminError(Exception):
    """A CLI failure with a message for the operator (exit status 1)."""


def _user(session, email: str):  # type: ignore[no-untyped-def]
    user = repo.get_user_by_email(session=session, email=email)
    if user is None:
        raise AdminError(f"no user with email {email!r}; create it with create-user")
    return user


def run(argv: list[str]) -> str:
    """Execute one command; returns what to print. Raises AdminError for operator mistakes."""
    parser = argparse.ArgumentParser(prog="python -m serve.admin", description="Users and API keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create-user", help="create a user")
    p.add_argument("email")
    p.add_argument("--admin", action="store_true", help="may use admin-only operations")
    p = sub.add_parser("create-key", help="create an API key (printed once)")
    p.add_argument("email")
    p.add_argument("--name", default="")
    p = sub.add_parser("list-keys", help="a user's keys (ids, never the keys)")
    p.add_argument("email")
    p = sub.add_parser("revoke-key", help="revoke a key by id")
    p.add_argument("key_id")
    args = parser.parse_args(argv)

    upgrade_head()
    with session_scope() as session:
        if args.command == "create-user":
            if "@" not in args.email:
                raise AdminError(f"{args.email!r} is not an email address")
            if repo.get_user_by_email(session=session, email=args.email) is not None:
                raise AdminError(f"user {args.email!r} already exists")
            user = repo.create_user(session=session, email=args.email, is_admin=args.admin)
            repo.audit(session=session, action="user.created", user_id=user.id, target=user.email)
            return f"created user {user.email} (id {user.id}{', admin' if user.is_admin else ''})"
        if args.command == "create-key":
            key_id, key = create_key_for(session=session, user=_user(session, args.email), name=args.name)
            return f"key id: {key_id}\nkey (shown once, store it now): {key}"
        if args.command == "list-keys":
            keys = repo.list_api_keys(session=session, user_id=_user(session, args.email).id)
            lines = ["KEY_ID\tNAME\tCREATED\tLAST_USED\tREVOKED"]
            for k in keys:
                lines.append("\t".join([k.id, k.name or "-", k.created_at.isoformat(timespec="seconds"),
                                        k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "-",
                                        k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-"]))
            return "\n".join(lines)
        key = repo.revoke_api_key(session=session, key_id=args.key_id)
        if key is None:
            raise AdminError(f"no key with id {args.key_id!r}")
        repo.audit(session=session, action="key.revoked", user_id=key.user_id, target=key.id)
        return f"revoked {key.id}"


def main(argv: list[str] | None = None) -> int:
    try:
        print(run(sys.argv[1:] if argv is None else argv))
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
