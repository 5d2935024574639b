"""The newcomer path from the wheel alone: ``twistd -n myxd``, then ``myx server add``.

The daemon and the CLI run from the venv of tests/support/installed.py, with
their cwd in a temp dir and no PYTHONPATH; the target is a real systemd test
host. The agent must come up online, pinned, with the packaged deployment tool
synced: everything the installer uploads comes from the installed package.
The ``myx server add`` command line is the one in README.md's Quick start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from myxd.install.bundle import deployment_tool_version
from myxd.install.remote import UNIT_NAME
from tests.daemon.test_plugin import Daemon
from tests.support import installed
from tests.support.testhost import CACHE_DIR, TestHost

TOKEN = "wheel-test-admin-token-0123456789"
README = os.path.join(installed.REPO_ROOT, "README.md")


def readme_server_add() -> list[str]:
    """The ``myx server add`` line of the README's Quick start, as argv (no ``myx``)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("myx server add ")]
    if not lines:
        raise AssertionError("README.md has no 'myx server add' command line")
    return shlex.split(lines[0])[1:]


def write_key(path: str, key: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)


class FromWheelTests(unittest.TestCase):
    timeout = 900

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.root, self.data, self.key = self.prepare_dirs()
        self.host = TestHost(os.path.join(self.root, "host"), reactor)
        self.addCleanup(self.host.stop)
        await self.host.start()
        write_key(self.key, self.host.private_key)

    def prepare_dirs(self) -> tuple[str, str, str]:
        root = os.path.abspath(self.mktemp())
        data = os.path.join(root, "data")
        os.makedirs(data, mode=0o700)
        # The agent's wheels: the cache the other install tests fill, not the index.
        os.symlink(os.path.join(CACHE_DIR, "wheelhouse"), os.path.join(data, "wheelhouse"))
        return root, data, os.path.join(root, "id_ed25519")

    def start_daemon(self) -> Daemon:
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
            TOKEN,
            "--ssh-connect-timeout",
            "60",
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
        return proto

    async def myx(self, api: str, *argv: str) -> tuple[int, str, str]:
        env = installed.env(MYX_TOKEN=TOKEN, MYX_API=api)
        out, err, code = await getProcessOutputAndValue(
            installed.script("myx"), list(argv), env=env, path=self.root, reactor=reactor
        )
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    async def test_twistd_and_myx_server_add_install_a_working_agent(self) -> None:
        daemon = self.start_daemon()
        m = await daemon.wait_for(r"myxd admin API listening on 127\.0\.0\.1:(\d+)")
        api = f"http://127.0.0.1:{m.group(1)}"

        # The README's line (myx server add NAME HOST --key FILE ...), with the
        # same flags pointed at the test host.
        argv = readme_server_add()
        self.assertEqual(argv[:2], ["server", "add"])
        fixed = ["server", "add", "test1", "127.0.0.1"]
        rest = argv[4:]
        values = {"--key": self.key, "--port": str(self.host.port), "--user": "root"}
        i = 0
        while i < len(rest):
            flag = rest[i]
            if flag in values and i + 1 < len(rest):
                fixed += [flag, values.pop(flag)]
                i += 2
            else:
                fixed.append(flag)
                i += 1
        for flag, value in values.items():
            fixed += [flag, value]
        code, out, err = await self.myx(api, *fixed)
        self.assertEqual(code, 0, out + err + daemon.text)
        for step in ("connect", "upload", "dependencies", "wait", "pin", "sync_tool"):
            self.assertRegex(out, rf"(?m)^\s+{step}\s+ok\s+\d+\.\ds")
        self.assertIn("install of server 1 succeeded", out)

        code, out, err = await self.myx(api, "server", "show", "1", "--json")
        self.assertEqual(code, 0, err)
        server: dict[str, Any] = json.loads(out)
        self.assertEqual((server["status"], server["agent_status"]), ("installed", "online"))
        agent = server["agent"]
        self.assertRegex(agent["cert_fingerprint"], r"^[0-9a-f]{64}$")

        code, out, err = await self.myx(api, "servers")
        self.assertEqual(code, 0, err)
        self.assertRegex(
            out, r"(?m)^1\s+test1\s+127\.0\.0\.1\s+\d+\s+root\s+installed\s+\d+\s+online"
        )

        # The deployment tool the agent got is the packaged one.
        code, out, err = await self.myx(api, "agent", str(server["agent_id"]))
        self.assertEqual(code, 0, err)
        status = await self.wait_status(api, server["agent_id"])
        self.assertEqual(status.get("deployment_tool_version"), deployment_tool_version())
        self.assertEqual((await self.host.sh(f"systemctl is-active {UNIT_NAME}")).strip(), "active")
        # Journal hygiene at the default log level: no conch chatter, no token.
        self.assertNotIn("Disconnecting with error", daemon.text)
        self.assertNotIn(TOKEN, daemon.text)
        self.assertNotIn("Traceback", daemon.text)
        self.assertIsNone(re.search(r"RPC dead .*cert_fingerprint", daemon.text))

    async def wait_status(self, api: str, agent_id: int) -> dict[str, Any]:
        # The heartbeat fills the agent's details with get_status.
        for _ in range(240):
            code, out, err = await self.myx(api, "agent", str(agent_id))
            self.assertEqual(code, 0, err)
            details = json.loads(out).get("details") or {}
            if details.get("deployment_tool_version"):
                return dict(details)
            await deferLater(reactor, 0.5, lambda: None)
        raise AssertionError(f"no heartbeat details for agent {agent_id}: {out}")
