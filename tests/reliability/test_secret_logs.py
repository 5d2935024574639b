"""Secrets in logs (issue #12 §3): nothing secret in any log or API error body.

A real ``twistd -n myxd`` from the wheel (at ``--log-level debug``, the most
talkative) installs an agent on a real systemd test host over SSH with a
password and a sudo password, runs a command with a secret in its ``env``, and
is sent requests that fail. Then every daemon log line, the agent's journal
and files on the host, and every API error body the test saw are searched for
the admin token, the agent token and secret key, the SSH and sudo password,
the private key and the env value: 0 hits. A positive control checks that the
search itself finds a secret where one is known to be (the agent's config).
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from myxd.install.remote import CONFIG_PATH, UNIT_NAME
from tests.support.testhost import TestHost
from tests.support.wheel_daemon import TOKEN, WheelDaemonMixin, prepare_dirs

PASSWORD = "deploy-Pw-7f3e1c9a5b"
ENV_SECRET = "env-secret-4b1d9e77c2a0"


class SecretLogTests(WheelDaemonMixin, unittest.TestCase):
    timeout = 900
    poll_deadline = 600.0
    poll_interval = 0.5

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.root, self.data = prepare_dirs(self.mktemp())

        async def users(h: TestHost) -> None:
            await h.add_user("deploy", PASSWORD, sudo="password")

        self.host = TestHost(os.path.join(self.root, "host"), reactor, prepare_hook=users)
        self.addCleanup(self.host.stop)
        await self.host.start()
        self.bodies: list[str] = []

    def answered(self, code: int, text: str) -> None:
        if code >= 400:
            self.bodies.append(text)

    async def test_no_secret_in_any_log_or_error_body(self) -> None:
        daemon = await self.start_daemon("--log-level", "debug")
        server = {
            "name": "s1",
            "host": "127.0.0.1",
            "ssh_port": self.host.port,
            "username": "deploy",
            "auth": {"password": PASSWORD},
            "sudo": {"mode": "sudo", "password": PASSWORD},
        }
        code, created = await self.call("POST", "/api/servers", server)
        self.assertEqual(code, 201, created)
        sid = created["server"]["id"]
        # Errors on purpose: a bad token, a duplicate, bad input with secrets in it.
        self.assertEqual((await self.call("GET", "/api/servers", token=PASSWORD))[0], 401)
        bad = dict(server, ssh_port="x")
        self.assertEqual((await self.call("POST", "/api/servers", bad))[0], 400)
        bad = dict(server, auth={"password": PASSWORD, "private_key": self.host.private_key})
        self.assertEqual((await self.call("POST", "/api/servers", bad))[0], 400)
        srv = await self.until(
            f"/api/servers/{sid}",
            lambda s: s["status"] in ("installed", "failed"),
            "the install",
        )
        self.assertEqual(srv["status"], "installed", srv)
        await self.until(
            f"/api/servers/{sid}", lambda s: s["agent_status"] == "online", "agent online"
        )
        aid = srv["agent_id"]
        code, cmd = await self.call(
            "POST",
            f"/api/agents/{aid}/commands",
            {
                "command": "/bin/sh",
                "args": ["-c", 'test -n "$APP_SECRET" && echo set'],
                "env": {"APP_SECRET": ENV_SECRET},
            },
        )
        self.assertEqual(code, 201, cmd)
        done = await self.until(f"/api/commands/{cmd['id']}", lambda c: c["final"], "cmd")
        self.assertEqual(done["status"], "success", done)
        self.assertEqual(done["extra"]["env"], ["APP_SECRET"])
        # A failing command and a bad command body, with the secret in them.
        code, _ = await self.call(
            "POST", f"/api/agents/{aid}/commands", {"command": "", "env": {"X": ENV_SECRET}}
        )
        self.assertEqual(code, 400)

        config = json.loads(await self.host.sh(f"cat {CONFIG_PATH}"))
        secrets = {
            "admin token": TOKEN,
            "agent token": config["agent_token"],
            "agent secret key": config["secret_key"],
            "SSH/sudo password": PASSWORD,
            "private key": self.host.private_key.strip().splitlines()[1],
            "env value": ENV_SECRET,
        }
        # Positive control: the search finds the agent token where it must be.
        self.assertIn(config["agent_token"], await self.host.sh(f"cat {CONFIG_PATH}"))
        journal = await self.host.sh(f"journalctl -u {UNIT_NAME} --no-pager -o cat || true")
        files = await self.host.sh(
            "find /var/lib/myx-agent /var/log -type f -size -20M -print0 2>/dev/null"
            " | xargs -0 -r grep -l -a -F -e "
            + " -e ".join(f"'{v}'" for v in secrets.values())
            + " || true"
        )
        self.assertTrue(journal.strip(), "the agent's journal is empty: nothing was searched")
        places = {
            "daemon log": daemon.text,
            "agent journal": journal,
            "API error bodies": "\n".join(self.bodies),
        }
        self.assertGreaterEqual(len(self.bodies), 4)
        hits = [
            f"{what} in {where}"
            for where, text in places.items()
            for what, value in secrets.items()
            if value in text
        ]
        self.assertEqual(hits, [])
        self.assertEqual(files.strip(), "", "host files holding a secret")
