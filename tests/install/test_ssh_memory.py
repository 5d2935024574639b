"""In-memory tests of the conch client (Twisted test_endpoints.py style).

A conch SSH server and our client are joined by ``twisted.test.iosim`` fake
transports and pumped by hand; time is a ``Clock``. The server side records
every service and user-auth request, so the tests can prove that a refused host
key means no credential was ever sent.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.avatar import ConchUser
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common, connection, keys, transport, userauth
from twisted.conch.ssh.factory import SSHFactory
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from myxd.install.hostkeys import HostKeyMismatch, HostKeyPolicy, format_fingerprint
from myxd.install.ssh import AuthenticationFailed, Credentials, SSHConnectError, connect

PASSWORD = b"memory-secret"


@implementer(IRealm)
class _Realm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        return IConchUser, ConchUser(), lambda: None


class _Recorder:
    def __init__(self) -> None:
        self.services: list[bytes] = []
        self.auth: list[tuple[bytes, bytes, bytes]] = []  # (user, method, alg or b"")


def _server_factory(
    host_key: keys.Key, rec: _Recorder, user_key: keys.Key | None, clock: Clock
) -> Any:
    class Transport(transport.SSHServerTransport):
        def ssh_SERVICE_REQUEST(self, packet: bytes) -> Any:
            rec.services.append(common.getNS(packet)[0])
            return super().ssh_SERVICE_REQUEST(packet)

    class UserAuth(userauth.SSHUserAuthServer):
        # The server's auth timeout and failed-password delay run on the test clock.
        pass

    UserAuth.clock = clock

    class RecordingUserAuth(UserAuth):
        def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:
            user, _svc, method, rest = common.getNS(packet, 3)
            alg = common.getNS(rest[1:])[0] if method == b"publickey" else b""
            rec.auth.append((user, method, alg))
            return super().ssh_USERAUTH_REQUEST(packet)

    portal = Portal(_Realm())
    pw = InMemoryUsernamePasswordDatabaseDontUse()
    pw.addUser(b"root", PASSWORD)
    portal.registerChecker(pw)
    if user_key is not None:
        portal.registerChecker(
            SSHPublicKeyChecker(InMemorySSHKeyDB({b"root": [user_key.public()]}))
        )
    factory = SSHFactory()
    factory.protocol = Transport
    factory.portal = portal  # type: ignore[attr-defined]
    factory.services = {
        b"ssh-userauth": RecordingUserAuth,
        b"ssh-connection": connection.SSHConnection,
    }
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    factory.privateKeys = {host_key.sshType(): host_key}
    for alg in (b"rsa-sha2-512", b"rsa-sha2-256"):
        if host_key.type() == "RSA":
            factory.publicKeys[alg] = host_key.public()
            factory.privateKeys[alg] = host_key
    factory.startFactory()
    return factory


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    """Connects the client protocol to a fresh server protocol over iosim transports."""

    def __init__(self, server_factory: Any, clock: Clock) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        return succeed(client)


def _key(kind: str) -> keys.Key:
    if kind == "ed25519":
        return keys.Key(ed25519.Ed25519PrivateKey.generate())
    if kind == "ecdsa":
        return keys.Key(ec.generate_private_key(ec.SECP256R1()))
    return keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))


class MemorySSHTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rec = _Recorder()
        self.host_key = _key("ed25519")
        self.user_key = _key("rsa")
        self.endpoint = _MemoryEndpoint(
            _server_factory(self.host_key, self.rec, self.user_key, self.clock), self.clock
        )

    def run_connect(self, creds: Credentials, policy: HostKeyPolicy, **kw: Any) -> Any:
        d = Deferred.fromCoroutine(
            connect(
                "mem",
                22,
                creds,
                policy,
                reactor=self.clock,
                timeout=30,
                endpoint_factory=lambda h, p, t: self.endpoint,
                **kw,
            )
        )
        for _ in range(200):
            if d.called:
                break
            for pump in self.endpoint.pumps:
                pump.pump(advanceClock=False)
            # Let the server's failed-password delay (1 s) pass.
            self.clock.advance(0.5)
        self.assertTrue(d.called, "the handshake did not finish")
        results: list[Any] = []
        d.addBoth(results.append)
        return results[0]

    def test_password_auth(self) -> None:
        client = self.run_connect(Credentials("root", password=PASSWORD.decode()), HostKeyPolicy())
        self.assertEqual(client.host_key_trust, "first-use")
        self.assertEqual(self.rec.services, [b"ssh-userauth"])
        self.assertIn((b"root", b"password", b""), self.rec.auth)

    def test_wrong_password_sent_once(self) -> None:
        result = self.run_connect(Credentials("root", password="nope"), HostKeyPolicy())
        self.assertIsInstance(result.value, AuthenticationFailed)
        self.assertEqual(
            [a for a in self.rec.auth if a[1] == b"password"], [(b"root", b"password", b"")]
        )

    def test_rsa_key_signs_with_sha2(self) -> None:
        client = self.run_connect(Credentials("root"), HostKeyPolicy(), private_key=self.user_key)
        self.assertEqual(getattr(client, "username", None), "root", client)
        algs = {a[2] for a in self.rec.auth if a[1] == b"publickey"}
        self.assertEqual(algs, {b"rsa-sha2-512"})

    def test_rsa_signature_choice_never_sha1(self) -> None:
        from myxd.install.sshauth import _rsa_signature_algorithm as pick

        self.assertEqual(pick(None), (b"rsa-sha2-512", None))
        self.assertEqual(pick(b"ssh-ed25519,rsa-sha2-256")[0], b"rsa-sha2-256")
        self.assertEqual(pick(b"rsa-sha2-256,rsa-sha2-512")[0], b"rsa-sha2-512")
        alg, hint = pick(b"ssh-ed25519,ssh-rsa")
        self.assertEqual(alg, b"rsa-sha2-512")
        self.assertIn("SHA-1 ssh-rsa is never used", hint or "")

    def test_host_key_mismatch_sends_no_credential(self) -> None:
        stored: list[str] = []
        policy = HostKeyPolicy(
            pinned=format_fingerprint(_key("ed25519").public().blob()), on_first_use=stored.append
        )
        result = self.run_connect(Credentials("root", password=PASSWORD.decode()), policy)
        self.assertIsInstance(result.value, HostKeyMismatch)
        self.assertEqual(self.rec.services, [], "user-auth was never even requested")
        self.assertEqual(self.rec.auth, [])
        self.assertEqual(stored, [])

    def test_changed_known_key_refused(self) -> None:
        other = _key("ed25519").public().toString("openssh").decode()
        result = self.run_connect(
            Credentials("root", password=PASSWORD.decode()), HostKeyPolicy(known_key=other)
        )
        self.assertIsInstance(result.value, HostKeyMismatch)
        self.assertEqual(self.rec.auth, [])

    def test_first_use_stores_the_servers_key_once(self) -> None:
        stored: list[str] = []
        self.run_connect(
            Credentials("root", password=PASSWORD.decode()),
            HostKeyPolicy(on_first_use=stored.append),
        )
        self.assertEqual(len(stored), 1)
        self.assertEqual(
            stored[0].split()[1], self.host_key.public().toString("openssh").decode().split()[1]
        )

    def test_handshake_timeout(self) -> None:
        @implementer(IStreamClientEndpoint)
        class Silent:
            def connect(self, factory: Any) -> Deferred[Any]:
                proto = factory.buildProtocol(None)
                proto.makeConnection(iosim.makeFakeClient(proto))  # nobody answers
                return succeed(proto)

        d = Deferred.fromCoroutine(
            connect(
                "mem",
                22,
                Credentials("root", password="x"),
                HostKeyPolicy(),
                reactor=self.clock,
                timeout=5,
                endpoint_factory=lambda h, p, t: Silent(),
            )
        )
        self.assertFalse(d.called)
        self.clock.advance(5)
        f = self.failureResultOf(d, SSHConnectError)
        self.assertIn("timed out after 5 s", str(f.value))
