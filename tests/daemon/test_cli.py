"""The `myx` CLI end to end: a real daemon service tree and a real agent, with the CLI
run as its own process (it blocks on urllib, so it must never share the test's reactor)."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from myxd.cli.client import _api_error
from myxd.cli.deploy import target_line
from myxd.cli.words import explain, operator_words
from tests.daemon.api_helpers import TOKEN
from tests.daemon.daemon_harness import DaemonTestCase
from tests.support import installed
from tests.support.agent_process import free_port, start_agent


class CLITest(DaemonTestCase):
    timeout = 300

    async def myx(
        self, *argv: str, token: str | None = TOKEN, env: dict[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        # The installed console script, outside the checkout.
        full_env = installed.env()
        for name in ("MYX_TOKEN", "MYX_API"):
            full_env.pop(name, None)
        if token is not None:
            full_env["MYX_TOKEN"] = token
        full_env.update(env or {})
        out, err, code = await getProcessOutputAndValue(
            installed.script("myx"),
            ["--api", self.daemon.base, *argv],
            env=full_env,
            path=self.temp_dir(),
            reactor=self.reactor,
        )
        return code, out, err

    async def adopted_agent(self) -> tuple[Any, int]:
        await self.daemon.start()
        agent = await start_agent(self)
        return agent, await self.adopt(agent)

    async def test_agents_run_and_logs(self) -> None:
        agent, agent_id = await self.adopted_agent()
        code, out, err = await self.myx("agents")
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0].split()[:6], ["ID", "NAME", "HOST", "PORT", "STATUS", "TAGS"])
        self.assertEqual(
            lines[1].split()[:6],
            [str(agent_id), "127.0.0.1", "127.0.0.1", str(agent.port), "online", "-"],
        )

        # stdout and stderr come back on their own streams; the exit code passes through.
        script = "printf 'out-1\\n'; printf 'err-1\\n' >&2; printf 'out-2\\n'; exit 3"
        code, out, err = await self.myx("run", str(agent_id), "--", "/bin/sh", "-c", script)
        self.assertEqual(code, 3)
        self.assertEqual(out, b"out-1\nout-2\n")
        self.assertIn(b"err-1\n", err)
        self.assertIn(b"failed (exit code 3)", err)

        code, out, err = await self.myx(
            "run", str(agent_id), "--no-follow", "--", "/bin/echo", "hello"
        )
        self.assertEqual(code, 0, err)
        command_id = int(out.strip())
        final = await self.wait_final(command_id)
        self.assertEqual(final["status"], "success")
        code, out, err = await self.myx("logs", str(command_id))
        self.assertEqual((code, out), (0, b"hello\n"), err)

    async def test_run_on_all_agents(self) -> None:
        await self.daemon.start()
        agents = [await start_agent(self) for _ in range(2)]
        ids = [await self.adopt(a) for a in agents]
        code, out, err = await self.myx("run", "all", "--", "/bin/echo", "fan-out")
        self.assertEqual(code, 0, err)
        text = out.decode()
        # Adopted agents without a name of their own are named by their host.
        for agent_id in ids:
            self.assertRegex(
                text, rf"--- 127\.0\.0\.1 \(agent {agent_id}, command \d+, success, exit 0\)\n"
            )
        self.assertEqual(text.count("fan-out\n"), 2)
        self.assertNotIn("None", text + err.decode())

    async def test_run_all_failure_prints_reason_and_name_never_none(self) -> None:
        await self.daemon.start()
        ids = [await self.adopt(await start_agent(self)) for _ in range(2)]
        code, out, err = await self.myx("run", "all", "--", "/nonexistent/program", "x")
        self.assertEqual(code, 1, err)
        text = out.decode() + err.decode()
        self.assertNotIn("None", text)
        for agent_id in ids:
            line = next(ln for ln in out.decode().splitlines() if f"(agent {agent_id}," in ln)
            self.assertRegex(
                line, rf"^--- 127\.0\.0\.1 \(agent {agent_id}, command \d+, failed, exit -\): "
            )  # and the agent's reason after it
            self.assertIn("/nonexistent/program", line)

    async def test_run_sh_runs_a_shell_command(self) -> None:
        _agent, agent_id = await self.adopted_agent()
        code, out, err = await self.myx(
            "run", str(agent_id), "--sh", "printf 'a b\\nc\\n' | tr a-z A-Z | grep B"
        )
        self.assertEqual((code, out), (0, b"A B\n"), err)
        code, out, err = await self.myx(
            "run", str(agent_id), "--no-follow", "--sh", "echo $((6 * 7))"
        )
        self.assertEqual(code, 0, err)
        final = await self.wait_final(int(out.strip()))
        self.assertEqual((final["command"], final["args"]), ("/bin/sh", ["-c", "echo $((6 * 7))"]))
        self.assertEqual(await self.read_all(final["id"]), b"42\n")
        # Both forms at once is a usage error, sent nowhere.
        code, _, err = await self.myx("run", str(agent_id), "--sh", "true", "--", "true")
        self.assertEqual(code, 2)
        self.assertIn(b"either --sh", err)

    async def test_no_token_says_where_it_looked_before_any_request(self) -> None:
        # Nothing listens on this port: had the CLI sent a request, it would say
        # "cannot reach" (exit 3). It must stop before, with where it looked.
        api = f"http://127.0.0.1:{free_port()}"
        code, out, err = await self.myx("--api", api, "agents", token=None)
        self.assertEqual(code, 2, err)
        message = err.decode()
        self.assertIn("no admin token found", message)
        self.assertIn("--token", message)
        self.assertIn("MYX_TOKEN", message)
        self.assertIn(os.path.join("myxd-data", "admin-token"), message)
        self.assertNotIn("cannot reach", message)
        self.assertEqual(len(message.strip().splitlines()), 1, message)

    async def test_agent_errors_in_operator_words_raw_in_json_and_verbose(self) -> None:
        _agent, agent_id = await self.adopted_agent()
        code, out, err = await self.myx("ansible", str(agent_id), "nope.yml")
        self.assertEqual(code, 1, err)
        words = err.decode()
        self.assertNotIn("JSON-RPC", words)
        self.assertNotIn("-326", words)
        self.assertIn("the agent refused the request", words)
        self.assertIn("nope.yml", words)
        # -v keeps the raw text with its code after the words.
        code, out, err = await self.myx("-v", "ansible", str(agent_id), "nope.yml")
        self.assertEqual(code, 1, err)
        self.assertIn("the agent refused the request", err.decode())
        self.assertRegex(
            err.decode(), r"\[raw: .*JSON-RPC error -32602: invalid params: playbook not found"
        )
        # --json prints the records as the API has them: the raw reason, code included.
        code, out, err = await self.myx(
            "run", str(agent_id), "--json", "--", "/nonexistent/program"
        )
        self.assertEqual(code, 1, err)
        records = json.loads(out)
        self.assertEqual(len(records), 1)
        self.assertEqual(records[0]["agent_id"], agent_id)
        self.assertEqual(records[0]["agent_name"], "127.0.0.1")
        self.assertEqual(records[0]["status"], "failed")
        self.assertTrue(records[0]["reason"])

    async def test_names_tags_commands_list_events_and_cancelled(self) -> None:
        """Issue #9 §4: tag targets, the commands list with filters, event filters,
        and a cancelled command shown as cancelled."""
        await self.daemon.start()
        ids = [await self.adopt(await start_agent(self)) for _ in range(2)]
        code, body = await self.api(
            "PATCH", f"/api/agents/{ids[1]}", {"name": "edge-1", "tags": ["de"]}
        )
        self.assertEqual(code, 200, body)
        code, out, err = await self.myx("agents", "--tag", "de")
        self.assertEqual(code, 0, err)
        rows = out.decode().splitlines()[1:]
        self.assertEqual([r.split()[:2] for r in rows], [[str(ids[1]), "edge-1"]])
        code, out, err = await self.myx("agents", "--search", "EDGE")
        self.assertEqual((code, len(out.decode().splitlines())), (0, 2), err)
        # A tag target runs on the tagged agent only, named in the heading.
        code, out, err = await self.myx("run", "tag:de", "--sh", "echo tagged | tr a-z A-Z")
        self.assertEqual(code, 0, err)
        self.assertRegex(
            out.decode(),
            rf"^--- edge-1 \(agent {ids[1]}, command \d+, success, exit 0\)\nTAGGED\n$",
        )
        code, out, err = await self.myx("run", "tag:nobody", "--", "true")
        self.assertEqual(code, 2)
        self.assertIn("no agent has the tag 'nobody'", err.decode())
        # Cancel a long command: it is "cancelled", not "failed".
        code, out, err = await self.myx("run", str(ids[0]), "--no-follow", "--", "sleep", "60")
        self.assertEqual(code, 0, err)
        command_id = int(out.strip())
        for _ in range(100):
            if (await self.command(command_id))["attempts"]:
                break
            await deferLater(self.reactor, 0.1, lambda: None)
        code, out, err = await self.myx("cancel", str(command_id))
        self.assertEqual(code, 0, err)
        final = await self.wait_final(command_id)
        self.assertEqual(final["status"], "cancelled")
        code, out, err = await self.myx("commands", "--status", "cancelled")
        self.assertEqual(code, 0, err)
        rows = out.decode().splitlines()
        self.assertEqual(rows[0].split()[:4], ["ID", "AGENT", "KIND", "STATUS"])
        self.assertEqual(len(rows), 2, out)
        self.assertIn(f"{command_id} ", rows[1])
        self.assertIn(" cancelled ", rows[1])
        self.assertIn("sleep 60", rows[1])
        code, out, err = await self.myx("commands", "--agent", str(ids[1]), "--search", "TR A-Z")
        self.assertEqual((code, len(out.decode().splitlines())), (0, 2), out)
        code, out, err = await self.myx("commands", "--search", "no-such-thing", "--json")
        self.assertEqual((code, json.loads(out)["total"]), (0, 0), err)
        code, out, err = await self.myx("events", "--kind", "command.cancel")
        self.assertEqual(code, 0, err)
        rows = out.decode().splitlines()[1:]
        self.assertEqual(len(rows), 1, out)
        self.assertIn("command.cancel", rows[0])
        code, out, err = await self.myx("events", "--target", "no-such-target")
        self.assertEqual((code, len(out.decode().splitlines())), (0, 1), err)  # the header

    async def test_errors_are_one_line_with_exit_codes(self) -> None:
        await self.daemon.start()
        code, out, err = await self.myx("agents", token="wrong-token-wrong-token")
        self.assertEqual(code, 2)
        self.assertIn(b"HTTP 401", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertNotIn(b"wrong-token-wrong-token", err + out)

        code, _, err = await self.myx("agent", "999")
        self.assertEqual(code, 2)
        self.assertIn(b"HTTP 404", err)

        # "--timeout x" after "--" belongs to the remote command; agent 1 is unknown.
        code, _, err = await self.myx("run", "1", "--", "true", "--timeout", "x")
        self.assertEqual(code, 2)
        self.assertIn(b"HTTP 404", err)

        code, _, err = await self.myx(
            "adopt",
            "--host",
            "127.0.0.1",
            "--rpc-port",
            "1",
            "--rpc-path",
            "p" * 20,
            "--fingerprint",
            "zz",
            "--agent-token",
            "t" * 20,
        )
        self.assertEqual(code, 2)
        self.assertIn(b"field: cert_fingerprint", err)

        # Nothing listens on this port: "cannot reach", exit 3, no traceback.
        code, _, err = await self.myx("--api", f"http://127.0.0.1:{free_port()}", "agents")
        self.assertEqual(code, 3)
        self.assertIn(b"cannot reach myxd", err)
        self.assertNotIn(b"Traceback", err)


class OperatorWordsTests(unittest.SynchronousTestCase):
    """The CLI's rewording of agent errors, without a daemon."""

    def test_known_code_becomes_words_and_keeps_the_detail(self) -> None:
        raw = "agent 3: JSON-RPC error -32602: invalid params: playbook not found: x.yml"
        self.assertEqual(
            operator_words(raw), "agent 3: the agent refused the request: playbook not found: x.yml"
        )

    def test_unknown_code_and_empty_detail(self) -> None:
        self.assertEqual(
            operator_words("JSON-RPC error -32099: "), "the agent answered with error -32099"
        )

    def test_other_text_is_unchanged_and_verbose_adds_raw_only_when_reworded(self) -> None:
        self.assertEqual(explain("exit code 3", verbose=True), "exit code 3")
        raw = "JSON-RPC error -32000: busy"
        self.assertEqual(
            explain(raw, verbose=False),
            "the agent is busy (too many commands running); nothing was started: busy",
        )
        self.assertTrue(explain(raw, verbose=True).endswith(f" [raw: {raw}]"))

    def test_deploy_target_reason_in_words_raw_with_verbose(self) -> None:
        t = {
            "agent_id": 3,
            "agent_name": "de-1",
            "status": "failed",
            "changed": None,
            "ok": None,
            "failed": None,
            "command_id": None,
            "reason": "JSON-RPC error -32010: member escapes the target: ../x",
        }
        line = target_line(t)
        self.assertTrue(
            line.endswith(
                "failed       changed=- ok=- failed=-: the agent rejected the deployment"
                " tool archive: member escapes the target: ../x"
            ),
            line,
        )
        self.assertNotIn("JSON-RPC", line)
        self.assertTrue(target_line(t, verbose=True).endswith(f" [raw: {t['reason']}]"))

    def test_api_error_words_and_verbose(self) -> None:
        body = json.dumps({"error": "JSON-RPC error -32001: bad token"}).encode()
        self.assertEqual(
            _api_error(502, body),
            "myxd refused the request (HTTP 502): the agent rejected the daemon's token: bad token",
        )
        self.assertIn("[raw: JSON-RPC error -32001: bad token]", _api_error(502, body, True))
