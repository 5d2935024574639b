# -*- test-case-name: tests.daemon.test_reactor_helper -*-
"""One way to take an injected reactor: ``default_reactor(reactor)``.

Library code takes its reactor as a constructor argument typed with the
interfaces it actually uses, so a test can pass a ``Clock`` or a
``MemoryReactor``; only when the caller passes None is the global reactor
imported, here, at call time (never at import time: importing it installs the
default reactor). Where one interface is not enough, a Protocol here names the
intersection (``CoreReactor``), as Twisted itself types its global reactor.

This module never installs or runs a reactor and holds no state.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, cast

__all__ = ["CoreReactor", "default_reactor"]

R = TypeVar("R")


class CoreReactor(Protocol):
    """``IReactorCore & IReactorTime``, as far as the daemon uses them.

    The global reactor (typed ``IReactorCore & IReactorTime & IReactorTCP &
    ...`` by Twisted) provides it, and so does any concrete reactor.
    """

    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...

    def seconds(self) -> float: ...


def default_reactor(reactor: R | None) -> R:
    """``reactor`` itself, or the global reactor when it is None.

    Type the parameter with the interfaces the caller uses
    (``reactor: IReactorTime | None = None``), and assign the result to an
    attribute of that type: the global reactor provides every reactor interface.
    """
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return cast(R, global_reactor)
