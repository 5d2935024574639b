"""The conch SSH layer against a REAL OpenSSH sshd on 127.0.0.1 (tests/support/sshd.py),
and sudo against real test hosts (tests/support/testhost.py)."""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from myxd.install.hostkeys import HostKeyMismatch, HostKeyPolicy, format_fingerprint
from myxd.install.ssh import (
    AuthenticationFailed,
    CommandTimeout,
    Credentials,
    KeyLoadError,
    SSHClient,
    SSHConnectError,
    Sudo,
    SudoError,
    connect,
)
from tests.support.sshd import (
    TEST_PASSWORD,
    TEST_USER,
    SSHServer,
    ensure_test_user,
    free_port,
    keygen,
)
from tests.support.testhost import shared_host


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _new_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path)
    return path


class RealSSHDTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.base = _new_dir(self.mktemp())
        self.sshd = SSHServer(os.path.join(self.base, "sshd"), reactor)
        self.clients: list[SSHClient] = []
        await self.sshd.start()
        self.addCleanup(self.sshd.stop)

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._tearDown())

    async def _tearDown(self) -> None:
        for c in self.clients:
            await c.close()

    def root_key(self, kind: str, *, passphrase: str = "", bits: int | None = None) -> str:
        path = os.path.join(self.base, f"id_{kind}")
        self.sshd.authorize("root", keygen(path, kind, passphrase=passphrase, bits=bits))
        return _read(path)

    async def connect(
        self, creds: Credentials, policy: HostKeyPolicy | None = None, **kw: Any
    ) -> SSHClient:
        client = await connect(
            "127.0.0.1", self.sshd.port, creds, policy or HostKeyPolicy(), reactor=reactor, **kw
        )
        self.clients.append(client)
        return client

    async def _key_auth(self, kind: str, bits: int | None = None) -> None:
        key = self.root_key(kind, bits=bits)
        client = await self.connect(Credentials("root", private_key=key))
        res = await client.run("id -u")
        self.assertEqual((res.exit_code, res.stdout), (0, b"0\n"))
        self.assertTrue(await client.is_root())
        await self.sshd.wait_log("Accepted publickey for root")

    async def test_key_auth_ed25519(self) -> None:
        await self._key_auth("ed25519")

    async def test_key_auth_ecdsa(self) -> None:
        await self._key_auth("ecdsa")

    async def test_key_auth_rsa_uses_sha2(self) -> None:
        # OpenSSH 9 refuses SHA-1 ssh-rsa signatures: success means rsa-sha2-*.
        await self._key_auth("rsa", bits=3072)
        await self.sshd.wait_log("ssh2: RSA SHA256:")

    async def test_passphrase_protected_key(self) -> None:
        key = self.root_key("ed25519", passphrase="open sesame")
        client = await self.connect(Credentials("root", private_key=key, passphrase="open sesame"))
        self.assertEqual((await client.run("echo hi")).stdout, b"hi\n")
        e = await self.assertFailure_(
            self.connect(Credentials("root", private_key=key, passphrase="wrong")), KeyLoadError
        )
        self.assertIn("passphrase", str(e))
        e = await self.assertFailure_(
            self.connect(Credentials("root", private_key=key)), KeyLoadError
        )
        self.assertIn("passphrase is required", str(e))

    async def assertFailure_(self, coro: Any, exc: type[BaseException]) -> Any:
        try:
            await coro
        except exc as e:
            return e
        self.fail(f"{exc.__name__} not raised")

    async def test_password_auth(self) -> None:
        ensure_test_user()
        client = await self.connect(Credentials(TEST_USER, password=TEST_PASSWORD))
        self.assertEqual((await client.run("whoami")).stdout_text().strip(), TEST_USER)
        self.assertFalse(await client.is_root())
        await self.sshd.wait_log(f"Accepted password for {TEST_USER}")

    async def test_wrong_password_is_a_clear_error(self) -> None:
        ensure_test_user()
        e = await self.assertFailure_(
            self.connect(Credentials(TEST_USER, password="not-the-password")),
            AuthenticationFailed,
        )
        self.assertIn(f"authentication failed for user '{TEST_USER}'", str(e))
        self.assertIn("tried: password", str(e))
        self.assertNotIn("not-the-password", str(e))
        await self.sshd.wait_log(f"Failed password for {TEST_USER}")

    async def test_wrong_key_is_a_clear_error(self) -> None:
        other = keygen(os.path.join(self.base, "stranger"), "ed25519")
        del other  # generated but never authorized
        e = await self.assertFailure_(
            self.connect(
                Credentials("root", private_key=_read(os.path.join(self.base, "stranger")))
            ),
            AuthenticationFailed,
        )
        self.assertIn("tried: publickey", str(e))

    async def test_keyboard_interactive_answers_the_password(self) -> None:
        ensure_test_user()
        kbd = SSHServer(os.path.join(self.base, "kbd"), reactor, keyboard_interactive=True)
        await kbd.start()
        self.addCleanup(kbd.stop)
        client = await connect(
            "127.0.0.1",
            kbd.port,
            Credentials(TEST_USER, password=TEST_PASSWORD),
            HostKeyPolicy(),
            reactor=reactor,
        )
        self.clients.append(client)
        self.assertEqual((await client.run("whoami")).stdout_text().strip(), TEST_USER)
        await kbd.wait_log(f"Accepted keyboard-interactive/pam for {TEST_USER}")

    async def test_no_credentials(self) -> None:
        e = await self.assertFailure_(self.connect(Credentials("root")), AuthenticationFailed)
        self.assertIn("no SSH credential", str(e))

    async def test_fingerprint_pin_matches_in_every_form(self) -> None:
        key = self.root_key("ed25519")
        ed = self.sshd.host_fingerprint("ed25519")
        ec = self.sshd.host_fingerprint("ecdsa")
        import base64

        ed_hex = base64.b64decode(ed[7:] + "=").hex()
        for pin in (ed, ed_hex, ec):  # the ECDSA pin makes the client ask for that key
            client = await self.connect(
                Credentials("root", private_key=key), HostKeyPolicy(pinned=pin)
            )
            self.assertEqual(client.host_key_trust, "pinned")
            self.assertEqual(client.host_key_fingerprint, pin if pin != ed_hex else ed)
            await client.close()

    async def test_fingerprint_mismatch_aborts_before_auth(self) -> None:
        ensure_test_user()
        stored: list[str] = []
        wrong = format_fingerprint(b"some other key")
        e = await self.assertFailure_(
            self.connect(
                Credentials(TEST_USER, password=TEST_PASSWORD),
                HostKeyPolicy(pinned=wrong, on_first_use=stored.append),
            ),
            HostKeyMismatch,
        )
        self.assertIn("does not match the pinned fingerprint", str(e))
        self.assertIn("no credentials were sent", str(e))
        self.assertEqual(stored, [])
        # sshd saw the connections end (so its log is read up to there), but not
        # one authentication attempt for the user.
        await self.sshd.wait_log("host key not trusted")
        self.assertNotIn(TEST_USER, self.sshd.log_text)
        # The same credentials DO show up in the log once the key is right.
        client = await self.connect(
            Credentials(TEST_USER, password=TEST_PASSWORD),
            HostKeyPolicy(pinned=self.sshd.host_fingerprint("ed25519")),
        )
        await client.close()
        await self.sshd.wait_log(f"Accepted password for {TEST_USER}")

    async def test_trust_on_first_use_then_changed_key_refused(self) -> None:
        ensure_test_user()
        key = self.root_key("ed25519")
        stored: list[str] = []
        client = await self.connect(
            Credentials("root", private_key=key), HostKeyPolicy(on_first_use=stored.append)
        )
        self.assertEqual(client.host_key_trust, "first-use")
        await client.close()
        self.assertEqual(len(stored), 1)
        self.assertEqual(stored[0].split()[1], self.sshd.host_public_key("ed25519").split()[1])
        client = await self.connect(
            Credentials("root", private_key=key),
            HostKeyPolicy(known_key=stored[0], on_first_use=stored.append),
        )
        self.assertEqual(client.host_key_trust, "known")
        await client.close()
        self.assertEqual(len(stored), 1, "a known key is not stored again")

        self.sshd.generate_host_keys()
        await self.sshd.restart()
        e = await self.assertFailure_(
            self.connect(
                Credentials(TEST_USER, password=TEST_PASSWORD),
                HostKeyPolicy(known_key=stored[0], on_first_use=stored.append),
            ),
            HostKeyMismatch,
        )
        self.assertIn("host key changed", str(e))
        self.assertEqual(len(stored), 1)
        await self.sshd.wait_log("host key not trusted")
        self.assertNotIn(TEST_USER, self.sshd.log_text)

    async def test_command_output_exit_status_and_stdin(self) -> None:
        client = await self.connect(Credentials("root", private_key=self.root_key("ed25519")))
        res = await client.run("echo out; echo err >&2; exit 3")
        self.assertEqual((res.exit_code, res.stdout, res.stderr), (3, b"out\n", b"err\n"))
        self.assertFalse(res.ok)
        res = await client.run("cat", stdin=b"\x00binary\xff" * 1000)
        self.assertEqual(res.stdout, b"\x00binary\xff" * 1000)
        res = await client.run("kill -9 $$")
        self.assertEqual((res.exit_code, res.signal), (None, "KILL"))

    async def test_command_timeout_keeps_the_connection(self) -> None:
        client = await self.connect(Credentials("root", private_key=self.root_key("ed25519")))
        e = await self.assertFailure_(client.run("sleep 30", timeout=1), CommandTimeout)
        self.assertIn("timed out after 1 s", str(e))
        self.assertEqual((await client.run("echo still here")).stdout, b"still here\n")

    async def test_sftp_upload_is_byte_identical_and_atomic(self) -> None:
        client = await self.connect(Credentials("root", private_key=self.root_key("ed25519")))
        dest = os.path.join(self.base, "uploaded.bin")
        payload = os.urandom(1024 * 1024 + 17)
        await client.upload(dest, payload, mode=0o640)
        self.assertEqual(_read_bytes(dest), payload)
        self.assertEqual(stat.S_IMODE(os.stat(dest).st_mode), 0o640)
        # Overwrite an existing file (rename over it), from a local file.
        src = os.path.join(self.base, "local.bin")
        _write_bytes(src, b"second version")
        await client.upload(dest, local_path=src, mode=0o600)
        self.assertEqual(_read_bytes(dest), b"second version")
        self.assertEqual(stat.S_IMODE(os.stat(dest).st_mode), 0o600)
        await client.upload(os.path.join(self.base, "empty"), b"")
        self.assertEqual(_read_bytes(os.path.join(self.base, "empty")), b"")
        # No temporary names are left behind.
        self.assertEqual(sorted(n for n in os.listdir(self.base) if ".tmp-" in n), [])

    async def test_sftp_upload_error_is_clear(self) -> None:
        from myxd.install.ssh import SFTPError

        client = await self.connect(Credentials("root", private_key=self.root_key("ed25519")))
        e = await self.assertFailure_(
            client.upload(os.path.join(self.base, "no", "such", "dir", "f"), b"x"), SFTPError
        )
        self.assertIn("sftp open", str(e))

    async def test_connection_refused(self) -> None:
        port = free_port()
        e = await self.assertFailure_(
            connect(
                "127.0.0.1",
                port,
                Credentials("root", password="x"),
                HostKeyPolicy(),
                reactor=reactor,
                timeout=10,
            ),
            SSHConnectError,
        )
        self.assertIn("connection refused", str(e))


