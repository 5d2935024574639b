# -*- test-case-name: tests.install.test_ssh_memory,tests.install.test_ssh -*-
"""Opening an authenticated SSH connection: TCP, host-key check, user auth (conch).

``open_connection`` drives ``SSHClientTransport`` itself, with:

- host-key verification (``hostkeys.HostKeyPolicy``) in ``verifyHostKey``, i.e.
  before the user-auth service is even requested: a refused key means no password,
  no signature and no sudo password ever leaves this process;
- user-auth by password, keyboard-interactive (answered with the password) or a
  private key: ed25519, ECDSA, and RSA signed with rsa-sha2-512/256 as the server
  advertises in ``server-sig-algs`` (RFC 8308/8332).

It never logs passwords, passphrases or private keys, never blocks the reactor
(key decryption runs in a thread), and never retries authentication with a
guessed method. Channels (commands, SFTP) are ``sshchannels``' job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, cast

from twisted.conch.ssh import common, connection, keys, transport, userauth
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd.install.hostkeys import HostKeyCheck, HostKeyError, HostKeyMismatch, HostKeyPolicy
from myxd.install.sshbase import (
    AuthenticationFailed,
    KeyLoadError,
    Once,
    SSHConnectError,
    SSHError,
)


@dataclass(frozen=True)
class Credentials:
    """Who to log in as. Secrets are excluded from ``repr`` so they never reach a log."""

    username: str
    password: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)

    @classmethod
    def from_auth(cls, username: str, auth: dict[str, Any] | None) -> Credentials:
        """From a server record's ``auth``: ``{password}`` or ``{private_key, passphrase?}``."""
        auth = auth or {}
        return cls(
            username=username,
            password=auth.get("password"),
            private_key=auth.get("private_key"),
            passphrase=auth.get("passphrase"),
        )


def load_private_key(text: str, passphrase: str | None) -> keys.Key:
    """Parse a private key (OpenSSH or PEM). Blocking (bcrypt KDF): call in a thread."""
    try:
        data = text.encode("utf-8") if isinstance(text, str) else text
        pw = passphrase.encode("utf-8") if passphrase else None
    except UnicodeEncodeError:
        raise KeyLoadError("the private key or passphrase is not valid UTF-8") from None
    try:
        key = keys.Key.fromString(data, passphrase=pw)
    except keys.EncryptedKeyError:
        raise KeyLoadError("the private key is encrypted; a passphrase is required") from None
    except keys.BadKeyError as e:
        if pw is not None and "passphrase" in str(e).lower():
            raise KeyLoadError("the passphrase does not decrypt the private key") from None
        if pw is not None:
            raise KeyLoadError(
                "the private key cannot be read (wrong passphrase or unsupported format)"
            ) from None
        raise KeyLoadError(f"the private key cannot be read: {e}") from None
    except (ValueError, TypeError, IndexError, struct.error) as e:
        raise KeyLoadError(f"the private key cannot be read: {type(e).__name__}") from None
    except Exception as e:
        # Conch's parsers meet arbitrary text here; some fail in ways of their
        # own (an LSH key "(..." that is not an s-expression: AssertionError).
        # Whatever it is, the key cannot be read: a 400, never a 500.
        raise KeyLoadError(f"the private key cannot be read: {type(e).__name__}") from None
    if key.isPublic():
        raise KeyLoadError("a public key was given where the private key is needed")
    if key.type() not in ("Ed25519", "EC", "RSA"):
        raise KeyLoadError(f"{key.type()} keys are not supported; use ed25519, ECDSA or RSA")
    return key


def _rsa_signature_algorithm(server_sig_algs: bytes | None) -> tuple[bytes, str | None]:
    """Pick the RSA signature algorithm: SHA-512, then SHA-256. Never SHA-1.

    Returns the algorithm and, when the server did not advertise SHA-2 RSA
    signatures, a hint to add to the error should authentication fail.
    """
    if server_sig_algs is None:
        # No RFC 8308 advertisement: every OpenSSH since 7.2 takes rsa-sha2-*.
        return b"rsa-sha2-512", None
    offered = server_sig_algs.split(b",")
    for alg in (b"rsa-sha2-512", b"rsa-sha2-256"):
        if alg in offered:
            return alg, None
    return b"rsa-sha2-512", (
        "the server does not list rsa-sha2-256/512 signatures, and SHA-1 ssh-rsa is never "
        "used; an ed25519 or ECDSA key may work"
    )


