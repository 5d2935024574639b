"""The SQLite store: one adbapi connection, versioned schema, secrets encrypted at rest.

``StoreService`` owns the ``ConnectionPool`` (one connection, one thread, WAL,
foreign keys on) and brings the schema up to date when it starts. ``Store``
holds every query. Each public method is one ``runInteraction``, so each
logical write is one transaction: a failure leaves nothing half-written.

Rules this module keeps:
- It never runs SQL, file I/O or crypto on the reactor thread: all of it runs in
  the pool's thread, and every public method returns a Deferred.
- It never logs a token, secret key, password, private key or sudo password,
  and never stores one unencrypted.
- It never stores a byte of command output twice, and never leaves a gap.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd.errors import ConflictError, NotFoundError, OutputGapError, StoreError
from myxd.identity import AgentIdentity, new_identity
from myxd.store import migrate
from myxd.store.crypto import KEY_FILE_NAME, SecretBox, load_or_create_key
from myxd.store.records import (
    AGENT_STATUSES,
    COMMAND_KINDS,
    COMMAND_STATUSES,
    ERROR_KINDS,
    INSTALL_KINDS,
    INSTALL_STATUSES,
    INSTALL_STEP_STATUSES,
    OUTPUT_STREAMS,
    SERVER_STATUSES,
    AgentRecord,
    CommandRecord,
    EventRecord,
    HeartbeatResult,
    OutputChunk,
    ServerRecord,
)

T = TypeVar("T")

# adbapi hands interactions a Transaction that proxies a sqlite3 cursor.
Txn = sqlite3.Cursor

BUSY_TIMEOUT_MS = 10000
MAX_READ_BYTES = 16 * 1024 * 1024


class _Unset:
    """Marks a keyword argument the caller did not pass (so None can mean NULL)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def _open_connection(conn: sqlite3.Connection) -> None:
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"SQLite refused WAL mode (journal_mode={mode})")
    # NORMAL is durable against process crashes in WAL mode; output offsets and
    # bytes are committed together, so a lost tail after a power cut is simply
    # fetched again from the agent.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.commit()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


