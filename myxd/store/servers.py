# -*- test-case-name: tests.daemon.test_store_servers -*-
"""Server records (SSH targets) and their installs, step by step.

Rules this module keeps:
- It never stores SSH credentials or sudo passwords unencrypted, and never
  returns them except inside a ``ServerRecord`` (whose repr hides them).
- Every method is one transaction in the pool's thread (``Database.run``).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet.defer import Deferred

from myxd.errors import NotFoundError
from myxd.statuses import INSTALL_KINDS, INSTALL_STATUSES, INSTALL_STEP_STATUSES, SERVER_STATUSES
from myxd.store.db import UNSET, Database, Txn, check, like, tags_of, tags_text, update_row
from myxd.store.records import ServerRecord


class ServerStore:
    """Queries on ``servers``, ``installs`` and ``install_steps``.

    All methods return Deferreds that fire in the reactor thread.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def _server(self, row: sqlite3.Row) -> ServerRecord:
        box = self._db.box()
        auth_enc = row["auth_enc"]
        return ServerRecord(
            id=row["id"],
            name=row["name"],
            host=row["host"],
            ssh_port=row["ssh_port"],
            username=row["username"],
            auth=None if auth_enc is None else box.decrypt_json(auth_enc),
            sudo=box.decrypt_json(row["sudo_enc"]),
            host_key_fingerprint=row["host_key_fingerprint"],
            host_key=row["host_key"],
            status=row["status"],
            status_reason=row["status_reason"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            tags=tags_of(row["tags"]),
        )

    def add_server(
        self,
        *,
        name: str,
        host: str,
        ssh_port: int,
        username: str,
        auth: dict[str, Any] | None,
        sudo: dict[str, Any],
        host_key_fingerprint: str | None = None,
    ) -> Deferred[int]:
        """Save a server (``auth`` and ``sudo`` encrypted); returns its id."""
        now = self._db.now()

        def txn(t: Txn) -> int:
            if not 1 <= int(ssh_port) <= 65535:
                raise ValueError(f"ssh_port must be in 1-65535, not {ssh_port}")
            box = self._db.box()
            t.execute(
                "INSERT INTO servers (name, host, ssh_port, username, auth_enc, sudo_enc,"
                " host_key_fingerprint, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'new', ?, ?)",
                (
                    name,
                    host,
                    ssh_port,
                    username,
                    None if auth is None else box.encrypt_json(auth),
                    box.encrypt_json(sudo),
                    host_key_fingerprint,
                    now,
                    now,
                ),
            )
            return int(t.lastrowid or 0)

        return self._db.run(txn)

    def get_server(self, server_id: int) -> Deferred[ServerRecord | None]:
        def txn(t: Txn) -> ServerRecord | None:
            t.execute("SELECT * FROM servers WHERE id = ?", (server_id,))
            row = t.fetchone()
            return None if row is None else self._server(row)

        return self._db.run(txn)

    def list_servers(
        self, *, tag: str | None = None, q: str | None = None
    ) -> Deferred[list[ServerRecord]]:
        """Servers in id order; ``tag``: only those with this tag; ``q``: a
        case-insensitive substring of the name or host."""

        def txn(t: Txn) -> list[ServerRecord]:
            sql = "SELECT * FROM servers WHERE 1 = 1"
            params: list[Any] = []
            if tag is not None:
                sql += " AND tags LIKE ? ESCAPE '\\'"
                params.append(f"%,{like(tag.lower())},%")
            if q:
                sql += " AND (name LIKE ? ESCAPE '\\' OR host LIKE ? ESCAPE '\\')"
                params += [f"%{like(q)}%"] * 2
            t.execute(sql + " ORDER BY id", params)
            return [self._server(r) for r in t.fetchall()]

        return self._db.run(txn)

    def update_server(
        self,
        server_id: int,
        *,
        host_key: str | None = UNSET,
        status: str = UNSET,
        status_reason: str | None = UNSET,
        auth: dict[str, Any] | None = UNSET,
        host_key_fingerprint: str | None = UNSET,
        name: str = UNSET,
        host: str = UNSET,
        ssh_port: int = UNSET,
        username: str = UNSET,
        sudo: dict[str, Any] = UNSET,
        tags: list[str] = UNSET,
    ) -> Deferred[None]:
        """Set only the fields passed. NotFoundError for an unknown server."""
        now = self._db.now()

        def txn(t: Txn) -> None:
            fields: dict[str, Any] = {}
            for column, value in (
                ("name", name),
                ("host", host),
                ("ssh_port", ssh_port),
                ("username", username),
            ):
                if value is not UNSET:
                    fields[column] = value
            if ssh_port is not UNSET and not 1 <= int(ssh_port) <= 65535:
                raise ValueError(f"ssh_port must be in 1-65535, not {ssh_port}")
            if sudo is not UNSET:
                fields["sudo_enc"] = self._db.box().encrypt_json(sudo)
            if tags is not UNSET:
                fields["tags"] = tags_text(tags)
            if host_key is not UNSET:
                fields["host_key"] = host_key
            if status is not UNSET:
                check(status, SERVER_STATUSES, "status")
                fields["status"] = status
            if status_reason is not UNSET:
                fields["status_reason"] = status_reason
            if auth is not UNSET:
                fields["auth_enc"] = None if auth is None else self._db.box().encrypt_json(auth)
            if host_key_fingerprint is not UNSET:
                fields["host_key_fingerprint"] = host_key_fingerprint
            update_row(t, "servers", server_id, fields, now, "server")

        return self._db.run(txn)

    def delete_server(self, server_id: int) -> Deferred[bool]:
        """Deletes the server, its agent, and their commands and installs (cascade)."""

        def txn(t: Txn) -> bool:
            t.execute("DELETE FROM servers WHERE id = ?", (server_id,))
            return bool(t.rowcount)

        return self._db.run(txn)

    def start_install(self, server_id: int, kind: str) -> Deferred[int]:
        """A new install record (status ``running``); returns its id."""
        now = self._db.now()

        def txn(t: Txn) -> int:
            check(kind, INSTALL_KINDS, "kind")
            t.execute("SELECT 1 FROM servers WHERE id = ?", (server_id,))
            if t.fetchone() is None:
                raise NotFoundError(f"server {server_id} not found")
            t.execute(
                "INSERT INTO installs (server_id, kind, status, started_at)"
                " VALUES (?, ?, 'running', ?)",
                (server_id, kind, now),
            )
            return int(t.lastrowid or 0)

        return self._db.run(txn)

    def record_install_step(
        self,
        install_id: int,
        step: str,
        status: str,
        log: str | None = None,
        error: str | None = None,
    ) -> Deferred[None]:
        """Insert or update one step. ``log`` replaces the stored log when given.

        ``started_at`` is set when the step is first recorded; ``finished_at``
        when its status is ok, failed or skipped.
        """
        now = self._db.now()

        def txn(t: Txn) -> None:
            check(status, INSTALL_STEP_STATUSES, "status")
            t.execute("SELECT 1 FROM installs WHERE id = ?", (install_id,))
            if t.fetchone() is None:
                raise NotFoundError(f"install {install_id} not found")
            finished = None if status == "running" else now
            t.execute(
                "INSERT INTO install_steps (install_id, step, status, log, error,"
                " started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (install_id, step) DO UPDATE SET"
                " status = excluded.status, log = COALESCE(excluded.log, log),"
                " error = excluded.error, finished_at = excluded.finished_at",
                (install_id, step, status, log, error, now, finished),
            )

        return self._db.run(txn)

    def finish_install(
        self, install_id: int, status: str, error: str | None = None
    ) -> Deferred[None]:
        """Close an install with ``ok``, ``failed`` or ``cancelled``.

        A step still ``running`` (the daemon was killed in it) is closed as
        ``failed`` with the install's error, in the same transaction: a closed
        install never shows a step running forever.
        """
        now = self._db.now()

        def txn(t: Txn) -> None:
            check(status, INSTALL_STATUSES[1:], "status")
            t.execute(
                "UPDATE installs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, error, now, install_id),
            )
            if not t.rowcount:
                raise NotFoundError(f"install {install_id} not found")
            t.execute(
                "UPDATE install_steps SET status = 'failed', error = COALESCE(error, ?),"
                " finished_at = ? WHERE install_id = ? AND status = 'running'",
                (error or f"install {status}", now, install_id),
            )

        return self._db.run(txn)

    def get_latest_install(self, server_id: int) -> Deferred[dict[str, Any] | None]:
        """The newest install of a server with its steps in the order first recorded."""

        def txn(t: Txn) -> dict[str, Any] | None:
            t.execute(
                "SELECT * FROM installs WHERE server_id = ? ORDER BY id DESC LIMIT 1",
                (server_id,),
            )
            row = t.fetchone()
            if row is None:
                return None
            t.execute(
                "SELECT step, status, log, error, started_at, finished_at FROM install_steps"
                " WHERE install_id = ? ORDER BY id",
                (row["id"],),
            )
            steps = [dict(s) for s in t.fetchall()]
            return {
                "id": row["id"],
                "kind": row["kind"],
                "status": row["status"],
                "error": row["error"],
                "started_at": row["started_at"],
                "finished_at": row["finished_at"],
                "steps": steps,
            }

        return self._db.run(txn)
