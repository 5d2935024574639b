"""SSH client for installs, on twisted.conch: connect, check the host key, authenticate,
run commands (also through sudo) and upload files by SFTP, over ONE connection.

Why not ``SSHCommandClientEndpoint``: its user-auth signs RSA keys only with SHA-1
``ssh-rsa`` (which OpenSSH >= 8.8 refuses), its command channel drops stderr, and
an install needs exec and SFTP channels on one authenticated connection. So this
module drives ``SSHClientTransport`` itself, with:

- host-key verification (``hostkeys.HostKeyPolicy``) in ``verifyHostKey``, i.e.
  before the user-auth service is even requested: a refused key means no password,
  no signature and no sudo password ever leaves this process;
- user-auth by password, keyboard-interactive (answered with the password) or a
  private key: ed25519, ECDSA, and RSA signed with rsa-sha2-512/256 as the server
  advertises in ``server-sig-algs`` (RFC 8308/8332);
- exec channels collecting stdout, stderr and exit status, with a timeout;
- SFTP through a ``session`` channel with the ``sftp`` subsystem and conch's
  ``FileTransferClient``; files are written under a temporary name and renamed.

It never logs passwords, passphrases, private keys or command stdin, never blocks
the reactor (key decryption runs in a thread), and never retries authentication
with a guessed method.
"""

from __future__ import annotations

import os
import shlex
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar, cast

from twisted.conch.ssh import channel, common, connection, filetransfer, keys, transport, userauth
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd.errors import MyxError
from myxd.install.hostkeys import HostKeyCheck, HostKeyError, HostKeyMismatch, HostKeyPolicy

__all__ = [
    "AuthenticationFailed",
    "CommandResult",
    "CommandTimeout",
    "Credentials",
    "HostKeyMismatch",
    "KeyLoadError",
    "SFTPError",
    "SSHClient",
    "SSHConnectError",
    "SSHDisconnected",
    "SSHError",
    "Sudo",
    "SudoError",
    "connect",
    "load_private_key",
]

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


@dataclass(frozen=True)
class Sudo:
    """How to become root: ``mode`` is ``none`` or ``sudo``; ``password`` for sudo -S."""

    mode: str = "none"
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, sudo: dict[str, Any] | None) -> Sudo:
        sudo = sudo or {}
        return cls(mode=str(sudo.get("mode") or "none"), password=sudo.get("password"))


@dataclass(frozen=True)
class CommandResult:
    command: str  # as sent (never contains secrets: those go on stdin)
    exit_code: int | None
    signal: str | None
    stdout: bytes
    stderr: bytes
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


