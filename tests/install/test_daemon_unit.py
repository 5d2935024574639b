"""packaging/myxd.service under real systemd, set up as docs/operations.md says.

Each test boots a Debian bookworm test host (systemd as PID 1 under nspawn),
installs the run's wheel into /opt/myx/venv from a wheelhouse built here (the
host has no package index), copies the unit and runs the documented commands:
``systemctl enable --now``, restart, ``kill -9`` of the main PID, stop; then a
root-only config passed with the docs' own ``LoadCredential=`` drop-in
(through ``systemctl edit``), the stale generated token, and a bad config that
must stop the unit with one journal line and no restart loop.

The hosts share this machine's loopback: the daemon's API port is a free port
chosen at test time, set in the config or, for the plain unit, in a drop-in.
Every wait is on a condition (unit state, an API answer, a journal line).
"""

from __future__ import annotations

import json
import os
import re
import shutil

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from tests.support.daemon_host import (
    UNIT_FILE,
    VENV,
    api_get,
    docs_block,
    install_myx,
    unit_props,
    wait_api,
    wait_remote,
)
from tests.support.sshd import free_port
from tests.support.testhost import TestHost

UNIT = "myxd"
STATE_DIR = "/var/lib/private/myxd"
TOKEN = "unit-test-admin-token-0123456789abcdef"
CONFIG_ERROR = 78


def _new_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path)
    return path


def _stage_unit(host_root: str) -> str:
    """Copy the unit into the host's /root; returns its ExecStart= command."""
    shutil.copy(UNIT_FILE, os.path.join(host_root, "root", "myxd.service"))
    with open(UNIT_FILE) as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    if len(lines) != 1:
        raise AssertionError(f"expected one ExecStart= in {UNIT_FILE}, found {lines}")
    return lines[0].split("=", 1)[1]


