"""The admin API end to end: the daemon's real service tree (tap.makeService: store,
RPC client, heartbeats, command queue, API listener on 127.0.0.1:0) driven over HTTP,
with real myx_agent processes adopted through POST /api/agents."""

from __future__ import annotations

import base64
import os
import socket
from typing import Any

import treq

from tests.daemon.api_helpers import AUTH, SSEParser
from tests.daemon.daemon_harness import (
    Daemon,
    DaemonTestCase,
    file_size,
    now_value,
    read_bytes,
    request_lines,
    touch,
    write_text,
)
from tests.support.agent_process import free_port, start_agent


class APIIntegrationTest(DaemonTestCase):
    timeout = 400

    # -- tests ---------------------------------------------------------------------

    async def test_adopt_online_refusals_and_token(self) -> None:
        await self.daemon.start()
        agent = await start_agent(self)
        code, body = await self.api("GET", "/api/agents", auth=False)
        self.assertEqual(code, 401)
        code, body = await self.api("GET", "/api/health", auth=False)
        self.assertEqual((code, body), (200, {"status": "ok"}))

        # a wrong pin: 422, nothing stored, and the agent never saw a request
        before = len(request_lines(agent))
        code, body = await self.api(
            "POST",
            "/api/agents",
            {
                "host": agent.host,
                "rpc_port": agent.port,
                "rpc_path": agent.rpc_path,
                "token": agent.token,
                "cert_fingerprint": "0" * 64,
            },
        )
        self.assertEqual((code, body["field"]), (422, "cert_fingerprint"), body)
        # nothing listening: 422 with the reason
        code, body = await self.api(
            "POST",
            "/api/agents",
            {
                "host": "127.0.0.1",
                "rpc_port": free_port(),
                "rpc_path": agent.rpc_path,
                "token": agent.token,
                "cert_fingerprint": agent.fingerprint,
            },
        )
        self.assertEqual(code, 422, body)
        self.assertTrue(body["reason"])
        # a wrong token: the agent answers 401, so 422 too
        code, body = await self.api(
            "POST",
            "/api/agents",
            {
                "host": agent.host,
                "rpc_port": agent.port,
                "rpc_path": agent.rpc_path,
                "token": "wrong-token",
                "cert_fingerprint": agent.fingerprint,
            },
        )
        self.assertEqual((code, body.get("kind")), (422, "auth"), body)
        # The agent logs requests in order: once the wrong-token one shows, a request
        # made under the wrong pin would have shown before it.
        lines = await self.until(
            lambda: now_value(request_lines(agent)),
            lambda ls: len(ls) > before,
            "the agent's log line",
        )
        self.assertEqual(len(lines), before + 1, lines[before:])
        code, body = await self.api("GET", "/api/agents")
        self.assertEqual((body["total"], body["agents"]), (0, []))

        agent_id = await self.adopt(agent)
        code, rec = await self.api("GET", f"/api/agents/{agent_id}")
        self.assertEqual((rec["status"], rec["cert_fingerprint"]), ("online", agent.fingerprint))
        self.assertEqual(rec["details"]["rpc_port"], agent.port)
        # heartbeats keep it online (last_heartbeat moves on)
        first = rec["last_heartbeat"]
        rec = await self.until(
            lambda: self._agent(agent_id), lambda r: r["last_heartbeat"] != first, "a heartbeat"
        )
        self.assertEqual(rec["status"], "online")

        # the agent's certificate changes: the heartbeat refuses it, the API shows why
        await agent.stop()
        for name in os.listdir(agent.ssl_dir):
            os.unlink(os.path.join(agent.ssl_dir, name))
        await agent.restart()
        rec = await self.until(
            lambda: self._agent(agent_id),
            lambda r: r["status"] == "offline" and "certificate" in (r["status_reason"] or ""),
            "the changed certificate to be refused",
        )
        self.assertEqual(rec["last_error_kind"], "final")
        code, events = await self.api("GET", "/api/events?limit=100")
        outcomes = [(e["action"], e["outcome"]) for e in events["events"]]
        self.assertIn(("agent.adopt", "ok"), outcomes)
        self.assertEqual(outcomes.count(("agent.adopt", "refused")), 3)

    async def _agent(self, agent_id: int) -> dict[str, Any]:
        code, body = await self.api("GET", f"/api/agents/{agent_id}")
        self.assertEqual(code, 200, body)
        return dict(body)

    async def test_live_output_long_poll_and_sse(self) -> None:
        await self.daemon.start()
        agent = await start_agent(self)
        agent_id = await self.adopt(agent)
        trigger = os.path.join(self.temp_dir(), "go")
        script = (
            'echo first; i=0; while [ ! -e "$0" ] && [ $i -lt 6000 ]; do sleep 0.05; '
            'i=$((i+1)); done; n=0; while [ $n -lt 50 ]; do echo "out $n"; '
            'echo "err $n" >&2; n=$((n+1)); done; echo last'
        )
        code, body = await self.api(
            "POST",
            f"/api/agents/{agent_id}/commands",
            {"command": "/bin/sh", "args": ["-c", script, trigger], "timeout": 300},
        )
        self.assertEqual(code, 201, body)
        self.assertEqual(body["status"], "running")
        cid = body["id"]

        # SSE, read with treq's streaming collect
        response = await treq.get(
            f"{self.daemon.base}/api/commands/{cid}/stream",
            headers=dict(AUTH),  # type: ignore[arg-type]
            pool=self.pool,
            unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        self.assertTrue(
            (response.headers.getRawHeaders(b"content-type") or [b""])[0].startswith(
                b"text/event-stream"
            )
        )
        parser = SSEParser()
        stream_done = treq.collect(response, parser.sink)

        # long-poll: the first line arrives while the command is blocked (still running)
        code, body = await self.until(
            lambda: self.api("GET", f"/api/commands/{cid}?offset=0&wait=5"),
            lambda r: bool(r[1]["output"]),
            "the first line",
        )
        self.assertEqual(body["status"], "running")
        self.assertEqual(b"".join(base64.b64decode(c["data"]) for c in body["output"]), b"first\n")
        self.assertEqual(body["next_offset"], 6)
        await self.until(
            lambda: now_value(parser.events), lambda ev: len(ev) >= 1, "the first SSE event"
        )
        self.assertEqual(parser.events[0]["event"], "output")
        self.assertEqual(base64.b64decode(parser.events[0]["data"]["data"]), b"first\n")
        self.assertEqual(parser.events[0]["id"], "6")

        # follow the output with offsets until the command is complete
        touch(trigger)
        offset, got, streams = 6, b"first\n", set()
        while True:
            code, body = await self.api("GET", f"/api/commands/{cid}?offset={offset}&wait=5")
            self.assertEqual(code, 200, body)
            for chunk in body["output"]:
                self.assertEqual(chunk["offset"], offset)
                data = base64.b64decode(chunk["data"])
                got += data
                offset += len(data)
                streams.add(chunk["stream"])
            self.assertEqual(body["next_offset"], offset)
            if body["complete"]:
                break
        self.assertEqual((body["status"], body["exit_code"]), ("success", 0))
        expected_lines = (
            [b"first"]
            + [f"{k} {n}".encode() for n in range(50) for k in ("out", "err")]
            + [b"last"]
        )
        self.assertEqual(sorted(got.splitlines()), sorted(expected_lines))
        self.assertEqual(streams, {"stdout", "stderr"})
        stdout_only = b"".join(
            base64.b64decode(c["data"])
            for c in (await self.api("GET", f"/api/commands/{cid}"))[1]["output"]
            if c["stream"] == "stdout"
        )
        self.assertEqual(
            stdout_only, b"first\n" + b"".join(f"out {n}\n".encode() for n in range(50)) + b"last\n"
        )

        # the SSE stream saw the same bytes, then the final event, then it ended
        await stream_done
        kinds = [e["event"] for e in parser.events]
        self.assertEqual(kinds[-1], "final")
        self.assertEqual(set(kinds[:-1]), {"output"})
        sse_bytes = b""
        for event in parser.events[:-1]:
            self.assertEqual(event["data"]["offset"], len(sse_bytes))
            sse_bytes += base64.b64decode(event["data"]["data"])
            self.assertEqual(int(event["id"]), len(sse_bytes))
        self.assertEqual(sse_bytes, got)
        self.assertEqual(parser.events[-1]["data"]["status"], "success")
        self.assertEqual(parser.events[-1]["data"]["exit_code"], 0)

        # resume from the middle with Last-Event-ID
        response = await treq.get(
            f"{self.daemon.base}/api/commands/{cid}/stream",
            headers={**AUTH, b"Last-Event-ID": [b"100"]},  # type: ignore
            pool=self.pool,
            unbuffered=True,
        )
        again = SSEParser()
        await treq.collect(response, again.sink)
        tail = b"".join(
            base64.b64decode(e["data"]["data"]) for e in again.events if e["event"] == "output"
        )
        self.assertEqual(tail, got[100:])

    async def test_bulk_command_on_several_agents(self) -> None:
        await self.daemon.start()
        agents = [await start_agent(self) for _ in range(3)]
        ids = [await self.adopt(a) for a in agents]
        code, body = await self.api(
            "POST", "/api/commands", {"agents": "all", "command": "hostname", "timeout": 60}
        )
        self.assertEqual(code, 201, body)
        self.assertEqual(sorted(c["agent_id"] for c in body["commands"]), sorted(ids))
        expected = socket.gethostname().encode() + b"\n"
        for entry in body["commands"]:
            final = await self.wait_final(entry["id"])
            self.assertEqual((final["status"], final["exit_code"]), ("success", 0), final)
            self.assertEqual(final["agent_id"], entry["agent_id"])
            self.assertEqual(await self.read_all(entry["id"]), expected)
        code, body = await self.api(
            "POST", "/api/commands", {"agents": ids[:2], "command": "/bin/echo", "args": ["two"]}
        )
        self.assertEqual([c["agent_id"] for c in body["commands"]], ids[:2])
        for entry in body["commands"]:
            await self.wait_final(entry["id"])
            self.assertEqual(await self.read_all(entry["id"]), b"two\n")
        # each agent lists its own commands, newest first
        code, page = await self.api("GET", f"/api/agents/{ids[0]}/commands?limit=1")
        self.assertEqual(page["commands"][0]["command"], "/bin/echo")
        self.assertEqual(page["next_offset"], 1)

    async def test_ansible_playbook_via_api(self) -> None:
        await self.daemon.start()
        agent = await start_agent(self)
        playbooks = os.path.join(agent.deployment_tool_dir, "playbooks")
        os.makedirs(playbooks, exist_ok=True)
        write_text(
            os.path.join(playbooks, "ping.yml"),
            (
                "- hosts: localhost\n"
                "  connection: local\n"
                "  gather_facts: false\n"
                "  tasks:\n"
                "    - name: ping\n"
                "      ansible.builtin.ping:\n"
                "    - name: say\n"
                "      ansible.builtin.debug:\n"
                '        msg: "greeting={{ greeting }}"\n'
            ),
        )
        agent_id = await self.adopt(agent)
        code, body = await self.api(
            "POST",
            f"/api/agents/{agent_id}/ansible",
            {"playbook": "ping.yml", "extra_vars": {"greeting": "hello-from-api"}, "timeout": 300},
        )
        self.assertEqual(code, 201, body)
        self.assertEqual(body["kind"], "ansible")
        final = await self.wait_final(body["id"])
        output = await self.read_all(body["id"])
        self.assertEqual(final["status"], "success", output.decode("utf-8", "replace"))
        self.assertIn(b"greeting=hello-from-api", output)
        self.assertIn(b"PLAY RECAP", output)
        self.assertEqual(final["result"]["ansible"]["status"], "successful")
        # a playbook outside playbooks/ is refused by the API before the agent is asked
        code, body = await self.api(
            "POST", f"/api/agents/{agent_id}/ansible", {"playbook": "../x.yml"}
        )
        self.assertEqual((code, body["field"]), (400, "playbook"))

    async def test_daemon_restart_mid_command_loses_and_duplicates_nothing(self) -> None:
        await self.daemon.start()
        agent = await start_agent(self)
        agent_id = await self.adopt(agent)
        work = self.temp_dir()
        trigger, copy = os.path.join(work, "stop"), os.path.join(work, "printed")
        # Prints a deterministic numbered sequence without pause until told to stop
        # (the trigger) and at least 300 lines; every byte also goes to `copy`.
        script = (
            'i=0; while [ ! -e "$0" ] || [ $i -lt 300 ]; do '
            'line=$(printf "line %06d\\n" $i); echo "$line"; echo "$line" >> "$1"; '
            'i=$((i+1)); sleep 0.002; done; echo done; echo done >> "$1"'
        )
        code, body = await self.api(
            "POST",
            f"/api/agents/{agent_id}/commands",
            {"command": "/bin/sh", "args": ["-c", script, trigger, copy], "timeout": 600},
        )
        self.assertEqual(code, 201, body)
        cid = body["id"]
        mid = await self.until(
            lambda: self.command(cid), lambda c: c["output_offset"] >= 2000, "output to be stored"
        )
        self.assertEqual(mid["status"], "running")

        await self.daemon.stop()
        # the process keeps printing while no daemon runs
        stopped_at = file_size(copy)
        await self.until(
            lambda: now_value(file_size(copy)),
            lambda n: n > stopped_at + 2000,
            "output while myxd is down",
        )

        second = Daemon(self, self.data_dir)
        await second.start()
        rec = await self.command(cid, second)
        self.assertEqual(rec["status"], "running")
        resumed_from = rec["output_offset"]
        await self.until(
            lambda: self.command(cid, second),
            lambda c: c["output_offset"] > resumed_from + 2000,
            "the resumed poller to store more",
        )
        touch(trigger)
        final = await self.wait_final(cid, second)
        self.assertEqual((final["status"], final["exit_code"]), ("success", 0), final)
        stored = await self.read_all(cid, second)
        printed = read_bytes(copy)
        self.assertEqual(len(stored), len(printed))
        self.assertEqual(stored, printed)
        lines = stored.splitlines()
        self.assertEqual(lines[-1], b"done")
        self.assertEqual(lines[:-1], [b"line %06d" % i for i in range(len(lines) - 1)])
        self.assertEqual(final["output_offset"], len(printed))
