# -*- test-case-name: tests.daemon.test_reactor_helper -*-
"""``myxd._reactor.default_reactor``: the injected reactor wins; None means the global one."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from myxd._reactor import CoreReactor, default_reactor
from myxd.store import StoreService


class DefaultReactorTests(unittest.TestCase):
    def test_injected_reactor_is_kept(self) -> None:
        clock = Clock()
        got: IReactorTime = default_reactor(clock)
        self.assertIs(got, clock)

    def test_none_is_the_global_reactor(self) -> None:
        from twisted.internet import reactor

        got: IReactorTime | None = None
        self.assertIs(default_reactor(got), reactor)

    def test_a_service_uses_what_it_is_given(self) -> None:
        memory = MemoryReactorClock()
        memory.advance(42.0)
        core: CoreReactor = memory
        svc = StoreService(self.mktemp(), core)
        self.assertEqual(svc.db.now(), 42.0)
