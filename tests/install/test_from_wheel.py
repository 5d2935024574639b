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
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from myxd.install.bundle import deployment_tool_version
from myxd.install.remote import UNIT_NAME
from tests.daemon import api_helpers
from tests.support import installed
from tests.support.testhost import TestHost
from tests.support.wheel_daemon import TOKEN, WheelDaemonMixin, prepare_dirs, write_secret

README = os.path.join(installed.REPO_ROOT, "README.md")
# The console's install view polls every second; an install takes about a minute
# here, more when other runs share the machine.
INSTALL_WAIT_MS = 600_000


def readme_server_add() -> list[str]:
    """The ``myx server add`` line of the README's Quick start, as argv (no ``myx``)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("myx server add ")]
    if not lines:
        raise AssertionError("README.md has no 'myx server add' command line")
    return shlex.split(lines[0])[1:]


def readme_console_path() -> tuple[str, str]:
    """The README's console path, *Servers → Add server*: (nav link, button)."""
    with open(README, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    m = re.search(r"\*(\w[\w ]*) → (\w[\w ]*)\*", text)
    if m is None:
        raise AssertionError("README.md names no console path like *Servers → Add server*")
    return m.group(1), m.group(2)


class FromWheelTests(WheelDaemonMixin, unittest.TestCase):
    timeout = 900

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.root, self.data = prepare_dirs(self.mktemp())
        self.host = TestHost(os.path.join(self.root, "host"), reactor)
        self.addCleanup(self.host.stop)
        await self.host.start()
        self.key = write_secret(os.path.join(self.root, "id_ed25519"), self.host.private_key)

    async def test_twistd_and_myx_server_add_install_a_working_agent(self) -> None:
        daemon = await self.start_daemon()

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
        code, out, err = await self.myx(*fixed)
        self.assertEqual(code, 0, out + err + daemon.text)
        for step in ("connect", "upload", "dependencies", "wait", "pin", "sync_tool"):
            self.assertRegex(out, rf"(?m)^\s+{step}\s+ok\s+\d+\.\ds")
        self.assertIn("install of server 1 succeeded", out)

        code, out, err = await self.myx("server", "show", "1", "--json")
        self.assertEqual(code, 0, err)
        server: dict[str, Any] = json.loads(out)
        self.assertEqual((server["status"], server["agent_status"]), ("installed", "online"))
        agent = server["agent"]
        self.assertRegex(agent["cert_fingerprint"], r"^[0-9a-f]{64}$")

        code, out, err = await self.myx("servers")
        self.assertEqual(code, 0, err)
        self.assertRegex(
            out, r"(?m)^1\s+test1\s+127\.0\.0\.1\s+\d+\s+root\s+installed\s+\d+\s+online"
        )

        # The deployment tool the agent got is the packaged one.
        code, out, err = await self.myx("agent", str(server["agent_id"]))
        self.assertEqual(code, 0, err)
        status = await self.wait_status(server["agent_id"])
        self.assertEqual(status.get("deployment_tool_version"), deployment_tool_version())
        self.assertEqual((await self.host.sh(f"systemctl is-active {UNIT_NAME}")).strip(), "active")
        # Journal hygiene at the default log level: no conch chatter, no token.
        self.assertNotIn("Disconnecting with error", daemon.text)
        self.assertNotIn(TOKEN, daemon.text)
        self.assertNotIn("Traceback", daemon.text)
        self.assertIsNone(re.search(r"RPC dead .*cert_fingerprint", daemon.text))

    async def wait_status(self, agent_id: int) -> dict[str, Any]:
        # The heartbeat fills the agent's details with get_status.
        for _ in range(240):
            code, out, err = await self.myx("agent", str(agent_id))
            self.assertEqual(code, 0, err)
            details = json.loads(out).get("details") or {}
            if details.get("deployment_tool_version"):
                return dict(details)
            await deferLater(reactor, 0.5, lambda: None)
        raise AssertionError(f"no heartbeat details for agent {agent_id}: {out}")

    async def test_console_servers_add_server_installs_a_working_agent(self) -> None:
        """The README's console path, in headless Chromium, against the real host."""
        from tests.daemon.test_console import CHROMIUM, BrowserSession

        if not os.access(CHROMIUM, os.X_OK):
            self.fail(f"Chromium is not installed at {CHROMIUM}: apt-get install -y chromium")
        # BrowserSession signs in with the API tests' token.
        self.token = api_helpers.TOKEN
        daemon = await self.start_daemon()
        nav, button = readme_console_path()
        shots = os.path.join(self.root, "shots")
        port = str(self.host.port)

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page)
            page.locator("#nav").get_by_role("link", name=nav, exact=True).click()
            form = page.locator("#server-form")
            expect(form).to_be_visible()
            page.locator("#srv-name").fill("console-1")
            page.locator("#srv-host").fill("127.0.0.1")
            page.locator("#srv-port").fill(port)
            page.locator("#srv-auth-key").check()
            page.locator("#srv-key").fill(self.host.private_key)
            form.get_by_role("button", name=button, exact=True).click()
            expect(page).to_have_url(re.compile(r"#/servers/\d+$"))
            server_id = int(page.url.rsplit("/", 1)[1])
            # The progress view shows each step as it finishes, then the outcome.
            steps = page.locator("#install-steps")
            for step in ("connect", "upload", "dependencies", "wait", "pin", "sync_tool"):
                expect(steps.locator(f'tr[data-step="{step}"]')).to_have_attribute(
                    "data-status", "ok", timeout=INSTALL_WAIT_MS
                )
            expect(page.locator("#server-status")).to_have_text("installed")
            expect(page.locator("#install-status")).to_have_text("ok")
            b.shot(page, "installed.png")
            return {"id": server_id, "errors": list(b.errors)}

        def in_thread() -> dict[str, Any]:
            with BrowserSession(self.api, shots, os.path.join(shots, "profile")) as b:
                return scenario(b)

        _make_dir(shots)
        seen = await deferToThread(in_thread)
        self.assertEqual(seen["errors"], [], "the page logged errors")
        code, out, err = await self.myx("server", "show", str(seen["id"]), "--json")
        self.assertEqual(code, 0, err)
        server = json.loads(out)
        self.assertEqual((server["status"], server["agent_status"]), ("installed", "online"))
        self.assertEqual((await self.host.sh(f"systemctl is-active {UNIT_NAME}")).strip(), "active")
        self.assertNotIn(self.token, daemon.text)
        self.assertNotIn("Traceback", daemon.text)


def _make_dir(path: str) -> None:
    os.makedirs(path)
