"""Host and process faults on systemd test hosts (issue #12 §2).

Every test runs a real ``twistd -n myxd`` from the wheel's venv
(tests/support/wheel_daemon.py) that installs a real agent over SSH on a real
systemd test host (tests/support/testhost.py: Debian booted with
systemd-nspawn, systemd as PID 1, reached on 127.0.0.1), then injects one fault:

- ``kill -9`` of the agent while a command runs: systemd restarts it, the
  command reads back ``failed`` with a reason, and an ``execute_command`` with
  the same ``command_id`` sent again does not run it again (a marker file on the
  host counts the runs; a new id is the positive control);
- ``kill -9`` of myxd during an SSH install: after the restart the server and
  its install read ``failed`` ("interrupted by a daemon restart"), no step is
  left ``running``, and a reinstall completes;
- the agent broken for good (``/opt/myx-agent`` removed, its process killed):
  the daemon, with nothing but its settings lowered, sees the dead RPC,
  reinstalls through ``tap.py``'s wiring of the auto-reinstaller, and the agent
  comes back with the same identity (agent id, port, path, token, certificate).

Waits are on conditions (with generous deadlines that only turn a hang into a
failure); the figures are logged as ``fault figures: ...`` lines.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shlex
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial import unittest

from myxd.install.remote import AGENT_DIR, CONFIG_PATH, UNIT_NAME
from tests.daemon.test_plugin import Daemon as TwistdProcess
from tests.support.daemon_host import unit_props
from tests.support.pinned_client import AgentClient
from tests.support.testhost import TestHost
from tests.support.wheel_daemon import WheelDaemonMixin, prepare_dirs

log = Logger()

# Only turns a hang into a failure; nothing is asserted about durations.
DEADLINE = 600.0

# Heartbeats and log polls fast enough that the faults resolve in seconds.
FAST = (
    "--heartbeat-min-interval",
    "0.5",
    "--heartbeat-max-interval",
    "1",
    "--log-poll-interval",
    "0.2",
    "--log-poll-wait",
    "1",
)


class HostFaultTests(WheelDaemonMixin, unittest.TestCase):
    timeout = 1500
    poll_deadline = DEADLINE

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.root, self.data = prepare_dirs(self.mktemp())
        self.host = TestHost(os.path.join(self.root, "host"), reactor)
        self.addCleanup(self.host.stop)
        await self.host.start()

    # -- helpers -------------------------------------------------------------
    async def installed_server(self) -> dict[str, Any]:
        """Create the test host's server, install its agent, wait until it is online."""
        code, created = await self.call(
            "POST",
            "/api/servers",
            {
                "name": self.host.name,
                "host": "127.0.0.1",
                "ssh_port": self.host.port,
                "username": "root",
                "auth": {"private_key": self.host.private_key},
                "sudo": {"mode": "none"},
            },
        )
        self.assertEqual(code, 201, created)
        sid = created["server"]["id"]
        srv = await self.until(
            f"/api/servers/{sid}", lambda s: s["status"] in ("installed", "failed"), "the install"
        )
        self.assertEqual(srv["status"], "installed", srv)
        srv = await self.until(
            f"/api/servers/{sid}", lambda s: s["agent_status"] == "online", "the agent online"
        )
        return dict(srv)

    async def run_ok(self, agent_id: int, text: str) -> None:
        """A command through the daemon that must succeed and print ``text``."""
        code, cmd = await self.call(
            "POST", f"/api/agents/{agent_id}/commands", {"command": "/bin/echo", "args": [text]}
        )
        self.assertEqual(code, 201, cmd)
        done = await self.until(f"/api/commands/{cmd['id']}", lambda c: c["final"], "echo")
        self.assertEqual(done["status"], "success", done)
        data = b"".join(base64.b64decode(c["data"]) for c in done["output"])
        self.assertEqual(data, text.encode() + b"\n")

    async def read_all(self, command_id: int) -> bytes:
        """The daemon's whole stored output, page by page, offsets contiguous."""
        out = b""
        while True:
            code, body = await self.call(
                "GET", f"/api/commands/{command_id}?offset={len(out)}&max_bytes=65536"
            )
            self.assertEqual(code, 200, body)
            if not body["output"]:
                return out
            for chunk in body["output"]:
                self.assertEqual(chunk["offset"], len(out))
                out += base64.b64decode(chunk["data"])

    async def agent_config(self) -> dict[str, Any]:
        return dict(json.loads(await self.host.sh(f"cat {CONFIG_PATH}")))

    async def main_pid(self) -> tuple[int, int]:
        props = await unit_props(self.host, UNIT_NAME, "MainPID", "NRestarts")
        return int(props["MainPID"]), int(props["NRestarts"])

    def events(self, body: Any, action: str) -> list[dict[str, Any]]:
        return [e for e in body["events"] if e["action"] == action]

    # -- 1. kill -9 of the agent mid-command ---------------------------------
    async def test_agent_killed_mid_command(self) -> None:
        await self.start_daemon(*FAST)
        srv = await self.installed_server()
        agent = srv["agent"]
        marker = "/root/relhost-runs"
        script = (
            f"echo run >> {marker}; i=0; "
            'while [ $i -lt 100000 ]; do echo "relhost-loop line $i"; i=$((i+1)); sleep 0.1; done'
        )
        args = ["-c", script]
        code, cmd = await self.call(
            "POST",
            f"/api/agents/{agent['id']}/commands",
            {"command": "/bin/sh", "args": args, "timeout": 900},
        )
        self.assertEqual(code, 201, cmd)
        cid = cmd["id"]
        running = await self.until(
            f"/api/commands/{cid}?max_bytes=1",
            lambda c: c["status"] == "running" and c["output_offset"] > 1000,
            "the command to stream output",
        )
        pid, restarts = await self.main_pid()
        self.assertGreater(pid, 0)
        await self.host.sh(f"kill -9 {pid}")
        final = await self.until(f"/api/commands/{cid}", lambda c: c["final"], "a final status")
        self.assertEqual(final["status"], "failed", final)
        self.assertTrue(final["reason"], final)
        self.assertIs(final["result"]["interrupted"], True, final)
        self.assertIn("restart", final["reason"])
        new_pid, new_restarts = await self.main_pid()
        self.assertEqual(new_restarts, restarts + 1, "systemd restarted the agent once")
        self.assertNotIn(new_pid, (0, pid))
        # Nothing is left of the killed command's process tree.
        left = await self.host.sh("ps -eo args | grep -c '[r]elhost-loop' || true")
        self.assertEqual(left.strip(), "0")
        host_marker = os.path.join(self.host.root, marker.lstrip("/"))
        self.assertEqual(_runs(host_marker), 1)

        # The output up to the kill: whole lines, in order, none lost or doubled,
        # and the daemon's copy is byte-identical to the agent's log.
        stored = await self.read_all(cid)
        lines = stored.count(b"\n")
        self.assertGreater(len(stored), running["output_offset"] - 1)
        expected = b"".join(b"relhost-loop line %d\n" % i for i in range(lines))
        self.assertTrue(stored == expected, f"stored output differs: {stored[-200:]!r}")

        # The daemon's retry: the same command_id sent to the agent again.
        config = await self.agent_config()
        client = AgentClient(
            host=agent["host"],
            port=agent["rpc_port"],
            rpc_path=agent["rpc_path"],
            token=config["agent_token"],
            fingerprint=agent["cert_fingerprint"],
            reactor=reactor,
        )
        self.addCleanup(client.close)
        params = {"command_id": final["command_uid"], "command": "/bin/sh", "args": args}
        again = await client.call("execute_command", params)
        self.assertEqual(
            again, {"status": "failed", "command_id": final["command_uid"], "duplicate": True}
        )
        logged = await client.call(
            "get_command_log", {"command_id": final["command_uid"], "offset": 0}
        )
        self.assertTrue(logged["is_final"])
        agent_log = base64.b64decode(logged["log_data"])
        while True:
            more = await client.call(
                "get_command_log",
                {"command_id": final["command_uid"], "offset": logged["new_offset"]},
            )
            if not more["log_data"]:
                break
            agent_log += base64.b64decode(more["log_data"])
            logged = more
        self.assertTrue(agent_log == stored, "the daemon's copy differs from the agent's log")
        # Positive control: a new id with the same command does run, once.
        control = dict(params, command_id="relhost-control", args=["-c", f"echo run >> {marker}"])
        started = await client.call("execute_command", control)
        self.assertNotIn("duplicate", started)
        deadline = reactor.seconds() + DEADLINE
        while reactor.seconds() < deadline:
            chunk = await client.call(
                "get_command_log", {"command_id": "relhost-control", "offset": 0, "wait": 5}
            )
            if chunk["is_final"]:
                break
        self.assertEqual(chunk["result"]["return_code"], 0, chunk)
        self.assertEqual(_runs(host_marker), 2, "the original run and the control, nothing else")
        again = await client.call("execute_command", params)
        self.assertTrue(again.get("duplicate"), again)
        self.assertEqual(_runs(host_marker), 2)
        log.info(
            "fault figures: kill -9 of the agent (pid {pid}) mid-command after {stored} bytes"
            " stored, {compared} bytes compared ({lines} lines);"
            " systemd restarts {restarts}; command {status}: {reason}; marker runs"
            " {runs} (1 + control)",
            pid=pid,
            stored=running["output_offset"],
            compared=len(stored),
            lines=lines,
            restarts=new_restarts - restarts,
            status=final["status"],
            reason=final["reason"],
            runs=_runs(host_marker),
        )

    # -- 2. kill -9 of myxd during an SSH install ----------------------------
    async def test_daemon_killed_during_install(self) -> None:
        first = await self.start_daemon(*FAST)
        code, created = await self.call(
            "POST",
            "/api/servers",
            {
                "name": self.host.name,
                "host": "127.0.0.1",
                "ssh_port": self.host.port,
                "username": "root",
                "auth": {"private_key": self.host.private_key},
                "sudo": {"mode": "none"},
            },
        )
        self.assertEqual(code, 201, created)
        sid = created["server"]["id"]
        # Kill while the remote venv is being made (the host's files are read
        # here, through its overlay mount): "python3 -m venv" has written the
        # venv's python but ensurepip has not put pip in it yet. The worst
        # moment for a later reinstall, mid-SSH in the longest step.
        venv = os.path.join(self.host.root, AGENT_DIR.lstrip("/"), "venv")
        deadline = reactor.seconds() + DEADLINE
        while (state := _venv_state(venv)) != "half made":
            self.assertEqual(state, "absent", "missed the moment: pip is in the venv already")
            self.assertLess(reactor.seconds(), deadline, "the venv was never made")
            self.assertIsNone(first.reason, first.text)
            await deferLater(reactor, 0.01, lambda: None)
        _kill_9(first)
        await first.ended
        assert first.reason is not None
        self.assertEqual(getattr(first.reason.value, "signal", None), 9, first.reason)

        second = await self.start_daemon(*FAST)
        srv = await self.until(
            f"/api/servers/{sid}", lambda s: s["status"] != "installing", "a clear state"
        )
        code, install = await self.call("GET", f"/api/servers/{sid}/install")
        done_steps = [s["step"] for s in install["steps"] if s["step"] != "dependencies"]
        self.assertEqual(srv["status"], "failed", srv)
        self.assertEqual(srv["status_reason"], "install interrupted by a daemon restart")
        self.assertFalse(srv["install_running"])
        code, install = await self.call("GET", f"/api/servers/{sid}/install")
        self.assertEqual(code, 200, install)
        self.assertEqual(install["status"], "failed", install)
        self.assertEqual(install["error"], "interrupted by a daemon restart")
        self.assertFalse(install["running"])
        self.assertEqual(
            [s["step"] for s in install["steps"] if s["status"] == "running"],
            [],
            "no step may read running forever",
        )

        code, started = await self.call("POST", f"/api/servers/{sid}/reinstall", {})
        self.assertEqual(code, 202, started)
        srv = await self.until(
            f"/api/servers/{sid}",
            lambda s: s["status"] in ("installed", "failed") and not s["install_running"],
            "the reinstall",
        )
        self.assertEqual(srv["status"], "installed", srv)
        srv = await self.until(
            f"/api/servers/{sid}", lambda s: s["agent_status"] == "online", "the agent online"
        )
        await self.run_ok(srv["agent_id"], "after-the-kill")
        # One agent process, run by systemd.
        pid, _ = await self.main_pid()
        self.assertGreater(pid, 0)
        self.assertNotIn("Traceback", second.text)
        log.info(
            "fault figures: kill -9 of myxd during an SSH install (steps done: {done};"
            " the venv made, pip not yet in it);"
            " server after restart: failed ({reason}); reinstall installed, agent online",
            done=",".join(done_steps),
            reason=install["error"],
        )

    # -- 3. auto-reinstall, end to end ---------------------------------------
    async def test_broken_agent_is_reinstalled_automatically(self) -> None:
        # Only settings lowered: the daemon is the one tap.py builds.
        daemon = await self.start_daemon(
            *FAST,
            "--reinstall-after-cycles",
            "2",
            "--rpc-timeout",
            "2",
            "--rpc-retry-max-attempts",
            "1",
            "--rpc-retry-base-delay",
            "0.2",
        )
        srv = await self.installed_server()
        sid, before = srv["id"], srv["agent"]
        config_before = await self.agent_config()
        code, events = await self.call("GET", "/api/events?limit=500")
        self.assertEqual(code, 200, events)
        self.assertEqual(self.events(events, "server.auto_reinstall"), [])

        broke_at = reactor.seconds()
        await self.host.sh(f"rm -rf {shlex.quote(AGENT_DIR)} && systemctl kill -s KILL {UNIT_NAME}")
        await self.until(
            f"/api/servers/{sid}", lambda s: s["agent_status"] == "offline", "the agent offline"
        )
        offline_at = reactor.seconds()
        srv = await self.until(
            f"/api/servers/{sid}",
            lambda s: s["install_running"] or s["status"] == "installing",
            "the automatic reinstall to start",
        )
        started_at = reactor.seconds()
        srv = await self.until(
            f"/api/servers/{sid}",
            lambda s: s["status"] in ("installed", "failed") and not s["install_running"],
            "the automatic reinstall to end",
        )
        self.assertEqual(srv["status"], "installed", srv)
        srv = await self.until(
            f"/api/servers/{sid}", lambda s: s["agent_status"] == "online", "the agent back"
        )
        online_at = reactor.seconds()

        code, install = await self.call("GET", f"/api/servers/{sid}/install")
        self.assertEqual((install["kind"], install["status"]), ("reinstall", "ok"), install)
        code, events = await self.call("GET", "/api/events?limit=500")
        auto = self.events(events, "server.auto_reinstall")
        self.assertEqual([e["outcome"] for e in auto], ["started"], auto)
        reinstalls = [
            e["details"]["actor"]
            for e in self.events(events, "server.reinstall")
            if e["outcome"] == "started"
        ]
        self.assertEqual(reinstalls, ["auto"], "one reinstall, started by the auto-reinstaller")
        self.assertEqual(auto[0]["details"]["attempt"], 1)
        self.assertEqual(auto[0]["details"]["agent_id"], before["id"])
        self.assertTrue(self.events(events, "agent.reinstall_requested"))

        # The same identity: agent id, port, path, certificate, token and secret key.
        after = srv["agent"]
        for key in ("id", "host", "rpc_port", "rpc_path", "cert_fingerprint"):
            self.assertEqual(after[key], before[key], key)
        config_after = await self.agent_config()
        self.assertEqual(config_after["agent_token"], config_before["agent_token"])
        self.assertEqual(config_after["secret_key"], config_before["secret_key"])
        await self.host.sh(f"test -x {AGENT_DIR}/venv/bin/python")
        await self.run_ok(after["id"], "reinstalled")
        self.assertNotIn("Traceback", daemon.text)
        log.info(
            "fault figures: agent broken for good; offline after {offline:.1f} s,"
            " reinstall started after {started:.1f} s, online again after {online:.1f} s;"
            " {attempts} automatic attempt(s); same agent id {agent_id} and certificate",
            offline=offline_at - broke_at,
            started=started_at - broke_at,
            online=online_at - broke_at,
            attempts=len(auto),
            agent_id=after["id"],
        )


def _runs(path: str) -> int:
    try:
        with open(path) as f:
            return f.read().count("run\n")
    except FileNotFoundError:
        return 0


def _venv_state(venv: str) -> str:
    """``absent``, ``half made`` (a python, no pip yet) or ``with pip``."""
    if glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "pip")):
        return "with pip"
    if os.path.exists(os.path.join(venv, "bin", "python")):
        return "half made"
    return "absent"


def _kill_9(proto: TwistdProcess) -> None:
    assert proto.transport is not None
    proto.transport.signalProcess("KILL")