def load_private_key(text: str, passphrase: str | None) -> keys.Key:
    """Parse a private key (OpenSSH or PEM). Blocking (bcrypt KDF): call in a thread."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    pw = passphrase.encode("utf-8") if passphrase else None
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


class _Once(Generic[T]):
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


class _UserAuth(userauth.SSHUserAuthClient):
    """Tries each credential we have exactly once; never prompts, never guesses."""

    _log = Logger()

    def __init__(
        self,
        handshake: _Handshake,
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


class _Connection(connection.SSHConnection):
    def __init__(self, handshake: _Handshake) -> None:
        super().__init__()
        self._handshake = handshake

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._handshake.connected(self)


class _Transport(transport.SSHClientTransport):
    def __init__(self, handshake: _Handshake) -> None:
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
            self.requestService(_UserAuth(self._handshake, _Connection(self._handshake)))

        def store_failed(f: Failure) -> None:
            self._handshake.fail(SSHError(f"could not store the host key: {f.getErrorMessage()}"))
            self.loseConnection()

        d.addCallbacks(start_auth, store_failed)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self._handshake.remote_disconnect = description.decode("utf-8", "replace")

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self._handshake.lost(reason)


class _Handshake:
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
        self.result: _Once[_Connection] = _Once()
        self.closed: Deferred[None] = Deferred()
        self.connection: _Connection | None = None

    def fail(self, exc: BaseException) -> None:
        self.result.fail(exc)

    def store_host_key(self) -> Any:
        check = self.host_check
        if check is None:  # pragma: no cover - conch always verifies first
            raise SSHError("host key was not verified")
        if check.store and self.policy.on_first_use is not None:
            return self.policy.on_first_use(check.openssh)
        return None

    def connected(self, conn: _Connection) -> None:
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


class _ExecChannel(channel.SSHChannel):
    name = b"session"

    def __init__(
        self,
        conn: connection.SSHConnection,
        command: str,
        stdin: bytes | None,
        max_output: int,
    ) -> None:
        super().__init__(conn=conn)
        self._c = conn
        self.command = command
        self._stdin = stdin
        self._max = max_output
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._truncated = False
        self._exit_code: int | None = None
        self._signal: str | None = None
        self._exec_ok = False
        self.done: _Once[CommandResult] = _Once()

    def openFailed(self, reason: Any) -> None:
        self.done.fail(SSHError(f"the server refused a session channel: {reason}"))

    def channelOpen(self, specificData: bytes) -> None:
        d = self._c.sendRequest(self, b"exec", common.NS(self.command.encode()), wantReply=True)
        d.addCallbacks(self._exec_started, self._exec_refused)

    def _exec_started(self, _: object) -> None:
        self._exec_ok = True
        if self._stdin:
            self.write(self._stdin)
        self._c.sendEOF(self)

    def _exec_refused(self, f: Failure) -> None:
        self.done.fail(SSHError(f"the server refused to run the command: {f.getErrorMessage()}"))
        self.loseConnection()

    def _append(self, buf: bytearray, data: bytes) -> None:
        buf += data
        if len(buf) > self._max:
            # Keep the tail: the end of an installer's output is where errors are.
            del buf[: len(buf) - self._max]
            self._truncated = True

    def dataReceived(self, data: bytes) -> None:
        self._append(self._stdout, data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        if dataType == connection.EXTENDED_DATA_STDERR:
            self._append(self._stderr, data)

    def request_exit_status(self, data: bytes) -> int:
        (self._exit_code,) = struct.unpack(">L", data[:4])
        return 1

    def request_exit_signal(self, data: bytes) -> int:
        name, _ = common.getNS(data)
        self._signal = name.decode("ascii", "replace")
        return 1

    def kill(self) -> None:
        # RFC 4254 6.9; best effort: servers may ignore it, closing the channel
        # then leaves the remote process to die on SIGPIPE.
        try:
            self._c.sendRequest(self, b"signal", common.NS(b"KILL"), wantReply=False)
        except Exception:  # noqa: S110 - the channel may already be gone
            pass
        self.loseConnection()

    def closed(self) -> None:
        if not self._exec_ok and not self.done.fired:
            self.done.fail(SSHDisconnected("the connection closed before the command started"))
            return
        if self._exit_code is None and self._signal is None:
            self.done.fail(
                SSHDisconnected("the connection closed before the command reported its exit")
            )
            return
        self.done.succeed(
            CommandResult(
                command=self.command,
                exit_code=self._exit_code,
                signal=self._signal,
                stdout=bytes(self._stdout),
                stderr=bytes(self._stderr),
                truncated=self._truncated,
            )
        )


class _SFTPClient(filetransfer.FileTransferClient):
    def __init__(self) -> None:
        super().__init__()
        self.ready: _Once[dict[bytes, bytes]] = _Once()
        self.server_extensions: dict[bytes, bytes] = {}
        self.lost = False

    def gotServerVersion(self, serverVersion: int, extData: dict[bytes, bytes]) -> None:
        self.server_extensions = dict(extData)
        self.ready.succeed(self.server_extensions)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.ready.fail(SFTPError("the SFTP session closed"))
        super().connectionLost(reason)


class _SFTPChannel(channel.SSHChannel):
    name = b"session"

    def __init__(self, conn: connection.SSHConnection) -> None:
        super().__init__(conn=conn)
        self._c = conn
        self.client = _SFTPClient()

    def openFailed(self, reason: Any) -> None:
        self.client.lost = True
        self.client.ready.fail(SFTPError(f"the server refused a session channel: {reason}"))

    def channelOpen(self, specificData: bytes) -> None:
        d = self._c.sendRequest(self, b"subsystem", common.NS(b"sftp"), wantReply=True)
        d.addCallbacks(self._subsystem_started, self._subsystem_refused)

    def _subsystem_started(self, _: object) -> None:
        self.client.makeConnection(self)

    def _subsystem_refused(self, f: Failure) -> None:
        self.client.ready.fail(SFTPError("the server has no sftp subsystem"))
        self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def closed(self) -> None:
        self.client.connectionLost(Failure(error.ConnectionDone("sftp channel closed")))


def _sftp_error(op: str, path: str, f: Failure) -> SFTPError:
    if isinstance(f.value, filetransfer.SFTPError):
        return SFTPError(f"sftp {op} {path}: {f.value.message}")
    return SFTPError(f"sftp {op} {path}: {f.getErrorMessage()}")


_SUDO_FAILURES = (
    (
        "a password is required",
        "sudo needs a password for user {user}; give the sudo password or allow NOPASSWD",
    ),
    ("incorrect password", "sudo rejected the password for user {user}"),
    ("sorry, try again", "sudo rejected the password for user {user}"),
    ("no password was provided", "sudo needs a password for user {user}"),
    ("is not in the sudoers file", "user {user} may not use sudo (not in sudoers)"),
    ("is not allowed to execute", "user {user} may not run this command with sudo"),
    ("may not run sudo", "user {user} may not use sudo"),
)


class SSHClient:
    """One authenticated SSH connection. Use for all steps of one install, then close()."""

    log = Logger()
    SFTP_CHUNK = 32 * 1024
    SFTP_IN_FLIGHT = 8

    def __init__(
        self,
        conn: _Connection,
        handshake: _Handshake,
        reactor: IReactorTime,
        *,
        command_timeout: float,
    ) -> None:
        self._conn = conn
        self._handshake = handshake
        self._reactor = reactor
        self.command_timeout = command_timeout
        self.username = handshake.credentials.username
        self.host = handshake.host
        self.port = handshake.port
        check = handshake.host_check
        self.host_key_fingerprint = check.fingerprint if check else ""
        # pinned | known | first-use: how the host key came to be trusted.
        self.host_key_trust = check.reason if check else ""
        self._uid: int | None = None
        self._sftp: _SFTPClient | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        return not self._handshake.closed.called

    async def run(
        self,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        max_output: int = 4 * 1024 * 1024,
    ) -> CommandResult:
        """Run ``command`` through the login shell; return its output and exit status.

        Raises CommandTimeout (the channel is closed and a KILL signal requested),
        SSHDisconnected. A non-zero exit status is NOT an error here.
        """
        if not self.connected:
            raise SSHDisconnected(f"{self.host}:{self.port}: not connected")
        ch = _ExecChannel(self._conn, command, stdin, max_output)
        self._conn.openChannel(ch)
        limit = self.command_timeout if timeout is None else timeout
        timer: IDelayedCall | None = None

        def expire() -> None:
            ch.done.fail(CommandTimeout(f"command timed out after {limit:g} s: {_short(command)}"))
            ch.kill()

        if limit and limit > 0:
            timer = self._reactor.callLater(limit, expire)
        try:
            return await ch.done.deferred
        finally:
            if timer is not None and timer.active():
                timer.cancel()

    async def uid(self) -> int:
        if self._uid is None:
            res = await self.run("id -u")
            try:
                self._uid = int(res.stdout.strip())
            except ValueError:
                detail = res.stderr_text()[:200]
                raise SSHError(f"cannot read the remote user id: {detail}") from None
        return self._uid

    async def is_root(self) -> bool:
        return await self.uid() == 0

    async def privileged_command(self, script: str, sudo: Sudo) -> tuple[str, bytes | None]:
        """The command line (and stdin) that runs ``script`` as root for this user."""
        quoted = "sh -c " + shlex.quote(script)
        if await self.is_root():
            return quoted, None
        if sudo.mode != "sudo":
            raise SudoError(
                f"user {self.username} is not root and sudo is not enabled for this server"
            )
        if sudo.password:
            # -S reads the password from stdin; -p '' keeps the prompt out of stderr.
            return "sudo -S -p '' -- " + quoted, (sudo.password + "\n").encode("utf-8")
        return "sudo -n -- " + quoted, None

    async def run_privileged(
        self, script: str, sudo: Sudo, *, timeout: float | None = None
    ) -> CommandResult:
        """Run a shell script as root (directly, or via sudo). Sudo failures raise SudoError."""
        command, stdin = await self.privileged_command(script, sudo)
        result = await self.run(command, stdin=stdin, timeout=timeout)
        if stdin is not None or command.startswith("sudo "):
            self._raise_for_sudo(result)
        return result

    def _raise_for_sudo(self, result: CommandResult) -> None:
        if result.exit_code == 0:
            return
        err = result.stderr_text().lower()
        if result.exit_code == 127 and ("sudo: not found" in err or "sudo: command not" in err):
            raise SudoError(f"sudo is not installed on {self.host}")
        if result.exit_code != 1:
            return
        for marker, message in _SUDO_FAILURES:
            if marker in err and ("sudo" in err or "sorry" in err):
                raise SudoError(message.format(user=self.username))

    async def _sftp_client(self) -> _SFTPClient:
        if self._sftp is None or self._sftp.lost:
            ch = _SFTPChannel(self._conn)
            self._sftp = ch.client
            self._conn.openChannel(ch)
        client = self._sftp
        timer = self._reactor.callLater(
            self.command_timeout,
            lambda: client.ready.fail(SFTPError("timed out opening the SFTP session")),
        )
        try:
            await client.ready.deferred
        except SFTPError:
            self._sftp = None
            raise
        finally:
            if timer.active():
                timer.cancel()
        return client

    async def upload(
        self,
        remote_path: str,
        data: bytes | None = None,
        *,
        local_path: str | None = None,
        mode: int = 0o600,
        timeout: float | None = None,
    ) -> None:
        """Write ``data`` (or the file at ``local_path``) to ``remote_path`` by SFTP.

        The bytes go to a temporary name in the same directory, which is then
        renamed over ``remote_path`` (posix-rename when the server has it), so a
        reader never sees a half-written file. The file is created with ``mode``.
        """
        if (data is None) == (local_path is None):
            raise ValueError("give exactly one of data or local_path")
        limit = self.command_timeout if timeout is None else timeout
        d = Deferred.fromCoroutine(self._upload(remote_path, data, local_path, mode))
        d.addTimeout(limit, self._reactor)
        try:
            await d
        except defer.TimeoutError:
            raise SFTPError(f"sftp upload {remote_path} timed out after {limit:g} s") from None

    async def _upload(
        self, remote_path: str, data: bytes | None, local_path: str | None, mode: int
    ) -> None:
        client = await self._sftp_client()
        tmp = f"{remote_path}.tmp-{os.urandom(6).hex()}"
        tmp_b = tmp.encode("utf-8")
        flags = filetransfer.FXF_WRITE | filetransfer.FXF_CREAT | filetransfer.FXF_EXCL
        try:
            handle = await client.openFile(tmp_b, flags, {"permissions": mode})
        except Exception:
            raise _sftp_error("open", tmp, Failure()) from None
        try:
            await self._write_chunks(handle, data, local_path, tmp)
            await handle.close()
            # The server's umask may have narrowed the mode given at open.
            await client.setAttrs(tmp_b, {"permissions": mode})
            await self._rename(client, tmp, remote_path)
        except BaseException:
            f = Failure()
            try:
                await client.removeFile(tmp_b)
            except Exception:  # noqa: S110 - best effort; the original error matters
                pass
            if isinstance(f.value, (SFTPError, SSHError)):
                f.raiseException()
            raise _sftp_error("write", remote_path, f) from None

    async def _write_chunks(
        self, handle: Any, data: bytes | None, local_path: str | None, name: str
    ) -> None:
        offset = 0
        pending: list[Deferred[Any]] = []
        fh = open(local_path, "rb") if local_path is not None else None  # noqa: ASYNC230
        try:
            while True:
                if fh is not None:
                    # Page-cache reads of installer files: small and fast enough
                    # for the reactor thread, and bounded to one chunk at a time.
                    chunk = fh.read(self.SFTP_CHUNK)
                else:
                    assert data is not None
                    chunk = data[offset : offset + self.SFTP_CHUNK]
                if not chunk:
                    break
                pending.append(handle.writeChunk(offset, chunk))
                offset += len(chunk)
                if len(pending) >= self.SFTP_IN_FLIGHT:
                    await pending.pop(0)
            for p in pending:
                await p
        finally:
            if fh is not None:
                fh.close()

    async def _rename(self, client: _SFTPClient, old: str, new: str) -> None:
        old_b, new_b = old.encode("utf-8"), new.encode("utf-8")
        if b"posix-rename@openssh.com" in client.server_extensions:
            await client.extendedRequest(
                b"posix-rename@openssh.com", common.NS(old_b) + common.NS(new_b)
            )
            return
        # SFTP v3 rename refuses an existing target: remove it first.
        try:
            await client.removeFile(new_b)
        except filetransfer.SFTPError:
            pass
        await client.renameFile(old_b, new_b)

    async def close(self) -> None:
        """Disconnect and wait until the connection is gone. Safe to call twice."""
        tr = self._handshake.transport
        if tr is not None and not self._handshake.closed.called and not self._closing:
            self._closing = True
            try:
                tr.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"done")
            except Exception:  # noqa: S110 - already going away
                pass
        if not self._handshake.closed.called:
            # A peer that never answers the disconnect must not hang close().
            timer = self._reactor.callLater(
                10, lambda: tr and cast(Any, tr.transport).abortConnection()
            )
            await self._handshake.closed
            if timer.active():
                timer.cancel()


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


async def connect(
    host: str,
    port: int,
    credentials: Credentials,
    policy: HostKeyPolicy,
    *,
    reactor: Any = None,
    timeout: float = 30.0,
    command_timeout: float = 300.0,
    private_key: keys.Key | None = None,
    endpoint_factory: Callable[[str, int, float], IStreamClientEndpoint] | None = None,
) -> SSHClient:
    """Open an authenticated SSH connection, checking the host key before any credential.

    ``timeout`` bounds each connection attempt: TCP connect, key exchange and
    authentication. ``private_key`` may be given pre-loaded; otherwise
    ``credentials.private_key`` is decrypted in a thread. ``endpoint_factory``
    (host, port, timeout) -> endpoint replaces TCP (in-memory tests). Raises
    HostKeyMismatch, AuthenticationFailed, KeyLoadError, SSHConnectError.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
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
        hs = _Handshake(credentials, private_key, policy, algorithms, host, port)
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
        return SSHClient(conn, hs, reactor, command_timeout=command_timeout)
    if first_mismatch is not None:
        raise first_mismatch
    assert last_error is not None
    raise last_error


async def _attempt(
    reactor: Any,
    hs: _Handshake,
    timeout: float,
    endpoint_factory: Callable[[str, int, float], IStreamClientEndpoint] | None,
) -> _Connection:
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
