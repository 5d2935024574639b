# -*- test-case-name: tests.daemon.test_store_agents,tests.daemon.test_store_contract -*-
"""Agent records: adoption, identity, status, and the heartbeat results in bulk.

Rules this module keeps:
- It never logs or returns a token or secret key except inside an
  ``AgentRecord`` (whose repr hides them), and never stores one unencrypted.
- Every method is one transaction in the pool's thread (``Database.run``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from myxd.errors import ConflictError, NotFoundError
from myxd.identity import AgentIdentity, new_identity
from myxd.statuses import AGENT_STATUSES, ERROR_KINDS
from myxd.store.db import (
    UNSET,
    Database,
    Txn,
    check,
    counts,
    dumps,
    like,
    loads,
    tags_of,
    tags_text,
    update_row,
)
from myxd.store.records import AgentRecord, HeartbeatResult

# Agents with their server's name and tags (the API shows both).
_SELECT = (
    "SELECT agents.*, servers.name AS server_name, servers.tags AS server_tags"
    " FROM agents LEFT JOIN servers ON servers.id = agents.server_id"
)


class AgentStore:
    """Queries on ``agents``. All methods return Deferreds that fire in the reactor thread."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Ports handed out by new_agent_identity but not yet saved by add_agent.
        # Only touched from the pool's single thread.
        self._reserved_ports: set[int] = set()

    def _agent(self, row: sqlite3.Row) -> AgentRecord:
        box = self._db.box()
        return AgentRecord(
            id=row["id"],
            server_id=row["server_id"],
            host=row["host"],
            rpc_port=row["rpc_port"],
            rpc_path=row["rpc_path"],
            token=box.decrypt(row["token_enc"]),
            secret_key=box.decrypt(row["secret_key_enc"]),
            cert_fingerprint=row["cert_fingerprint"],
            status=row["status"],
            status_reason=row["status_reason"],
            rpc_supported=bool(row["rpc_supported"]),
            rpc_last_check=row["rpc_last_check"],
            rpc_last_success=row["rpc_last_success"],
            last_heartbeat=row["last_heartbeat"],
            version=row["version"],
            details=loads(row["details"]),
            failed_cycles=row["failed_cycles"],
            created_at=row["created_at"],
            total_failures=row["total_failures"],
            last_error_kind=row["last_error_kind"],
            last_latency=row["last_latency"],
            updated_at=row["updated_at"],
            name=row["server_name"] or row["name"] or row["host"],
            tags=tuple(sorted(set(tags_of(row["tags"])) | set(tags_of(row["server_tags"])))),
            own_tags=tags_of(row["tags"]),
        )

    def new_agent_identity(self) -> Deferred[AgentIdentity]:
        """A fresh identity whose ``rpc_port`` no agent in the DB uses."""

        def txn(t: Txn) -> AgentIdentity:
            def taken(port: int) -> bool:
                if port in self._reserved_ports:
                    return True
                t.execute("SELECT 1 FROM agents WHERE rpc_port = ?", (port,))
                return t.fetchone() is not None

            ident = new_identity(taken)
            self._reserved_ports.add(ident.rpc_port)
            return ident

        return self._db.run(txn)

    def add_agent(
        self,
        *,
        host: str,
        rpc_port: int,
        rpc_path: str,
        token: str,
        secret_key: str,
        cert_fingerprint: str,
        status: str = "online",
        server_id: int | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> Deferred[int]:
        """Save an agent; returns its id.

        Raises ConflictError if ``rpc_port`` is taken or the server already has
        an agent, NotFoundError if ``server_id`` is unknown.
        """
        now = self._db.now()

        def txn(t: Txn) -> int:
            check(status, AGENT_STATUSES, "status")
            if not 1 <= int(rpc_port) <= 65535:
                raise ValueError(f"rpc_port must be in 1-65535, not {rpc_port}")
            box = self._db.box()
            t.execute("SELECT id FROM agents WHERE rpc_port = ?", (rpc_port,))
            row = t.fetchone()
            if row is not None:
                raise ConflictError(f"rpc_port {rpc_port} is already used by agent {row[0]}")
            if server_id is not None:
                t.execute("SELECT 1 FROM servers WHERE id = ?", (server_id,))
                if t.fetchone() is None:
                    raise NotFoundError(f"server {server_id} not found")
                t.execute("SELECT id FROM agents WHERE server_id = ?", (server_id,))
                row = t.fetchone()
                if row is not None:
                    raise ConflictError(f"server {server_id} already has agent {row[0]}")
            t.execute(
                "INSERT INTO agents (server_id, host, rpc_port, rpc_path, token_enc,"
                " secret_key_enc, cert_fingerprint, status, created_at, updated_at, name, tags)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    server_id,
                    host,
                    rpc_port,
                    rpc_path,
                    box.encrypt(token),
                    box.encrypt(secret_key),
                    cert_fingerprint,
                    status,
                    now,
                    now,
                    name,
                    tags_text(tags),
                ),
            )
            self._reserved_ports.discard(rpc_port)
            return int(t.lastrowid or 0)

        return self._db.run(txn)

    def get_agent(self, agent_id: int) -> Deferred[AgentRecord | None]:
        def txn(t: Txn) -> AgentRecord | None:
            t.execute(_SELECT + " WHERE agents.id = ?", (agent_id,))
            row = t.fetchone()
            return None if row is None else self._agent(row)

        return self._db.run(txn)

    def get_agent_for_server(self, server_id: int) -> Deferred[AgentRecord | None]:
        def txn(t: Txn) -> AgentRecord | None:
            t.execute(_SELECT + " WHERE agents.server_id = ?", (server_id,))
            row = t.fetchone()
            return None if row is None else self._agent(row)

        return self._db.run(txn)

    def list_agents(
        self, *, limit: int | None = None, offset: int = 0, status: str | None = None
    ) -> Deferred[list[AgentRecord]]:
        """Agents in id order, optionally one status only."""

        def txn(t: Txn) -> list[AgentRecord]:
            if status is not None:
                check(status, AGENT_STATUSES, "status")
            if offset < 0 or (limit is not None and limit < 0):
                raise ValueError("limit and offset must not be negative")
            sql = _SELECT
            params: list[Any] = []
            if status is not None:
                sql += " WHERE agents.status = ?"
                params.append(status)
            sql += " ORDER BY agents.id LIMIT ? OFFSET ?"
            params += [-1 if limit is None else limit, offset]
            t.execute(sql, params)
            return [self._agent(r) for r in t.fetchall()]

        return self._db.run(txn)

    def search_agents(
        self,
        *,
        q: str | None = None,
        status: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Deferred[tuple[list[AgentRecord], int]]:
        """One page of installed agents (an agent whose install never finished
        has no certificate fingerprint and is not listed) and the filtered total.

        ``q``: case-insensitive substring of the name or host; ``tag``: the
        agent's or its server's tag.
        """

        def txn(t: Txn) -> tuple[list[AgentRecord], int]:
            if status is not None:
                check(status, AGENT_STATUSES, "status")
            if offset < 0 or limit < 0:
                raise ValueError("limit and offset must not be negative")
            where = " WHERE agents.cert_fingerprint != ''"
            params: list[Any] = []
            if status is not None:
                where += " AND agents.status = ?"
                params.append(status)
            if tag is not None:
                where += (
                    " AND (agents.tags LIKE ? ESCAPE '\\'"
                    " OR COALESCE(servers.tags, '') LIKE ? ESCAPE '\\')"
                )
                params += [f"%,{like(tag.lower())},%"] * 2
            if q:
                where += (
                    " AND (COALESCE(servers.name, agents.name, agents.host) LIKE ? ESCAPE '\\'"
                    " OR agents.host LIKE ? ESCAPE '\\')"
                )
                params += [f"%{like(q)}%"] * 2
            count = "SELECT COUNT(*) FROM agents LEFT JOIN servers ON servers.id = agents.server_id"
            t.execute(count + where, params)  # noqa: S608 - fixed clauses; values are bound
            total = int(t.fetchone()[0])
            t.execute(
                _SELECT + where + " ORDER BY agents.id LIMIT ? OFFSET ?", [*params, limit, offset]
            )
            return [self._agent(r) for r in t.fetchall()], total

        return self._db.run(txn)

    def delete_agent(self, agent_id: int) -> Deferred[bool]:
        """Deletes the agent and (by cascade) its commands and output."""

        def txn(t: Txn) -> bool:
            t.execute("DELETE FROM agents WHERE id = ?", (agent_id,))
            return bool(t.rowcount)

        return self._db.run(txn)

    def set_agent_status(
        self, agent_id: int, status: str, reason: str | None = None
    ) -> Deferred[None]:
        now = self._db.now()

        def txn(t: Txn) -> None:
            check(status, AGENT_STATUSES, "status")
            t.execute(
                "UPDATE agents SET status = ?, status_reason = ?, updated_at = ? WHERE id = ?",
                (status, reason, now, agent_id),
            )

        return self._db.run(txn)

    def update_agent(
        self,
        agent_id: int,
        *,
        host: str = UNSET,
        cert_fingerprint: str = UNSET,
        status: str = UNSET,
        status_reason: str | None = UNSET,
        server_id: int | None = UNSET,
        failed_cycles: int = UNSET,
        name: str | None = UNSET,
        tags: Sequence[str] = UNSET,
    ) -> Deferred[None]:
        """Set only the fields passed. Raises NotFoundError for an unknown agent."""
        now = self._db.now()
        fields: dict[str, Any] = {
            k: v
            for k, v in (
                ("name", name),
                ("tags", UNSET if tags is UNSET else tags_text(tags)),
                ("host", host),
                ("cert_fingerprint", cert_fingerprint),
                ("status", status),
                ("status_reason", status_reason),
                ("server_id", server_id),
                ("failed_cycles", failed_cycles),
            )
            if v is not UNSET
        }

        def txn(t: Txn) -> None:
            if "status" in fields:
                check(fields["status"], AGENT_STATUSES, "status")
            update_row(t, "agents", agent_id, fields, now, "agent")

        return self._db.run(txn)

    def record_heartbeat_results(self, results: Sequence[HeartbeatResult]) -> Deferred[None]:
        """Store one heartbeat cycle's results in ONE transaction.

        ok: online, reason cleared, ``failed_cycles`` reset, version/details kept
        if the result has none. Not ok: offline with the reason, ``failed_cycles``
        and ``total_failures`` + 1. An agent being installed keeps the
        ``installing`` status (the installer owns it) but its counters move.
        Results for agents deleted meanwhile are ignored.
        """
        results = list(results)

        def txn(t: Txn) -> None:
            ok_rows = []
            bad_rows = []
            for r in results:
                if r.ok:
                    ok_rows.append(
                        (
                            r.at,
                            r.at,
                            r.at,
                            r.version,
                            None if r.details is None else dumps(r.details),
                            r.latency,
                            r.at,
                            r.agent_id,
                        )
                    )
                else:
                    if r.error_kind is not None:
                        check(r.error_kind, ERROR_KINDS, "error_kind")
                    bad_rows.append((r.reason, r.error_kind, r.at, r.at, r.agent_id))
            if ok_rows:
                t.executemany(
                    "UPDATE agents SET status = 'online', status_reason = NULL,"
                    " failed_cycles = 0, last_error_kind = NULL, rpc_supported = 1,"
                    " rpc_last_check = ?, rpc_last_success = ?, last_heartbeat = ?,"
                    " version = COALESCE(?, version), details = COALESCE(?, details),"
                    " last_latency = COALESCE(?, last_latency), updated_at = ?"
                    " WHERE id = ?",
                    ok_rows,
                )
            if bad_rows:
                t.executemany(
                    "UPDATE agents SET"
                    " status = CASE status WHEN 'installing' THEN status ELSE 'offline' END,"
                    " status_reason = CASE status WHEN 'installing' THEN status_reason"
                    "   ELSE ? END,"
                    " failed_cycles = failed_cycles + 1, total_failures = total_failures + 1,"
                    " last_error_kind = ?, rpc_last_check = ?, updated_at = ?"
                    " WHERE id = ?",
                    bad_rows,
                )

        return self._db.run(txn)

    def agent_counts_by_status(self) -> Deferred[dict[str, int]]:
        """Every status (zero-filled) -> number of agents."""
        return self._db.run(counts, "agents", AGENT_STATUSES)
