# -*- test-case-name: tests.install.test_ssh,tests.install.test_ssh_memory -*-
"""SSH client for installs, on twisted.conch: one connection per install, running
commands (also through sudo) and uploading files by SFTP.

Why not ``SSHCommandClientEndpoint``: its user-auth signs RSA keys only with SHA-1
``ssh-rsa`` (which OpenSSH >= 8.8 refuses), its command channel drops stderr, and
an install needs exec and SFTP channels on one authenticated connection. So the
client is built from three rooms:

- ``sshauth``: TCP, host-key check before any credential, user auth;
- ``sshchannels``: exec channels (stdout, stderr, exit status) and SFTP;
- this module: ``connect`` and ``SSHClient``, which runs commands with a
  timeout, becomes root through sudo, and uploads files under a temporary name
  then renames them. It is the public face: the errors and value types of the
  other rooms are re-exported here.

It never logs passwords, passphrases, private keys or command stdin, never blocks
the reactor, and never retries authentication with a guessed method.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, cast

from twisted.conch.ssh import common, filetransfer, keys, transport
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd._reactor import default_reactor
from myxd.install.hostkeys import HostKeyMismatch, HostKeyPolicy
from myxd.install.sshauth import (
    Connection,
    Credentials,
    Handshake,
    load_private_key,
    open_connection,
)
from myxd.install.sshbase import (
    AuthenticationFailed,
    CommandTimeout,
    KeyLoadError,
    SFTPError,
    SSHConnectError,
    SSHDisconnected,
    SSHError,
    SudoError,
)
from myxd.install.sshchannels import CommandResult, ExecChannel, SFTPChannel, SFTPClient, sftp_error

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


@dataclass(frozen=True)
class Sudo:
    """How to become root: ``mode`` is ``none`` or ``sudo``; ``password`` for sudo -S."""

    mode: str = "none"
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, sudo: dict[str, Any] | None) -> Sudo:
        sudo = sudo or {}
        return cls(mode=str(sudo.get("mode") or "none"), password=sudo.get("password"))


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
        conn: Connection,
        handshake: Handshake,
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
        self._sftp: SFTPClient | None = None
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
        ch = ExecChannel(self._conn, command, stdin, max_output)
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

    async def _sftp_client(self) -> SFTPClient:
        if self._sftp is None or self._sftp.lost:
            ch = SFTPChannel(self._conn)
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
            raise sftp_error("open", tmp, Failure()) from None
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
            raise sftp_error("write", remote_path, f) from None

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

    async def _rename(self, client: SFTPClient, old: str, new: str) -> None:
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
    reactor = default_reactor(reactor)
    conn, hs = await open_connection(
        host,
        port,
        credentials,
        policy,
        reactor=reactor,
        timeout=timeout,
        private_key=private_key,
        endpoint_factory=endpoint_factory,
    )
    return SSHClient(conn, hs, reactor, command_timeout=command_timeout)
