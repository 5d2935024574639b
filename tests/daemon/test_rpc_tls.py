"""Certificate pinning on real loopback TLS servers (real reactor, real OpenSSL).

The server here is a raw TLS listener that records every decrypted byte it
receives and answers JSON-RPC by hand, so a test can prove that a refused
certificate means not one byte of the HTTP request (and so not the token) left
the client.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, ResponseNeverReceived

from myxd.rpc import AgentEndpoint, AgentRPC, AgentRPCError, CertificateMismatch
from myxd.rpc.tls import PinMismatchError, PinnedTLSPolicy, PinRegistry
from tests.daemon.fleet_fakes import settings

TOKEN = "token-that-must-never-leak-0123456789"
PATH = "pinnedpath"


def make_cert() -> tuple[Any, x509.Certificate, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "myx-agent-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, cert, hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


class RecordingHTTP(Protocol):
    """Records decrypted bytes; answers each complete JSON-RPC POST (keep-alive)."""

    transport: Any
    factory: Any

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self.factory.requests.append((head, body))
            request = json.loads(body)
            if isinstance(request, list):
                reply: Any = [
                    {"jsonrpc": "2.0", "id": r["id"], "result": r["method"]} for r in request
                ]
            else:
                reply = {"jsonrpc": "2.0", "id": request["id"], "result": "pong"}
            payload = json.dumps(reply).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
            )

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.connections.remove(self)
        self.factory.closed += 1


class RecordingFactory(Factory):
    protocol = RecordingHTTP

    def __init__(self) -> None:
        self.received = b""
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections: list[RecordingHTTP] = []
        self.closed = 0
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        return super().buildProtocol(addr)


class PinningTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        key, cert, self.pin = make_cert()
        _, _, self.other_pin = make_cert()
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(cert),
        )
        self.factory = RecordingFactory()
        self.port = cast(Any, self.reactor).listenSSL(
            0, self.factory, options, interface="127.0.0.1"
        )
        self.addCleanup(self._stop_server)
        self.rpc = AgentRPC(reactor, settings(rpc_timeout=20, rpc_retry_base_delay=0.05))
        self.addCleanup(lambda: Deferred.fromCoroutine(self.rpc.close()))

    async def _stop_server(self) -> None:
        await self.port.stopListening()
        for conn in list(self.factory.connections):
            conn.transport.abortConnection()
        await self.until(lambda: not self.factory.connections)

    async def until(self, predicate: Any, timeout: float = 30) -> None:
        deadline = self.reactor.seconds() + timeout
        while not predicate():
            if self.reactor.seconds() > deadline:
                self.fail("condition not reached")
            await deferLater(self.reactor, 0.01, lambda: None)

    def ep(self, pin: str) -> AgentEndpoint:
        return AgentEndpoint(
            host="127.0.0.1", port=self.port.getHost().port, path=PATH, token=TOKEN, fingerprint=pin
        )

    async def test_pinned_call_works_and_sends_the_token(self) -> None:
        self.assertEqual(await self.rpc.call(self.ep(self.pin), "heartbeat"), "pong")
        [(head, body)] = self.factory.requests
        self.assertTrue(head.startswith(b"POST /pinnedpath/rpc HTTP/1.1"))
        self.assertIn(b"X-Agent-Token: " + TOKEN.encode(), head)

    async def test_wrong_pin_refused_before_any_request_byte(self) -> None:
        with self.assertRaises(CertificateMismatch) as caught:
            await self.rpc.call(self.ep(self.other_pin), "heartbeat")
        err = caught.exception
        self.assertEqual((err.kind, err.attempts), ("final", 1))
        self.assertEqual((err.expected, err.actual), (self.other_pin, self.pin))
        # The TCP connection was made (the handshake was tried) ...
        self.assertEqual(self.factory.accepted, 1)
        await self.until(lambda: self.factory.closed == 1)
        # ... but not a single decrypted byte reached the server.
        self.assertEqual(self.factory.received, b"")
        self.assertEqual(self.factory.requests, [])

    async def test_pooled_connection_is_not_reused_under_another_pin(self) -> None:
        await self.rpc.call(self.ep(self.pin), "heartbeat")
        await self.rpc.call(self.ep(self.pin), "heartbeat")
        self.assertEqual(self.factory.accepted, 1)  # keep-alive pool reused it
        received = len(self.factory.received)
        with self.assertRaises(CertificateMismatch):
            await self.rpc.call(self.ep(self.other_pin), "heartbeat")
        self.assertEqual(self.factory.accepted, 2)
        self.assertEqual(len(self.factory.received), received)
        self.assertEqual(await self.rpc.call(self.ep(self.pin), "heartbeat"), "pong")

    async def test_batch_over_tls_is_one_request(self) -> None:
        results = await self.rpc.batch(
            self.ep(self.pin), [("heartbeat", None), ("get_status", None)]
        )
        self.assertEqual(results, ["heartbeat", "get_status"])
        self.assertEqual(len(self.factory.requests), 1)

    async def test_agent_without_registered_pin_is_refused(self) -> None:
        agent = Agent(self.reactor, contextFactory=PinnedTLSPolicy(PinRegistry()))
        url = f"https://127.0.0.1:{self.port.getHost().port}/{PATH}/rpc".encode()
        with self.assertRaises(ResponseNeverReceived) as caught:
            await agent.request(b"GET", url)
        reasons = [r.value for r in caught.exception.reasons]
        self.assertTrue(
            any(isinstance(r, PinMismatchError) and r.expected is None for r in reasons), reasons
        )
        await self.until(lambda: self.factory.closed == 1)
        self.assertEqual(self.factory.received, b"")

    def test_one_context_every_connection_carries_its_own_pin(self) -> None:
        pins = PinRegistry()
        policy = PinnedTLSPolicy(pins)
        pins.set("127.0.0.1", 1, self.pin)
        pins.set("127.0.0.1", 2, self.other_pin)
        # The creators never look at the TLS protocol object they are given.
        no_protocol: Any = None
        a = policy.creatorForNetloc(b"127.0.0.1", 1).clientConnectionForTLS(no_protocol)
        b = policy.creatorForNetloc(b"127.0.0.1", 2).clientConnectionForTLS(no_protocol)
        c = policy.creatorForNetloc(b"127.0.0.1", 3).clientConnectionForTLS(no_protocol)
        self.assertIs(a.get_context(), policy.context)
        self.assertIs(b.get_context(), policy.context)
        self.assertEqual(
            [getattr(x, "_myx_expected_pin", "unset") for x in (a, b, c)],
            [self.pin, self.other_pin, None],
        )


class TransportFailureTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        _, _, self.pin = make_cert()
        self.rpc = AgentRPC(reactor, settings(rpc_timeout=20, rpc_retry_base_delay=0.05))
        self.addCleanup(lambda: Deferred.fromCoroutine(self.rpc.close()))

    async def test_connection_refused_is_retried_then_reported(self) -> None:
        port = self.reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        ep = AgentEndpoint("127.0.0.1", number, PATH, TOKEN, self.pin)
        with self.assertRaises(AgentRPCError) as caught:
            await self.rpc.call(ep, "heartbeat")
        # The first try and 3 retries.
        self.assertEqual((caught.exception.kind, caught.exception.attempts), ("retryable", 4))
        self.assertIn("connection refused", caught.exception.reason)

    async def test_plain_tcp_server_is_a_retryable_tls_failure(self) -> None:
        class Garbage(Protocol):
            transport: Any

            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                self.transport.loseConnection()

        port = self.reactor.listenTCP(0, Factory.forProtocol(Garbage), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ep = AgentEndpoint("127.0.0.1", port.getHost().port, PATH, TOKEN, self.pin)
        with self.assertRaises(AgentRPCError) as caught:
            await self.rpc.call(ep, "heartbeat")
        err = caught.exception
        self.assertNotIsInstance(err, CertificateMismatch)
        self.assertEqual((err.kind, err.attempts), ("retryable", 4))  # first try + 3 retries
