# -*- test-case-name: tests.daemon.test_api_ops -*-
"""The admin API's rows in the audit trail (the API and the adoption it asks for):
one actor, and a failed write never turns a done action into an error for the
client."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from myxd.store.protocols import EventLog

#: The actor of what the admin API does, in the audit trail.
ACTOR = "admin-api"


async def record_event(
    store: EventLog,
    log: Logger,
    action: str,
    target: str | None,
    outcome: str,
    details: dict[str, Any] | None = None,
) -> None:
    try:
        await store.add_event(
            actor=ACTOR, action=action, target=target, outcome=outcome, details=details
        )
    except Exception:
        log.failure("could not record event {action}", action=action)
