# -*- test-case-name: tests.daemon.test_store -*-
"""Versioned schema for the SQLite store: apply ``schema/NNN_*.sql`` in order.

The applied version lives in the ``schema_version`` table. Each file is applied
in its own transaction together with its ``schema_version`` row, so a failed
upgrade leaves the database at the previous version. Before an existing
database is upgraded, a copy is taken with the SQLite backup API as
``<db>.bak-v<N>-<UTC timestamp>``.

Everything here is blocking; it must only run in the store's database thread,
never on the reactor thread. It never downgrades and never touches a database
newer than the code.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from myxd.errors import SchemaError

DEFAULT_SCHEMA_DIR = str(Path(__file__).parent / "schema")

_FILE_RE = re.compile(r"^(\d{3})_[A-Za-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    path: str


@dataclass(frozen=True)
class MigrationReport:
    from_version: int
    to_version: int
    backup_path: str | None


def find_migrations(schema_dir: str) -> list[Migration]:
    """The migrations in ``schema_dir``, checked to be numbered 1..N with no gap."""
    found: dict[int, str] = {}
    for name in sorted(os.listdir(schema_dir)):
        m = _FILE_RE.match(name)
        if m is None:
            continue
        version = int(m.group(1))
        if version in found:
            raise SchemaError(f"{schema_dir}: two schema files for version {version}")
        found[version] = os.path.join(schema_dir, name)
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"{schema_dir}: schema files must be numbered 001, 002, ... without gaps")
    return [Migration(v, found[v]) for v in versions]


def current_version(conn: sqlite3.Connection) -> int:
    """0 for an empty database; raises SchemaError for a non-MyX database."""
    tables = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    if "schema_version" not in tables:
        if tables:
            raise SchemaError("database has tables but no schema_version: not a MyX store")
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def backup(conn: sqlite3.Connection, db_path: str, version: int, now: float) -> str:
    """Copy the live database with the backup API (consistent even under WAL)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    dest = f"{db_path}.bak-v{version}-{stamp}"
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{db_path}.bak-v{version}-{stamp}-{n}"
    # The copy holds the same (encrypted) secrets as the original: keep it 600.
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    target = sqlite3.connect(dest)
    try:
        conn.backup(target)
    finally:
        target.close()
    return dest


def upgrade(
    conn: sqlite3.Connection, db_path: str, schema_dir: str = DEFAULT_SCHEMA_DIR
) -> MigrationReport:
    """Bring the database at ``conn`` up to the newest schema in ``schema_dir``."""
    migrations = find_migrations(schema_dir)
    if not migrations:
        raise SchemaError(f"{schema_dir}: no schema files")
    target = migrations[-1].version
    if conn.in_transaction:
        conn.commit()
    start = current_version(conn)
    if start > target:
        raise SchemaError(
            f"{db_path}: schema version {start} is newer than this myxd supports ({target})"
        )
    backup_path = None
    if 0 < start < target:
        backup_path = backup(conn, db_path, start, time.time())
    for migration in migrations[start:]:
        _apply(conn, migration)
    return MigrationReport(start, target, backup_path)


def _apply(conn: sqlite3.Connection, migration: Migration) -> None:
    with open(migration.path, encoding="utf-8") as f:
        sql = f.read()
    # Foreign keys are switched off while a migration runs (it cannot be
    # changed inside a transaction) so that table rebuilds are possible; the
    # foreign_key_check below proves the result is still consistent.
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        conn.executescript(
            "BEGIN IMMEDIATE;\n"
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);\n" + sql
        )
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
            (migration.version, time.time()),
        )
        broken = conn.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise SchemaError(
                f"{os.path.basename(migration.path)}: leaves {len(broken)} broken foreign keys"
            )
        conn.commit()
    except BaseException as e:
        if conn.in_transaction:
            conn.rollback()
        if isinstance(e, SchemaError):
            raise
        if isinstance(e, sqlite3.Error):
            raise SchemaError(
                f"{os.path.basename(migration.path)}: upgrade to schema version "
                f"{migration.version} failed: {e}"
            ) from e
        raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")
