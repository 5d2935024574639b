"""myx_agent.clock: schedules count monotonic seconds, records keep wall time (issue #12 §2).

A wall clock that jumps is simulated with plain numbers handed to the clocks;
a reactor is built but never run. The real-process test with libfaketime is
tests/reliability/test_clock_jumps.py.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from myx_agent.clock import MonotonicSeconds, WallClock, use_monotonic_time
from myxd.fleet.heartbeat import HeartbeatService
from tests.daemon.fleet_fakes import FakeStore, agent_record, settings
from tests.daemon.test_heartbeat import BatchRPC

HOUR = 3600.0


class Times:
    """A wall clock and a monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.wall_now = 1_800_000_000.0
        self.mono_now = 500.0

    def wall(self) -> float:
        return self.wall_now

    def mono(self) -> float:
        return self.mono_now

    def elapse(self, seconds: float) -> None:
        self.wall_now += seconds
        self.mono_now += seconds

    def jump(self, seconds: float) -> None:
        self.wall_now += seconds


class _Reactor(ReactorBase):
    """A reactor that is never run: enough for callLater, timeout and runUntilCurrent."""

    def installWaker(self) -> None:
        pass

    def doIteration(self, delay: float | None) -> None:  # pragma: no cover - never run
        raise AssertionError("not run")


def reactor_on(times: Times, monotonic: bool) -> _Reactor:
    reactor = _Reactor()
    if monotonic:
        use_monotonic_time(reactor, MonotonicSeconds(times.wall, times.mono))
    else:
        reactor.seconds = times.wall  # Twisted's own behaviour: the wall clock
    return reactor


class MonotonicSecondsTests(TestCase):
    def test_starts_at_wall_time_and_ignores_jumps(self) -> None:
        times = Times()
        seconds = MonotonicSeconds(times.wall, times.mono)
        self.assertEqual(seconds(), times.wall_now)
        times.elapse(5)
        self.assertEqual(seconds(), 1_800_000_005.0)
        times.jump(+HOUR)
        self.assertEqual(seconds(), 1_800_000_005.0)
        times.jump(-2 * HOUR)
        times.elapse(1)
        self.assertEqual(seconds(), 1_800_000_006.0)

    def test_wall_clock_is_the_wall(self) -> None:
        times = Times()
        wall = WallClock(times.wall)
        times.jump(-HOUR)
        self.assertEqual(wall.seconds(), 1_800_000_000.0 - HOUR)


class ReactorScheduleTests(TestCase):
    def schedule(self, monotonic: bool, jump: float) -> tuple[_Reactor, Times, list[str]]:
        times = Times()
        reactor = reactor_on(times, monotonic)
        fired: list[str] = []
        reactor.callLater(20, fired.append, "heartbeat")
        reactor.runUntilCurrent()
        times.elapse(5)
        times.jump(jump)
        return reactor, times, fired

    def test_jump_back_holds_a_wall_clock_reactor_but_not_a_monotonic_one(self) -> None:
        # The control: Twisted's default (wall) clock waits an hour more.
        reactor, _, _ = self.schedule(monotonic=False, jump=-HOUR)
        self.assertAlmostEqual(reactor.timeout() or 0.0, 15 + HOUR)
        reactor, times, fired = self.schedule(monotonic=True, jump=-HOUR)
        self.assertAlmostEqual(reactor.timeout() or 0.0, 15)
        times.elapse(15)
        reactor.runUntilCurrent()
        self.assertEqual(fired, ["heartbeat"])

    def test_jump_forward_fires_nothing_early_on_a_monotonic_reactor(self) -> None:
        reactor, _, fired = self.schedule(monotonic=False, jump=+HOUR)
        reactor.runUntilCurrent()
        self.assertEqual(fired, ["heartbeat"])  # the control: 15 s early
        reactor, times, fired = self.schedule(monotonic=True, jump=+HOUR)
        reactor.runUntilCurrent()
        self.assertEqual(fired, [])
        times.elapse(14.9)
        reactor.runUntilCurrent()
        self.assertEqual(fired, [])
        times.elapse(0.2)
        reactor.runUntilCurrent()
        self.assertEqual(fired, ["heartbeat"])

    def test_calls_scheduled_before_the_switch_keep_their_time(self) -> None:
        times = Times()
        reactor = _Reactor()
        reactor.seconds = times.wall  # Twisted's own behaviour: the wall clock
        fired: list[str] = []
        early = reactor.callLater(10, fired.append, "early")
        self.assertTrue(use_monotonic_time(reactor, MonotonicSeconds(times.wall, times.mono)))
        times.jump(-HOUR)
        times.elapse(10)
        reactor.runUntilCurrent()
        self.assertEqual(fired, ["early"])
        self.assertIsInstance(early.seconds, MonotonicSeconds)

    def test_only_real_reactors_and_only_once(self) -> None:
        clock = Clock()
        self.assertFalse(use_monotonic_time(clock))
        self.assertEqual(clock.seconds(), 0)
        reactor = _Reactor()
        self.assertTrue(use_monotonic_time(reactor))
        first = reactor.seconds
        self.assertFalse(use_monotonic_time(reactor))
        self.assertIs(reactor.seconds, first)


class RecordsKeepWallTimeTests(TestCase):
    """The heartbeat measures with the reactor and stamps with the store's wall clock."""

    def test_heartbeat_result_is_stamped_with_wall_time(self) -> None:
        reactor = Clock()
        wall = Clock()
        wall.advance(1_800_000_000 - HOUR)  # an hour behind the schedule's clock
        store = FakeStore(wall)
        store.add(agent_record(1))
        svc = HeartbeatService(
            store,
            BatchRPC(),  # type: ignore[arg-type]
            settings(),
            reactor,
            rng=random.Random(1),
        )
        stats: Any = self.successResultOf(Deferred.fromCoroutine(svc.run_cycle()))
        self.assertEqual(stats.ok, 1)
        [[result]] = store.heartbeat_writes
        self.assertEqual(result.at, wall.seconds())
        self.assertEqual(result.latency, 0.0)
        self.assertEqual(stats.started_at, reactor.seconds())
