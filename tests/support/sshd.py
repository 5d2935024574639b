"""A real OpenSSH sshd for tests, on 127.0.0.1 and a free port, in a temp dir.

Host keys (ed25519 and ECDSA) are generated per server with ssh-keygen; authorized
keys live in the temp dir (``AuthorizedKeysFile <dir>/authorized_keys/%u``), so
root's real ~/.ssh is never touched. The sshd runs in the foreground (``-D -e``)
under spawnProcess; its log (LogLevel VERBOSE) is kept in memory for assertions
such as "no authentication was attempted".

Password tests use a dedicated local user (``TEST_USER``) created with useradd
on first use, with a fixed test password: the only system change this module
makes. It never touches the system sshd and never listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

SSHD = "/usr/sbin/sshd"
TEST_USER = "myxsshtest"
TEST_PASSWORD = "myx-test-Password-1"


def free_port() -> int:
    """A port free on 127.0.0.1 right now (callers retry if they lose a race)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


def ensure_test_user() -> str:
    """Create TEST_USER (home in /home, shell /bin/sh) if missing; set its password.

    Synchronous on purpose: called once from test setUp before the reactor work.
    """
    try:
        subprocess.run(["id", "-u", TEST_USER], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER],
            check=False,
            capture_output=True,
        )
    subprocess.run(
        ["chpasswd"],
        input=f"{TEST_USER}:{TEST_PASSWORD}\n".encode(),
        check=True,
        capture_output=True,
    )
    return TEST_USER


def keygen(path: str, key_type: str, *, passphrase: str = "", bits: int | None = None) -> str:
    """Generate a key pair with ssh-keygen; return the public key line."""
    args = ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-C", "myx-test", "-f", path]
    if bits:
        args += ["-b", str(bits)]
    if os.path.exists(path):
        os.unlink(path)
    if os.path.exists(path + ".pub"):
        os.unlink(path + ".pub")
    subprocess.run(args, check=True, capture_output=True)
    with open(path + ".pub") as f:
        return f.read().strip()


def fingerprint(pub_path: str) -> str:
    """``SHA256:...`` of a public key file, as ssh-keygen -l prints it."""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", pub_path], check=True, capture_output=True
    ).stdout.decode()
    return out.split()[1]


