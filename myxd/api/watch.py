"""Wake an API reader (long-poll or SSE) when a command gets new output or ends.

`OutputWatch` subscribes to the command queue's notifications for one command and
turns them into a Deferred the reader can wait on with a timeout. It never reads the
store itself (the reader re-reads after every wake-up, so a notification is only a
hint and a missed one costs at most one timeout), and it always unsubscribes on
`close()`, so a client that goes away leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

__all__ = ["OutputWatch", "Subscribable"]


class Subscribable(Protocol):
    def subscribe(self, command_id: int, callback: Callable[..., Any]) -> Callable[[], None]: ...


class OutputWatch:
    def __init__(self, queue: Subscribable, command_id: int, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._pending = False
        self._waiter: Deferred[bool] | None = None
        self._closed = False
        self._unsubscribe: Callable[[], None] | None = queue.subscribe(command_id, self._notify)

    def _notify(self, *args: object, **kwargs: object) -> None:
        # Called by the queue; must never raise into it.
        self._pending = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            self._pending = False
            waiter.callback(True)

    def wait(self, timeout: float) -> Deferred[bool]:
        """Fires True on a notification (possibly one already pending), False on timeout."""
        if self._pending or self._closed:
            self._pending = False
            return succeed(not self._closed)
        d: Deferred[bool] = Deferred()
        self._waiter = d

        def timed_out(result: object, timeout: float) -> bool:
            return False

        def forget(result: object) -> object:
            if self._waiter is d:
                self._waiter = None
            return result

        d.addTimeout(timeout, self._reactor, onTimeoutCancel=timed_out)
        d.addBoth(forget)
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(False)
