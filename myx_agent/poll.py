# -*- test-case-name: tests.agent.test_poll -*-
"""A reusable poller: schedule, tick, reschedule after a (random) delay, forever.

``Poller(func, clock, next_delay)`` calls ``func`` on the injected clock; when
it has finished (it may return a value, a Deferred or a coroutine), the next
call is scheduled ``next_delay()`` seconds later, or after the delay ``func``
returned if it returned a number (e.g. "more work is due: soon"). A failure of
``func`` is logged with its traceback and the loop goes on: nothing may stop
it but ``stop()``, which cancels the next call and waits for a running one.
Buildbot's ``util/poll.py`` is the model; ``random_delay`` builds the usual
jittered ``next_delay``.

It lives in the agent package because the agent needs it and must not import
the daemon; the daemon (``myxd.fleet.heartbeat``) imports it from here, which
works because the installed distribution ships both packages. So it must stay
small and depend on nothing but Twisted.

What it must never do: block, run two calls of ``func`` at once, let an
exception escape into the reactor, or keep a timer alive after ``stop()``.
"""

from __future__ import annotations

import random
from typing import Any, Awaitable, Callable, Optional, Union

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

#: What ``func`` may return: nothing, a delay override in seconds, or either later.
TickResult = Union[None, float, "Deferred[Any]", Awaitable[Any]]


def random_delay(
    low: float, high: float, rng: Optional[random.Random] = None
) -> Callable[[], float]:
    """A ``next_delay`` uniform in [low, high] (swapped if given the wrong way)."""
    if high < low:
        low, high = high, low
    uniform = (rng or random.Random()).uniform
    return lambda: uniform(low, high)


class Poller:
    """Calls ``func`` periodically; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        func: Callable[[], TickResult],
        clock: IReactorTime,
        next_delay: Callable[[], float],
        *,
        name: str = "poller",
    ) -> None:
        self._func = func
        self._clock = clock
        self._next_delay = next_delay
        self.name = name
        self._call: Optional[IDelayedCall] = None
        self._running: Optional[Deferred[None]] = None
        self.started = False

    @property
    def scheduled(self) -> bool:
        """True while a next call is waiting on the clock."""
        return self._call is not None and self._call.active()

    def start(self, first_delay: Optional[float] = None) -> None:
        """Start the loop: the first call after ``first_delay`` (default:
        ``next_delay()``; 0 means as soon as the reactor turns)."""
        if self.started:
            return
        self.started = True
        self._schedule(self._next_delay() if first_delay is None else first_delay)

    def stop(self) -> Deferred[None]:
        """Cancel the next call; fires when a call in progress has finished."""
        self.started = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._running is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._running.addBoth(lambda _: done.callback(None))
        return done

    def _schedule(self, delay: float) -> None:
        if self.started and not self.scheduled:
            self._call = self._clock.callLater(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        self._call = None
        d = maybeDeferred(self._func)

        def unwrap(result: Any) -> Any:
            # A coroutine function's result: run it to the end.
            if hasattr(result, "__await__") and not isinstance(result, Deferred):
                return ensureDeferred(result)
            return result

        d.addCallback(unwrap)
        override: list[Optional[float]] = [None]

        def done(result: Any) -> None:
            if isinstance(result, (int, float)) and not isinstance(result, bool):
                override[0] = float(result)

        def failed(f: Failure) -> None:
            self.log.failure(
                "{name}: periodic call failed; the next one is still scheduled", f, name=self.name
            )

        d.addCallbacks(done, failed)
        if d.called:
            self._after(override[0])
            return
        running: Deferred[None] = Deferred()
        self._running = running

        def after(_: object) -> None:
            self._running = None
            self._after(override[0])
            running.callback(None)

        d.addBoth(after)

    def _after(self, override: Optional[float]) -> None:
        if not self.started:
            return
        try:
            delay = self._next_delay() if override is None else override
        except Exception:
            self.log.failure("{name}: next_delay failed; using 60 s", name=self.name)
            delay = 60.0
        self._schedule(delay)
