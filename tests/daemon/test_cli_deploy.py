"""`myx artifacts`, `myx deploy`, `myx deployments`, `myx deployment`, `myx drift` end to
end: a real daemon service tree, real agent processes running real ansible-playbook,
and the CLI run from the installed wheel as its own process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue

from myxd.deploy.reports import normalize_service
from tests.daemon.api_helpers import TOKEN
from tests.daemon.daemon_harness import Daemon, DaemonTestCase, read_bytes, write_text
from tests.support import installed
from tests.support.agent_process import REPO_ROOT, RunningAgent, start_agent

FAILING_PING = """\
- name: Ping that fails on this host
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Refuse this host
      ansible.builtin.fail:
        msg: "this host is made to fail"
"""


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


async def tool_agent(test: Any, failing: bool = False) -> RunningAgent:
    """A real agent whose deployment tool dir holds the repository's deployment-tool
    (as an install would sync it); ``failing`` swaps its ping.yml for one that fails."""
    agent = await start_agent(test)
    shutil.copytree(
        os.path.join(REPO_ROOT, "deployment-tool"), agent.deployment_tool_dir, dirs_exist_ok=True
    )
    if failing:
        write_text(os.path.join(agent.deployment_tool_dir, "playbooks", "ping.yml"), FAILING_PING)
    return agent


def check_service_line(version: str | None, active: bool, config: str | None) -> dict[str, Any]:
    """One service as check_service.py prints it (its real field names)."""
    return normalize_service(
        {
            "service": "xray",
            "active_version": version,
            "installed_versions": [version] if version else [],
            "config_sha256": config,
            "unit": {"active_state": "active" if active else "failed", "sub_state": "x"},
        }
    )


async def seed_xray_drift(daemon: Daemon, good: int, drifted: int) -> None:
    """A finished deploy_xray.yml on both agents (25.1.1, config hash a…), then what
    check_service.py would report later: ``good`` unchanged, ``drifted`` running an
    older Xray with a hand-edited config. Written through the daemon's own store, so
    the API computes the drift; real hosts with Xray are deploye2e's tests."""
    assert daemon.root is not None
    store: Any = daemon.root.getServiceNamed("store")
    deps = store.store.deployments
    rec = await deps.create_deployment(
        playbook="deploy_xray.yml",
        vars={},
        artifacts={},
        agent_ids=[good, drifted],
        batch_size=None,
        max_failures=None,
        timeout=None,
        actor="test",
    )
    baseline = check_service_line("25.1.1", True, "a" * 64)
    for aid in (good, drifted):
        await deps.update_target(rec.id, aid, status="success", post_check=baseline)
    await deps.set_deployment_status(rec.id, "success")
    await deps.record_services(good, {"xray": baseline})
    await deps.record_services(drifted, {"xray": check_service_line("24.12.0", True, "b" * 64)})


class InstalledCLITestCase(DaemonTestCase):
    """``myx`` runs the installed console script against the test's daemon."""

    async def myx(self, *argv: str) -> tuple[int, bytes, bytes]:
        # The installed console script, outside the checkout (as tests/daemon/test_cli.py).
        env = installed.env()
        env.pop("MYX_API", None)
        env["MYX_TOKEN"] = TOKEN
        out, err, code = await getProcessOutputAndValue(
            installed.script("myx"),
            ["--api", self.daemon.base, *argv],
            env=env,
            path=self.temp_dir(),
            reactor=self.reactor,
        )
        return code, out, err


