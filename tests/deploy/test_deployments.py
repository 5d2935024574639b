"""Deployments end to end (issue #8 §5): a real myxd in process, real agents on
three systemd test hosts (Debian under nspawn), the stand-in Xray release
uploaded through POST /api/artifacts and deployed with deploy_xray.yml.

The hosts share this machine's loopback, so a port the test itself listens on
is "already taken" on a host: that is how one target is made to fail.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred

from tests.deploy.harness import VERSION, DeployTestCase


def taken_port() -> tuple[socket.socket, int]:
    """A loopback port held open by this process (closed by the caller)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


class DeploymentTests(DeployTestCase):
    def test_partial_then_redeploy_sends_nothing(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._partial_then_redeploy())

    async def _partial_then_redeploy(self) -> None:
        await self.start(3)
        art = await self.release()
        code, arts = await self.api("GET", f"/api/artifacts/{art}")
        self.assertEqual(code, 200, arts)
        size = arts["size"]
        held, bad_port = taken_port()
        self.addCleanup(held.close)
        ports = self.free_ports(2) + [bad_port]
        a, b, c = self.agent_ids
        dep = await self.deploy(
            {
                "playbook": "deploy_xray.yml",
                "agents": [a, b, c],
                "vars": self.per_host_vars(ports, art),
                "artifacts": {"xray_archive_path": art},
            }
        )
        self.assertEqual([t["agent_id"] for t in dep["targets"]], [a, b, c])
        self.assertIn(dep["status"], ("pending", "running"))
        done = await self.wait_deployment(dep["id"])
        self.assertEqual(done["status"], "partial", done)
        self.assertEqual(done["counts"]["success"], 2, done)
        self.assertEqual(done["counts"]["failed"], 1, done)
        for agent_id in (a, b):
            t = self.target(done, agent_id)
            self.assertEqual(t["status"], "success", t)
            self.assertIsNone(t["reason"])
            self.assertGreater(t["changed"], 0, t)
            self.assertEqual(t["failed"], 0, t)
            self.assertEqual(t["bytes_sent"], size, t)
        failed = self.target(done, c)
        self.assertEqual(failed["status"], "failed", failed)
        self.assertGreater(failed["failed"], 0, failed)
        # The reason names the task that failed and its message.
        self.assertRegex(failed["reason"], r"^[^:]+: .+", failed)
        log = await self.read_all(failed["command_id"])
        task = failed["reason"].split(":", 1)[0]
        self.assertIn(f"TASK [{task}]".encode(), log)
        self.assertIn(str(bad_port).encode(), log)
        # Every target's command_id is its live log, through the command API.
        for t in done["targets"]:
            cmd = await self.command(t["command_id"])
            self.assertEqual(cmd["status"], "success" if t["status"] == "success" else "failed")
            self.assertIn(b"PLAY RECAP", await self.read_all(t["command_id"]))

        # Free the port and deploy again: all succeed and no artifact byte moves.
        held.close()
        again = await self.deploy(
            {
                "playbook": "deploy_xray.yml",
                "agents": [a, b, c],
                "vars": self.per_host_vars(ports, art),
                "artifacts": {"xray_archive_path": art},
            }
        )
        done = await self.wait_deployment(again["id"])
        self.assertEqual(done["status"], "success", done)
        self.assertEqual([t["bytes_sent"] for t in done["targets"]], [0, 0, 0], done)
        self.assertEqual(self.target(done, a)["changed"], 0, done)

    def test_rolling_stops_after_the_first_failure(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rolling())

    async def _rolling(self) -> None:
        await self.start(3)
        art = await self.release()
        held, bad_port = taken_port()
        self.addCleanup(held.close)
        a, b, c = self.agent_ids
        ports = self.free_ports(2) + [bad_port]
        before = [self.ansible_runs(ah) for ah in self.hosts]
        # c (its port taken) goes first, one at a time, and one failure is enough.
        dep = await self.deploy(
            {
                "playbook": "deploy_xray.yml",
                "agents": [c, a, b],
                "vars": self.per_host_vars(ports, art),
                "artifacts": {"xray_archive_path": art},
                "batch_size": 1,
                "max_failures": 1,
            }
        )
        done = await self.wait_deployment(dep["id"])
        self.assertEqual(done["status"], "failed", done)
        self.assertEqual([t["agent_id"] for t in done["targets"]], [c, a, b])
        self.assertEqual([t["status"] for t in done["targets"]], ["failed", "skipped", "skipped"])
        for agent_id in (a, b):
            t = self.target(done, agent_id)
            self.assertIsNone(t["command_id"], t)
            self.assertEqual(t["bytes_sent"], 0, t)
            self.assertIn("max_failures 1", t["reason"])
        after = [self.ansible_runs(ah) for ah in self.hosts]
        # Only c ran a playbook.
        self.assertEqual([len(x - y) for x, y in zip(after, before)], [0, 0, 1])

    def test_daemon_restart_mid_deployment(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._restart())

    async def _restart(self) -> None:
        await self.start(2)
        art = await self.release()
        a, b = self.agent_ids
        before = [self.ansible_runs(ah) for ah in self.hosts]
        dep = await self.deploy(
            {
                "playbook": "deploy_xray.yml",
                "agents": [a, b],
                "vars": self.per_host_vars(self.free_ports(2), art),
                "artifacts": {"xray_archive_path": art},
                "batch_size": 1,
            }
        )
        running = await self.until(
            lambda: self.deployment(dep["id"]),
            lambda d: self.target(d, a)["status"] == "running",
            "the first target to run",
            interval=0.1,
        )
        self.assertEqual(self.target(running, b)["status"], "pending")
        await self.daemon.stop()
        # A new daemon on the same data dir, as after a crash and restart.
        from tests.daemon.daemon_harness import Daemon

        self.daemon = Daemon(self, self.data_dir)
        await self.daemon.start()
        # The first target was still running when the daemon stopped.
        first = await self.command(self.target(running, a)["command_id"])
        done = await self.wait_deployment(dep["id"])
        self.assertEqual(done["status"], "success", done)
        self.assertEqual(self.target(done, a)["command_id"], first["id"])
        for t in done["targets"]:
            self.assertIn(b"PLAY RECAP", await self.read_all(t["command_id"]))
        # Each host ran the playbook exactly once, under one agent-side command.
        after = [self.ansible_runs(ah) for ah in self.hosts]
        new = [x - y for x, y in zip(after, before)]
        self.assertEqual([len(n) for n in new], [1, 1], new)
        for ah, n in zip(self.hosts, new):
            self.assertEqual(len(self.runner_idents(ah, n.pop())), 1)
        # The agents got no second run: the daemon's command list for each is one run.
        for agent_id in (a, b):
            code, page = await self.api("GET", f"/api/agents/{agent_id}/commands")
            self.assertEqual(code, 200, page)
            runs = [c for c in page["commands"] if c["kind"] == "ansible"]
            self.assertEqual(len(runs), 1, runs)

    def test_drift_after_a_hand_edit(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drift())

    async def _drift(self) -> None:
        await self.start(1)
        art = await self.release()
        (a,) = self.agent_ids
        dep = await self.deploy(
            {
                "playbook": "deploy_xray.yml",
                "agents": [a],
                "vars": self.per_host_vars(self.free_ports(1), art),
                "artifacts": {"xray_archive_path": art},
            }
        )
        done = await self.wait_deployment(dep["id"])
        self.assertEqual(done["status"], "success", done)
        code, fleet = await self.api("GET", "/api/fleet/services")
        self.assertEqual(code, 200, fleet)
        row = self.drift_row(fleet, a)
        self.assertEqual(row["drift"], [], fleet)
        self.assertEqual(row["active_version"], VERSION)
        self.assertTrue(row["active"])
        self.assertEqual(row["deployment_id"], dep["id"])
        # An operator edits the config by hand (still valid JSON).
        await self.hosts[0].host.sh("echo >> /usr/local/etc/xray/config.json")
        code, body = await self.api("POST", f"/api/agents/{a}/services/refresh")
        self.assertEqual(code, 200, body)
        code, fleet = await self.api("GET", "/api/fleet/services")
        row = self.drift_row(fleet, a)
        self.assertEqual(row["drift"], ["config changed since the last deployment"], fleet)
        self.assertEqual(fleet["services"]["xray"]["drifted"], 1)

    def drift_row(self, fleet: dict[str, Any], agent_id: int) -> dict[str, Any]:
        rows = [r for r in fleet["services"]["xray"]["agents"] if r["agent_id"] == agent_id]
        self.assertEqual(len(rows), 1, fleet)
        return dict(rows[0])
