"""Injection through the real agent RPC (issue #12 §3, Injection).

A real agent process, over pinned TLS:
- ``execute_command`` arguments never pass through a shell: shell syntax in
  ``command`` or ``args`` reaches the program as literal bytes, and a
  would-be side effect (a file a shell would create) never appears; the same
  text run with an explicit ``sh -c`` does create it (the positive control).
- ``execute_ansible`` playbook names cannot leave ``<deployment tool>/playbooks``
  (``..``, absolute paths, a symlink pointing out): -32602 every time.
- ``extra_vars`` cannot become ansible-playbook options: keys and values that
  look like options (``--syntax-check``, ``-e @file``) arrive as variables, and
  the playbook really runs its task.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile

from twisted.trial.unittest import TestCase

from tests.agent.test_agent_process import PLAYBOOK, read_until_final
from tests.agent.test_deploytool import exists, make_archive
from tests.support.agent_process import RunningAgent, start_agent
from tests.support.pinned_client import AgentRPCError

INVALID_PARAMS = -32602


class InjectionTests(TestCase):
    timeout = 300

    async def run_command(
        self, agent: RunningAgent, cid: str, command: str, args: list[str]
    ) -> bytes:
        started = await agent.call(
            "execute_command", {"command": command, "args": args, "command_id": cid}
        )
        self.assertEqual(started["status"], "running")
        data, result = await read_until_final(agent, cid)
        self.assertTrue(result["success"], result)
        return data

    async def test_arguments_never_reach_a_shell(self) -> None:
        agent = await start_agent(self)
        target = tempfile.mkdtemp(prefix="myx-inject-")
        self.addCleanup(os.rmdir, target)
        marker = os.path.join(target, "pwned")
        payloads = [
            f"$(touch {marker})",
            f"`touch {marker}`",
            f"; touch {marker}",
            f"| touch {marker}",
            f"&& touch {marker}",
            f"\ntouch {marker}\n",
            f"> {marker}",
            "$HOME ~ * ?",
        ]
        for i, payload in enumerate(payloads):
            out = await self.run_command(agent, f"inj-{i}", "printf", ["%s", payload])
            self.assertEqual(out, payload.encode(), payload)
            self.assertFalse(exists(marker), payload)
        # The whole command line as the program name is one (missing) program.
        await agent.call(
            "execute_command", {"command": f"true; touch {marker}", "command_id": "inj-x"}
        )
        _, result = await read_until_final(agent, "inj-x")
        self.assertFalse(result["success"], result)
        self.assertFalse(exists(marker))
        # Positive control: an explicit sh -c does run the shell syntax.
        await self.run_command(agent, "inj-sh", "sh", ["-c", f"true && touch {marker}"])
        self.assertTrue(exists(marker))
        os.unlink(marker)

    async def sync_tool(self, agent: RunningAgent) -> None:
        archive = make_archive(
            [
                ("file", "VERSION", b"1.0.0\n"),
                ("file", "playbooks/hello.yml", PLAYBOOK),
                ("file", "outside.yml", PLAYBOOK),
                ("symlink", "playbooks/out.yml", "../outside.yml"),
            ]
        )
        await agent.call(
            "sync_deployment_tool",
            {
                "archive": base64.b64encode(archive).decode(),
                "sha256": hashlib.sha256(archive).hexdigest(),
                "version": "1.0.0",
            },
        )

    async def test_playbook_names_stay_in_playbooks(self) -> None:
        agent = await start_agent(self)
        await self.sync_tool(agent)
        tool = agent.deployment_tool_dir
        names = [
            "../outside.yml",
            "playbooks/../../outside.yml",
            "../../../../../../etc/passwd",
            os.path.join(tool, "outside.yml"),
            os.path.join(tool, "playbooks", "hello.yml"),
            "/etc/passwd",
            "out.yml",
            "hello.yml\0.txt",
            "",
        ]
        for i, name in enumerate(names):
            with self.assertRaises(AgentRPCError, msg=name) as ctx:
                await agent.call("execute_ansible", {"playbook": name, "command_id": f"pb-{i}"})
            self.assertEqual(ctx.exception.code, INVALID_PARAMS, name)
            with self.assertRaises(AgentRPCError) as gone:
                await agent.call("get_command_log", {"command_id": f"pb-{i}", "offset": 0})
            self.assertEqual(gone.exception.code, -32004, name)

    async def test_extra_vars_never_become_options(self) -> None:
        agent = await start_agent(self)
        await self.sync_tool(agent)
        extra = {
            "who": "--syntax-check",
            "--list-tasks": "-e @/etc/passwd",
            "-C": True,
            "--check --diff": "--step",
        }
        started = await agent.call(
            "execute_ansible",
            {"playbook": "hello.yml", "extra_vars": extra, "command_id": "ev-1"},
        )
        self.assertEqual(started["status"], "running")
        data, result = await read_until_final(agent, "ev-1")
        self.assertTrue(result["success"], result)
        self.assertEqual(result["ansible"]["status"], "successful")
        # The task ran (no --syntax-check / --list-tasks / --check took effect)
        # and printed the option-looking value as a plain variable.
        self.assertIn(b"hello from --syntax-check", data)
        self.assertNotIn(b"root:x:0:0", data)
        self.assertNotIn(b"playbook: ", data)  # what --list-tasks/--syntax-check print
