"""The installer on REAL systemd test hosts (Debian bookworm under systemd-nspawn).

Each test boots its own host (about a second once the cached rootfs exists; the
first test of a run may build it with debootstrap, about a minute) and drives
the real Installer with a real SQLite store and the real pinned AgentRPC. Agent
wheels come from a wheelhouse built by pip download, cached outside the repo.
Agents bind 127.0.0.1 only: the hosts share this machine's network namespace.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest

from myxd.config import Settings
from myxd.install import INSTALL_STEPS, Installer, InstallOutcome
from myxd.install.bundle import deployment_tool_version
from myxd.install.remote import UNIT_NAME
from myxd.rpc.client import AgentEndpoint, AgentRPC
from myxd.rpc.retry import AgentRPCError
from myxd.store import StoreService
from tests.support.testhost import CACHE_DIR, ROOT_PASSWORD, TestHost

WHEELHOUSE = os.path.join(CACHE_DIR, "wheelhouse")
SECRET_WORDS = ("token", "secret_key")


def _abs_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    return path


class InstallRealTests(unittest.TestCase):
    timeout = 900  # generous: the first test may build the rootfs and the wheelhouse

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.base = _abs_dir(self.mktemp())
        data = _abs_dir(os.path.join(self.base, "data"))
        self.settings = Settings(
            data_dir=data, agent_start_timeout=120, ssh_connect_timeout=60, rpc_timeout=20
        )
        self.store_service = StoreService(os.path.join(data, "myxd.sqlite"), reactor)
        self.store_service.startService()
        await self.store_service.when_ready()
        self.addCleanup(self.store_service.stopService)
        self.store = self.store_service.store
        self.rpc = AgentRPC(reactor, self.settings)
        self.addCleanup(self.rpc.close)
        self.installer = Installer(
            self.store,
            self.rpc,
            self.settings,
            reactor,
            wheelhouse_dir=WHEELHOUSE,
            agent_bind="127.0.0.1",
            # The hosts share this machine's network: keep agent ports out of the
            # ephemeral range that every test's outgoing connections draw from.
            agent_port_range=(8000, 32767),
        )
        self.installer.startService()
        self.addCleanup(self.installer.stopService)

    async def boot(self, name: str = "h", **kw: Any) -> TestHost:
        host = TestHost(os.path.join(self.base, name), reactor, **kw)
        self.addCleanup(host.stop)
        await host.start()
        return host

    async def add(
        self,
        host: TestHost,
        *,
        user: str = "root",
        auth: dict[str, Any] | None = None,
        sudo: dict[str, Any] | None = None,
        **kw: Any,
    ) -> int:
        server_id, _agent_id = await self.installer.create_server(
            name=host.name,
            host="127.0.0.1",
            ssh_port=host.port,
            username=user,
            auth=auth if auth is not None else {"private_key": host.private_key},
            sudo=sudo or {"mode": "none"},
            **kw,
        )
        return server_id

    async def server(self, server_id: int) -> Any:
        server = await self.store.get_server(server_id)
        assert server is not None
        return server

    async def agent(self, server_id: int) -> Any:
        agent = await self.store.get_agent_for_server(server_id)
        assert agent is not None
        return agent

    async def latest(self, server_id: int) -> dict[str, Any]:
        latest = await self.store.get_latest_install(server_id)
        assert latest is not None
        return latest

    async def endpoint(self, server_id: int) -> AgentEndpoint:
        agent = await self.store.get_agent_for_server(server_id)
        assert agent is not None
        return AgentEndpoint.from_record(agent)

    async def assert_installed(self, server_id: int, outcome: InstallOutcome) -> Any:
        self.assertTrue(outcome.ok, outcome.error)
        server = await self.server(server_id)
        self.assertEqual(server.status, "installed")
        agent = await self.agent(server_id)
        self.assertEqual(agent.status, "online")
        self.assertRegex(agent.cert_fingerprint, r"^[0-9a-f]{64}$")
        status = await self.rpc.call(AgentEndpoint.from_record(agent), "get_status")
        self.assertEqual(status["cert_fingerprint"], agent.cert_fingerprint)
        self.assertEqual(status["rpc_port"], agent.rpc_port)
        return agent

    async def wait_health(self, ep: AgentEndpoint, timeout: float = 120) -> None:
        deadline = reactor.seconds() + timeout
        while True:
            try:
                await self.rpc.call(ep, "health_check", retry=False, timeout=5)
                return
            except AgentRPCError:
                if reactor.seconds() > deadline:
                    raise
            await deferLater(reactor, 0.5, lambda: None)

    def assert_no_secrets(self, text: str, agent: Any) -> None:
        self.assertNotIn(agent.token, text)
        self.assertNotIn(agent.secret_key, text)

    # -- tests -----------------------------------------------------------------
    async def test_fresh_install_with_key(self) -> None:
        host = await self.boot()
        server_id = await self.add(host)
        outcome = await self.installer.install(server_id)
        agent = await self.assert_installed(server_id, outcome)

        latest = await self.latest(server_id)
        self.assertEqual(latest["status"], "ok")
        self.assertEqual([s["step"] for s in latest["steps"]], list(INSTALL_STEPS))
        for step in latest["steps"]:
            self.assertIn(step["status"], ("ok",), step)
            self.assertIsNotNone(step["finished_at"])
            self.assert_no_secrets(step["log"] or "", agent)
        server = await self.server(server_id)
        self.assertTrue(server.host_key.startswith("ssh-ed25519 "), "TOFU stored the key")
        self.assertEqual(server.host_key.split()[1], host.host_key_line.split()[1])

        out = await host.sh(
            f"systemctl is-enabled {UNIT_NAME}; systemctl is-active {UNIT_NAME}; "
            "stat -c '%U:%G %a' /etc/myx-agent/config.json /etc/myx-agent; "
            "systemctl show -p Restart --value myx-agent; ls /opt/myx-agent/myx_agent"
        )
        lines = out.split("\n")
        self.assertEqual(
            lines[:5], ["enabled", "active", "root:root 600", "root:root 700", "always"]
        )
        self.assertIn("main.py", lines[5:])

        ep = AgentEndpoint.from_record(agent)
        status = await self.rpc.call(ep, "get_status")
        self.assertEqual(status["deployment_tool_version"], deployment_tool_version())

        # The synced tool runs through execute_ansible.
        await self.rpc.call(
            ep, "execute_ansible", {"playbook": "ping.yml", "command_id": "ping-1", "timeout": 300}
        )
        offset, log = 0, b""
        deadline = reactor.seconds() + 300
        final: Any = None
        while final is None and reactor.seconds() < deadline:
            chunk = await self.rpc.call(
                ep, "get_command_log", {"command_id": "ping-1", "offset": offset, "wait": 5}
            )
            log += base64.b64decode(chunk["log_data"])
            offset = chunk["new_offset"]
            if chunk["is_final"]:
                final = chunk["result"]
        self.assertIsNotNone(final, log.decode(errors="replace"))
        self.assertTrue(final["success"], log.decode(errors="replace"))
        self.assertIn(f"myx deployment tool {deployment_tool_version()}".encode(), log)

        events = await self.store.list_events(limit=200)
        steps_seen = {
            e.details.get("step") for e in events if e.action == "install.step" and e.details
        }
        self.assertEqual(steps_seen, set(INSTALL_STEPS))
        for e in events:
            self.assert_no_secrets(repr(e.details), agent)

    async def test_fresh_install_with_password(self) -> None:
        host = await self.boot()
        server_id = await self.add(host, auth={"password": ROOT_PASSWORD})
        await self.assert_installed(server_id, await self.installer.install(server_id))

    async def test_non_root_user_with_sudo_password(self) -> None:
        async def users(h: TestHost) -> None:
            await h.add_user("deploy", "deploy-pw-1", sudo="password")

        host = await self.boot(prepare_hook=users)
        server_id = await self.add(
            host,
            user="deploy",
            auth={"password": "deploy-pw-1"},
            sudo={"mode": "sudo", "password": "deploy-pw-1"},
        )
        await self.assert_installed(server_id, await self.installer.install(server_id))
        latest = await self.latest(server_id)
        self.assertIn("as deploy (uid 1000)", latest["steps"][0]["log"])
        out = await host.sh("stat -c '%U %a' /etc/myx-agent/config.json; ls /tmp")
        self.assertEqual(out.split("\n")[0], "root 600")
        self.assertNotIn("myx-install", out, "the staging dir is removed")

    async def test_restarted_after_kill_and_back_after_reboot(self) -> None:
        host = await self.boot()
        server_id = await self.add(host)
        await self.assert_installed(server_id, await self.installer.install(server_id))
        ep = await self.endpoint(server_id)
        pid = (await host.sh(f"systemctl show -p MainPID --value {UNIT_NAME}")).strip()
        await host.sh(f"kill -9 {pid}")
        await deferLater(reactor, 1, lambda: None)
        await self.wait_health(ep)
        new_pid = (await host.sh(f"systemctl show -p MainPID --value {UNIT_NAME}")).strip()
        self.assertNotEqual(new_pid, pid)
        boots = host.boots
        await host.reboot()
        self.assertEqual(host.boots, boots + 1)
        await self.wait_health(ep)
        self.assertEqual((await host.sh(f"systemctl is-active {UNIT_NAME}")).strip(), "active")

    async def test_reinstall_keeps_identity(self) -> None:
        host = await self.boot()
        server_id = await self.add(host)
        before = await self.assert_installed(server_id, await self.installer.install(server_id))
        outcome = await self.installer.reinstall(server_id)
        after = await self.assert_installed(server_id, outcome)
        for attr in ("id", "rpc_port", "rpc_path", "token", "secret_key", "cert_fingerprint"):
            self.assertEqual(getattr(after, attr), getattr(before, attr), attr)
        steps = {s["step"]: s["status"] for s in (await self.latest(server_id))["steps"]}
        self.assertEqual(steps["dependencies"], "skipped")
        self.assertEqual(steps["sync_tool"], "skipped")
        self.assertEqual(steps["service"], "ok")

    async def test_host_key_change_is_refused(self) -> None:
        host = await self.boot()
        # The installer uses the password; the test's own checks use the root key,
        # so sshd's log tells the two apart.
        server_id = await self.add(host, auth={"password": ROOT_PASSWORD})
        await self.assert_installed(server_id, await self.installer.install(server_id))
        stored = (await self.server(server_id)).host_key
        await host.regenerate_host_keys()
        outcome = await self.installer.reinstall(server_id)
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.failed_step, "connect")
        self.assertIn("host key changed", outcome.error)
        server = await self.server(server_id)
        self.assertEqual(server.status, "failed")
        self.assertEqual(server.host_key, stored, "the stored key is never overwritten")
        journal = await host.sh("journalctl -u ssh --no-pager -o cat")
        before, _, after = journal.rpartition("Server listening on 127.0.0.1")
        self.assertIn("Accepted password for root", before)
        self.assertNotIn("password for root", after, "no password reached the new key")

    async def test_wrong_password_is_a_clear_error(self) -> None:
        host = await self.boot()
        server_id = await self.add(host, auth={"password": "definitely-wrong"})
        outcome = await self.installer.install(server_id)
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.failed_step, "connect")
        self.assertIn("authentication failed for user 'root'", outcome.error)
        self.assertNotIn("definitely-wrong", outcome.error)
        latest = await self.latest(server_id)
        self.assertEqual(
            [(s["step"], s["status"]) for s in latest["steps"]], [("connect", "failed")]
        )

    async def test_target_without_python3(self) -> None:
        host = await self.boot(with_python=False)
        server_id = await self.add(host)
        outcome = await self.installer.install(server_id)
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.failed_step, "check")
        self.assertIn("python3 is not installed on the target", outcome.error)
        out = await host.sh("ls /opt /etc/systemd/system")
        self.assertNotIn("myx", out, "nothing was installed")

    async def test_failed_step_names_stderr_and_second_attempt_works(self) -> None:
        host = await self.boot()
        await host.sh("touch /opt/myx-agent")  # a file where the agent's dir must go
        server_id = await self.add(host)
        outcome = await self.installer.install(server_id)
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.failed_step, "upload")
        latest = await self.latest(server_id)
        failed = latest["steps"][-1]
        self.assertEqual((failed["step"], failed["status"]), ("upload", "failed"))
        self.assertIn("/opt/myx-agent", failed["log"])  # the remote stderr
        self.assertEqual((await self.server(server_id)).status, "failed")
        await host.sh("rm -f /opt/myx-agent")
        await self.assert_installed(server_id, await self.installer.install(server_id))

    async def test_agent_that_cannot_start_fails_fast_and_is_disabled(self) -> None:
        host = await self.boot()
        server_id = await self.add(host)
        # 192.0.2.1 (TEST-NET-1) is on no interface: the agent's bind fails, so
        # it exits at once and systemd restarts it in a loop. Nothing is sent there.
        broken = Installer(
            self.store,
            self.rpc,
            self.settings,
            reactor,
            wheelhouse_dir=WHEELHOUSE,
            agent_bind="192.0.2.1",
            agent_port_range=(8000, 32767),
        )
        outcome = await broken.install(server_id)
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.failed_step, "wait")
        self.assertIn("the agent keeps exiting", outcome.error)
        self.assertIn("myx-agent: error:", outcome.error)
        latest = await self.latest(server_id)
        self.assertIn("myx-agent: error:", latest["steps"][-1]["log"])
        # Made harmless: the unit no longer restarts forever.
        out = await host.sh(
            f"systemctl is-enabled {UNIT_NAME}; systemctl is-active {UNIT_NAME}; true"
        )
        self.assertEqual(out.split()[:2], ["disabled", "inactive"])
        # The next attempt (with a usable config) works.
        await self.assert_installed(server_id, await self.installer.install(server_id))

    async def test_busy_port_on_a_fresh_install_is_replaced(self) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.protocol import Factory, Protocol

        host = await self.boot()
        server_id = await self.add(host)
        first = await self.agent(server_id)
        # The hosts share this machine's network: a listener here is on the target.
        port = await TCP4ServerEndpoint(reactor, first.rpc_port, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(port.stopListening)
        agent = await self.assert_installed(server_id, await self.installer.install(server_id))
        self.assertNotEqual(agent.rpc_port, first.rpc_port)
        check = (await self.latest(server_id))["steps"][1]
        self.assertIn(f"port {first.rpc_port} is busy on the target; assigned", check["log"])

    async def test_uninstall_leaves_nothing(self) -> None:
        host = await self.boot()
        server_id = await self.add(host)
        agent = await self.assert_installed(server_id, await self.installer.install(server_id))
        outcome = await self.installer.uninstall(server_id)
        self.assertTrue(outcome.ok, outcome.error)
        out = await host.sh(
            "ls -a /opt /etc /var/lib /etc/systemd/system "
            "/etc/systemd/system/multi-user.target.wants; "
            f"systemctl list-units --all --no-legend {UNIT_NAME}; "
            f"ss -Hltn 'sport = :{agent.rpc_port}'"
        )
        self.assertNotIn("myx", out)
        self.assertIsNone(await self.store.get_agent_for_server(server_id))
        self.assertEqual((await self.server(server_id)).status, "uninstalled")
        # And it can be installed again afterwards, with a new identity.
        await self.assert_installed(server_id, await self.installer.install(server_id))

    async def test_two_hosts_in_parallel(self) -> None:
        hosts = [await self.boot("a"), await self.boot("b")]
        ids = [await self.add(h) for h in hosts]
        outcomes = [Deferred.fromCoroutine(self.installer.install(i)) for i in ids]
        agents = []
        for server_id, d in zip(ids, outcomes):
            agents.append(await self.assert_installed(server_id, await d))
        self.assertNotEqual(agents[0].rpc_port, agents[1].rpc_port)
        self.assertNotEqual(agents[0].cert_fingerprint, agents[1].cert_fingerprint)
