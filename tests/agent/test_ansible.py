"""execute_ansible with a real ansible-runner and ansible-playbook, on localhost
with connection=local, through CommandRunner (no HTTP)."""

import base64
import json
import os
import shutil
import sys
from typing import Any, Dict

from twisted.internet.task import Clock

from myx_agent import ansible_executor
from myx_agent import process as proc
from myx_agent.commands import CommandRunner
from myx_agent.errors import COMMAND_ID_CONFLICT, INVALID_PARAMS, RPCError
from myx_agent.execution import MARKER_ENV
from tests.agent.test_commands import (
    RunnerTestCase,
    exists,
    kill_quietly,
    pid_dead,
    read_text,
    wait_for,
)

PING = """\
- hosts: localhost
  gather_facts: false
  tasks:
    - name: ping
      ping:
    - name: say
      debug:
        msg: "hello {{ who }}"
"""

GREET = """\
- hosts: all
  gather_facts: false
  tasks:
    - debug:
        msg: "greeting={{ greeting }}"
"""

# The task's shell writes its pid, then becomes `sleep`: a process three levels
# below ansible-playbook, inside a worker that left its process group (setsid).
SLEEP = """\
- hosts: localhost
  gather_facts: false
  tasks:
    - name: sleep
      shell: "echo $$ > {{ pidfile }}.tmp && mv {{ pidfile }}.tmp {{ pidfile }} && exec sleep 600"
"""


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class AnsibleTests(RunnerTestCase):
    kill_grace = 2.0

    def setUp(self) -> None:
        self.tool = os.path.abspath(self.mktemp())
        write(os.path.join(self.tool, "playbooks", "ping.yml"), PING)
        write(os.path.join(self.tool, "playbooks", "sleep.yml"), SLEEP)
        write(os.path.join(self.tool, "playbooks", "sub", "greet.yml"), GREET)
        write(os.path.join(self.tool, "outside.yml"), PING)
        self.state = os.path.abspath(self.mktemp())

    def runner(self, state: str = "", **kwargs: Any) -> CommandRunner:
        runner = CommandRunner(
            state or self.state, deployment_tool_dir=self.tool, kill_grace=self.kill_grace, **kwargs
        )
        runner.startService()
        self.addCleanup(runner.stopService)
        return runner

    def pidfile(self) -> str:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        return os.path.join(d, "pid")

    async def sleeping_pid(self, pidfile: str) -> int:
        await wait_for(lambda: exists(pidfile), timeout=90)
        pid = int(read_text(pidfile))
        self.addCleanup(kill_quietly, pid)
        self.assertTrue(proc.is_alive(pid))
        return pid

    def marker_of(self, runner: CommandRunner, command_id: str) -> str:
        info = json.loads(
            read_text(os.path.join(runner._state_dir, "commands", "c-" + command_id, "proc.json"))
        )
        marker: str = info["env_marker"]
        return marker

    async def test_real_run_with_live_log_and_stats(self) -> None:
        runner = self.runner()
        res = runner.execute_ansible("an-1", "ping.yml", {"who": "world"}, None)
        self.assertEqual(res, {"status": "running", "command_id": "an-1"})
        offset = 0
        responses = []
        while True:
            r = await runner.get_command_log("an-1", offset, 10, 1048576)
            data = base64.b64decode(r["log_data"])
            if data:
                self.assertEqual(r["log_type"], "stdout")
                responses.append((data, r["is_final"]))
            offset = r["new_offset"]
            if r["is_final"]:
                result: Dict[str, Any] = r["result"]
                break
        log = b"".join(d for d, _ in responses).decode()
        # Live: the play header arrived on its own, long before the recap.
        self.assertIn("PLAY [localhost]", responses[0][0].decode())
        self.assertNotIn("PLAY RECAP", responses[0][0].decode())
        self.assertFalse(responses[0][1])
        self.assertIn("TASK [ping]", log)
        self.assertIn('"msg": "hello world"', log)
        self.assertIn("PLAY RECAP", log)
        self.assertTrue(result["success"], result)
        self.assertEqual(result["return_code"], 0)
        self.assertEqual(result["kind"], "ansible")
        self.assertFalse(result["timed_out"] or result["cancelled"] or result["interrupted"])
        ansible = result["ansible"]
        self.assertEqual(ansible["status"], "successful")
        self.assertEqual(ansible["rc"], 0)
        self.assertEqual(ansible["stats"]["ok"], {"localhost": 2})
        self.assertEqual(ansible["stats"]["failures"], {})
        self.assertEqual(base64.b64decode(result["stdout"]).decode(), log)
        # extra_vars never reach a command line, and their file is gone.
        pdd = os.path.join(runner._state_dir, "commands", "c-an-1", "ansible")
        self.assertFalse(exists(os.path.join(pdd, "env", "extravars")))
        # The walk below must check something: the dir exists and holds files.
        self.assertTrue(exists(os.path.join(pdd, "artifacts")), pdd)
        walked = 0
        for root, _dirs, files in os.walk(os.path.join(pdd, "artifacts")):
            for name in files:
                walked += 1
                self.assertNotIn("world", read_text(os.path.join(root, name)))
        self.assertGreater(walked, 0)
        # At most once.
        again = runner.execute_ansible("an-1", "ping.yml", {"who": "world"}, None)
        self.assertEqual(again, {"status": "success", "command_id": "an-1", "duplicate": True})
        err = self.assertRaises(
            RPCError, runner.execute_command, "an-1", "/bin/true", [], None, None, None
        )
        self.assertEqual(err.code, COMMAND_ID_CONFLICT)

    async def test_inventory_and_config_from_the_tool(self) -> None:
        write(
            os.path.join(self.tool, "inventory", "localhost.ini"),
            f"localhost ansible_connection=local ansible_python_interpreter={sys.executable} "
            "greeting=from-inventory\n",
        )
        write(os.path.join(self.tool, "ansible.cfg"), "[defaults]\nforks = 3\n")
        runner = self.runner()
        runner.execute_ansible("an-2", "sub/greet.yml", {}, None)
        segments, result = await self.read_all(runner, "an-2")
        log = b"".join(d for _, d in segments).decode()
        self.assertIn("greeting=from-inventory", log)
        self.assertTrue(result["success"], log)

    async def test_failed_playbook(self) -> None:
        write(
            os.path.join(self.tool, "playbooks", "fail.yml"),
            "- hosts: localhost\n  gather_facts: false\n  tasks:\n    - fail:\n        msg: nope\n",
        )
        runner = self.runner()
        runner.execute_ansible("an-3", "fail.yml", {}, None)
        _, result = await self.read_all(runner, "an-3")
        self.assertFalse(result["success"])
        self.assertEqual(result["ansible"]["status"], "failed")
        self.assertEqual(result["ansible"]["stats"]["failures"], {"localhost": 1})
        self.assertNotEqual(result["return_code"], 0)

    def make_playbook(self) -> str:
        """playbooks/make.yml, which writes a file; returns where (not made yet)."""
        write(
            os.path.join(self.tool, "playbooks", "make.yml"),
            "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
            "    - name: make a file\n      copy:\n"
            '        dest: "{{ target }}"\n        content: "made\\n"\n',
        )
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        return os.path.join(d, "made-by-ansible")

    async def test_check_mode_changes_nothing_and_says_what_would(self) -> None:
        target = self.make_playbook()
        runner = self.runner()
        runner.execute_ansible("an-check", "make.yml", {"target": target}, None, True)
        segments, result = await self.read_all(runner, "an-check")
        log = b"".join(d for _, d in segments).decode()
        self.assertTrue(result["success"], log)
        self.assertEqual(result["ansible"]["stats"]["changed"], {"localhost": 1}, log)
        self.assertIn("+made", log)  # --diff: what would change
        self.assertFalse(exists(target))
        # The same playbook for real makes it: the check above changed nothing.
        runner.execute_ansible("an-real", "make.yml", {"target": target}, None)
        _, result = await self.read_all(runner, "an-real")
        self.assertTrue(result["success"])
        self.assertEqual(read_text(target), "made\n")

    def test_playbook_must_resolve_inside_playbooks(self) -> None:
        os.symlink("../outside.yml", os.path.join(self.tool, "playbooks", "escape.yml"))
        os.symlink("/etc/hostname", os.path.join(self.tool, "playbooks", "abs-link.yml"))
        os.symlink("..", os.path.join(self.tool, "playbooks", "up"))
        os.symlink("ping.yml", os.path.join(self.tool, "playbooks", "alias.yml"))
        runner = self.runner()
        for bad in [
            "../outside.yml",
            "sub/../../outside.yml",
            os.path.join(self.tool, "playbooks", "ping.yml"),
            "escape.yml",
            "abs-link.yml",
            "up/outside.yml",
            "missing.yml",
            "sub",
            "",
            ".",
        ]:
            err = self.assertRaises(RPCError, runner.execute_ansible, "bad-1", bad, {}, None)
            self.assertEqual(err.code, INVALID_PARAMS, bad)
            self.assertIn("playbook", err.message)
        # (extra_vars that are not an object are refused by the method table,
        # tests.agent.test_rpc_server.MethodTableTests.test_bad_params.)
        # Nothing was recorded for the rejected id.
        self.assertEqual(os.listdir(os.path.join(runner._state_dir, "ids")), [])
        # A symlink that stays inside is fine.
        self.assertEqual(
            ansible_executor.resolve_playbook(self.tool, "alias.yml"),
            os.path.realpath(os.path.join(self.tool, "playbooks", "ping.yml")),
        )

    async def test_timeout_kills_the_whole_tree(self) -> None:
        # The 15 s timeout runs on the test's Clock: it fires when the test says,
        # after the task's pid is known, however long ansible takes to get there.
        clock = Clock()
        runner = self.runner(clock=clock)
        pidfile = self.pidfile()
        runner.execute_ansible("an-to", "sleep.yml", {"pidfile": pidfile}, 15.0)
        pid = await self.sleeping_pid(pidfile)
        marker = self.marker_of(runner, "an-to")
        clock.advance(14.9)
        self.assertTrue(proc.is_alive(pid), "killed before its timeout")
        clock.advance(0.1)  # the timeout
        _, result = await self.read_all(runner, "an-to")
        self.assertTrue(result["timed_out"])
        self.assertFalse(result["cancelled"])
        self.assertFalse(result["success"])
        self.assertEqual(result["ansible"]["status"], "timeout")
        await wait_for(lambda: pid_dead(pid))
        await wait_for(lambda: not proc.pids_with_env_marker(MARKER_ENV, marker))

    async def test_cancel_kills_the_whole_tree(self) -> None:
        runner = self.runner()
        pidfile = self.pidfile()
        runner.execute_ansible("an-cx", "sleep.yml", {"pidfile": pidfile}, None)
        pid = await self.sleeping_pid(pidfile)
        marker = self.marker_of(runner, "an-cx")
        self.assertTrue(proc.pids_with_env_marker(MARKER_ENV, marker))
        self.assertEqual(
            runner.cancel_command("an-cx"),
            {"command_id": "an-cx", "cancelled": True, "status": "running"},
        )
        _, result = await self.read_all(runner, "an-cx")
        self.assertTrue(result["cancelled"])
        self.assertFalse(result["success"])
        self.assertEqual(result["ansible"]["status"], "canceled")
        await wait_for(lambda: pid_dead(pid))
        await wait_for(lambda: not proc.pids_with_env_marker(MARKER_ENV, marker))

    async def test_crash_mid_run_is_interrupted_and_its_tree_killed(self) -> None:
        runner = self.runner()
        pidfile = self.pidfile()
        runner.execute_ansible("an-cr", "sleep.yml", {"pidfile": pidfile}, None)
        pid = await self.sleeping_pid(pidfile)
        marker = self.marker_of(runner, "an-cr")
        copy = self.mktemp()
        shutil.copytree(self.state, copy)
        after = self.runner(copy)
        _, result = await self.read_all(after, "an-cr")
        self.assertTrue(result["interrupted"])
        self.assertEqual(result["ansible"]["status"], "failed")
        self.assertIsNone(result["return_code"])
        await wait_for(lambda: pid_dead(pid))
        await wait_for(lambda: not proc.pids_with_env_marker(MARKER_ENV, marker))
        # The first runner's run ends too (its processes were killed).
        _, original = await self.read_all(runner, "an-cr")
        self.assertFalse(original["success"])

    async def test_missing_ansible_playbook(self) -> None:
        self.patch(ansible_executor, "find_ansible_playbook", lambda: None)
        runner = self.runner()
        runner.execute_ansible("an-nf", "ping.yml", {}, None)
        _, result = await self.read_all(runner, "an-nf")
        self.assertFalse(result["success"])
        self.assertIn("ansible-playbook not found", result["error"])
        self.assertEqual(result["ansible"]["status"], "failed")
