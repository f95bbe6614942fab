"""The one line a command prints when it cannot connect to its database: what it
tried (file, or host, port, database and user; never a password) and what to do.
Imported only when a command fails."""

from __future__ import annotations

import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

POSTGRESQL_PORT = 5432
UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE
LOGIN_REFUSED = ("password", "authentication", "not permitted to log in")


def connection_failure(exc: BaseException, url: str | None) -> str | None:
    """The line for `exc` when it is a failure to connect to the database at `url`
    (the driver's error raised outside any statement); None for any other error."""
    if not isinstance(exc, DBAPIError) or exc.statement is not None or url is None:
        return None
    detail = " ".join((str(exc.orig) if exc.orig is not None else str(exc)).split()) or type(exc).__name__
    try:
        parsed = make_url(url)
    except Exception:  # the URL was usable when the engine was made; be safe anyway
        return f"cannot connect to the database: {detail}; check --db-url (env BILLING_DB_URL)"
    if parsed.get_backend_name() == "sqlite":
        return (
            f"cannot open the SQLite database file {parsed.database!r}: {detail}; check that its "
            "directory exists and that this user may read and write there (--db-url, env BILLING_DB_URL)"
        )
    port = parsed.port or (POSTGRESQL_PORT if parsed.get_backend_name() == "postgresql" else None)
    where = (
        f"database {parsed.database!r} on host {parsed.host or 'localhost'}"
        f"{f', port {port}' if port else ''} as user {parsed.username!r}"
    )
    lowered = detail.lower()
    if f'database "{(parsed.database or "").lower()}" does not exist' in lowered:
        advice = "the server has no such database: create it, or fix the database name of --db-url"
    elif any(word in lowered for word in LOGIN_REFUSED) or (
        "role" in lowered and "does not exist" in lowered
    ):
        advice = "the server refused the login: check the user and password of --db-url (env BILLING_DB_URL)"
    else:
        advice = (
            "check that the server is running and reachable from here, and the host and port of "
            "--db-url (env BILLING_DB_URL)"
        )
    return f"cannot connect to the {where}: {detail}; {advice}"


def missing_table(exc: BaseException) -> str | None:
    """The line for a statement that failed because a table does not exist (SQLite's
    "no such table", PostgreSQL's undefined table); None for any other error."""
    if not isinstance(exc, DBAPIError) or exc.orig is None:
        return None
    text = str(exc.orig)
    found = re.search(r"no such table: (\S+)", text)
    if found is None and getattr(exc.orig, "sqlstate", None) == UNDEFINED_TABLE:
        found = re.search(r'relation "([^"]+)" does not exist', text)
    if found is None:
        return None
    return (
        f"the database has no table {found.group(1)}: check that --db-url (env BILLING_DB_URL) is the "
        "platform's database; the jobs' own tables are made by `billing-jobs db upgrade`"
    )