class _UserAuth(userauth.SSHUserAuthClient):
    """Tries each credential we have exactly once; never prompts, never guesses."""

    _log = Logger()

    def __init__(
        self,
        handshake: Handshake,
        instance: connection.SSHConnection,
    ) -> None:
        super().__init__(handshake.credentials.username.encode("utf-8"), instance)
        self._handshake = handshake
        self._tried: set[bytes] = set()
        self._kbd_rounds = 0
        self._alg: bytes = b""

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        methods, _ = common.getNS(packet)
        self._handshake.server_auth_methods = methods.decode("ascii", "replace")
        if self.lastAuth != b"none":
            self._handshake.rejected.append(self.lastAuth.decode("ascii", "replace"))
        return super().ssh_USERAUTH_FAILURE(packet)

    def auth_publickey(self) -> Deferred[bool]:
        key = self._handshake.private_key
        if key is None or b"publickey" in self._tried:
            return defer.succeed(False)
        self._tried.add(b"publickey")
        if key.type() == "RSA":
            assert self.transport is not None
            self._alg, self._handshake.auth_hint = _rsa_signature_algorithm(
                self.transport.peerExtensions.get(b"server-sig-algs")
            )
        else:
            self._alg = key.sshType()
        self._handshake.attempted.append("publickey")
        self.askForAuth(
            b"publickey", b"\x00" + common.NS(self._alg) + common.NS(key.public().blob())
        )
        return defer.succeed(True)

    def ssh_USERAUTH_PK_OK_publickey(self, packet: bytes) -> None:
        # The server accepts this key: prove we hold it (RFC 4252 section 7).
        key = self._handshake.private_key
        assert key is not None and self.transport is not None
        assert self.transport.sessionID is not None
        blob = key.public().blob()
        signed = (
            common.NS(self.transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + common.NS(self.user)
            + common.NS(self.instance.name)
            + common.NS(b"publickey")
            + b"\x01"
            + common.NS(self._alg)
            + common.NS(blob)
        )
        signature = key.sign(signed, signatureType=self._alg)
        self.askForAuth(
            b"publickey",
            b"\x01" + common.NS(self._alg) + common.NS(blob) + common.NS(signature),
        )

    def auth_password(self) -> bool:
        password = self._handshake.credentials.password
        if password is None or b"password" in self._tried:
            return False
        self._tried.add(b"password")
        self._handshake.attempted.append("password")
        self.askForAuth(b"password", b"\x00" + common.NS(password.encode("utf-8")))
        return True

    def auth_keyboard_interactive(self) -> bool:
        if self._handshake.credentials.password is None or b"keyboard-interactive" in self._tried:
            return False
        self._tried.add(b"keyboard-interactive")
        self._handshake.attempted.append("keyboard-interactive")
        self.askForAuth(b"keyboard-interactive", common.NS(b"") + common.NS(b""))
        return True

    def getGenericAnswers(
        self, name: bytes, instruction: bytes, prompts: list[tuple[bytes, bool]]
    ) -> Deferred[list[str]]:
        self._kbd_rounds += 1
        password = self._handshake.credentials.password or ""
        if self._kbd_rounds > 3:
            # A server that keeps asking is not asking for a password.
            return defer.fail(AuthenticationFailed("keyboard-interactive asked too many times"))
        # Hidden prompts get the password; echoed prompts (not secrets) get nothing.
        return defer.succeed(["" if echo else password for _prompt, echo in prompts])

    def ssh_USERAUTH_SUCCESS(self, packet: bytes) -> None:
        self._handshake.authenticated = True
        super().ssh_USERAUTH_SUCCESS(packet)


class Connection(connection.SSHConnection):
    def __init__(self, handshake: Handshake) -> None:
        super().__init__()
        self._handshake = handshake

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._handshake.connected(self)


class _Transport(transport.SSHClientTransport):
    def __init__(self, handshake: Handshake) -> None:
        self._handshake = handshake

    def connectionMade(self) -> None:
        # Instance attribute: restricts what we offer to the algorithms this
        # attempt is for (see HostKeyPolicy.algorithm_groups).
        self.supportedPublicKeys = list(self._handshake.algorithms)
        self._handshake.transport = self
        super().connectionMade()

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        self._handshake.phase = "verifying the host key"
        try:
            self._handshake.host_check = self._handshake.policy.check(hostKey)
        except HostKeyError as e:
            self._handshake.fail(e)
            # Disconnect here rather than errback: conch would put the failure's
            # repr (with local tracebacks) into the disconnect message. The
            # returned Deferred never fires; the connection is gone.
            self.sendDisconnect(
                transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE, b"host key not trusted"
            )
            return Deferred()
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        # The key exchange signature is verified by now, so the server holds the
        # private half of the key we accepted: only now may a new key be stored.
        d = defer.maybeDeferred(self._handshake.store_host_key)

        def start_auth(_: object) -> None:
            self._handshake.phase = "authenticating"
            self.requestService(_UserAuth(self._handshake, Connection(self._handshake)))

        def store_failed(f: Failure) -> None:
            self._handshake.fail(SSHError(f"could not store the host key: {f.getErrorMessage()}"))
            self.loseConnection()

        d.addCallbacks(start_auth, store_failed)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self._handshake.remote_disconnect = description.decode("utf-8", "replace")

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self._handshake.lost(reason)


class Handshake:
    """State of one connection attempt, from TCP connect to an authenticated service."""

    def __init__(
        self,
        credentials: Credentials,
        private_key: keys.Key | None,
        policy: HostKeyPolicy,
        algorithms: list[bytes],
        host: str,
        port: int,
    ) -> None:
        self.credentials = credentials
        self.private_key = private_key
        self.policy = policy
        self.algorithms = algorithms
        self.host = host
        self.port = port
        self.phase = "connecting"
        self.transport: _Transport | None = None
        self.host_check: HostKeyCheck | None = None
        self.authenticated = False
        self.attempted: list[str] = []
        self.rejected: list[str] = []
        self.server_auth_methods: str | None = None
        self.auth_problem: str | None = None
        self.auth_hint: str | None = None
        self.remote_disconnect: str | None = None
        self.result: Once[Connection] = Once()
        self.closed: Deferred[None] = Deferred()
        self.connection: Connection | None = None

    def fail(self, exc: BaseException) -> None:
        self.result.fail(exc)

    def store_host_key(self) -> Any:
        check = self.host_check
        if check is None:  # pragma: no cover - conch always verifies first
            raise SSHError("host key was not verified")
        if check.store and self.policy.on_first_use is not None:
            return self.policy.on_first_use(check.openssh)
        return None

    def connected(self, conn: Connection) -> None:
        self.connection = conn
        self.result.succeed(conn)

    def lost(self, reason: Failure | None) -> None:
        if not self.result.fired:
            self.result.fail(self._failure_for_loss())
        if not self.closed.called:
            self.closed.callback(None)

    def _failure_for_loss(self) -> SSHError:
        where = f"{self.host}:{self.port}"
        if self.host_check is not None and self.phase == "authenticating":
            if self.auth_problem:
                return AuthenticationFailed(f"{where}: {self.auth_problem}")
            user = self.credentials.username
            tried = ", ".join(self.attempted) or "nothing"
            if not self.attempted:
                offered = self.server_auth_methods or "unknown"
                return AuthenticationFailed(
                    f"{where}: no usable credential for user {user!r} "
                    f"(the server accepts: {offered})"
                )
            hint = f"; {self.auth_hint}" if self.auth_hint else ""
            return AuthenticationFailed(
                f"{where}: authentication failed for user {user!r} (tried: {tried}); "
                f"check the password or key{hint}"
            )
        detail = f": {self.remote_disconnect}" if self.remote_disconnect else ""
        return SSHConnectError(f"{where}: connection closed while {self.phase}{detail}")


async def open_connection(
    host: str,
    port: int,
    credentials: Credentials,
    policy: HostKeyPolicy,
    *,
    reactor: Any,
    timeout: float,
    private_key: keys.Key | None = None,
    endpoint_factory: Callable[[str, int, float], IStreamClientEndpoint] | None = None,
) -> tuple[Connection, Handshake]:
    """The authenticated connection and its handshake state (see ``ssh.connect``).

    Tries the host-key algorithm groups of ``policy`` in turn; raises
    HostKeyMismatch, AuthenticationFailed, KeyLoadError, SSHConnectError.
    """
    if not credentials.username:
        raise AuthenticationFailed("no SSH username")
    if private_key is None and credentials.private_key:
        from twisted.internet.threads import deferToThreadPool

        private_key = await deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            load_private_key,
            credentials.private_key,
            credentials.passphrase,
        )
    if private_key is None and credentials.password is None:
        raise AuthenticationFailed("no SSH credential: give a password or a private key")

    groups = policy.algorithm_groups()
    first_mismatch: HostKeyMismatch | None = None
    last_error: SSHError | None = None
    for algorithms in groups:
        hs = Handshake(credentials, private_key, policy, algorithms, host, port)
        try:
            conn = await _attempt(reactor, hs, timeout, endpoint_factory)
        except HostKeyMismatch as e:
            if first_mismatch is None:
                first_mismatch = e
            continue
        except SSHConnectError as e:
            if hs.transport is None or len(groups) == 1:
                raise  # TCP-level failure: another key type will not help
            last_error = e  # probably "no matching host key type": try the next
            continue
        return conn, hs
    if first_mismatch is not None:
        raise first_mismatch
    assert last_error is not None
    raise last_error


