# -*- test-case-name: tests.daemon.test_store_events -*-
"""The audit trail on a real SQLite file."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from tests.daemon.test_store import StoreTestBase, d


class EventTests(StoreTestBase):
    def test_events_newest_first(self) -> Deferred[Any]:
        async def go() -> None:
            ids = [
                await self.store.add_event(
                    actor="api",
                    action=f"a{i}",
                    target=f"agent:{i}",
                    outcome="ok",
                    details={"i": i} if i else None,
                )
                for i in range(5)
            ]
            events = await self.store.list_events()
            self.assertEqual([e.id for e in events], ids[::-1])
            first = events[-1]
            self.assertEqual(
                (first.actor, first.action, first.target, first.outcome, first.details),
                ("api", "a0", "agent:0", "ok", None),
            )
            self.assertEqual(events[0].details, {"i": 4})
            self.assertEqual(first.at, first.created_at)
            page = await self.store.list_events(limit=2, before_id=ids[3])
            self.assertEqual([e.id for e in page], [ids[2], ids[1]])
            self.assertEqual(await self.store.list_events(before_id=ids[0]), [])

        return d(go())
