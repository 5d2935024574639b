# -*- test-case-name: tests.daemon.test_store_events,tests.daemon.test_store_contract -*-
"""The audit trail: who did what to which target, with what outcome.

Rules this module keeps: events are only appended, never changed; callers must
never put a secret in ``details`` (this module cannot tell one from a name).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from myxd.store.db import Database, Txn, dumps, loads
from myxd.store.records import EventRecord


class EventStore:
    """Queries on ``events``. All methods return Deferreds that fire in the reactor thread."""

    def __init__(self, db: Database) -> None:
        self._db = db

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
        now = self._db.now()

        def txn(t: Txn) -> int:
            t.execute(
                "INSERT INTO events (created_at, actor, action, target, outcome, details)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, actor, action, target, outcome, None if details is None else dumps(details)),
            )
            return int(t.lastrowid or 0)

        return self._db.run(txn)

    def list_events(
        self,
        *,
        limit: int = 50,
        before_id: int | None = None,
        kind: str | None = None,
        target: str | None = None,
        actor: str | None = None,
    ) -> Deferred[list[EventRecord]]:
        """Newest first; ``before_id`` pages back through older events; ``kind``
        (the action), ``target`` and ``actor`` match exactly."""

        def txn(t: Txn) -> list[EventRecord]:
            if limit < 0:
                raise ValueError("limit must not be negative")
            where = " WHERE 1 = 1"
            params: list[Any] = []
            for column, value in (
                ("id <", before_id),
                ("action =", kind),
                ("target =", target),
                ("actor =", actor),
            ):
                if value is not None:
                    where += f" AND {column} ?"
                    params.append(value)
            t.execute(
                "SELECT * FROM events" + where + " ORDER BY id DESC LIMIT ?",  # noqa: S608
                [*params, limit],
            )
            return [
                EventRecord(
                    id=r["id"],
                    created_at=r["created_at"],
                    actor=r["actor"],
                    action=r["action"],
                    target=r["target"],
                    outcome=r["outcome"],
                    details=loads(r["details"]),
                )
                for r in t.fetchall()
            ]

        return self._db.run(txn)
