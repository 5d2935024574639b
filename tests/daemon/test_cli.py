"""The `myx` CLI end to end: a real daemon service tree and a real agent, with the CLI
run as its own process (it blocks on urllib, so it must never share the test's reactor)."""

from __future__ import annotations

from typing import Any

from twisted.internet.utils import getProcessOutputAndValue

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
        self.assertEqual(lines[0].split()[:4], ["ID", "HOST", "PORT", "STATUS"])
        self.assertEqual(
            lines[1].split()[:4], [str(agent_id), "127.0.0.1", str(agent.port), "online"]
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
        for agent_id in ids:
            self.assertIn(f"--- agent {agent_id} ", text)
        self.assertEqual(text.count("fan-out\n"), 2)

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
