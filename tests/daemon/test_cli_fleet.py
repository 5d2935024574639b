"""Issue #9 end to end: `myx adopt --name --tag`, `myx ansible tag:NAME` and
`myx deploy --agents tag:NAME` (and POST /api/deployments with "tag:NAME"), and
cancelled / timed_out commands as their own statuses in the CLI and in /metrics,
against a real daemon service tree and real agent processes running real
ansible-runner. The CLI runs from the installed wheel as its own process (it
blocks on urllib)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet.task import deferLater

from tests.daemon.api_helpers import parse_prometheus
from tests.daemon.daemon_harness import write_text
from tests.daemon.test_cli_deploy import InstalledCLITestCase, tool_agent


def fingerprint(agent: Any) -> str:
    return ":".join(agent.fingerprint[i : i + 2].upper() for i in range(0, 64, 2))


def read_or_none(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


class FleetCLITest(InstalledCLITestCase):
    timeout = 400

    async def adopt_cli(self, agent: Any, *extra: str) -> tuple[int, bytes, bytes]:
        token_file = os.path.join(self.temp_dir(), "agent-token")
        write_text(token_file, agent.token + "\n")
        return await self.myx(
            "adopt",
            "--host",
            agent.host,
            "--rpc-port",
            str(agent.port),
            # "=": a random path may begin with "-" (argparse would read an option).
            f"--rpc-path={agent.rpc_path}",
            "--fingerprint",
            fingerprint(agent),
            "--agent-token-file",
            token_file,
            *extra,
        )

    async def test_adopt_with_name_and_tags(self) -> None:
        await self.daemon.start()
        agent = await tool_agent(self)
        code, out, err = await self.adopt_cli(
            agent, "--name", "edge-7", "--tag", "DE", "--tag", "caddy", "--tag", "de"
        )
        self.assertEqual(code, 0, err)
        m = re.fullmatch(
            rf"agent (\d+) \(edge-7, tags caddy,de\) adopted at 127\.0\.0\.1:{agent.port}"
            r" \(online\)\n",
            out.decode(),
        )
        self.assertIsNotNone(m, out)
        assert m is not None
        agent_id = int(m.group(1))
        code, body = await self.api("GET", f"/api/agents/{agent_id}")
        self.assertEqual((body["name"], body["tags"]), ("edge-7", ["caddy", "de"]), body)
        code, out, err = await self.myx("agents", "--tag", "caddy")
        self.assertEqual(code, 0, err)
        rows = out.decode().splitlines()[1:]
        self.assertEqual([r.split()[:2] for r in rows], [[str(agent_id), "edge-7"]])
        # The audit row names what was adopted, never the agent's token.
        code, page = await self.api("GET", f"/api/events?kind=agent.adopt&target=agent:{agent_id}")
        (event,) = page["events"]
        self.assertEqual(event["actor"], "admin-api")
        self.assertEqual(
            event["details"],
            {
                "host": "127.0.0.1",
                "rpc_port": agent.port,
                "name": "edge-7",
                "tags": ["caddy", "de"],
            },
        )
        self.assertNotIn(agent.token, json.dumps(page))

        # A bad tag is the API's field error, one line, and adopts nothing.
        other = await tool_agent(self)
        code, out, err = await self.adopt_cli(other, "--tag", "no spaces")
        self.assertEqual(code, 2, out)
        self.assertIn("(field: tags[0])", err.decode())
        self.assertEqual(len(err.decode().strip().splitlines()), 1, err)
        code, page = await self.api("GET", "/api/agents")
        self.assertEqual([a["id"] for a in page["agents"]], [agent_id])
        # Without --name the agent is named by its host, with no tags.
        code, out, err = await self.adopt_cli(other)
        self.assertEqual(code, 0, err)
        self.assertIn("(127.0.0.1, tags -) adopted", out.decode())

    async def test_ansible_and_deploy_on_a_tag(self) -> None:
        await self.daemon.start()
        tagged = []
        for name in ("de-1", "de-2"):
            code, out, err = await self.adopt_cli(
                await tool_agent(self), "--name", name, "--tag", "de"
            )
            self.assertEqual(code, 0, err)
            tagged.append(int(out.split()[1]))
        code, out, err = await self.adopt_cli(await tool_agent(self), "--name", "us-1")
        self.assertEqual(code, 0, err)
        other = int(out.split()[1])

        # myx ansible on a tag: one real ansible-runner run per tagged agent, each
        # under its heading, in order; the untagged agent runs nothing.
        code, out, err = await self.myx("ansible", "tag:de", "ping.yml")
        self.assertEqual(code, 0, out + err)
        text = out.decode()
        sections = re.split(r"^--- ", text, flags=re.M)
        self.assertEqual(sections[0], "", text)
        self.assertEqual(len(sections), 3, text)
        for section, name, agent_id in zip(sections[1:], ("de-1", "de-2"), tagged):
            heading, _, body = section.partition("\n")
            self.assertRegex(
                heading, rf"^{name} \(agent {agent_id}, command \d+, success, exit 0\)$"
            )
            self.assertIn("TASK [Check that a module runs on the host]", body)
            self.assertRegex(body, r"localhost +: ok=2 +changed=0 .*failed=0")
        self.assertNotIn("None", text + err.decode())
        code, page = await self.api("GET", f"/api/agents/{other}/commands")
        self.assertEqual(page["commands"], [])
        code, page = await self.api("GET", "/api/commands?kind=ansible")
        self.assertEqual(sorted(c["agent_id"] for c in page["commands"]), tagged)

        # POST /api/deployments takes "tag:NAME" like POST /api/commands.
        code, body = await self.api(
            "POST", "/api/deployments", {"playbook": "ping.yml", "agents": "tag:nobody"}
        )
        self.assertEqual((code, body.get("field")), (400, "agents"), body)
        self.assertIn("no installed agent has the tag 'nobody'", body["error"])
        code, body = await self.api(
            "POST", "/api/deployments", {"playbook": "ping.yml", "agents": "tag:no spaces"}
        )
        self.assertEqual((code, body.get("field")), (400, "agents"), body)
        code, page = await self.api("GET", "/api/deployments")
        self.assertEqual(page["deployments"], [])

        # myx deploy --agents tag:de: the tagged agents only, each to success.
        code, out, err = await self.myx("deploy", "ping.yml", "--agents", "tag:de")
        self.assertEqual(code, 0, out + err)
        text = out.decode()
        for name, agent_id in zip(("de-1", "de-2"), tagged):
            last = [ln for ln in text.splitlines() if f"{name} (agent {agent_id})" in ln][-1]
            self.assertRegex(last, r" success +changed=0 ok=2 failed=0 command=\d+$")
        self.assertNotIn(f"(agent {other})", text)
        dep_id = int(text.splitlines()[-1].split()[1])
        self.assertEqual(text.splitlines()[-1], f"deployment {dep_id} success: 2 success")
        code, dep = await self.api("GET", f"/api/deployments/{dep_id}")
        self.assertEqual(sorted(t["agent_id"] for t in dep["targets"]), tagged)
        # Checked before any request: a bad tag, and --follow of an agent without it.
        code, out, err = await self.myx("deploy", "ping.yml", "--agents", "tag:a b")
        self.assertEqual(code, 2, out)
        self.assertIn("a tag is 1-32 letters", err.decode())
        code, out, err = await self.myx(
            "deploy", "ping.yml", "--agents", "tag:de", "--follow", str(other)
        )
        self.assertEqual(code, 2, out)
        self.assertIn("not a target", err.decode())
        code, page = await self.api("GET", "/api/deployments")
        self.assertEqual([d["id"] for d in page["deployments"]], [dep_id])

    async def test_ansible_check_mode_changes_nothing(self) -> None:
        await self.daemon.start()
        agent = await tool_agent(self)
        write_text(
            os.path.join(agent.deployment_tool_dir, "playbooks", "make.yml"),
            "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
            "    - name: Make a file\n      ansible.builtin.copy:\n"
            '        dest: "{{ target }}"\n        content: "made\\n"\n        mode: "0644"\n',
        )
        target = os.path.join(self.temp_dir(), "made-by-ansible")
        code, out, err = await self.adopt_cli(agent, "--name", "web-1")
        self.assertEqual(code, 0, err)
        agent_id = int(out.split()[1])
        extra = json.dumps({"target": target})

        # --check: ansible says what would change (--diff), and changes nothing.
        code, out, err = await self.myx(
            "ansible", str(agent_id), "make.yml", "--check", "--extra-vars", extra
        )
        self.assertEqual(code, 0, out + err)
        text = out.decode()
        self.assertIn("+made", text)
        self.assertRegex(text, r"localhost +: ok=1 +changed=1 ")
        self.assertIsNone(read_or_none(target))
        code, page = await self.api("GET", "/api/commands?kind=ansible")
        (checked,) = page["commands"]
        self.assertIs(checked["extra"]["check"], True)
        self.assertEqual(checked["status"], "success")

        # The same run without it makes the file.
        code, out, err = await self.myx("ansible", str(agent_id), "make.yml", "--extra-vars", extra)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(read_or_none(target), "made\n")
        code, page = await self.api("GET", "/api/commands?kind=ansible")
        self.assertNotIn("check", page["commands"][0]["extra"])

    async def test_cancelled_and_timed_out_are_their_own_statuses_in_metrics(self) -> None:
        await self.daemon.start()
        agent_id = await self.adopt(await tool_agent(self))
        # Stopped by its timeout: timed_out, not failed.
        code, out, err = await self.myx("run", str(agent_id), "--timeout", "1", "--", "sleep", "30")
        self.assertEqual(code, 1, out + err)
        self.assertRegex(err.decode(), r"myx: command \d+ timed_out \(")
        # Cancelled by the operator: cancelled, not failed.
        code, out, err = await self.myx("run", str(agent_id), "--no-follow", "--", "sleep", "60")
        self.assertEqual(code, 0, err)
        cancelled = int(out.strip())
        while not (await self.command(cancelled))["attempts"]:
            await deferLater(self.reactor, 0.1, lambda: None)
        code, out, err = await self.myx("cancel", str(cancelled))
        self.assertEqual(code, 0, err)
        self.assertEqual((await self.wait_final(cancelled))["status"], "cancelled")
        # And one plain failure, one success.
        code, _, err = await self.myx("run", str(agent_id), "--", "false")
        self.assertEqual(code, 1, err)
        code, _, err = await self.myx("run", str(agent_id), "--", "true")
        self.assertEqual(code, 0, err)
        for status in ("timed_out", "cancelled"):
            code, out, err = await self.myx("commands", "--status", status)
            self.assertEqual((code, len(out.decode().splitlines())), (0, 2), out + err)
            self.assertIn(f" {status} ", out.decode())

        code, text = await self.api("GET", "/metrics")
        self.assertEqual(code, 200)
        fams = parse_prometheus(text.decode())
        commands = {s[1]["status"]: s[2] for s in fams["myxd_commands"]["samples"]}
        self.assertEqual(
            commands,
            {
                "pending": 0,
                "running": 0,
                "success": 1,
                "failed": 1,
                "cancelled": 1,
                "timed_out": 1,
            },
        )
