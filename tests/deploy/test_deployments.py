"""Deployments end to end (issue #8 §5): a real myxd in process, real agents on
three systemd test hosts (Debian under nspawn), the stand-in Xray release
uploaded through POST /api/artifacts and deployed with deploy_xray.yml.

The hosts share this machine's loopback, so a port the test itself listens on
is "already taken" on a host: that is how one target is made to fail.
"""

from __future__ import annotations

import socket

from twisted.internet.defer import Deferred

from tests.deploy.harness import DeployTestCase


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
