"""A daemon restart while an install is unfinished never leaves a phantom agent
(issue #9): the server reads ``failed`` with the reason, and no agent row is left to
be listed, counted or heartbeated as offline.

- End to end: a real ``twistd -n myxd`` from the installed wheel
  (tests/support/wheel_daemon.py) starts an install against a TCP port that
  accepts and never speaks SSH (the install sits in ``connect``); it is killed
  with SIGKILL mid-step and started again on the same data dir.
- In process, on a real SQLite store: what a killed reinstall of an installed
  agent leaves behind (the agent ``installing``, its certificate pinned) is
  closed by the Installer's start-up recovery; the agent keeps its identity and
  reads ``error`` until the heartbeat checks it again.

Waits are on conditions; deadlines only turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial import unittest

from myxd.config import Settings
from myxd.install import Installer
from myxd.rpc.client import AgentRPC
from myxd.store import StoreService
from tests.daemon.api_helpers import parse_prometheus
from tests.support.wheel_daemon import WheelDaemonMixin, prepare_dirs

DEADLINE = 120.0
FAST = ("--heartbeat-min-interval", "0.3", "--heartbeat-max-interval", "0.6")
INTERRUPTED = "install interrupted by a daemon restart"


class _Accepted(Protocol):
    """Takes the connection and says nothing: SSH waits for the server's banner."""

    def connectionMade(self) -> None:
        self.factory.count += 1


class _Silent(Factory):
    protocol = _Accepted
    count = 0


class RestartDuringInstallTests(WheelDaemonMixin, unittest.TestCase):
    timeout = 300
    poll_deadline = DEADLINE
    poll_interval = 0.1

    def setUp(self) -> None:
        self.root, self.data = prepare_dirs(self.mktemp())

    async def metrics(self) -> dict[str, Any]:
        code, text = await self.call("GET", "/metrics")
        self.assertEqual(code, 200, text)
        return parse_prometheus(text)

    def agents_by_status(self, fams: dict[str, Any]) -> dict[str, float]:
        return {s[1]["status"]: s[2] for s in fams["myxd_agents"]["samples"]}

    async def test_kill_9_mid_install_leaves_no_phantom_agent(self) -> None:
        factory = _Silent()
        silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(silent.stopListening)
        first = await self.start_daemon(*FAST)
        code, created = await self.call(
            "POST",
            "/api/servers",
            {
                "name": "half-made",
                "host": "127.0.0.1",
                "ssh_port": silent.getHost().port,
                "username": "root",
                "auth": {"password": "never-sent-0123"},
                "sudo": {"mode": "none"},
            },
        )
        self.assertEqual(code, 201, created)
        sid = created["server"]["id"]
        self.assertEqual(created["server"]["agent_status"], "installing")
        install = await self.until(
            f"/api/servers/{sid}/install",
            lambda i: (
                [(s["step"], s["status"]) for s in i["steps"]] == [("connect", "running")]
                and factory.count > 0
            ),
            "the install to sit in connect",
        )
        self.assertTrue(install["running"])
        assert first.transport is not None
        first.transport.signalProcess("KILL")
        await first.ended

        # A short SSH timeout: its stop waits for the reinstall below to give up.
        second = await self.start_daemon(*FAST, "--ssh-connect-timeout", "5")
        srv = await self.until(
            f"/api/servers/{sid}", lambda s: s["status"] != "installing", "a clear state"
        )
        self.assertEqual((srv["status"], srv["status_reason"]), ("failed", INTERRUPTED), srv)
        self.assertFalse(srv["install_running"])
        self.assertIsNone(srv["agent_id"], "an install that never finished leaves no agent")
        self.assertIsNone(srv["agent_status"])
        code, install = await self.call("GET", f"/api/servers/{sid}/install")
        self.assertEqual(
            (install["status"], install["error"], install["running"]),
            ("failed", "interrupted by a daemon restart", False),
        )
        self.assertEqual([s["status"] for s in install["steps"]], ["failed"])

        # Heartbeat cycles go by: still no agent, none offline, none installing.
        await self.until(
            "/metrics",
            lambda text: (
                sum(
                    s[2]
                    for s in parse_prometheus(text)["myxd_heartbeat_cycles_total"]["samples"]
                    if s[0] == "myxd_heartbeat_cycles_total"
                )
                >= 3
            ),
            "three heartbeat cycles",
        )
        self.assertEqual(set(self.agents_by_status(await self.metrics()).values()), {0.0})
        code, page = await self.call("GET", "/api/agents")
        self.assertEqual((page["agents"], page["total"]), ([], 0))
        code, srv = await self.call("GET", f"/api/servers/{sid}")
        self.assertEqual((srv["status"], srv["agent_id"]), ("failed", None))
        code, page = await self.call("GET", f"/api/events?target=server:{sid}&kind=server.install")
        self.assertEqual(
            [(e["actor"], e["outcome"]) for e in page["events"]][:1],
            [("installer", "failed")],
            page,
        )
        self.assertEqual(page["events"][0]["details"]["error"], INTERRUPTED)
        self.assertNotIn("never-sent-0123", json.dumps(page))
        self.assertNotIn("Traceback", second.text)

        # A reinstall starts from there: a fresh agent record, installing again.
        code, started = await self.call("POST", f"/api/servers/{sid}/reinstall", {})
        self.assertEqual(code, 202, started)
        srv = await self.until(
            f"/api/servers/{sid}", lambda s: s["agent_status"] == "installing", "the reinstall"
        )
        self.assertEqual(srv["status"], "installing")


