# -*- test-case-name: tests.daemon.test_clock -*-
"""Two clocks: a monotonic one for durations and schedules, the wall clock for records.

Twisted's reactors measure time with ``time.time()``: ``callLater``, every
timeout, ``LoopingCall`` and the daemon's heartbeat scheduler all count in wall
seconds. When the wall clock jumps (an NTP step, ``date -s``, a VM resumed), a
jump back of one hour would hold every scheduled call for an hour (no
heartbeat, no retry, no log poll) and a jump forward would fire every pending
timeout at once. ``use_monotonic_time(reactor)`` makes the reactor's
``seconds()`` monotonic: it starts at the wall time of the call and then only
advances with ``time.monotonic()``, so the numbers still look like epoch
seconds but never jump. Both processes call it before anything is scheduled:
the daemon's ``makeService`` and the agent's ``main.serve``. (It lives in the
agent's package because the agent is installed on its own; the daemon already
depends on this package.)

What is stored or shown (``last_heartbeat``, ``created_at``, ``finished_at``)
must be the wall clock: the daemon's store stamps rows with ``WallClock``
(``tap.py``), and the fleet code asks the store (``Store.now()``) for such
timestamps, never the reactor; the agent's ``CommandRunner`` and
``AgentMethods`` (the heartbeat's ``time``) take ``wall=time.time``.
Durations (``reactor.seconds()`` differences) are monotonic.

Only a real reactor (``ReactorBase``) is changed; a ``Clock`` or a memory
reactor of a test keeps its own time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["MonotonicSeconds", "WallClock", "use_monotonic_time"]


class MonotonicSeconds:
    """``wall() at creation + (monotonic() - monotonic() at creation)``: never jumps."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def __call__(self) -> float:
        return self._offset + self._monotonic()


class WallClock:
    """``seconds()`` is the wall clock: for timestamps that are stored or shown."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall

    def seconds(self) -> float:
        return self._wall()


def use_monotonic_time(reactor: Any, seconds: MonotonicSeconds | None = None) -> bool:
    """Make a real reactor's ``seconds()`` (and so its scheduling) monotonic.

    Calls already scheduled keep their times (the new clock starts at the wall
    time) and are switched to the new clock. Returns False, changing nothing,
    when ``reactor`` is not a ``ReactorBase`` or already uses a monotonic clock.
    """
    from twisted.internet.base import ReactorBase

    if not isinstance(reactor, ReactorBase):
        return False
    if isinstance(reactor.__dict__.get("seconds"), MonotonicSeconds):
        return False
    clock = seconds if seconds is not None else MonotonicSeconds()
    reactor.seconds = clock
    for call in [*reactor._pendingTimedCalls, *reactor._newTimedCalls]:
        call.seconds = clock
    return True