class Store:
    """Every query of the daemon. Use through ``StoreService.store``.

    All methods return Deferreds that fire in the reactor thread.
    """

    log = Logger()

    def __init__(self, pool: adbapi.ConnectionPool | None, reactor: IReactorTime) -> None:
        self._pool = pool
        self._reactor = reactor
        self._box: SecretBox | None = None
        # Ports handed out by new_agent_identity but not yet saved by add_agent.
        # Only touched from the pool's single thread.
        self._reserved_ports: set[int] = set()
        self._pending: set[Deferred[Any]] = set()
        self._closed = False
        # append_output's group commit: waiting appends, the batch being
        # written, and who waits for both to be empty (stop).
        self._appends: list[_Append] = []
        self._append_batch: Deferred[Any] | None = None
        self._append_idle: list[Deferred[None]] = []

    # -- plumbing ---------------------------------------------------------

    def _run(self, interaction: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._pool is None:
            return fail(StoreError("the store is not started"))
        if self._closed:
            return fail(StoreError("the store is closed"))
        d: Deferred[T] = self._pool.runInteraction(interaction, *args)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d

    def _drain(self) -> Deferred[Any]:
        """Fires once every interaction started so far has finished."""
        waits = list(self._pending)
        if self._append_batch is not None or self._appends:
            idle: Deferred[None] = Deferred()
            self._append_idle.append(idle)
            waits.append(idle)
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=False)

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            raise StoreError("the store is not started")
        return self._box

    def _now(self) -> float:
        return float(self._reactor.seconds())

    # -- row conversion (pool thread) ---------------------------------------

    def _agent(self, row: sqlite3.Row) -> AgentRecord:
        box = self._secret_box()
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
            details=_loads(row["details"]),
            failed_cycles=row["failed_cycles"],
            created_at=row["created_at"],
            total_failures=row["total_failures"],
            last_error_kind=row["last_error_kind"],
            last_latency=row["last_latency"],
            updated_at=row["updated_at"],
        )

    @staticmethod
    def _command(row: sqlite3.Row) -> CommandRecord:
        return CommandRecord(
            id=row["id"],
            agent_id=row["agent_id"],
            command_uid=row["command_uid"],
            kind=row["kind"],
            command=row["command"],
            args=_loads(row["args"]),
            timeout=row["timeout"],
            extra=_loads(row["extra"]),
            status=row["status"],
            exit_code=row["exit_code"],
            reason=row["reason"],
            result=_loads(row["result"]),
            attempts=row["attempts"],
            output_offset=row["output_offset"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )

    def _server(self, row: sqlite3.Row) -> ServerRecord:
        box = self._secret_box()
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
        )

    # -- agents -------------------------------------------------------------

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

        return self._run(txn)

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
    ) -> Deferred[int]:
        """Save an agent; returns its id.

        Raises ConflictError if ``rpc_port`` is taken or the server already has
        an agent, NotFoundError if ``server_id`` is unknown.
        """
        now = self._now()

        def txn(t: Txn) -> int:
            _check(status, AGENT_STATUSES, "status")
            if not 1 <= int(rpc_port) <= 65535:
                raise ValueError(f"rpc_port must be in 1-65535, not {rpc_port}")
            box = self._secret_box()
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
                " secret_key_enc, cert_fingerprint, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
            self._reserved_ports.discard(rpc_port)
            return int(t.lastrowid or 0)

        return self._run(txn)

    def get_agent(self, agent_id: int) -> Deferred[AgentRecord | None]:
        def txn(t: Txn) -> AgentRecord | None:
            t.execute("SELECT * FROM agents WHERE id = ?", (agent_id,))
            row = t.fetchone()
            return None if row is None else self._agent(row)

        return self._run(txn)

    def get_agent_for_server(self, server_id: int) -> Deferred[AgentRecord | None]:
        def txn(t: Txn) -> AgentRecord | None:
            t.execute("SELECT * FROM agents WHERE server_id = ?", (server_id,))
            row = t.fetchone()
            return None if row is None else self._agent(row)

        return self._run(txn)

    def list_agents(
        self, *, limit: int | None = None, offset: int = 0, status: str | None = None
    ) -> Deferred[list[AgentRecord]]:
        """Agents in id order, optionally one status only."""

        def txn(t: Txn) -> list[AgentRecord]:
            if status is not None:
                _check(status, AGENT_STATUSES, "status")
            if offset < 0 or (limit is not None and limit < 0):
                raise ValueError("limit and offset must not be negative")
            sql = "SELECT * FROM agents"
            params: list[Any] = []
            if status is not None:
                sql += " WHERE status = ?"
                params.append(status)
            sql += " ORDER BY id LIMIT ? OFFSET ?"
            params += [-1 if limit is None else limit, offset]
            t.execute(sql, params)
            return [self._agent(r) for r in t.fetchall()]

        return self._run(txn)

    def delete_agent(self, agent_id: int) -> Deferred[bool]:
        """Deletes the agent and (by cascade) its commands and output."""

        def txn(t: Txn) -> bool:
            t.execute("DELETE FROM agents WHERE id = ?", (agent_id,))
            return bool(t.rowcount)

        return self._run(txn)

    def set_agent_status(
        self, agent_id: int, status: str, reason: str | None = None
    ) -> Deferred[None]:
        now = self._now()

        def txn(t: Txn) -> None:
            _check(status, AGENT_STATUSES, "status")
            t.execute(
                "UPDATE agents SET status = ?, status_reason = ?, updated_at = ? WHERE id = ?",
                (status, reason, now, agent_id),
            )

        return self._run(txn)

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
    ) -> Deferred[None]:
        """Set only the fields passed. Raises NotFoundError for an unknown agent."""
        now = self._now()
        fields: dict[str, Any] = {
            k: v
            for k, v in (
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
                _check(fields["status"], AGENT_STATUSES, "status")
            _update_row(t, "agents", agent_id, fields, now, "agent")

        return self._run(txn)

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
                            None if r.details is None else _dumps(r.details),
                            r.latency,
                            r.at,
                            r.agent_id,
                        )
                    )
                else:
                    if r.error_kind is not None:
                        _check(r.error_kind, ERROR_KINDS, "error_kind")
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

        return self._run(txn)

    def agent_counts_by_status(self) -> Deferred[dict[str, int]]:
        """Every status (zero-filled) -> number of agents."""
        return self._run(_counts, "agents", AGENT_STATUSES)

    # -- commands -----------------------------------------------------------

    def create_command(
        self,
        *,
        agent_id: int,
        kind: str,
        command: str,
        args: Sequence[Any],
        timeout: float | None,
        extra: dict[str, Any] | None = None,
        status: str = "running",
    ) -> Deferred[CommandRecord]:
        """Record a command with a fresh ``command_uid``; NotFoundError if no such agent."""
        now = self._now()
        uid = uuid.uuid4().hex

        def txn(t: Txn) -> CommandRecord:
            _check(kind, COMMAND_KINDS, "kind")
            _check(status, COMMAND_STATUSES, "status")
            t.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,))
            if t.fetchone() is None:
                raise NotFoundError(f"agent {agent_id} not found")
            t.execute(
                "INSERT INTO agent_commands (agent_id, command_uid, kind, command, args,"
                " timeout, extra, status, created_at, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    agent_id,
                    uid,
                    kind,
                    command,
                    _dumps(list(args)),
                    timeout,
                    None if extra is None else _dumps(extra),
                    status,
                    now,
                    now if status == "running" else None,
                    now,
                ),
            )
            t.execute("SELECT * FROM agent_commands WHERE id = ?", (t.lastrowid,))
            return self._command(t.fetchone())

        return self._run(txn)

    def get_command(self, command_id: int) -> Deferred[CommandRecord | None]:
        def txn(t: Txn) -> CommandRecord | None:
            t.execute("SELECT * FROM agent_commands WHERE id = ?", (command_id,))
            row = t.fetchone()
            return None if row is None else self._command(row)

        return self._run(txn)

    def list_commands(
        self, *, agent_id: int | None = None, limit: int = 50, offset: int = 0
    ) -> Deferred[list[CommandRecord]]:
        """Newest first."""

        def txn(t: Txn) -> list[CommandRecord]:
            if limit < 0 or offset < 0:
                raise ValueError("limit and offset must not be negative")
            if agent_id is None:
                t.execute(
                    "SELECT * FROM agent_commands ORDER BY id DESC LIMIT ? OFFSET ?",
                    (limit, offset),
                )
            else:
                t.execute(
                    "SELECT * FROM agent_commands WHERE agent_id = ?"
                    " ORDER BY id DESC LIMIT ? OFFSET ?",
                    (agent_id, limit, offset),
                )
            return [self._command(r) for r in t.fetchall()]

        return self._run(txn)

    def list_unfinished_commands(self) -> Deferred[list[CommandRecord]]:
        """Pending and running commands, oldest first (to resume at start)."""

        def txn(t: Txn) -> list[CommandRecord]:
            t.execute(
                "SELECT * FROM agent_commands WHERE status IN ('pending', 'running') ORDER BY id"
            )
            return [self._command(r) for r in t.fetchall()]

        return self._run(txn)

    def update_command(
        self,
        command_id: int,
        *,
        status: str | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
        attempts: int | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> Deferred[None]:
        """Set the fields that are not None. NotFoundError for an unknown command."""
        now = self._now()
        fields: dict[str, Any] = {
            k: v
            for k, v in (
                ("status", status),
                ("exit_code", exit_code),
                ("reason", reason),
                ("result", None if result is None else _dumps(result)),
                ("attempts", attempts),
                ("started_at", started_at),
                ("finished_at", finished_at),
            )
            if v is not None
        }

        def txn(t: Txn) -> None:
            if status is not None:
                _check(status, COMMAND_STATUSES, "status")
            _update_row(t, "agent_commands", command_id, fields, now, "command")

        return self._run(txn)

    def append_output(
        self, command_id: int, offset: int, stream: str, data: bytes
    ) -> Deferred[int]:
        """Store ``data`` (bytes ``[offset, offset+len)`` of the combined stream).

        Idempotent: only bytes past the stored ``output_offset`` are stored, in
        the same transaction that advances it. Returns the new output_offset.
        Raises OutputGapError when ``offset`` is past the stored offset, and
        NotFoundError for an unknown command.

        Group commit: appends that arrive while a batch of appends is being
        written wait for it and then go together in the next transaction (each
        checked and answered on its own; one that fails writes nothing and
        does not stop the others). With 1,000 live streams this turns 1,000
        transactions per second into a few dozen.
        """
        d: Deferred[int] = Deferred()
        self._appends.append(_Append(command_id, offset, stream, bytes(data), d))
        if self._append_batch is None:
            self._flush_appends()
        return d

    def _flush_appends(self) -> None:
        batch, self._appends = self._appends, []
        running = self._run(self._append_txn, batch)
        self._append_batch = running

        def settle(outcome: Any) -> None:
            self._append_batch = None
            if self._appends:
                self._flush_appends()
            for i, item in enumerate(batch):
                if isinstance(outcome, Failure):
                    item.done.errback(outcome)
                elif isinstance(outcome[i], Exception):
                    item.done.errback(Failure(outcome[i]))
                else:
                    item.done.callback(outcome[i])
            # Last, so that whoever waits for the store to drain (stop) sees
            # every append answered.
            if self._append_batch is None and not self._appends and self._append_idle:
                waiters, self._append_idle = self._append_idle, []
                for w in waiters:
                    w.callback(None)

        running.addBoth(settle)

    def _append_txn(self, t: Txn, batch: list[_Append]) -> list[int | Exception]:
        # Take the write lock before reading output_offset, so the
        # read-check-write cannot interleave with another writer.
        t.execute("BEGIN IMMEDIATE")
        out: list[int | Exception] = []
        for item in batch:
            try:
                out.append(_append_one(t, item))
            except (ValueError, NotFoundError, OutputGapError) as e:
                # Raised before this item wrote anything: the others go on.
                out.append(e)
        return out

    def read_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[list[OutputChunk]]:
        """Stored output from ``offset``, at most ``max_bytes`` bytes.

        The first chunk starts exactly at ``offset``; consecutive chunks of the
        same stream are merged. Past the end (or an unknown command): ``[]``.
        """

        def txn(t: Txn) -> list[OutputChunk]:
            return _read_chunks(t, command_id, offset, max_bytes)

        return self._run(txn)

    def read_command_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[tuple[CommandRecord | None, list[OutputChunk]]]:
        """``get_command`` and ``read_output`` in ONE transaction (one consistent
        snapshot, one trip through the pool's thread): the record, then the chunks.

        An unknown command is ``(None, [])``.
        """

        def txn(t: Txn) -> tuple[CommandRecord | None, list[OutputChunk]]:
            t.execute("SELECT * FROM agent_commands WHERE id = ?", (command_id,))
            row = t.fetchone()
            if row is None:
                # Same argument checks as read_output, also for an unknown id.
                _read_chunks(t, command_id, offset, max_bytes)
                return None, []
            return self._command(row), _read_chunks(t, command_id, offset, max_bytes)

        return self._run(txn)

    def command_counts_by_status(self) -> Deferred[dict[str, int]]:
        """Every status (zero-filled) -> number of commands."""
        return self._run(_counts, "agent_commands", COMMAND_STATUSES)

    # -- events -------------------------------------------------------------

    def add_event(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        details: dict[str, Any] | None = None,
    ) -> Deferred[int]:
        """Append to the audit trail; returns the event id. Never put secrets in details."""
        now = self._now()

        def txn(t: Txn) -> int:
            t.execute(
                "INSERT INTO events (created_at, actor, action, target, outcome, details)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, actor, action, target, outcome, None if details is None else _dumps(details)),
            )
            return int(t.lastrowid or 0)

        return self._run(txn)

    def list_events(
        self, *, limit: int = 50, before_id: int | None = None
    ) -> Deferred[list[EventRecord]]:
        """Newest first; ``before_id`` pages back through older events."""

        def txn(t: Txn) -> list[EventRecord]:
            if limit < 0:
                raise ValueError("limit must not be negative")
            if before_id is None:
                t.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
            else:
                t.execute(
                    "SELECT * FROM events WHERE id < ? ORDER BY id DESC LIMIT ?",
                    (before_id, limit),
                )
            return [
                EventRecord(
                    id=r["id"],
                    created_at=r["created_at"],
                    actor=r["actor"],
                    action=r["action"],
                    target=r["target"],
                    outcome=r["outcome"],
                    details=_loads(r["details"]),
                )
                for r in t.fetchall()
            ]

        return self._run(txn)

    # -- servers and installs -------------------------------------------------

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
        now = self._now()

        def txn(t: Txn) -> int:
            if not 1 <= int(ssh_port) <= 65535:
                raise ValueError(f"ssh_port must be in 1-65535, not {ssh_port}")
            box = self._secret_box()
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

        return self._run(txn)

    def get_server(self, server_id: int) -> Deferred[ServerRecord | None]:
        def txn(t: Txn) -> ServerRecord | None:
            t.execute("SELECT * FROM servers WHERE id = ?", (server_id,))
            row = t.fetchone()
            return None if row is None else self._server(row)

        return self._run(txn)

    def list_servers(self) -> Deferred[list[ServerRecord]]:
        def txn(t: Txn) -> list[ServerRecord]:
            t.execute("SELECT * FROM servers ORDER BY id")
            return [self._server(r) for r in t.fetchall()]

        return self._run(txn)

    def update_server(
        self,
        server_id: int,
        *,
        host_key: str | None = UNSET,
        status: str = UNSET,
        status_reason: str | None = UNSET,
        auth: dict[str, Any] | None = UNSET,
        host_key_fingerprint: str | None = UNSET,
    ) -> Deferred[None]:
        """Set only the fields passed. NotFoundError for an unknown server."""
        now = self._now()

        def txn(t: Txn) -> None:
            fields: dict[str, Any] = {}
            if host_key is not UNSET:
                fields["host_key"] = host_key
            if status is not UNSET:
                _check(status, SERVER_STATUSES, "status")
                fields["status"] = status
            if status_reason is not UNSET:
                fields["status_reason"] = status_reason
            if auth is not UNSET:
                fields["auth_enc"] = None if auth is None else self._secret_box().encrypt_json(auth)
            if host_key_fingerprint is not UNSET:
                fields["host_key_fingerprint"] = host_key_fingerprint
            _update_row(t, "servers", server_id, fields, now, "server")

        return self._run(txn)

    def delete_server(self, server_id: int) -> Deferred[bool]:
        """Deletes the server, its agent, and their commands and installs (cascade)."""

        def txn(t: Txn) -> bool:
            t.execute("DELETE FROM servers WHERE id = ?", (server_id,))
            return bool(t.rowcount)

        return self._run(txn)

    def start_install(self, server_id: int, kind: str) -> Deferred[int]:
        """A new install record (status ``running``); returns its id."""
        now = self._now()

        def txn(t: Txn) -> int:
            _check(kind, INSTALL_KINDS, "kind")
            t.execute("SELECT 1 FROM servers WHERE id = ?", (server_id,))
            if t.fetchone() is None:
                raise NotFoundError(f"server {server_id} not found")
            t.execute(
                "INSERT INTO installs (server_id, kind, status, started_at)"
                " VALUES (?, ?, 'running', ?)",
                (server_id, kind, now),
            )
            return int(t.lastrowid or 0)

        return self._run(txn)

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
        now = self._now()

        def txn(t: Txn) -> None:
            _check(status, INSTALL_STEP_STATUSES, "status")
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

        return self._run(txn)

    def finish_install(
        self, install_id: int, status: str, error: str | None = None
    ) -> Deferred[None]:
        """Close an install with ``ok``, ``failed`` or ``cancelled``."""
        now = self._now()

        def txn(t: Txn) -> None:
            _check(status, INSTALL_STATUSES[1:], "status")
            t.execute(
                "UPDATE installs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, error, now, install_id),
            )
            if not t.rowcount:
                raise NotFoundError(f"install {install_id} not found")

        return self._run(txn)

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

        return self._run(txn)


@dataclass
class _Append:
    command_id: int
    offset: int
    stream: str
    data: bytes
    done: Deferred[int]


def _append_one(t: Txn, item: _Append) -> int:
    _check(item.stream, OUTPUT_STREAMS, "stream")
    if item.offset < 0:
        raise ValueError(f"offset must not be negative, not {item.offset}")
    t.execute("SELECT output_offset FROM agent_commands WHERE id = ?", (item.command_id,))
    row = t.fetchone()
    if row is None:
        raise NotFoundError(f"command {item.command_id} not found")
    stored = int(row[0])
    if item.offset > stored:
        raise OutputGapError(item.command_id, item.offset, stored)
    end = item.offset + len(item.data)
    if end <= stored:
        return stored
    t.execute(
        "INSERT INTO command_output (command_id, offset, stream, data) VALUES (?, ?, ?, ?)",
        (item.command_id, stored, item.stream, item.data[stored - item.offset :]),
    )
    t.execute("UPDATE agent_commands SET output_offset = ? WHERE id = ?", (end, item.command_id))
    return end


def _read_chunks(t: Txn, command_id: int, offset: int, max_bytes: int) -> list[OutputChunk]:
    if offset < 0:
        raise ValueError(f"offset must not be negative, not {offset}")
    if not 1 <= max_bytes <= MAX_READ_BYTES:
        raise ValueError(f"max_bytes must be in 1-{MAX_READ_BYTES}, not {max_bytes}")
    t.execute(
        "SELECT offset FROM command_output WHERE command_id = ? AND offset <= ?"
        " ORDER BY offset DESC LIMIT 1",
        (command_id, offset),
    )
    row = t.fetchone()
    first = offset if row is None else int(row[0])
    t.execute(
        "SELECT offset, stream, data FROM command_output"
        " WHERE command_id = ? AND offset >= ? ORDER BY offset",
        (command_id, first),
    )
    chunks: list[tuple[int, str, bytearray]] = []
    budget = max_bytes
    while budget > 0:
        r = t.fetchone()
        if r is None:
            break
        start, stream, data = int(r[0]), str(r[1]), bytes(r[2])
        if start < offset:
            data = data[offset - start :]
            start = offset
        if not data:
            continue
        data = data[:budget]
        budget -= len(data)
        if chunks and chunks[-1][1] == stream:
            chunks[-1][2].extend(data)
        else:
            chunks.append((start, stream, bytearray(data)))
    return [OutputChunk(s, st, bytes(d)) for s, st, d in chunks]


def _update_row(
    t: Txn, table: str, row_id: int, fields: dict[str, Any], now: float, what: str
) -> None:
    # Column names come from the fixed keyword lists of the callers, never from input.
    assignments = ", ".join(f"{name} = ?" for name in fields)
    sql = f"UPDATE {table} SET {assignments + ', ' if fields else ''}updated_at = ? WHERE id = ?"  # noqa: S608
    t.execute(sql, [*fields.values(), now, row_id])
    if not t.rowcount:
        raise NotFoundError(f"{what} {row_id} not found")


def _counts(t: Txn, table: str, statuses: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(statuses, 0)
    t.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status")  # noqa: S608
    for status, n in t.fetchall():
        counts[status] = int(n)
    return counts


class StoreService(Service):
    """Owns the connection pool; ``.store`` is the ``Store``.

    The pool is created in ``startService``. Queries issued after that but
    before the schema upgrade finishes simply queue behind it: the pool has
    exactly one thread and runs work in order. ``when_ready()`` fires once the
    store is open, or fails with the reason it could not be opened (in which
    case, with ``stop_reactor_on_failure``, the reactor is stopped: a daemon
    without its store is useless).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        *,
        key_path: str | None = None,
        schema_dir: str | None = None,
        stop_reactor_on_failure: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.path = os.path.abspath(path)
        self.key_path = key_path or os.path.join(os.path.dirname(self.path), KEY_FILE_NAME)
        self.schema_dir = schema_dir or migrate.DEFAULT_SCHEMA_DIR
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.pool: adbapi.ConnectionPool | None = None
        self.store = Store(None, reactor)
        self.migration: migrate.MigrationReport | None = None
        self._outcome: Any = None
        self._waiters: list[Deferred[migrate.MigrationReport]] = []

    def when_ready(self) -> Deferred[migrate.MigrationReport]:
        """Fires with the migration report once open; fails if the store cannot open."""
        d: Deferred[migrate.MigrationReport] = Deferred()
        if self._outcome is None:
            self._waiters.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)
        return d

    def startService(self) -> None:
        super().startService()
        self.pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open_connection,
            cp_reactor=self._reactor,
        )
        self.store._pool = self.pool
        d = self.pool.runWithConnection(self._open)
        d.addCallbacks(self._opened, self._failed)

    def _open(self, conn: Any) -> migrate.MigrationReport:
        # adbapi's Connection proxies the sqlite3 connection's methods.
        raw = cast(sqlite3.Connection, conn)
        # Secrets are encrypted, but command output and host names are not:
        # keep the files private even if the data dir's mode is loosened.
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(self.path + suffix, 0o600)
            except FileNotFoundError:
                pass
        self.store._box = SecretBox(load_or_create_key(self.key_path))
        return migrate.upgrade(raw, self.path, self.schema_dir)

    def _opened(self, report: migrate.MigrationReport) -> None:
        self.migration = report
        if report.from_version == 0:
            self.log.info("store {path} created", path=self.path)
        elif report.from_version != report.to_version:
            self.log.info(
                "store {path} schema upgraded v{old} -> v{new} (backup: {backup})",
                path=self.path,
                old=report.from_version,
                new=report.to_version,
                backup=report.backup_path or "none needed",
            )
        self.log.info(
            "store {path} open at schema v{version}", path=self.path, version=report.to_version
        )
        self._settle(report)

    def _failed(self, failure: Failure) -> None:
        self.log.failure("store {path} could not be opened", failure, path=self.path)
        self._settle(failure)
        if (
            self.stop_reactor_on_failure
            and IReactorCore.providedBy(self._reactor)
            and self._reactor.running
        ):
            self._reactor.stop()

    def _settle(self, outcome: Any) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        pool = self.pool
        d = self.store._drain()

        def close(_: Any) -> None:
            # Work queued after this point is refused, not left waiting forever.
            self.store._closed = True
            if pool is not None:
                pool.close()

        d.addBoth(close)
        return d
