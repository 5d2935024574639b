# -*- test-case-name: tests.install.test_ssh,tests.install.test_ssh_memory -*-
"""The channels of an install's SSH connection: exec (stdout, stderr, exit status) and SFTP.

An exec channel collects output (keeping the tail past a limit) and the exit
status or signal; SFTP runs through a ``session`` channel with the ``sftp``
subsystem and conch's ``FileTransferClient``. Timeouts and the order of calls
are ``ssh.SSHClient``'s job. Never writes command stdin (a sudo password) anywhere
but the channel.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from twisted.conch.ssh import channel, common, connection, filetransfer
from twisted.internet import error
from twisted.python.failure import Failure

from myxd.install.sshbase import Once, SFTPError, SSHDisconnected, SSHError


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


class ExecChannel(channel.SSHChannel):
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
        self.done: Once[CommandResult] = Once()

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


class SFTPClient(filetransfer.FileTransferClient):
    def __init__(self) -> None:
        super().__init__()
        self.ready: Once[dict[bytes, bytes]] = Once()
        self.server_extensions: dict[bytes, bytes] = {}
        self.lost = False

    def gotServerVersion(self, serverVersion: int, extData: dict[bytes, bytes]) -> None:
        self.server_extensions = dict(extData)
        self.ready.succeed(self.server_extensions)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.ready.fail(SFTPError("the SFTP session closed"))
        super().connectionLost(reason)


class SFTPChannel(channel.SSHChannel):
    name = b"session"

    def __init__(self, conn: connection.SSHConnection) -> None:
        super().__init__(conn=conn)
        self._c = conn
        self.client = SFTPClient()

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


def sftp_error(op: str, path: str, f: Failure) -> SFTPError:
    if isinstance(f.value, filetransfer.SFTPError):
        return SFTPError(f"sftp {op} {path}: {f.value.message}")
    return SFTPError(f"sftp {op} {path}: {f.getErrorMessage()}")
