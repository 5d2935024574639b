"""The reusable poller (myx_agent.poll), on a Clock."""

from __future__ import annotations

import random
from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from myx_agent.poll import Poller, random_delay


class PollerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: List[float] = []

    def record(self) -> None:
        self.calls.append(self.clock.seconds())

    def test_first_call_then_every_next_delay(self) -> None:
        poller = Poller(self.record, self.clock, lambda: 10.0)
        poller.start(first_delay=0)
        self.assertEqual(self.calls, [])  # never inside start()
        self.clock.advance(0)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.calls, [0, 10, 20])

    def test_default_first_delay_is_next_delay(self) -> None:
        poller = Poller(self.record, self.clock, lambda: 7.0)
        poller.start()
        self.clock.advance(6.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [7.0])

    def test_failures_are_logged_and_the_loop_goes_on(self) -> None:
        def boom() -> None:
            self.record()
            raise RuntimeError("boom")

        poller = Poller(boom, self.clock, lambda: 5.0)
        poller.start(0)
        self.clock.advance(0)
        self.clock.advance(5)
        self.assertEqual(self.calls, [0, 5])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(poller.scheduled)

    def test_failing_deferred_and_coroutine(self) -> None:
        async def coro() -> None:
            self.record()
            raise ValueError("in a coroutine")

        poller = Poller(coro, self.clock, lambda: 1.0)
        poller.start(0)
        self.clock.advance(0)
        self.clock.advance(1)
        self.assertEqual(self.calls, [0, 1])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_returned_number_overrides_the_next_delay(self) -> None:
        answers = [1.0, None, True]

        def func() -> Any:
            self.record()
            return answers.pop(0) if answers else None

        poller = Poller(func, self.clock, lambda: 100.0)
        poller.start(0)
        self.clock.advance(0)  # -> 1.0 s override
        self.clock.advance(1)  # -> None: the regular 100 s
        self.clock.advance(100)  # -> True is not a delay: 100 s
        self.clock.advance(99)
        self.assertEqual(self.calls, [0, 1, 101])
        self.clock.advance(1)
        self.assertEqual(self.calls, [0, 1, 101, 201])

    def test_no_overlap_next_delay_counts_from_the_end(self) -> None:
        pending: List[Deferred[None]] = []

        def slow() -> Deferred[None]:
            self.record()
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        poller = Poller(slow, self.clock, lambda: 10.0)
        poller.start(0)
        self.clock.advance(0)
        self.clock.advance(30)  # still running: no second call
        self.assertEqual(self.calls, [0])
        self.assertFalse(poller.scheduled)
        pending.pop().callback(None)
        self.clock.advance(10)
        self.assertEqual(self.calls, [0, 40])

    def test_stop_cancels_the_next_call(self) -> None:
        poller = Poller(self.record, self.clock, lambda: 10.0)
        poller.start(0)
        self.clock.advance(0)
        self.successResultOf(poller.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(self.calls, [0])

    def test_stop_waits_for_a_running_call(self) -> None:
        pending: List[Deferred[None]] = []

        def slow() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            pending.append(d)
            return d

        poller = Poller(slow, self.clock, lambda: 10.0)
        poller.start(0)
        self.clock.advance(0)
        stopped = poller.stop()
        self.assertNoResult(stopped)
        pending.pop().callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_broken_next_delay_does_not_stop_the_loop(self) -> None:
        delays: List[Optional[float]] = [None, 3.0]

        def next_delay() -> float:
            value = delays.pop(0) if delays else 3.0
            if value is None:
                raise ZeroDivisionError()
            return value

        poller = Poller(self.record, self.clock, next_delay)
        poller.start(0)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(poller.scheduled)


class RandomDelayTests(SynchronousTestCase):
    def test_bounds_and_swapped_bounds(self) -> None:
        for low, high in ((5.0, 9.0), (9.0, 5.0)):
            delay = random_delay(low, high, random.Random(7))
            draws = [delay() for _ in range(500)]
            self.assertTrue(all(5.0 <= d <= 9.0 for d in draws))
            self.assertGreater(max(draws) - min(draws), 3.0)
