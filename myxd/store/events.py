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
                    details=loads(r["details"]),
                )
                for r in t.fetchall()
            ]

        return self._db.run(txn)