class SudoTests(unittest.TestCase):
    """Privilege escalation for non-root users on a real systemd test host."""

    timeout = 900  # the first test of a run may build the rootfs (about a minute)

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.host = await shared_host("sudo", reactor, prepare_hook=self._users)
        self.clients: list[SSHClient] = []

    @staticmethod
    async def _users(host: Any) -> None:
        await host.add_user("alice", "alice-pw-1", sudo="nopasswd")
        await host.add_user("bob", "bob-pw-1", sudo="password")
        await host.add_user("carol", "carol-pw-1", sudo=None)

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._tearDown())

    async def _tearDown(self) -> None:
        for c in self.clients:
            await c.close()

    async def login(self, user: str) -> SSHClient:
        client = await connect(
            "127.0.0.1",
            self.host.port,
            Credentials(user, password=f"{user}-pw-1"),
            HostKeyPolicy(known_key=self.host.host_key_line),
            reactor=reactor,
            timeout=60,
        )
        self.clients.append(client)
        return client

    async def test_sudo_nopasswd(self) -> None:
        client = await self.login("alice")
        self.assertFalse(await client.is_root())
        res = await client.run_privileged("id -u; echo $0", Sudo("sudo"))
        self.assertEqual(res.stdout_text().split(), ["0", "sh"])

    async def test_sudo_with_password(self) -> None:
        client = await self.login("bob")
        res = await client.run_privileged("id -u", Sudo("sudo", password="bob-pw-1"))
        self.assertEqual((res.exit_code, res.stdout_text().strip()), (0, "0"))
        # The password went on stdin, never on a command line.
        cmd, stdin = await client.privileged_command("true", Sudo("sudo", password="bob-pw-1"))
        self.assertNotIn("bob-pw-1", cmd)
        self.assertEqual(stdin, b"bob-pw-1\n")
        # A failing script is not a sudo error: its exit status comes back.
        res = await client.run_privileged("exit 1", Sudo("sudo", password="bob-pw-1"))
        self.assertEqual(res.exit_code, 1)

    async def test_sudo_failures_are_clear(self) -> None:
        bob = await self.login("bob")
        e = self.assertRaises_
        err = await e(bob.run_privileged("true", Sudo("sudo", password="wrong")), SudoError)
        self.assertIn("sudo rejected the password for user bob", str(err))
        err = await e(bob.run_privileged("true", Sudo("sudo")), SudoError)
        self.assertIn("sudo needs a password for user bob", str(err))
        err = await e(bob.run_privileged("true", Sudo("none")), SudoError)
        self.assertIn("not root and sudo is not enabled", str(err))
        carol = await self.login("carol")
        err = await e(carol.run_privileged("true", Sudo("sudo", password="carol-pw-1")), SudoError)
        self.assertIn("may not use sudo", str(err))

    async def assertRaises_(self, coro: Any, exc: type[BaseException]) -> Any:
        try:
            await coro
        except exc as err:
            return err
        self.fail(f"{exc.__name__} not raised")

    async def test_upload_then_move_into_place_with_sudo(self) -> None:
        alice = await self.login("alice")
        home = (await alice.run("echo $HOME")).stdout_text().strip()
        await alice.upload(f"{home}/staged.txt", b"from alice\n", mode=0o600)
        await alice.run_privileged(
            f"install -m 644 -o root -g root {home}/staged.txt /root/placed.txt", Sudo("sudo")
        )
        out = await self.host.sh("stat -c '%U %a' /root/placed.txt; cat /root/placed.txt")
        self.assertEqual(out.split("\n")[:2], ["root 644", "from alice"])
