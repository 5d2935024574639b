"""Process faults (issue #12 §2): ``kill -9`` of a real myxd while commands stream.

The daemon is a real ``twistd -n myxd`` from the wheel's venv
(tests/support/installed.py), the agents real agent processes. The daemon is
SIGKILLed while 20 commands are writing output, then started again on the same
data dir: every command's stored output must be byte-identical to what the
process wrote (nothing lost, nothing doubled), each command ran once (a marker
file), and ``PRAGMA integrity_check`` of the store is ``ok`` right after the
kill and at the end. Waits are on conditions.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from myxd.tap import DB_FILE_NAME
from tests.daemon.api_helpers import TOKEN
from tests.daemon.daemon_harness import DaemonTestCase
from tests.daemon.test_plugin import Daemon as TwistdProcess
from tests.reliability.harness import SCRIPT, expected_output, marker_runs
from tests.support import installed
from tests.support.agent_process import start_agent

log = Logger()

COMMANDS = 20
RECORDS = 2400  # 2400 * 265 bytes = 636,000 bytes per command
PAUSE = 0.4  # 64 records per pause: about 15 s of output per command


def integrity(db_path: str) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


class _Base:
    """Where the test's API helpers look for the daemon's URL."""

    base = ""


class TwistdTestCase(DaemonTestCase):
    """A real ``twistd -n myxd`` from the wheel on ``self.data_dir`` (no tests here)."""

    root = ""  # the daemon's working directory; set by each test

    def spawn_daemon(self) -> tuple[TwistdProcess, Any]:
        proto = TwistdProcess()
        twistd = installed.script("twistd")
        argv = [
            twistd,
            "--nodaemon",
            "--pidfile=",
            "myxd",
            "--data-dir",
            self.data_dir,
            "--api",
            "tcp:0:interface=127.0.0.1",
            "--admin-token",
            TOKEN,
            "--heartbeat-min-interval",
            "0.5",
            "--heartbeat-max-interval",
            "1",
            "--log-poll-interval",
            "0.2",
            "--log-poll-wait",
            "1",
        ]
        transport = self.reactor.spawnProcess(
            proto, twistd, argv, env=installed.env(), path=self.root
        )

        async def stop() -> None:
            if proto.reason is None:
                transport.signalProcess("KILL")
                await proto.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return proto, transport

    async def start(self) -> tuple[TwistdProcess, Any]:
        proto, transport = self.spawn_daemon()
        m = await proto.wait_for(r"myxd admin API listening on 127\.0\.0\.1:(\d+)")
        base = _Base()
        base.base = f"http://127.0.0.1:{m.group(1)}"
        self.daemon = base  # type: ignore[assignment]
        return proto, transport


class DaemonKillTests(TwistdTestCase):
    async def test_kill_9_while_20_commands_stream(self) -> None:
        self.root = self.temp_dir()
        self.addCleanup(self.pool.closeCachedConnections)
        first, transport = await self.start()
        agents = [await start_agent(self) for _ in range(2)]
        ids = [await self.adopt(a) for a in agents]
        runs: list[tuple[int, str]] = []
        for i in range(COMMANDS):
            marker = os.path.join(self.temp_dir(), "runs")
            code, body = await self.api(
                "POST",
                f"/api/agents/{ids[i % len(ids)]}/commands",
                {
                    "command": sys.executable,
                    "args": ["-c", SCRIPT, marker, str(RECORDS), str(PAUSE)],
                    "timeout": 300,
                },
            )
            self.assertEqual(code, 201, body)
            runs.append((int(body["id"]), marker))

        # Kill once every command has output stored and none has finished: the
        # kill lands in the middle of every stream.
        async def progress() -> list[tuple[str, int]]:
            states = []
            for cid, _ in runs:
                code, body = await self.api("GET", f"/api/commands/{cid}?max_bytes=1")
                self.assertEqual(code, 200)
                states.append((str(body["status"]), int(body["output_offset"])))
            return states

        await self.until(
            progress,
            lambda cs: all(size > 0 for _, size in cs),
            "every command to have stored output",
        )
        before = await progress()
        self.assertTrue(all(status == "running" for status, _ in before), before)
        stored_at_kill = sum(size for _, size in before)
        transport.signalProcess("KILL")
        await first.ended
        assert first.reason is not None
        self.assertEqual(getattr(first.reason.value, "signal", None), 9, first.reason)
        db_path = os.path.join(self.data_dir, DB_FILE_NAME)
        self.assertEqual(integrity(db_path), "ok")

        await self.pool.closeCachedConnections()
        second, _ = await self.start()
        compared = 0
        for cid, marker in runs:
            final = await self.wait_final(cid)
            self.assertEqual(final["status"], "success", final["reason"])
            out = await self.read_all(cid)
            self.assertEqual(len(out), RECORDS * 265, cid)
            self.assertTrue(out == expected_output(RECORDS), f"command {cid}: output differs")
            self.assertEqual(marker_runs(marker), 1, cid)
            compared += len(out)
        self.assertEqual(integrity(db_path), "ok")
        self.assertNotIn("Traceback", second.text)
        log.info(
            "fault figures: kill -9 of myxd {commands} commands, {stored} bytes stored"
            " at the kill, {compared} bytes compared",
            commands=COMMANDS,
            stored=stored_at_kill,
            compared=compared,
        )