class _SSHDProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.log = bytearray()
        self.ended: Deferred[int | None] = Deferred()
        self.exited: Deferred[None] = Deferred()
        self._waiters: list[tuple[bytes, Deferred[None]]] = []

    def wait_for(self, text: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if text in self.log:
            d.callback(None)
        else:
            self._waiters.append((text, d))
        return d

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.log += data
        for item in list(self._waiters):
            if item[0] in self.log:
                self._waiters.remove(item)
                item[1].callback(None)

    def processExited(self, reason: Failure) -> None:
        self.exited.callback(None)

    def processEnded(self, reason: Failure) -> None:
        code: int | None = None
        if isinstance(reason.value, ProcessDone):
            code = 0
        elif isinstance(reason.value, ProcessTerminated):
            code = reason.value.exitCode
        for _, d in self._waiters:
            d.errback(RuntimeError("sshd exited: " + self.log.decode(errors="replace")[-2000:]))
        self._waiters = []
        self.ended.callback(code)


class SSHServer:
    """One sshd. ``await start()``, then ``port``; ``await stop()`` in cleanup."""

    def __init__(
        self,
        base_dir: str,
        reactor: Any = None,
        *,
        extra_config: str = "",
        keyboard_interactive: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _r

            reactor = _r
        self.reactor = reactor
        self.dir = os.path.abspath(base_dir)
        self.extra_config = extra_config
        # keyboard-interactive needs PAM; the default is plain password auth.
        self.auth_config = "PasswordAuthentication yes\nKbdInteractiveAuthentication no\nUsePAM no"
        if keyboard_interactive:
            self.auth_config = (
                "PasswordAuthentication no\nKbdInteractiveAuthentication yes\nUsePAM yes"
            )
        self.port = 0
        self.proto: _SSHDProtocol | None = None
        self.host_key_paths = {
            "ed25519": os.path.join(self.dir, "ssh_host_ed25519_key"),
            "ecdsa": os.path.join(self.dir, "ssh_host_ecdsa_key"),
        }
        os.makedirs(os.path.join(self.dir, "authorized_keys"), exist_ok=True)
        os.chmod(self.dir, 0o755)  # noqa: S103 - sshd's privsep child reads its config
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.generate_host_keys()

    def generate_host_keys(self) -> None:
        for kind, path in self.host_key_paths.items():
            keygen(path, kind)

    def host_public_key(self, kind: str = "ed25519") -> str:
        with open(self.host_key_paths[kind] + ".pub") as f:
            parts = f.read().split()
        return f"{parts[0]} {parts[1]}"

    def host_fingerprint(self, kind: str = "ed25519") -> str:
        return fingerprint(self.host_key_paths[kind] + ".pub")

    def authorize(self, user: str, public_key_line: str) -> None:
        path = os.path.join(self.dir, "authorized_keys", user)
        with open(path, "a") as f:
            f.write(public_key_line.strip() + "\n")
        os.chmod(path, 0o644)

    async def wait_log(self, text: str, timeout: float = 30) -> None:
        """Wait until sshd's log shows ``text`` (its log pipe lags the TCP traffic)."""
        assert self.proto is not None
        await _with_timeout(self.reactor, self.proto.wait_for(text.encode()), timeout)

    @property
    def log_text(self) -> str:
        return self.proto.log.decode(errors="replace") if self.proto else ""

    def _write_config(self) -> str:
        path = os.path.join(self.dir, "sshd_config")
        keys = "\n".join(f"HostKey {p}" for p in self.host_key_paths.values())
        with open(path, "w") as f:
            f.write(
                f"""Port {self.port}
ListenAddress 127.0.0.1
{keys}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys/%u
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
{self.auth_config}
LogLevel VERBOSE
Subsystem sftp internal-sftp
MaxStartups 100
MaxAuthTries 10
{self.extra_config}
"""
            )
        return path

    async def start(self) -> None:
        last = ""
        for _ in range(5):
            self.port = free_port()
            config = self._write_config()
            proto = _SSHDProtocol()
            self.proto = proto
            self.reactor.spawnProcess(
                proto, SSHD, [SSHD, "-D", "-e", "-f", config], env=dict(os.environ), path=self.dir
            )
            listening = proto.wait_for(b"Server listening on 127.0.0.1 port %d" % self.port)
            try:
                await _with_timeout(self.reactor, listening, 30)
                return
            except Exception:
                last = self.log_text[-2000:]
                await self._terminate()
                if "Address already in use" not in last:
                    break
        raise RuntimeError("sshd did not start:\n" + last)

    async def _terminate(self) -> None:
        proto = self.proto
        if proto is None or proto.ended.called:
            return
        transport: Any = proto.transport
        if not proto.exited.called:
            try:
                transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
            try:
                await _with_timeout(self.reactor, proto.exited, 15)
            except Exception:
                try:
                    transport.signalProcess("KILL")
                except ProcessExitedAlready:
                    pass
                await proto.exited
        # Per-connection sshd children inherit the log pipe (-e); close our ends
        # so the listener counts as gone even while old sessions wind down.
        transport.loseConnection()
        await proto.ended

    async def stop(self) -> None:
        await self._terminate()

    async def restart(self) -> None:
        """Stop and start again on the same port (e.g. after new host keys)."""
        await self._terminate()
        config = self._write_config()
        proto = _SSHDProtocol()
        self.proto = proto
        self.reactor.spawnProcess(
            proto, SSHD, [SSHD, "-D", "-e", "-f", config], env=dict(os.environ), path=self.dir
        )
        await _with_timeout(
            self.reactor, proto.wait_for(b"Server listening on 127.0.0.1 port %d" % self.port), 30
        )


async def _with_timeout(reactor: Any, d: Deferred[Any], seconds: float) -> Any:
    d.addTimeout(seconds, reactor)
    return await d


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


__all__ = [
    "SSHServer",
    "TEST_PASSWORD",
    "TEST_USER",
    "ensure_test_user",
    "fingerprint",
    "free_port",
    "keygen",
]