class RecoveryInProcessTests(unittest.TestCase):
    """The Installer's start-up recovery over what a killed daemon left in the store."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        return Deferred.fromCoroutine(self._setUp(base))

    async def _setUp(self, base: str) -> None:
        self.settings = Settings(data_dir=base)
        ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
        self.store = ss.store
        self.rpc = AgentRPC(reactor, self.settings)
        self.addCleanup(self.rpc.close)

    async def killed_mid(self, kind: str, fingerprint: str) -> tuple[int, int]:
        """The store as a daemon killed in the ``connect`` step of ``kind`` leaves it."""
        sid = await self.store.add_server(
            name=f"s-{kind}",
            host="127.0.0.1",
            ssh_port=22,
            username="root",
            auth={"password": "pw-never-shown"},
            sudo={"mode": "none", "password": None},
        )
        ident = await self.store.new_agent_identity()
        aid = await self.store.add_agent(
            host="127.0.0.1",
            rpc_port=ident.rpc_port,
            rpc_path=ident.rpc_path,
            token=ident.token,
            secret_key=ident.secret_key,
            cert_fingerprint=fingerprint,
            status="installing",
            server_id=sid,
        )
        install_id = await self.store.start_install(sid, kind)
        await self.store.record_install_step(install_id, "connect", "running")
        await self.store.update_server(sid, status="installing")
        return sid, aid

    async def test_recovery_drops_a_never_installed_agent_and_keeps_an_installed_one(
        self,
    ) -> None:
        fresh_sid, fresh_aid = await self.killed_mid("install", "")
        old_sid, old_aid = await self.killed_mid("reinstall", "ab" * 32)
        installer = Installer(self.store, self.rpc, self.settings, reactor)
        installer.startService()
        self.addCleanup(installer.stopService)
        deadline = reactor.seconds() + DEADLINE
        # The pass is over once the last server's event is written (its last write).
        while not await self.store.list_events(limit=1, target=f"server:{old_sid}"):
            self.assertLess(reactor.seconds(), deadline, "recovery never finished")
            await deferLater(reactor, 0.05, lambda: None)

        fresh = await self.store.get_server(fresh_sid)
        assert fresh is not None
        self.assertEqual((fresh.status, fresh.status_reason), ("failed", INTERRUPTED))
        self.assertIsNone(await self.store.get_agent(fresh_aid))

        old = await self.store.get_server(old_sid)
        assert old is not None
        self.assertEqual(
            (old.status, old.status_reason), ("failed", "reinstall interrupted by a daemon restart")
        )
        agent = await self.store.get_agent(old_aid)
        assert agent is not None
        self.assertEqual(
            (agent.status, agent.status_reason, agent.cert_fingerprint),
            ("error", "reinstall interrupted by a daemon restart", "ab" * 32),
        )
        counts = await self.store.agent_counts_by_status()
        self.assertEqual((counts["offline"], counts["installing"], counts["error"]), (0, 0, 1))
        for sid in (fresh_sid, old_sid):
            latest = await self.store.get_latest_install(sid)
            assert latest is not None
            self.assertEqual(
                (latest["status"], [s["status"] for s in latest["steps"]]), ("failed", ["failed"])
            )
