"""The Installer's job running without SSH: a fake ``RemoteHost`` behind the connector.

The store is a real SQLite file. These tests check the order and recording of
the steps, the outcome, what a failure leaves behind, and that the agent files
are read once per daemon. Real installs: tests/install/test_install_real.py.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from myxd.config import Settings
from myxd.install import INSTALL_STEPS, Installer, remote
from myxd.install.bundle import AgentFiles
from myxd.install.host import RemoteHost
from myxd.install.hostkeys import HostKeyPolicy
from myxd.install.session import Connector
from myxd.store import StoreService
from myxd.store.records import ServerRecord
from tests.install.fakes import FakeHost, FakeRPC
from tests.install.test_steps import FILES, FP, GOOD_FACTS


def _new_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path)
    return path


class InstallerTests(unittest.TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        base = _new_dir(self.mktemp())
        ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
        self.store = ss.store
        self.hosts: list[FakeHost] = []
        self.rpc = FakeRPC()
        self.reads = 0

        async def connector(server: ServerRecord, policy: HostKeyPolicy) -> RemoteHost:
            host = FakeHost()
            host.reply("PORT=", GOOD_FACTS)
            host.reply("mktemp", "/tmp/myx-install.abc\n")
            host.reply("sha256", FP + "\n")
            self.hosts.append(host)
            return host

        def read_agent_files() -> AgentFiles:
            self.reads += 1
            return FILES

        self.installer = Installer(
            self.store,
            self.rpc,
            Settings(data_dir=base, install_dependency_mode="index"),
            Clock(),
            connector=connector,
            read_agent_files=read_agent_files,
        )
        self.installer.startService()
        self.addCleanup(self.installer.stopService)
        self.sid, agent_id = await self.installer.create_server(
            name="s",
            host="127.0.0.1",
            ssh_port=22,
            username="root",
            auth={"password": "pw"},
            sudo={"mode": "none"},
        )
        agent = await self.store.get_agent(agent_id)
        assert agent is not None
        self.rpc.answer("health_check", {"ok": True})
        self.rpc.answer("get_status", {"cert_fingerprint": FP, "rpc_port": agent.rpc_port})
        # The agent already holds the tool's archive in its cache: nothing to push.
        self.rpc.answer("artifact_status", {"present": True, "path": "/var/lib/a/x", "offset": 0})
        self.rpc.answer("sync_deployment_tool", {"changed": True})

    async def test_install_runs_every_step_in_order(self) -> None:
        outcome = await self.installer.install(self.sid)
        self.assertTrue(outcome.ok, outcome.error)
        latest = await self.store.get_latest_install(self.sid)
        assert latest is not None
        self.assertEqual(
            [(st["step"], st["status"]) for st in latest["steps"]],
            [(name, "ok") for name in INSTALL_STEPS],
        )
        server = await self.store.get_server(self.sid)
        agent = await self.store.get_agent_for_server(self.sid)
        assert server is not None and agent is not None
        self.assertEqual(
            (server.status, agent.status, agent.cert_fingerprint), ("installed", "online", FP)
        )
        (host,) = self.hosts
        self.assertTrue(host.closed)
        self.assertEqual(host.ran("rm -rf /tmp/myx-install.abc"), ["rm -rf /tmp/myx-install.abc"])
        self.assertFalse(self.installer.is_running(self.sid))

    async def test_agent_files_are_read_once_per_daemon(self) -> None:
        self.assertTrue((await self.installer.install(self.sid)).ok)
        self.assertTrue((await self.installer.reinstall(self.sid)).ok)
        self.assertEqual(len(self.hosts), 2)
        self.assertEqual(self.reads, 1)
        self.assertEqual(len(self.hosts[1].uploads), len(self.hosts[0].uploads))

    async def test_a_failed_step_is_recorded_and_made_harmless(self) -> None:
        self.installer.env.connector = self.failing_service(self.installer.env.connector)
        outcome = await self.installer.install(self.sid)
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.failed_step, "service")
        self.assertEqual(outcome.error, "service: remote command failed with exit status 1: boom")
        latest = await self.store.get_latest_install(self.sid)
        assert latest is not None
        self.assertEqual(
            [(st["step"], st["status"]) for st in latest["steps"]][-2:],
            [("config", "ok"), ("service", "failed")],
        )
        self.assertEqual(latest["steps"][-1]["log"], "boom")
        (host,) = self.hosts
        self.assertEqual(host.ran("disable --now", privileged=True), [remote.disable_unit()])
        self.assertTrue(host.closed)
        server = await self.store.get_server(self.sid)
        assert server is not None
        self.assertEqual(server.status, "failed")

    def failing_service(self, connector: Connector) -> Connector:
        async def connect(server: ServerRecord, policy: HostKeyPolicy) -> RemoteHost:
            host = await connector(server, policy)
            assert isinstance(host, FakeHost)
            host.reply("systemctl restart", stderr="boom", exit_code=1)
            return host

        return connect

    async def test_stop_cancels_an_ssh_connect_in_flight(self) -> None:
        # A host that never answers would hold the connect until its timeout
        # (ssh_connect_timeout), and the daemon's stop with it.
        reached: Deferred[None] = Deferred()
        cancelled: list[bool] = []

        def hang(server: ServerRecord, policy: HostKeyPolicy) -> Deferred[RemoteHost]:
            reactor.callLater(0, reached.callback, None)  # once the connect is in flight
            return Deferred(lambda _: cancelled.append(True))

        self.installer.env.connector = hang
        running = Deferred.fromCoroutine(self.installer.install(self.sid))
        await reached
        # The Clock never moves: only the cancel can end the connect.
        await self.installer.stopService().addTimeout(30, reactor)
        outcome = await running
        self.assertEqual(cancelled, [True])
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.failed_step, "connect")
        self.assertEqual(outcome.error, "connect: the daemon is stopping")
        server = await self.store.get_server(self.sid)
        assert server is not None
        self.assertEqual(server.status, "failed")
        self.assertIsNone(await self.store.get_agent_for_server(self.sid))

    async def test_uninstall(self) -> None:
        self.assertTrue((await self.installer.install(self.sid)).ok)
        outcome = await self.installer.uninstall(self.sid)
        self.assertTrue(outcome.ok, outcome.error)
        self.assertEqual(
            self.hosts[1].ran("", privileged=True),
            [remote.uninstall_unit(), remote.uninstall_files()],
        )
        self.assertIsNone(await self.store.get_agent_for_server(self.sid))
        server = await self.store.get_server(self.sid)
        assert server is not None
        self.assertEqual(server.status, "uninstalled")