async def _attempt(
    reactor: Any,
    hs: Handshake,
    timeout: float,
    endpoint_factory: Callable[[str, int, float], IStreamClientEndpoint] | None,
) -> Connection:
    if endpoint_factory is not None:
        endpoint = endpoint_factory(hs.host, hs.port, timeout)
    else:
        endpoint = HostnameEndpoint(reactor, hs.host, hs.port, timeout=timeout)
    proto = _Transport(hs)
    timed_out = False
    connecting = connectProtocol(endpoint, proto)

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        hs.fail(
            SSHConnectError(f"{hs.host}:{hs.port}: timed out after {timeout:g} s while {hs.phase}")
        )
        if not connecting.called:
            connecting.cancel()
        elif hs.transport is not None and hs.transport.transport is not None:
            cast(Any, hs.transport.transport).abortConnection()

    timer = reactor.callLater(timeout, expire)
    try:
        try:
            await connecting
        except (error.ConnectError, error.DNSLookupError, error.TimeoutError, OSError) as e:
            if timed_out:
                raise SSHConnectError(
                    f"{hs.host}:{hs.port}: timed out after {timeout:g} s while connecting"
                ) from None
            reason = _conn_reason(e)
            raise SSHConnectError(f"cannot connect to {hs.host}:{hs.port}: {reason}") from None
        except defer.CancelledError:
            raise SSHConnectError(
                f"{hs.host}:{hs.port}: timed out after {timeout:g} s while connecting"
            ) from None
        try:
            return await hs.result.deferred
        except BaseException:
            tr = hs.transport
            if tr is not None and tr.transport is not None and not hs.closed.called:
                if timed_out:
                    # Already aborted; a dead peer must not hold the caller.
                    cast(Any, tr.transport).abortConnection()
                else:
                    tr.transport.loseConnection()
                    await hs.closed
            raise
    finally:
        if timer.active():
            timer.cancel()


def _conn_reason(e: BaseException) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.DNSLookupError):
        return "host name not found"
    if isinstance(e, error.TimeoutError):
        return "timed out"
    text = str(e).strip()
    return text or type(e).__name__
