"""Header and body deadlines of the agent's HTTP channel (slowloris), on a Clock.

The real-process flood is in test_floods.py; this pins the rule itself: the
deadline starts with a request's first byte, is not reset by more bytes, and
does not apply while a kept-alive connection idles between requests.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from myx_agent.jsonrpc import Dispatcher, Method
from myx_agent.rpc_server import BODY_TIMEOUT, HEADER_TIMEOUT, build_factory

TOKEN = "t" * 43
PATH = "p" * 24
BODY = b'{"jsonrpc":"2.0","method":"health_check","id":1}'
HEAD = (
    b"POST /%s/rpc HTTP/1.1\r\nHost: a\r\nX-Agent-Token: %s\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % (PATH.encode(), TOKEN.encode(), len(BODY))
)


class DeadlineTests(TestCase):
    def connect(self) -> tuple[Clock, Any, StringTransport]:
        clock = Clock()
        dispatcher = Dispatcher([Method("health_check", (), lambda: {"status": "ok"})])
        factory = build_factory(rpc_path=PATH, token=TOKEN, dispatcher=dispatcher, reactor=clock)
        channel = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return clock, channel, transport

    def test_trickled_headers_are_cut_off(self) -> None:
        clock, channel, transport = self.connect()
        # One byte per second: each byte would restart an idle timeout.
        for i in range(int(HEADER_TIMEOUT) - 1):
            channel.dataReceived(HEAD[i : i + 1])
            clock.advance(1)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(HEAD[40:41])
        clock.advance(1.01)
        self.assertTrue(transport.disconnecting)

    def test_trickled_body_is_cut_off(self) -> None:
        clock, channel, transport = self.connect()
        channel.dataReceived(HEAD)
        clock.advance(HEADER_TIMEOUT + 1)  # the header deadline is over once they are in
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(BODY[:5])
        clock.advance(BODY_TIMEOUT - HEADER_TIMEOUT - 1.5)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_a_silent_new_connection_is_cut_off(self) -> None:
        clock, channel, transport = self.connect()
        clock.advance(HEADER_TIMEOUT - 0.5)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_whole_requests_and_idle_keepalive_are_not_cut(self) -> None:
        clock, channel, transport = self.connect()
        channel.dataReceived(HEAD + BODY)
        self.assertIn(b'"result":{"status":"ok"}', transport.value())
        # Idle between requests: longer than both deadlines, shorter than keep-alive.
        clock.advance(HEADER_TIMEOUT + BODY_TIMEOUT + 10)
        self.assertFalse(transport.disconnecting)
        transport.clear()
        channel.dataReceived(HEAD + BODY)
        self.assertIn(b'"result":{"status":"ok"}', transport.value())
        clock.advance(HEADER_TIMEOUT + BODY_TIMEOUT + 10)
        self.assertFalse(transport.disconnecting)


class APIDeadlineTests(TestCase):
    """The same rule on the admin API's site (myxd/api/deadlines.py via make_site)."""

    def connect(self) -> tuple[Clock, Any, StringTransport]:
        from twisted.web.resource import Resource

        from myxd.api.gate import make_site

        class Hello(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"hello"

        clock = Clock()
        site = make_site(Hello(), reactor=clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return clock, channel, transport

    def test_trickled_headers_are_cut_off_but_idle_keepalive_is_not(self) -> None:
        from myxd.api.deadlines import HEADER_TIMEOUT as API_HEADER_TIMEOUT
        from myxd.api.deadlines import IDLE_TIMEOUT

        clock, channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"hello", transport.value())
        clock.advance(IDLE_TIMEOUT - 1)  # idle between requests: only the idle timeout
        self.assertFalse(transport.disconnecting)
        head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 100
        for i in range(int(API_HEADER_TIMEOUT) - 1):
            channel.dataReceived(head[i : i + 1])
            clock.advance(1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1.5)
        self.assertTrue(transport.disconnecting)
