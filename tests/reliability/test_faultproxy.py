"""The fault proxy itself, on loopback against a real echo/sink server.

Delays run on a ``Clock`` so that "not yet delivered" and "delivered" are
conditions, not timings.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.support.faultproxy import DOWN, UP, FaultProxy


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)
        cast(Any, self.transport).write(data)


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.eof = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def send(self, data: bytes) -> None:
        cast(Any, self.transport).write(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        cast(Any, self.transport).loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class ProxyTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        factory = Factory.forProtocol(Echo)
        factory.received = 0  # type: ignore[attr-defined]
        factory.noisy = False
        self.echo = factory

    async def start(self, clock: Any = None) -> FaultProxy:
        port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(self.echo)
        self.addCleanup(port.stopListening)
        proxy = FaultProxy(self.reactor, "127.0.0.1", port.getHost().port, clock=clock)
        proxy.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        return proxy

    async def connect(self, proxy: FaultProxy) -> Client:
        client = Client()
        await connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", proxy.port), client)
        self.addCleanup(lambda: client.transport.loseConnection())  # type: ignore[union-attr]
        return client

    async def until(self, check: Any, what: str) -> None:
        for _ in range(2000):
            if check():
                return
            await deferLater(self.reactor, 0.005, lambda: None)
        self.fail(f"timed out waiting for {what}")

    async def test_passthrough_is_byte_identical(self) -> None:
        proxy = await self.start()
        client = await self.connect(proxy)
        payload = bytes(range(256)) * 4096  # 1 MiB
        client.send(payload)
        await self.until(lambda: len(client.data) >= len(payload), "the echo")
        self.assertEqual(client.data, payload)
        self.assertEqual(proxy.counts["bytes_up"], len(payload))
        self.assertEqual(proxy.counts["bytes_down"], len(payload))

    async def test_latency_holds_data_until_the_clock_moves(self) -> None:
        clock = Clock()
        proxy = await self.start(clock)
        proxy.latency = 2.0
        client = await self.connect(proxy)
        client.send(b"ping")
        await deferLater(self.reactor, 0.2, lambda: None)
        self.assertEqual(self.echo.received, 0)  # type: ignore[attr-defined]
        clock.advance(1.9)
        self.assertEqual(self.echo.received, 0)  # type: ignore[attr-defined]
        clock.advance(0.1)
        await self.until(lambda: self.echo.received == 4, "the delayed bytes")  # type: ignore[attr-defined]
        await deferLater(self.reactor, 0.1, lambda: None)
        self.assertEqual(client.data, b"")  # the echo is delayed too
        clock.advance(2.0)
        await self.until(lambda: client.data == b"ping", "the delayed echo")

    async def test_bandwidth_cap_paces_slices(self) -> None:
        clock = Clock()
        proxy = await self.start(clock)
        proxy.bandwidth = 4096  # one slice per second
        client = await self.connect(proxy)
        client.send(b"x" * 4096 * 3)
        await deferLater(self.reactor, 0.1, lambda: None)
        for expected in (4096, 8192, 12288):
            clock.advance(1.0)
            await self.until(
                lambda e=expected: self.echo.received == e,  # type: ignore[attr-defined]
                f"{expected} bytes",
            )

    async def test_reset_after_n_bytes_down(self) -> None:
        proxy = await self.start()
        proxy.reset_after(DOWN, 1000, times=1)
        client = await self.connect(proxy)
        client.send(b"y" * 5000)
        await client.lost
        reason = client.reason
        assert reason is not None
        self.assertEqual(client.data, b"y" * 1000)
        self.assertTrue(reason.check(ConnectionLost), reason)
        self.assertFalse(reason.check(ConnectionDone), reason)
        self.assertEqual(proxy.counts["reset_down"], 1)
        # times=1: the next connection is clean.
        again = await self.connect(proxy)
        again.send(b"z" * 5000)
        await self.until(lambda: len(again.data) == 5000, "a clean echo")

    async def test_reset_after_n_bytes_up(self) -> None:
        proxy = await self.start()
        proxy.reset_after(UP, 10)
        client = await self.connect(proxy)
        client.send(b"0123456789abcdef")
        await client.lost
        await self.until(lambda: self.echo.received == 10, "10 bytes at the target")  # type: ignore[attr-defined]
        self.assertEqual(proxy.counts["reset_up"], 1)

    async def test_blackhole_then_heal(self) -> None:
        proxy = await self.start()
        proxy.blackhole = True
        client = await self.connect(proxy)
        client.send(b"hello?")
        await deferLater(self.reactor, 0.3, lambda: None)
        self.assertEqual((client.data, self.echo.received), (b"", 0))  # type: ignore[attr-defined]
        self.assertFalse(client.lost.called)
        proxy.heal()
        client.send(b"still?")
        fresh = await self.connect(proxy)
        fresh.send(b"hi")
        await self.until(lambda: fresh.data == b"hi", "an echo after healing")
        self.assertEqual(client.data, b"")  # a blackholed connection stays dead
        self.assertEqual(proxy.counts["blackholed_connections"], 1)

    async def test_half_close_down_sends_eof_and_keeps_up_flowing(self) -> None:
        proxy = await self.start()
        proxy.half_close(DOWN, 3, times=1)
        client = await self.connect(proxy)
        client.send(b"abcdef")
        await self.until(lambda: client.eof, "EOF at the client")
        self.assertEqual(client.data, b"abc")
        self.assertEqual(proxy.counts["half_close_down"], 1)

    async def test_flapping_resets_when_down(self) -> None:
        clock = Clock()
        proxy = await self.start(clock)
        proxy.flap(up_for=1.0, down_for=1.0)
        client = await self.connect(proxy)
        client.send(b"a")
        await self.until(lambda: client.data == b"a", "an echo while up")
        clock.advance(1.0)  # down
        await client.lost
        refused = await self.connect(proxy)
        await refused.lost
        clock.advance(1.0)  # up again
        fresh = await self.connect(proxy)
        fresh.send(b"b")
        await self.until(lambda: fresh.data == b"b", "an echo after the flap")
        self.assertEqual(proxy.counts["flaps"], 2)
        self.assertEqual(proxy.counts["flap_resets"], 2)

    async def test_drop_on_reuse_after_idle(self) -> None:
        clock = Clock()
        proxy = await self.start(clock)
        proxy.drop_on_reuse = 5.0
        client = await self.connect(proxy)
        client.send(b"first")
        await self.until(lambda: client.data == b"first", "the first exchange")
        clock.advance(5.0)
        client.send(b"second")
        await client.lost
        self.assertEqual(self.echo.received, 5)  # type: ignore[attr-defined]
        self.assertEqual(proxy.counts["reuse_drops"], 1)

    def test_refuses_non_loopback(self) -> None:
        self.assertRaises(ValueError, FaultProxy, self.reactor, "10.0.0.1", 1)
