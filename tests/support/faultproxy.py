"""A fault-injecting TCP proxy for tests: put it between myxd and a real agent.

``FaultProxy(reactor, target_host, target_port)`` listens on 127.0.0.1 and
forwards every accepted connection to the target, byte for byte. The daemon
pins the agent's certificate, so the proxy works at the TCP level and never
sees plaintext: faults are injected on the byte stream, which is what a bad
network does too. Faults are attributes and methods, switchable while
connections are open:

- ``latency`` / ``jitter``: every chunk is delayed by latency + U(0, jitter)
  seconds (order is kept, as TCP would);
- ``bandwidth``: bytes per second per direction and connection;
- ``reset_after(direction, n, times)``: after n bytes in ``"up"`` (client to
  target) or ``"down"`` (target to client) direction, both sides get a TCP RST;
- ``blackhole``: connections are accepted, then nothing is forwarded or
  answered (a connection that saw the blackhole stays dead);
- ``half_close(direction, n)``: after n bytes in that direction the receiver
  gets a FIN, and further bytes in that direction are dropped; the other
  direction keeps flowing;
- ``drop_on_reuse``: a connection that carried data and then sat idle for
  that many seconds is reset when the client writes on it again, before a
  byte is forwarded (the keep-alive race of twisted#7843, made
  deterministic); with ``reuse_forward`` the request is forwarded first and
  the reset comes instead of the response (the server did the work, the
  client never hears of it);
- ``flap(up_for, down_for)``: up and down on a schedule; going down resets
  every connection, and connections made while down are reset at once.

``counts`` holds how many faults of each kind were injected and how many
bytes went each way, for the figures in docs/reliability.md.

Timers run on ``clock`` (default: the reactor), so unit tests can drive the
delays with ``twisted.internet.task.Clock``. It only ever listens on, and
connects to, loopback addresses. It never blocks the reactor.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter, deque
from typing import Any, Optional, cast

from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

UP = "up"  # client -> target
DOWN = "down"  # target -> client
DIRECTIONS = (UP, DOWN)
_SLICE = 4096  # bandwidth is applied per slice of this size


def _unflushed(transport: Any) -> bool:
    # twisted.internet.abstract.FileDescriptor buffers writes in user space
    # until the socket is writable; an abort would drop them.
    return bool(getattr(transport, "dataBuffer", b"")) or bool(
        getattr(transport, "_tempDataBuffer", [])
    )


def _rst(transport: Any, reactor: Any = None, tries: int = 200) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN: the peer sees ECONNRESET.

    Bytes already written are flushed to the socket first (on loopback they are
    then in the peer's receive buffer, which it reads before the reset)."""
    if transport is None:
        return
    if reactor is not None and tries > 0 and _unflushed(transport):
        reactor.callLater(0.001, _rst, transport, reactor, tries - 1)
        return
    try:
        handle = transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (AttributeError, OSError):
        pass
    transport.abortConnection()


