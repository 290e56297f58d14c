"""PostgreSQL connection strings (--database, --database-file): checked, and shown without secrets.

A password belongs in a file: the --database-file, or libpq's own PGPASSFILE (or PGPASSWORD
in the environment). Never in --database, which `ps` shows to every user of the machine.
psycopg is imported only when a connection string is really given, so the CLI's other
commands do not load libpq.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The keys of a libpq connection string that may carry a secret (a password, or an SSL key's
# passphrase): a redacted address never shows them.
SECRET_KEYS = ("password", "sslpassword")

FORMS = "postgresql://USER@HOST:PORT/DATABASE or libpq key=value pairs"


class DatabaseAddressError(ValueError):
    """A --database or --database-file value is unusable; the message never holds a secret."""


def parse_dsn(dsn: str, source: str) -> dict[str, Any]:
    """libpq's reading of a connection string; `source` names where it came from."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    if not dsn.strip():
        raise DatabaseAddressError(f"{source} is empty: expected {FORMS}")
    try:
        return conninfo_to_dict(dsn)
    except ProgrammingError:  # libpq's message may quote the string, password included
        raise DatabaseAddressError(
            f"{source} is not a PostgreSQL connection string: expected {FORMS}"
        ) from None


def refuse_password(dsn: str, source: str) -> None:
    """A connection string given where others can read it must not hold a password."""
    found = [key for key in SECRET_KEYS if parse_dsn(dsn, source).get(key)]
    if found:
        raise DatabaseAddressError(
            f"{source} holds a {found[0]}, and a command line is visible to every user of the "
            "machine (ps): put the connection string in a file given with --database-file "
            "(mode 0600), or keep the password in PGPASSFILE or PGPASSWORD"
        )


def read_database_file(path: Path) -> str:
    """The connection string a --database-file holds (surrounding whitespace removed)."""
    try:
        dsn = path.read_text().strip()
    except OSError as error:
        raise DatabaseAddressError(
            f"cannot read --database-file {path}: {error.strerror}"
        ) from None
    parse_dsn(dsn, f"--database-file {path}")
    return dsn


def redacted_dsn(dsn: str) -> str:
    """Where a connection string leads, for logs: postgresql://user@host:port/db, no secrets."""
    try:
        parts = parse_dsn(dsn, "the connection string")
    except DatabaseAddressError:
        return "(an unreadable connection string)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or parts.get("hostaddr") or "(local socket)"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"
