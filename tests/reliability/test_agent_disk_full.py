"""Agent state dir full (issue #12 §2): a real agent whose state_dir is a tiny tmpfs.

A real agent process keeps its command records (markers, output logs, results)
in a state_dir on a 1 MiB tmpfs mounted for the test (needs root, as the
daemon's full-disk test does). The tmpfs is then filled to the last byte:

- a command that was already running when the disk filled, and writes output
  that cannot be stored, ends ``failed`` with a reason that says the disk is
  full, and the output that was stored before reads back intact;
- a command started while the disk is full is refused (or ends failed) with a
  reason that says so, never an "internal error";
- the agent stays up and answers health_check and get_status all along;
- its log holds no traceback (a full disk is an expected condition: one line
  saying what could not be written, not a stack);
- once the filler is removed, a new command runs and its output is stored,
  without a restart.
"""

from __future__ import annotations

import base64
import os
import sys
from typing import Any

from twisted.logger import Logger

from tests.daemon.daemon_harness import DaemonTestCase, touch
from tests.reliability.test_disk_full import fill, mount_tmpfs
from tests.support.agent_process import start_agent
from tests.support.pinned_client import AgentClient, AgentRPCError

log = Logger()

# Writes a first line, then waits for the test's go file, then writes 200 KiB:
# the second part cannot be stored once the disk is full.
WRITER = (
    "import os, sys, time\n"
    "sys.stdout.write('first line\\n'); sys.stdout.flush()\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.05)\n"
    "for i in range(200):\n"
    "    sys.stdout.write(('%04d' % i) + 'x' * 1019 + '\\n'); sys.stdout.flush()\n"
)
FULL_WORDS = ("No space left", "disk", "full")


def says_full(text: str) -> bool:
    return any(word in text for word in FULL_WORDS)


class AgentDiskFullTests(DaemonTestCase):
    async def run_to_end(self, client: AgentClient, command_id: str) -> tuple[bytes, Any]:
        """Read a command's log from 0 to its final result; (output, result)."""
        out = b""
        offset = 0

        async def step() -> Any:
            return await client.call(
                "get_command_log", {"command_id": command_id, "offset": offset, "wait": 2}
            )

        for _ in range(600):
            page = await step()
            out += base64.b64decode(page["log_data"])
            offset = page["new_offset"]
            if page["is_final"]:
                return out, page["result"]
        self.fail(f"command {command_id} never ended")

    async def healthy(self, client: AgentClient) -> None:
        self.assertEqual(await client.call("health_check"), {"status": "ok"})
        status = await client.call("get_status")
        self.assertIsInstance(status, dict)

    async def test_full_state_dir(self) -> None:
        mount = mount_tmpfs(self, "1m")
        state = os.path.join(mount, "state")
        agent = await start_agent(self, config_overrides={"state_dir": state})
        client = agent.client()
        self.addCleanup(client.close)
        work = self.temp_dir()

        await client.call(
            "execute_command",
            {"command_id": "before", "command": "echo", "args": ["before"]},
        )
        out, result = await self.run_to_end(client, "before")
        self.assertEqual((out, result["success"]), (b"before\n", True), result)

        # A command that is running when the disk fills up.
        go = os.path.join(work, "go")
        await client.call(
            "execute_command",
            {
                "command_id": "running",
                "command": sys.executable,
                "args": ["-c", WRITER, go],
                "timeout": 120,
            },
        )
        await self.until(
            lambda: client.call(
                "get_command_log", {"command_id": "running", "offset": 0, "wait": 1}
            ),
            lambda p: p["new_offset"] > 0,
            "the running command's first line",
        )
        filled = fill(os.path.join(mount, "filler"))
        self.assertGreater(filled, 0)
        touch(go)
        out, result = await self.run_to_end(client, "running")
        self.assertTrue(out.startswith(b"first line\n"), out[:100])
        self.assertLess(len(out), 200 * 1024, "all the output fitted on a full disk")
        self.assertFalse(result["success"], result)
        running_error = str(result.get("error"))
        self.assertTrue(says_full(running_error), result)
        await self.healthy(client)

        # A command started on the full disk: refused, or failed, saying why.
        reason = ""
        try:
            started = await client.call(
                "execute_command",
                {"command_id": "while-full", "command": "echo", "args": ["while full"]},
            )
        except AgentRPCError as e:
            reason = str(e.message)
            self.assertNotIn("internal error", reason)
        else:
            self.assertIn(started["status"], ("running", "failed"), started)
            _, result = await self.run_to_end(client, "while-full")
            self.assertFalse(result["success"], result)
            reason = str(result.get("error"))
        self.assertTrue(says_full(reason), reason)
        await self.healthy(client)
        self.assertTrue(agent.running, "the agent exited on a full disk")

        # Space again: a new command runs and its output is stored.
        os.unlink(os.path.join(mount, "filler"))
        await client.call(
            "execute_command",
            {"command_id": "after", "command": "echo", "args": ["after"]},
        )
        out, result = await self.run_to_end(client, "after")
        self.assertEqual((out, result["success"]), (b"after\n", True), result)
        await self.healthy(client)
        text = agent.log_text()
        self.assertNotIn("Traceback", text)
        log.info(
            "fault figures: agent state_dir full, {filled} filler bytes; running command"
            " failed: {running!r}; new command: {reason!r}",
            filled=filled,
            running=running_error,
            reason=reason,
        )
