# -*- test-case-name: tests.daemon.test_store_commands,tests.daemon.test_fast_paths -*-
"""Command records and their output: create, update, append output, read it back.

Output is stored as the bytes of the combined stdout/stderr stream by offset.
Appends are group-committed and live reads are grouped (``Database.batcher``):
under 1,000 live streams that is a few dozen transactions a second, not
thousands.

Rules this module keeps:
- It never stores a byte of command output twice, and never leaves a gap: an
  append is checked against the stored ``output_offset`` in the same
  transaction that advances it.
- Grouping never changes a result: every append and read is checked and
  answered on its own, and one that fails stops no other.
- A command's ``env`` values (often credentials) are never stored in clear:
  ``extra`` keeps the names readable and each value encrypted with the
  store's SecretBox (``env_enc``); rows written before that, with a plain
  ``env``, still read back.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from myxd.errors import ConflictError, NotFoundError, OutputGapError
from myxd.statuses import COMMAND_KINDS, COMMAND_STATUSES, OUTPUT_STREAMS, UNFINISHED_STATUSES
from myxd.store.db import Database, Txn, check, counts, dumps, like, loads, update_row
from myxd.store.records import CommandRecord, OutputChunk

MAX_READ_BYTES = 16 * 1024 * 1024

CommandOutput = tuple[CommandRecord | None, list[OutputChunk]]


# Key in the stored ``extra`` of the encrypted env: {name: Fernet token}.
_ENV_ENC = "env_enc"


def _seal_extra(extra: dict[str, Any] | None, db: Database) -> str | None:
    """``extra`` as stored: the env values encrypted, their names readable."""
    if extra is None:
        return None
    out = dict(extra)
    env = out.pop("env", None)
    if isinstance(env, dict) and env:
        box = db.box()
        out[_ENV_ENC] = {str(k): box.encrypt_json(v).decode("ascii") for k, v in env.items()}
    elif env is not None:
        out["env"] = env
    return dumps(out)


def _open_extra(raw: str | None, db: Database) -> dict[str, Any] | None:
    extra = loads(raw)
    if isinstance(extra, dict) and isinstance(extra.get(_ENV_ENC), dict):
        box = db.box()
        sealed = extra.pop(_ENV_ENC)
        extra["env"] = {k: box.decrypt_json(v.encode("ascii")) for k, v in sealed.items()}
    return extra


def _command(row: sqlite3.Row, db: Database) -> CommandRecord:
    return CommandRecord(
        id=row["id"],
        agent_id=row["agent_id"],
        command_uid=row["command_uid"],
        kind=row["kind"],
        command=row["command"],
        args=loads(row["args"]),
        timeout=row["timeout"],
        extra=_open_extra(row["extra"], db),
        status=row["status"],
        exit_code=row["exit_code"],
        reason=row["reason"],
        result=loads(row["result"]),
        attempts=row["attempts"],
        output_offset=row["output_offset"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        agent_name=row["agent_name"] if "agent_name" in row.keys() else None,
    )


# Commands with their agent's name (the server's, an adopted agent's own, or its host).
_SELECT = (
    "SELECT c.*, COALESCE(s.name, a.name, a.host) AS agent_name FROM agent_commands c"
    " JOIN agents a ON a.id = c.agent_id LEFT JOIN servers s ON s.id = a.server_id"
)


class CommandStore:
    """Queries on ``agent_commands`` and ``command_output``.

    All methods return Deferreds that fire in the reactor thread.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._appends = db.batcher(_append_batch)
        self._reads = db.batcher(self._read_batch)

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
        command_uid: str | None = None,
    ) -> Deferred[CommandRecord]:
        """Record a command with ``command_uid`` (a fresh one by default; a
        deployment target reserves its own); NotFoundError if no such agent,
        ConflictError if the uid is taken."""
        now = self._db.now()
        uid = command_uid or uuid.uuid4().hex

        def txn(t: Txn) -> CommandRecord:
            check(kind, COMMAND_KINDS, "kind")
            check(status, COMMAND_STATUSES, "status")
            t.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,))
            if t.fetchone() is None:
                raise NotFoundError(f"agent {agent_id} not found")
            t.execute("SELECT id FROM agent_commands WHERE command_uid = ?", (uid,))
            taken = t.fetchone()
            if taken is not None:
                raise ConflictError(f"command_uid {uid} is already used by command {taken[0]}")
            t.execute(
                "INSERT INTO agent_commands (agent_id, command_uid, kind, command, args,"
                " timeout, extra, status, created_at, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    agent_id,
                    uid,
                    kind,
                    command,
                    dumps(list(args)),
                    timeout,
                    _seal_extra(extra, self._db),
                    status,
                    now,
                    now if status == "running" else None,
                    now,
                ),
            )
            t.execute(_SELECT + " WHERE c.id = ?", (t.lastrowid,))
            return _command(t.fetchone(), self._db)

        return self._db.run(txn)

    def get_command(self, command_id: int) -> Deferred[CommandRecord | None]:
        def txn(t: Txn) -> CommandRecord | None:
            t.execute(_SELECT + " WHERE c.id = ?", (command_id,))
            row = t.fetchone()
            return None if row is None else _command(row, self._db)

        return self._db.run(txn)

    def get_command_by_uid(self, command_uid: str) -> Deferred[CommandRecord | None]:
        def txn(t: Txn) -> CommandRecord | None:
            t.execute(_SELECT + " WHERE c.command_uid = ?", (command_uid,))
            row = t.fetchone()
            return None if row is None else _command(row, self._db)

        return self._db.run(txn)

    def list_commands(
        self,
        *,
        agent_id: int | None = None,
        limit: int = 50,
        offset: int = 0,
        status: str | None = None,
        kind: str | None = None,
        q: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Deferred[list[CommandRecord]]:
        """Newest first, filtered (see ``search_commands``)."""
        d = self.search_commands(
            agent_id=agent_id,
            limit=limit,
            offset=offset,
            status=status,
            kind=kind,
            q=q,
            since=since,
            until=until,
            with_total=False,
        )
        return d.addCallback(lambda page: page[0])

    def search_commands(
        self,
        *,
        agent_id: int | None = None,
        limit: int = 50,
        offset: int = 0,
        status: str | None = None,
        kind: str | None = None,
        q: str | None = None,
        since: float | None = None,
        until: float | None = None,
        with_total: bool = True,
    ) -> Deferred[tuple[list[CommandRecord], int]]:
        """One page of commands, newest first, and the filtered total (0 when
        not ``with_total``). ``q``: substring of the command line (program,
        playbook or arguments); ``since``/``until``: bounds on ``created_at``."""

        def txn(t: Txn) -> tuple[list[CommandRecord], int]:
            if limit < 0 or offset < 0:
                raise ValueError("limit and offset must not be negative")
            if status is not None:
                check(status, COMMAND_STATUSES, "status")
            if kind is not None:
                check(kind, COMMAND_KINDS, "kind")
            where = " WHERE 1 = 1"
            params: list[Any] = []
            for column, value in (("c.agent_id", agent_id), ("c.status", status), ("c.kind", kind)):
                if value is not None:
                    where += f" AND {column} = ?"
                    params.append(value)
            if since is not None:
                where += " AND c.created_at >= ?"
                params.append(since)
            if until is not None:
                where += " AND c.created_at <= ?"
                params.append(until)
            if q:
                where += " AND (c.command LIKE ? ESCAPE '\\' OR c.args LIKE ? ESCAPE '\\')"
                params += [f"%{like(q)}%", f"%{like(dumps(q)[1:-1])}%"]
            total = 0
            if with_total:
                t.execute("SELECT COUNT(*) FROM agent_commands c" + where, params)  # noqa: S608 - fixed clauses; values are bound
                total = int(t.fetchone()[0])
            t.execute(
                _SELECT + where + " ORDER BY c.id DESC LIMIT ? OFFSET ?", [*params, limit, offset]
            )
            return [_command(r, self._db) for r in t.fetchall()], total

        return self._db.run(txn)

    def list_unfinished_commands(self) -> Deferred[list[CommandRecord]]:
        """Pending and running commands, oldest first (to resume at start)."""

        def txn(t: Txn) -> list[CommandRecord]:
            marks = ", ".join("?" for _ in UNFINISHED_STATUSES)
            t.execute(
                _SELECT + f" WHERE c.status IN ({marks}) ORDER BY c.id",  # noqa: S608
                UNFINISHED_STATUSES,
            )
            return [_command(r, self._db) for r in t.fetchall()]

        return self._db.run(txn)

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
        now = self._db.now()
        fields: dict[str, Any] = {
            k: v
            for k, v in (
                ("status", status),
                ("exit_code", exit_code),
                ("reason", reason),
                ("result", None if result is None else dumps(result)),
                ("attempts", attempts),
                ("started_at", started_at),
                ("finished_at", finished_at),
            )
            if v is not None
        }

        def txn(t: Txn) -> None:
            if status is not None:
                check(status, COMMAND_STATUSES, "status")
            update_row(t, "agent_commands", command_id, fields, now, "command")

        return self._db.run(txn)

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
        return self._appends.submit(_Append(command_id, offset, stream, bytes(data)))

    def read_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[list[OutputChunk]]:
        """Stored output from ``offset``, at most ``max_bytes`` bytes.

        The first chunk starts exactly at ``offset``; consecutive chunks of the
        same stream are merged. Past the end (or an unknown command): ``[]``.
        """

        def txn(t: Txn) -> list[OutputChunk]:
            return _read_chunks(t, command_id, offset, max_bytes)

        return self._db.run(txn)

    def read_command_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[tuple[CommandRecord | None, list[OutputChunk]]]:
        """``get_command`` and ``read_output`` in one consistent snapshot: the
        record, then the chunks. An unknown command is ``(None, [])``.

        Every live reader (an API long-poll) asks this after each new line, so
        reads that arrive while others are being served are grouped: the next
        group runs in one transaction, each read checked and answered on its
        own. A read never runs before it was asked, so it sees every write that
        finished before it.
        """
        return self._reads.submit((command_id, offset, max_bytes))

    def _read_batch(
        self, t: Txn, batch: list[tuple[int, int, int]]
    ) -> list[CommandOutput | Exception]:
        return _read_batch(t, batch, self._db)

    def command_counts_by_status(self) -> Deferred[dict[str, int]]:
        """Every status (zero-filled) -> number of commands."""
        return self._db.run(counts, "agent_commands", COMMAND_STATUSES)


@dataclass
class _Append:
    command_id: int
    offset: int
    stream: str
    data: bytes


def _append_batch(t: Txn, batch: list[_Append]) -> list[int | Exception]:
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


def _read_batch(
    t: Txn, batch: list[tuple[int, int, int]], db: Database
) -> list[CommandOutput | Exception]:
    out: list[CommandOutput | Exception] = []
    for command_id, offset, max_bytes in batch:
        try:
            t.execute(_SELECT + " WHERE c.id = ?", (command_id,))
            row = t.fetchone()
            # The argument checks apply to an unknown id too.
            chunks = _read_chunks(t, command_id, offset, max_bytes)
            out.append((None, []) if row is None else (_command(row, db), chunks))
        except ValueError as e:
            # A bad offset or size answers its own read only.
            out.append(e)
    return out


def _append_one(t: Txn, item: _Append) -> int:
    check(item.stream, OUTPUT_STREAMS, "stream")
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
