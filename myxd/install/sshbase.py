# -*- test-case-name: tests.install.test_ssh,tests.install.test_ssh_memory -*-
"""What every part of the install SSH client shares: its errors and a fire-once Deferred.

Every error's ``str()`` is safe to show a user: none ever carries a password,
passphrase, private key or command stdin. This module imports nothing from the
rest of the client (the other ssh modules import it).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from myxd.errors import MyxError

T = TypeVar("T")


class SSHError(MyxError):
    """Base of every error this module raises. ``str()`` is safe to show a user."""


class SSHConnectError(SSHError):
    """TCP connect failed or timed out, or the SSH handshake did not complete."""


class AuthenticationFailed(SSHError):
    """The server rejected every credential we had."""


class KeyLoadError(SSHError):
    """The private key cannot be read: bad format, wrong/missing passphrase, unsupported."""


class CommandTimeout(SSHError):
    """A remote command did not finish in time; its channel was closed."""


class SSHDisconnected(SSHError):
    """The connection was lost while a command or transfer was in progress."""


class SudoError(SSHError):
    """Privilege escalation failed (no sudo, wrong password, not allowed)."""


class SFTPError(SSHError):
    """An SFTP operation failed."""


class Once(Generic[T]):
    """A Deferred that fires at most once, however many paths try to fire it."""

    def __init__(self) -> None:
        self.deferred: Deferred[T] = Deferred()
        self.fired = False

    def succeed(self, value: T) -> None:
        if not self.fired:
            self.fired = True
            self.deferred.callback(value)

    def fail(self, exc: BaseException | Failure) -> None:
        if not self.fired:
            self.fired = True
            self.deferred.errback(exc if isinstance(exc, Failure) else Failure(exc))
