"""A real ``twistd -n myxd`` and the ``myx`` CLI, both from the installed wheel's venv.

For Trial test cases: ``WheelDaemonMixin.start_daemon()`` runs twistd from the
venv of tests/support/installed.py with its cwd in the test's temp dir and no
PYTHONPATH, its API on a free loopback port, and stops it in cleanup;
``myx()`` runs the installed CLI against it; ``myx_on_pty()`` runs it on a
pseudo-terminal (its controlling tty, so ``getpass`` prompts there) and types
answers to its prompts.

The agent wheels come from the test cache's wheelhouse (the one the other
install tests fill), never the package index. Never leaves a process behind.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from tests.daemon.test_plugin import Daemon
from tests.support import installed
from tests.support.testhost import CACHE_DIR

TOKEN = "wheel-test-admin-token-0123456789"


def prepare_dirs(root: str) -> tuple[str, str]:
    """``root`` and its data dir (mode 700) sharing the cached agent wheelhouse."""
    root = os.path.abspath(root)
    data = os.path.join(root, "data")
    os.makedirs(data, mode=0o700)
    os.symlink(os.path.join(CACHE_DIR, "wheelhouse"), os.path.join(data, "wheelhouse"))
    return root, data


def write_secret(path: str, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class _Pty(ProcessProtocol):
    """Collects a pty's output; answers each prompt once it appears."""

    def __init__(self, answers: list[tuple[str, str]]) -> None:
        self.answers = list(answers)
        self.out = bytearray()
        self.ended: Deferred[int] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.out += data
        if self.answers and self.answers[0][0].encode() in self.out:
            _prompt, answer = self.answers.pop(0)
            assert self.transport is not None
            self.transport.write(answer.encode() + b"\n")

    def processEnded(self, reason: Failure) -> None:
        code = -1
        if isinstance(reason.value, ProcessDone):
            code = 0
        elif isinstance(reason.value, ProcessTerminated) and reason.value.exitCode is not None:
            code = reason.value.exitCode
        self.ended.callback(code)


class WheelDaemonMixin:
    """For ``unittest.TestCase``: needs ``self.root`` and ``self.data`` set in setUp."""

    root: str
    data: str
    api: str
    # The admin token the daemon is started with and the CLI sends.
    token: str = TOKEN
    # How long ``until`` polls, and how often.
    poll_deadline: float = 120.0
    poll_interval: float = 0.2

    addCleanup: Callable[..., None]  # TestCase's (an annotation only, no attribute)

    if TYPE_CHECKING:  # TestCase's

        def fail(self, msg: object | None = None) -> NoReturn: ...

    async def start_daemon(self, *extra: str) -> Daemon:
        proto = Daemon()
        twistd = installed.script("twistd")
        argv = [
            twistd,
            "--nodaemon",
            "--pidfile=",
            "myxd",
            "--data-dir",
            self.data,
            "--api",
            "tcp:0:interface=127.0.0.1",
            "--admin-token",
            self.token,
            "--ssh-connect-timeout",
            "60",
            *extra,
        ]
        transport = reactor.spawnProcess(proto, twistd, argv, env=installed.env(), path=self.root)

        async def stop() -> None:
            if proto.reason is None:
                transport.signalProcess("TERM")
                timer = reactor.callLater(60, transport.signalProcess, "KILL")
                await proto.ended
                if timer.active():
                    timer.cancel()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        m = await proto.wait_for(r"myxd admin API listening on 127\.0\.0\.1:(\d+)")
        self.api = f"http://127.0.0.1:{m.group(1)}"
        return proto

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        """One admin API request (``token``: another than the daemon's); the JSON
        body decoded, or the text of any other. Each answer passes ``answered``."""
        headers = {b"Authorization": [f"Bearer {token or self.token}".encode()]}
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode()
        response = await treq.request(
            method,
            self.api + path,
            headers=headers,  # type: ignore[arg-type]
            data=data,
            persistent=False,
        )
        raw = (await treq.content(response)).decode("utf-8", "replace")
        self.answered(response.code, raw)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        return response.code, json.loads(raw) if ctype.startswith(b"application/json") else raw

    def answered(self, code: int, text: str) -> None:
        """Each answer's status and body, for a test that keeps them."""

    async def until(self, path: str, ok: Callable[[Any], bool], what: str) -> Any:
        """GET ``path`` until it answers 200 with a body ``ok`` accepts."""
        deadline = reactor.seconds() + self.poll_deadline
        body: Any = None
        while reactor.seconds() < deadline:
            code, body = await self.call("GET", path)
            if code == 200 and ok(body):
                return body
            await deferLater(reactor, self.poll_interval, lambda: None)
        self.fail(f"timed out waiting for {what}: {body!r}")

    def myx_env(self) -> dict[str, str]:
        return installed.env(MYX_TOKEN=self.token, MYX_API=self.api)

    async def myx(self, *argv: str) -> tuple[int, str, str]:
        """The installed ``myx`` with ``argv``; returns (exit code, stdout, stderr)."""
        out, err, code = await getProcessOutputAndValue(
            installed.script("myx"), list(argv), env=self.myx_env(), path=self.root, reactor=reactor
        )
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    async def myx_on_pty(self, answers: list[tuple[str, str]], *argv: str) -> tuple[int, str]:
        """``myx`` on a pty; each (prompt, answer) is typed once the prompt shows."""
        proto = _Pty(answers)
        myx = installed.script("myx")
        reactor.spawnProcess(
            proto, myx, [myx, *argv], env=self.myx_env(), path=self.root, usePTY=True
        )
        code = await proto.ended
        return code, proto.out.decode(errors="replace")
