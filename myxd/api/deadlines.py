"""Slow-client deadlines for the admin API's HTTP channel (slowloris).

twisted.web's idle timeout restarts on every byte received, so a client that
trickles one byte a second holds a connection, and a file descriptor, for as
long as it likes. `DeadlineChannel` adds two deadlines that more bytes do not
extend: a request's line and headers must be complete within `HEADER_TIMEOUT`
from its first byte (or from the connection, for the first request), and its
body within `BODY_TIMEOUT` after the headers. A connection that misses one is
dropped. Long responses (the SSE stream) are not affected: both deadlines are
off once the request is in. Documented in docs/operations.md.

Never logs anything from the request itself: only the peer and which deadline.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

__all__ = ["BODY_TIMEOUT", "HEADER_TIMEOUT", "IDLE_TIMEOUT", "DeadlineChannel"]

HEADER_TIMEOUT = 30.0
BODY_TIMEOUT = 60.0
# A large authenticated upload (an artifact) gets BODY_TIMEOUT plus one second
# per this many bytes of its length: it must average at least 256 KiB/s.
UPLOAD_MIN_RATE = 256 * 1024
IDLE_TIMEOUT = 60.0  # twisted.web's default, kept explicit


class DeadlineChannel(HTTPChannel):
    """HTTP/1.1 channel with a header deadline and a body deadline (see the module)."""

    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    _deadline: Any = None
    log = Logger()

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm(self.header_timeout, "headers")

    def dataReceived(self, data: bytes) -> None:
        if data and self._deadline is None and not getattr(self, "_handlingRequest", False):
            self._arm(self.header_timeout, "headers")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._arm(self.body_timeout, "body")
        super().allHeadersReceived()
        # The request now knows its body limit (gate.BoundedRequest): a large
        # upload gets time in proportion to its size.
        requests = getattr(self, "requests", None)
        req = requests[-1] if requests else None
        limit = int(getattr(req, "max_body", 0) or 0)
        if limit > 1024 * 1024 and not getattr(req, "body_too_large", False):
            size = self.length if isinstance(self.length, int) and self.length > 0 else limit
            self._arm(self.body_timeout + size / UPLOAD_MIN_RATE, "body")

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._disarm()
        super().connectionLost(reason)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.callLater(seconds, lambda: self._expired(what))

    def _disarm(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _expired(self, what: str) -> None:
        self._deadline = None
        peer = getattr(self.transport.getPeer(), "host", "-") if self.transport else "-"
        self.log.info("dropped a connection from {peer}: {what} too slow", peer=peer, what=what)
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()
