"""`myx server ...` end to end: the installed CLI, a real myxd from the wheel, real hosts.

Covers what test_from_wheel.py (the README's ``--key`` line) does not:
``--password-file``, ``--ask-password`` typed on a pseudo-terminal,
``--sudo --sudo-password-file`` for a non-root user whose sudo asks for a
password, ``reinstall``, ``uninstall`` and ``remove``, a pinned host key that
does not match, and bad input: each a one-line error and a non-zero exit, never
a traceback, never a secret echoed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from myxd.install.remote import UNIT_NAME
from tests.support.agent_process import free_port
from tests.support.testhost import ROOT_PASSWORD, TestHost
from tests.support.wheel_daemon import WheelDaemonMixin, prepare_dirs, write_secret

SUDO_USER = "deploy"
SUDO_PASSWORD = "deploy-Sudo-Password-7"
STEPS = ("connect", "check", "upload", "dependencies", "config", "service", "wait", "pin")


def _mkdir(path: str) -> str:
    os.makedirs(path)
    return path


def _write_bytes(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


class CLIServerTests(WheelDaemonMixin, unittest.TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.root, self.data = prepare_dirs(self.mktemp())

    async def boot(self, **kw: Any) -> TestHost:
        host = TestHost(os.path.join(self.root, "host"), reactor, **kw)
        self.addCleanup(host.stop)
        await host.start()
        return host

    def assert_steps_ok(self, out: str, status: str = "ok") -> None:
        for step in STEPS:
            self.assertRegex(out, rf"(?m)^\s+{step}\s+(?:{status})\s+\d+\.\ds")

    async def server(self, server_id: int) -> dict[str, Any]:
        code, out, err = await self.myx("server", "show", str(server_id), "--json")
        self.assertEqual(code, 0, err)
        return dict(json.loads(out))

    def test_password_file_sudo_reinstall_uninstall_remove(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._password_file_sudo())

    async def _password_file_sudo(self) -> None:
        async def add_user(host: TestHost) -> None:
            await host.add_user(SUDO_USER, SUDO_PASSWORD, sudo="password")

        host = await self.boot(prepare_hook=add_user)
        daemon = await self.start_daemon()
        # The same file serves as SSH and sudo password: both are the user's.
        pw = write_secret(os.path.join(self.root, "pw"), SUDO_PASSWORD + "\n")
        code, out, err = await self.myx(
            "server", "add", "s1", "127.0.0.1", "--port", str(host.port),
            "--user", SUDO_USER, "--password-file", pw, "--sudo", "--sudo-password-file", pw,
        )  # fmt: skip
        self.assertEqual(code, 0, out + err + daemon.text)
        self.assert_steps_ok(out)
        self.assertIn("install of server 1 succeeded", out)
        server = await self.server(1)
        self.assertEqual(
            (server["username"], server["auth_method"], server["sudo"]["mode"]),
            (SUDO_USER, "password", "sudo"),
        )
        self.assertEqual(server["agent_status"], "online")
        agent_port = server["agent"]["rpc_port"]
        # The agent runs as a system service, installed through sudo.
        self.assertEqual((await host.sh(f"systemctl is-active {UNIT_NAME}")).strip(), "active")

        code, out, err = await self.myx("server", "reinstall", "1")
        self.assertEqual(code, 0, out + err)
        # Unchanged dependencies are not installed again.
        self.assert_steps_ok(out, "ok|skipped")
        self.assertIn("reinstall of server 1 succeeded", out)
        server = await self.server(1)
        self.assertEqual(
            (server["agent_status"], server["agent"]["rpc_port"]), ("online", agent_port)
        )

        code, out, err = await self.myx("server", "uninstall", "1")
        self.assertEqual(code, 0, out + err)
        self.assertIn("uninstall of server 1 succeeded", out)
        state = await host.sh(f"systemctl is-active {UNIT_NAME} || true")
        self.assertNotEqual(state.strip(), "active")
        self.assertEqual(await host.sh("ls /etc/myx-agent /opt/myx-agent 2>/dev/null || true"), "")

        code, out, err = await self.myx("server", "remove", "1")
        self.assertEqual(code, 0, out + err)
        self.assertIn("server 1 removed", out)
        code, out, err = await self.myx("servers", "--json")
        self.assertEqual((code, json.loads(out)), (0, []), err)
        code, out, err = await self.myx("server", "show", "1")
        self.assertEqual(code, 2)
        self.assertIn("HTTP 404", err)
        for secret in (SUDO_PASSWORD,):
            self.assertNotIn(secret, daemon.text)

    def test_ask_password_on_a_terminal(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._ask_password())

    async def _ask_password(self) -> None:
        host = await self.boot()
        daemon = await self.start_daemon()
        prompt = "SSH password for root@127.0.0.1: "
        code, out = await self.myx_on_pty(
            [(prompt, ROOT_PASSWORD)],
            "server", "add", "s1", "127.0.0.1", "--port", str(host.port), "--ask-password",
        )  # fmt: skip
        self.assertEqual(code, 0, out + daemon.text)
        self.assertIn(prompt, out)
        # getpass turned the echo off: the typed password never shows.
        self.assertNotIn(ROOT_PASSWORD, out)
        self.assert_steps_ok(out)
        self.assertIn("install of server 1 succeeded", out)
        self.assertEqual((await self.server(1))["agent_status"], "online")

        # Without a terminal the CLI says what to use instead, before asking myxd anything.
        code, out, err = await self.myx(
            "server", "add", "s2", "127.0.0.1", "--port", str(host.port), "--ask-password"
        )
        self.assertEqual(code, 2)
        self.assertEqual(err, "myx: --ask-password needs a terminal; use --password-file instead\n")

    def test_host_key_fingerprint_mismatch(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._fingerprint_mismatch())

    async def _fingerprint_mismatch(self) -> None:
        host = await self.boot()
        await self.start_daemon()
        key = write_secret(os.path.join(self.root, "id"), host.private_key)
        wrong = "SHA256:" + "A" * 43
        code, out, err = await self.myx(
            "server", "add", "s1", "127.0.0.1", "--port", str(host.port), "--key", key,
            "--host-key-fingerprint", wrong,
        )  # fmt: skip
        self.assertEqual(code, 1, out + err)
        self.assertRegex(out, r"(?m)^\s+connect\s+failed\s+\d+\.\ds\s+.*does not match the pinned")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertRegex(
            err,
            rf"^myx: install of server 1 failed: .*host key SHA256:\S+ does not match the pinned "
            rf"fingerprint {wrong}; no credentials were sent",
        )
        self.assertNotIn("Traceback", out + err)
        # A fingerprint that is not one is refused by myxd before anything is stored.
        code, out, err = await self.myx(
            "server", "add", "s2", "127.0.0.1", "--port", str(host.port), "--key", key,
            "--host-key-fingerprint", "MD5:00:11",
        )  # fmt: skip
        self.assertEqual(code, 2, out + err)
        self.assertIn("field: host_key_fingerprint", err)
        code, out, _ = await self.myx("servers", "--json")
        self.assertEqual([s["name"] for s in json.loads(out)], ["s1"])


class CLIBadInputTests(WheelDaemonMixin, unittest.TestCase):
    """Files that cannot be used: one line, exit 2, before myxd is even asked."""

    timeout = 120

    def setUp(self) -> None:
        self.root, self.data = prepare_dirs(self.mktemp())
        # Nothing listens there: every error below comes from the CLI itself.
        self.api = f"http://127.0.0.1:{free_port()}"

    def test_bad_files(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._bad_files())

    async def _bad_files(self) -> None:
        missing = os.path.join(self.root, "no-such-key")
        a_dir = _mkdir(os.path.join(self.root, "a-dir"))
        binary = _write_bytes(os.path.join(self.root, "binary"), b"\xff\xfe\x00key")
        empty = write_secret(os.path.join(self.root, "empty"), "\n")
        key = write_secret(os.path.join(self.root, "key"), "not checked here\n")
        base = ["server", "add", "s1", "127.0.0.1"]
        cases = [
            (["--key", missing], f"cannot read key file {missing}: No such file or directory"),
            (["--key", a_dir], f"cannot read key file {a_dir}: Is a directory"),
            (["--password-file", binary], f"password file {binary} is not UTF-8 text"),
            (["--password-file", empty], f"password file {empty} is empty"),
            (
                ["--key", key, "--passphrase-file", missing],
                f"cannot read passphrase file {missing}",
            ),
            (
                ["--password-file", key, "--passphrase-file", key],
                "--passphrase-file goes with --key",
            ),
            (["--key", key, "--sudo-password-file", key], "--sudo-password-file goes with --sudo"),
            (
                ["--key", key, "--sudo", "--sudo-password-file", a_dir],
                f"cannot read sudo password file {a_dir}: Is a directory",
            ),
        ]
        for extra, message in cases:
            code, out, err = await self.myx(*base, *extra)
            self.assertEqual((code, out), (2, ""), (extra, err))
            self.assertEqual(len(err.splitlines()), 1, (extra, err))
            self.assertTrue(err.startswith(f"myx: {message}"), (extra, err))
        # A config file given as the token file: refused without echoing it.
        config = write_secret(os.path.join(self.root, "myxd.toml"), 'admin_token = "s3cr3t"\n')
        code, out, err = await self.myx("--token-file", config, "servers")
        self.assertEqual(code, 2)
        self.assertEqual(
            err,
            f"myx: token file {config} does not hold a token "
            "(one word of printable ASCII expected)\n",
        )
        # Two ways of authenticating at once: argparse's usage error, still no traceback.
        code, out, err = await self.myx(*base, "--key", key, "--ask-password")
        self.assertEqual(code, 2)
        self.assertIn("not allowed with argument", err)
        self.assertNotIn("Traceback", err)

    def myx_env(self) -> dict[str, str]:
        env = super().myx_env()
        env.pop("MYX_TOKEN", None)  # the token-file case must reach --token-file
        return env