class CLIDeployTest(InstalledCLITestCase):
    timeout = 400

    def lines(self, err: bytes) -> list[str]:
        return err.decode().strip().splitlines()

    async def test_upload_list_and_digest_checks(self) -> None:
        await self.daemon.start()
        path = os.path.join(self.temp_dir(), "Xray-linux-64.zip")
        data = os.urandom(3 * 1024 * 1024 + 17)
        write_bytes(path, data)
        sha = hashlib.sha256(data).hexdigest()

        code, out, err = await self.myx("artifacts", "upload", path)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().split()[:2], [sha, "Xray-linux-64.zip"])
        self.assertIn("(uploaded)", out.decode())
        self.assertEqual(read_bytes(os.path.join(self.data_dir, "artifacts", sha)), data)
        # The same bytes again: found by their SHA-256, not sent.
        code, out, err = await self.myx("artifacts", "upload", path)
        self.assertEqual(code, 0, err)
        self.assertIn("(already stored)", out.decode())

        code, out, err = await self.myx("artifacts")
        self.assertEqual(code, 0, err)
        rows = out.decode().splitlines()
        self.assertEqual(rows[0].split(), ["ID", "NAME", "SIZE", "CREATED"])
        self.assertEqual(rows[1].split()[:4], [sha, "Xray-linux-64.zip", "3.0", "MiB"])
        code, out, err = await self.myx("artifacts", "--json")
        self.assertEqual(code, 0, err)
        listed = json.loads(out)
        self.assertEqual([(a["id"], a["size"]) for a in listed], [(sha, len(data))])

        # A .dgst that does not match: refused before a byte is sent, nothing stored.
        other = os.path.join(self.temp_dir(), "Xray-linux-arm64.zip")
        write_bytes(other, b"another release")
        other_sha = hashlib.sha256(b"another release").hexdigest()
        dgst = other + ".dgst"
        write_text(dgst, f"MD5= 00\nSHA2-256= {'0' * 64}\n")
        code, out, err = await self.myx("artifacts", "upload", other, "--dgst", dgst)
        self.assertEqual(code, 2, err)
        self.assertEqual(len(self.lines(err)), 1, err)
        self.assertIn("does not match the expected SHA-256", err.decode())
        code, out, err = await self.myx("artifacts", "upload", other, "--sha256", "xyz")
        self.assertEqual((code, len(self.lines(err))), (2, 1), err)
        code, body = await self.api("GET", "/api/artifacts")
        self.assertEqual([a["id"] for a in body["artifacts"]], [sha])
        # The matching .dgst (the official format) is accepted.
        write_text(dgst, f"MD5= 00\nSHA2-256= {other_sha}\nSHA2-512= 00\n")
        code, out, err = await self.myx("artifacts", "upload", other, "--dgst", dgst)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.decode().startswith(other_sha))

        code, out, err = await self.myx("artifacts", "delete", other_sha)
        self.assertEqual(code, 0, err)
        code, out, err = await self.myx("artifacts", "delete", other_sha)
        self.assertEqual(code, 2)
        self.assertIn("HTTP 404", err.decode())

    async def test_deploy_validation_errors_are_one_line_and_start_nothing(self) -> None:
        await self.daemon.start()
        agent_id = await self.adopt(await start_agent(self))
        bad_json = os.path.join(self.temp_dir(), "vars.json")
        write_text(bad_json, "{not json")
        a_list = os.path.join(self.temp_dir(), "list.json")
        write_text(a_list, "[1, 2]")
        cases: list[tuple[list[str], str]] = [
            (["nope.yml", "--all"], "(field: playbook)"),
            (["ping.yml", "--agents", "1,x"], "--agents takes agent ids"),
            (["ping.yml", "--agents", "99999"], "(field: agents)"),
            (["ping.yml", "--all", "--var", "novalue"], "--var takes NAME=VALUE"),
            (["ping.yml", "--all", "--var", "bad name=1"], "(field: vars.bad name)"),
            (["ping.yml", "--all", "--vars-file", bad_json], "is not JSON"),
            (["ping.yml", "--all", "--vars-file", a_list], "must hold a JSON object"),
            (["ping.yml", "--all", "--artifact", "x=/nonexistent"], "neither a file nor"),
            (["ping.yml", "--all", "--artifact", f"x={'a' * 64}"], "(field: artifacts)"),
            (["ping.yml", "--all", "--batch-size", "0"], "--batch-size must be at least 1"),
            (["ping.yml", "--agents", str(agent_id), "--follow", "77"], "not a target"),
        ]
        for argv, words in cases:
            code, out, err = await self.myx("deploy", *argv)
            self.assertEqual(code, 2, (argv, out, err))
            self.assertEqual(len(self.lines(err)), 1, (argv, err))
            self.assertTrue(err.startswith(b"myx: "), (argv, err))
            self.assertIn(words, err.decode(), (argv, err))
            self.assertNotIn(b"Traceback", err)
        # Neither --agents nor --all: argparse's usage error, exit 2.
        code, out, err = await self.myx("deploy", "ping.yml")
        self.assertEqual(code, 2)
        self.assertIn(b"one of the arguments --agents --all is required", err)
        code, body = await self.api("GET", "/api/deployments")
        self.assertEqual(body["deployments"], [])
        code, out, err = await self.myx("playbooks")
        self.assertEqual(code, 0, err)
        self.assertIn("ping.yml", out.decode().splitlines())
        self.assertIn("deploy_xray.yml", out.decode().splitlines())

    async def test_deploy_ping_to_real_agents_then_list_show_and_drift(self) -> None:
        await self.daemon.start()
        good = [await self.adopt(await tool_agent(self)) for _ in range(2)]
        bad = await self.adopt(await tool_agent(self, failing=True))

        code, out, err = await self.myx(
            "deploy", "ping.yml", "--agents", ",".join(map(str, good)), "--var", "who=cli"
        )
        self.assertEqual(code, 0, out + err)
        text = out.decode()
        # Not a terminal: a line each time an agent's line changes, the last one final.
        for aid in good:
            last = [ln for ln in text.splitlines() if f"(agent {aid})" in ln][-1]
            self.assertRegex(last, r" success +changed=0 ok=2 failed=0 command=\d+$")
        first_id = int(text.splitlines()[-1].split()[1])
        self.assertEqual(text.splitlines()[-1], f"deployment {first_id} success: 2 success")

        # One agent made to fail: partial, exit 1, the failing task and message shown.
        code, out, err = await self.myx(
            "deploy", "ping.yml", "--agents", f"{good[0]},{bad}", "--follow", str(bad)
        )
        self.assertEqual(code, 1, out + err)
        text = out.decode()
        self.assertIn("TASK [Refuse this host]", text)  # the followed agent's live log
        self.assertIn("PLAY RECAP", text)
        bad_line = next(ln for ln in text.splitlines() if f"(agent {bad})" in ln)
        self.assertIn(" failed ", bad_line)
        self.assertIn("Refuse this host: this host is made to fail", bad_line)
        self.assertRegex(text.splitlines()[-1], r"^deployment \d+ partial: 1 success, 1 failed$")
        second_id = first_id + 1

        code, out, err = await self.myx("deployments")
        self.assertEqual(code, 0, err)
        rows = [r.split() for r in out.decode().splitlines()]
        self.assertEqual(rows[0], ["ID", "PLAYBOOK", "STATUS", "TARGETS", "CREATED"])
        self.assertEqual(rows[1][:3], [str(second_id), "ping.yml", "partial"])
        self.assertEqual(rows[2][:5], [str(first_id), "ping.yml", "success", "2", "success"])
        code, out, err = await self.myx("deployments", "--json")
        self.assertEqual([d["id"] for d in json.loads(out)], [second_id, first_id])

        code, out, err = await self.myx("deployment", str(second_id))
        self.assertEqual(code, 0, err)
        self.assertIn("this host is made to fail", out.decode())
        code, out, err = await self.myx("deployment", str(first_id), "--json")
        dep = json.loads(out)
        self.assertEqual(dep["var_names"], ["who"])
        self.assertNotIn("cli", json.dumps(dep["targets"]))
        code, out, err = await self.myx("deployment", "cancel", str(first_id))
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().strip(), f"deployment {first_id}: cancel sent (success)")
        code, out, err = await self.myx("deployment", "cancel")
        self.assertEqual((code, len(self.lines(err))), (2, 1), err)

        await seed_xray_drift(self.daemon, good[0], good[1])
        code, out, err = await self.myx("drift")
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0], "xray: expected version 25.1.1, 1 of 2 agent(s) drifted")
        self.assertEqual(
            lines[1].split(), ["AGENT", "NAME", "ACTIVE", "VERSION", "CONFIG", "DRIFT"]
        )
        row = {int(r.split()[0]): r for r in lines[2:4]}
        self.assertRegex(row[good[0]], r" yes +25\.1\.1 +a{12} +ok$")
        self.assertIn(
            "version 24.12.0, expected 25.1.1; config changed since the last deployment",
            row[good[1]],
        )
        self.assertTrue(lines[4].startswith("caddy: expected version none deployed"))
        code, out, err = await self.myx("drift", "--json")
        self.assertEqual(json.loads(out)["xray"]["drifted"], 1)