class _Pipe:
    """One direction of one connection: delays, throttles and forwards chunks in order.

    Delayed chunks wait in one FIFO with one timer: two timers due at the same
    instant may fire in any order, and TCP never reorders bytes.
    """

    def __init__(self, link: _Link, direction: str) -> None:
        self.link = link
        self.direction = direction
        self.forwarded = 0
        self._due_last = 0.0  # when the previous chunk is fully "on the wire"
        self._queue: deque[tuple[float, bytes]] = deque()
        self._timer: Optional[IDelayedCall] = None
        self.half_closed = False

    def send(self, data: bytes) -> None:
        proxy = self.link.proxy
        if proxy.latency <= 0 and proxy.jitter <= 0 and not proxy.bandwidth and not self._queue:
            self._deliver(data)
            return
        now = proxy.clock.seconds()
        slices = [data]
        if proxy.bandwidth:
            slices = [data[i : i + _SLICE] for i in range(0, len(data), _SLICE)]
        for piece in slices:
            due = max(now + proxy.latency + proxy.rng.uniform(0, proxy.jitter), self._due_last)
            if proxy.bandwidth:
                due += len(piece) / proxy.bandwidth
            self._due_last = due
            self._queue.append((due, piece))
            proxy.counts["delayed_chunks"] += 1
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active() or not self._queue:
            return
        clock = self.link.proxy.clock
        self._timer = clock.callLater(max(0.0, self._queue[0][0] - clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.link.proxy.clock.seconds()
        while self._queue and self._queue[0][0] <= now:
            _, piece = self._queue.popleft()
            self._deliver(piece)
        self._arm()

    def _deliver(self, data: bytes) -> None:
        link = self.link
        if link.closed or self.half_closed:
            return
        proxy = link.proxy
        limit = proxy.limit_for(self.direction)
        kind, n = limit if limit else (None, 0)
        if kind is not None and self.forwarded + len(data) >= n:
            head = data[: max(0, n - self.forwarded)]
            self._write(head)
            if kind == "reset":
                proxy.used_limit(self.direction)
                proxy.counts[f"reset_{self.direction}"] += 1
                link.reset()
            else:
                proxy.used_limit(self.direction)
                proxy.counts[f"half_close_{self.direction}"] += 1
                self.half_closed = True
                receiver = link.target if self.direction == UP else link.client
                if receiver is not None and receiver.transport is not None:
                    cast(Any, receiver.transport).loseWriteConnection()
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        if not data:
            return
        link = self.link
        receiver = link.target if self.direction == UP else link.client
        if receiver is None or receiver.transport is None:
            return
        self.forwarded += len(data)
        link.proxy.counts[f"bytes_{self.direction}"] += len(data)
        receiver.transport.write(data)

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue.clear()


class _Link:
    """One proxied connection: the client side, the target side, two pipes."""

    def __init__(self, proxy: FaultProxy, client: _ClientSide) -> None:
        self.proxy = proxy
        self.client = client
        self.target: Optional[_TargetSide] = None
        self.pipes = {UP: _Pipe(self, UP), DOWN: _Pipe(self, DOWN)}
        self.buffer: list[bytes] = []
        self.closed = False
        self.blackholed = False
        self.used = False
        self.kill_on_response = False
        self.last_activity = proxy.clock.seconds()

    def from_client(self, data: bytes) -> None:
        proxy = self.proxy
        now = proxy.clock.seconds()
        if self._swallow():
            return
        if (
            proxy.drop_on_reuse is not None
            and self.used
            and now - self.last_activity >= proxy.drop_on_reuse
        ):
            proxy.counts["reuse_drops"] += 1
            if not proxy.reuse_forward:
                self.reset()
                return
            self.kill_on_response = True
        self.used = True
        self.last_activity = now
        if self.target is None or self.target.transport is None:
            self.buffer.append(data)
            return
        self.pipes[UP].send(data)

    def from_target(self, data: bytes) -> None:
        if self._swallow():
            return
        if self.kill_on_response:
            self.reset()
            return
        self.last_activity = self.proxy.clock.seconds()
        self.pipes[DOWN].send(data)

    def _swallow(self) -> bool:
        if self.proxy.blackhole and not self.blackholed:
            self.blackholed = True
            self.proxy.counts["blackholed_connections"] += 1
        return self.blackholed

    def target_connected(self, target: _TargetSide) -> None:
        self.target = target
        buffered, self.buffer = self.buffer, []
        for data in buffered:
            self.pipes[UP].send(data)

    def reset(self) -> None:
        """RST both sides now."""
        if self.closed:
            return
        self.closed = True
        for pipe in self.pipes.values():
            pipe.cancel()
        reactor = self.proxy.reactor
        _rst(self.client.transport, reactor)
        if self.target is not None:
            _rst(self.target.transport, reactor)
        self.proxy.links.discard(self)

    def side_lost(self, side: str) -> None:
        """One side closed: close the other once what is queued for it is out."""
        if self.closed:
            return
        self.closed = True
        for pipe in self.pipes.values():
            pipe.cancel()
        other = self.target if side == "client" else self.client
        if other is not None and other.transport is not None:
            other.transport.loseConnection()
        self.proxy.links.discard(self)


class _ClientSide(Protocol):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.link: Optional[_Link] = None

    def connectionMade(self) -> None:
        proxy = self.proxy
        proxy.counts["connections"] += 1
        self.link = link = _Link(proxy, self)
        proxy.links.add(link)
        if not proxy.up:
            proxy.counts["flap_resets"] += 1
            link.reset()
            return
        if proxy.blackhole:
            link.blackholed = True
            proxy.counts["blackholed_connections"] += 1
            return  # accepted, never answered: no target connection at all
        proxy._connect(link)

    def dataReceived(self, data: bytes) -> None:
        if self.link is not None:
            self.link.from_client(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.link is not None:
            self.link.side_lost("client")


class _TargetSide(Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def connectionMade(self) -> None:
        if self.link.closed:
            cast(Any, self.transport).loseConnection()
            return
        self.link.target_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.link.from_target(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.link.side_lost("target")


class _TargetFactory(ClientFactory):
    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _TargetSide:
        return _TargetSide(self.link)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.link.reset()


class FaultProxy:
    """See the module docstring."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        target_host: str,
        target_port: int,
        *,
        clock: Any = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        if not target_host.startswith("127."):
            raise ValueError("the fault proxy only forwards to loopback")
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.target = (target_host, target_port)
        self.rng = rng if rng is not None else random.Random(0)
        self.latency = 0.0
        self.jitter = 0.0
        self.bandwidth: Optional[float] = None
        self.blackhole = False
        self.drop_on_reuse: Optional[float] = None
        self.reuse_forward = False
        self.up = True
        self.counts: Counter[str] = Counter()
        self.links: set[_Link] = set()
        self._limits: dict[str, tuple[str, int, Optional[int]]] = {}
        self._flap_call: Optional[IDelayedCall] = None
        self._port: Optional[IListeningPort] = None

    # -- life cycle -------------------------------------------------------------

    def listen(self, interface: str = "127.0.0.1") -> int:
        """Start listening on an ephemeral loopback port; returns the port."""
        if not interface.startswith("127."):
            raise ValueError("the fault proxy only listens on loopback")
        factory = Factory.forProtocol(lambda: _ClientSide(self))
        factory.noisy = False
        self._port = self.reactor.listenTCP(0, factory, interface=interface)
        return int(self._port.getHost().port)  # type: ignore[union-attr]

    @property
    def port(self) -> int:
        assert self._port is not None
        return int(self._port.getHost().port)  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Stop flapping, stop listening, and reset every open connection."""
        self.stop_flapping()
        for link in list(self.links):
            link.reset()
        port, self._port = self._port, None
        if port is not None:
            await port.stopListening()  # type: ignore[misc]

    def _connect(self, link: _Link) -> None:
        host, port = self.target
        self.reactor.connectTCP(host, port, _TargetFactory(link), timeout=10)

    # -- faults -----------------------------------------------------------------

    def heal(self) -> None:
        """Back to a perfect link (connections already broken stay broken)."""
        self.latency = self.jitter = 0.0
        self.bandwidth = None
        self.blackhole = False
        self.drop_on_reuse = None
        self.reuse_forward = False
        self._limits.clear()
        self.stop_flapping()
        self.up = True

    def reset_after(self, direction: str, nbytes: int, times: Optional[int] = None) -> None:
        """Reset each connection after *nbytes* in *direction*, for *times* connections
        (None: every connection until cleared with ``clear_limit``)."""
        self._set_limit(direction, "reset", nbytes, times)

    def half_close(self, direction: str, nbytes: int, times: Optional[int] = None) -> None:
        """FIN toward the receiver after *nbytes* in *direction*; see the module docstring."""
        self._set_limit(direction, "half_close", nbytes, times)

    def clear_limit(self, direction: str) -> None:
        self._limits.pop(direction, None)

    def _set_limit(self, direction: str, kind: str, nbytes: int, times: Optional[int]) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        if nbytes < 0 or (times is not None and times < 1):
            raise ValueError("nbytes must be >= 0 and times >= 1")
        self._limits[direction] = (kind, nbytes, times)

    def limit_for(self, direction: str) -> Optional[tuple[str, int]]:
        limit = self._limits.get(direction)
        return None if limit is None else (limit[0], limit[1])

    def used_limit(self, direction: str) -> None:
        limit = self._limits.get(direction)
        if limit is None or limit[2] is None:
            return
        left = limit[2] - 1
        if left <= 0:
            del self._limits[direction]
        else:
            self._limits[direction] = (limit[0], limit[1], left)

    def set_up(self, up: bool) -> None:
        """Take the link down (reset everything, refuse by reset) or bring it up."""
        if up == self.up:
            return
        self.up = up
        self.counts["flaps"] += 1
        if not up:
            for link in list(self.links):
                self.counts["flap_resets"] += 1
                link.reset()

    def flap(self, up_for: float, down_for: float) -> None:
        """Alternate up (``up_for`` s) and down (``down_for`` s), starting up."""
        self.stop_flapping()
        self.set_up(True)

        def toggle() -> None:
            self.set_up(not self.up)
            self._flap_call = self.clock.callLater(up_for if self.up else down_for, toggle)

        self._flap_call = self.clock.callLater(up_for, toggle)

    def stop_flapping(self) -> None:
        call, self._flap_call = self._flap_call, None
        if call is not None and call.active():
            call.cancel()
        self.set_up(True)