class DaemonUnitTests(unittest.TestCase):
    timeout = 1200

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        base = _new_dir(self.mktemp())
        self.host = TestHost(os.path.join(base, "host"), reactor)
        self.addCleanup(self.host.stop)
        await self.host.start()
        await install_myx(self.host, reactor)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"

    async def sh(self, script: str) -> str:
        return await self.host.sh(script)

    async def journal(self, *match: str) -> str:
        return await self.sh(f"journalctl --no-pager -o cat -u {UNIT} {' '.join(match)}")

    async def enable_as_documented(self) -> str:
        """The docs' install block after pip: unit, daemon-reload, enable --now, myx.

        Returns the generated admin token. The API goes to this test's port with
        a drop-in, since port 8470 on the shared loopback may be taken.
        """
        block = docs_block("sh", "systemctl enable --now myxd")
        lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
        # The venv and pip lines ran in install_myx, offline, as the docs say.
        self.assertTrue(lines[0].startswith("python3 -m venv /opt/myx/venv"), lines)
        self.assertTrue(lines[1].startswith(f"{VENV}/bin/pip install "), lines)
        self.assertEqual(lines[2], f"{VENV}/bin/twistd --help >/dev/null", lines)
        exec_start = _stage_unit(self.host.root)
        dropin = (
            "[Service]\nExecStart=\n"
            f"ExecStart={exec_start} --api tcp:{self.port}:interface=127.0.0.1\n"
        )
        out = token = ""
        for line in lines[3:]:
            is_cli = line.startswith(f"{VENV}/bin/myx ")
            line = line.replace("/path/to/myx/packaging/myxd.service", "/root/myxd.service")
            line = line.replace(f"{VENV}/bin/myx ", f"{VENV}/bin/myx --api {self.api} ")
            if line == "systemctl enable --now myxd":
                await self.sh(
                    "mkdir -p /etc/systemd/system/myxd.service.d && cat > "
                    f"/etc/systemd/system/myxd.service.d/test-port.conf <<'EOF'\n{dropin}EOF\n"
                    "systemctl daemon-reload"
                )
            if is_cli:
                # The CLI answers once the API listens.
                await wait_remote(self.host, f"test -s {STATE_DIR}/admin-token")
                token = (await self.sh(f"cat {STATE_DIR}/admin-token")).strip()
                await wait_api(reactor, f"{self.api}/api/agents", token)
            out = await self.sh(line)
        self.assertRegex(out.splitlines()[0], r"^ID\s+NAME\s+HOST", out)
        self.assertTrue(token, "the docs' block has no myx line")
        return token

    async def main_pid(self) -> int:
        return int((await unit_props(self.host, UNIT, "MainPID"))["MainPID"])

    async def test_enable_restart_kill_and_stop(self) -> None:
        token = await self.enable_as_documented()
        props = await unit_props(self.host, UNIT, "User", "UnitFileState", "ActiveState")
        self.assertEqual((props["UnitFileState"], props["ActiveState"]), ("enabled", "active"))
        # A DynamicUser: the process runs as an unprivileged, allocated uid.
        pid = await self.main_pid()
        uid = int((await self.sh(f"stat -c %u /proc/{pid}")).strip())
        self.assertNotEqual(uid, 0)
        code, _ = await api_get(reactor, f"{self.api}/api/agents", None)
        self.assertEqual(code, 401)

        # restart: a new process that answers.
        await self.sh("systemctl restart myxd")
        restarted = await self.main_pid()
        self.assertNotIn(restarted, (0, pid))
        await wait_api(reactor, f"{self.api}/api/agents", token)

        # kill -9: systemd starts it again (Restart=on-failure).
        await self.sh(f"kill -9 {restarted}")
        await wait_remote(
            self.host,
            '[ "$(systemctl show -p NRestarts --value myxd)" = 1 ] && '
            '[ "$(systemctl show -p ActiveState --value myxd)" = active ]',
        )
        killed_and_back = await self.main_pid()
        self.assertNotIn(killed_and_back, (0, restarted))
        await wait_api(reactor, f"{self.api}/api/agents", token)
        journal = await self.journal()
        self.assertIn("status=9/KILL", journal)

        # stop: clean, not failed.
        await self.sh("systemctl stop myxd")
        props = await unit_props(self.host, UNIT, "ActiveState", "Result")
        self.assertEqual((props["ActiveState"], props["Result"]), ("inactive", "success"))
        journal = await self.journal()
        self.assertIn("myxd stopped cleanly", journal)
        self.assertIn("admin API token created in /var/lib/myxd/admin-token", journal)
        self.assertNotIn(token, journal)
        self.assertNotIn("Traceback", journal)
        self.assertNotIn("plugin cache", journal)

        # The data dir of a DynamicUser service: where docs/operations.md says to back up.
        listing = await self.sh(f"ls {STATE_DIR}")
        for name in ("myxd.sqlite", "secret.key", "admin-token"):
            self.assertIn(name, listing.split())

        # The figure the docs quote.
        out = await self.sh("systemd-analyze security --no-pager myxd")
        m = re.search(r"Overall exposure level for myxd\.service: (\d+\.\d+)", out)
        assert m is not None, out
        self.assertLessEqual(float(m.group(1)), 1.5, out[-2000:])

    async def test_protected_config_as_credential_and_bad_config(self) -> None:
        generated = await self.enable_as_documented()
        await self.sh(
            "rm /etc/systemd/system/myxd.service.d/test-port.conf && systemctl daemon-reload"
        )

        # docs/operations.md: /etc/myxd, a root-only config, `systemctl edit myxd`.
        block = docs_block("sh", "systemctl edit myxd")
        lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
        self.assertEqual(lines[-1], "systemctl edit myxd", lines)
        for line in lines[:-1]:
            await self.sh(line)
        config = f'api = "tcp:{self.port}:interface=127.0.0.1"\nadmin_token = "{TOKEN}"\n'
        await self.sh(f"cat > /etc/myxd/myxd.toml <<'EOF'\n{config}EOF")
        self.assertEqual((await self.sh("stat -c '%U %a' /etc/myxd/myxd.toml")).strip(), "root 600")
        # The whole drop-in as the docs show it, through systemctl edit (it wants a
        # terminal: script(1) gives it one; the "editor" copies the drop-in in).
        dropin = docs_block("ini", "LoadCredential=")
        await self.sh(f"cat > /root/dropin.conf <<'EOF'\n{dropin}EOF")
        await self.sh(
            "script -qec 'SYSTEMD_EDITOR=\"cp /root/dropin.conf\" systemctl edit myxd' /dev/null"
        )
        override = await self.sh("cat /etc/systemd/system/myxd.service.d/override.conf")
        self.assertEqual(override.strip(), dropin.strip())
        await self.sh("systemctl restart myxd")
        body = await wait_api(reactor, f"{self.api}/api/agents", TOKEN)
        self.assertIn("agents", json.loads(body))
        code, _ = await api_get(reactor, f"{self.api}/api/agents", generated)
        self.assertEqual(code, 401)
        # The generated token file is stale now: removed, and the journal says so.
        await wait_remote(self.host, f"! test -e {STATE_DIR}/admin-token")
        journal = await self.journal()
        self.assertIn("removed /var/lib/myxd/admin-token: admin_token is set", journal)

        # A bad value: the unit fails with exit 78 and one line, and is not restarted.
        await self.sh(
            "sed -i '1i heartbeat_min_interval = \"soon\"' /etc/myxd/myxd.toml && "
            "systemctl restart myxd"
        )
        await wait_remote(self.host, '[ "$(systemctl show -p ActiveState --value myxd)" = failed ]')
        props = await unit_props(
            self.host, UNIT, "SubState", "Result", "ExecMainStatus", "NRestarts", "InvocationID"
        )
        # "failed", not "auto-restart": no restart is scheduled.
        self.assertEqual(
            (props["SubState"], props["Result"], props["ExecMainStatus"], props["NRestarts"]),
            ("failed", "exit-code", str(CONFIG_ERROR), "0"),
        )
        match = f"_SYSTEMD_INVOCATION_ID={props['InvocationID']}"
        await wait_remote(self.host, f"journalctl -o cat {match} | grep -q 'myxd: error'")
        output = (await self.sh(f"journalctl --no-pager -o cat {match}")).strip().splitlines()
        self.assertEqual(
            output,
            [
                "myxd: error: /run/credentials/myxd.service/myxd.toml: heartbeat_min_interval: "
                "expected a number, got 'soon'"
            ],
        )
        status = await self.host.sh("systemctl status --no-pager myxd || true")
        self.assertIn("status=78/CONFIG", status)

        # Fixed: it starts again.
        await self.sh("sed -i '/heartbeat_min_interval/d' /etc/myxd/myxd.toml")
        await self.sh("systemctl restart myxd")
        await wait_api(reactor, f"{self.api}/api/agents", TOKEN)
        journal = await self.journal()
        self.assertNotIn(TOKEN, journal)
        self.assertNotIn(generated, journal)
        self.assertNotIn("Traceback", journal)
        self.assertNotIn("Usage:", journal)
