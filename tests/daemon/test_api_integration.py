"""The admin API end to end: the daemon's real service tree (tap.makeService: store,
RPC client, heartbeats, command queue, API listener on 127.0.0.1:0) driven over HTTP,
with real myx_agent processes adopted through POST /api/agents."""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import treq
from twisted.application.service import MultiService
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from myxd.config import Settings
from myxd.tap import makeService
from tests.daemon.api_helpers import AUTH, TOKEN, SSEParser
from tests.support.agent_process import RunningAgent, free_port, start_agent

T = TypeVar("T")
WAIT = 120.0


def request_lines(agent: RunningAgent) -> list[str]:
    """The agent logs one line per HTTP request that reached it (any outcome)."""
    return [line for line in agent.log_text().splitlines()
            if " rpc " in line and " ms from " in line]


class Daemon:
    """One myxd service tree on a data dir, its API on an ephemeral loopback port."""

    def __init__(self, test: APIIntegrationTest, data_dir: str) -> None:
        self.test = test
        self.data_dir = data_dir
        self.root: MultiService | None = None
        self.base = ""

    async def start(self) -> None:
        settings = Settings(
            data_dir=self.data_dir, api="tcp:0:interface=127.0.0.1", admin_token=TOKEN,
            heartbeat_min_interval=0.3, heartbeat_max_interval=0.8,
            rpc_retry_max_attempts=3, rpc_retry_base_delay=0.05, rpc_timeout=20,
            rpc_pool_idle_timeout=30, log_poll_interval=0.2, log_poll_wait=2,
            reinstall_after_cycles=100000)
        root = makeService({"settings": settings})
        self.root = root
        root.startService()
        self.test.addCleanup(self.stop)
        # Cleanups run last-in first-out: client connections close before the daemon stops.
        self.test.addCleanup(self.test.pool.closeCachedConnections)
        await root.getServiceNamed("store").when_ready()
        listener: Any = root.getServiceNamed("api")
        port = await self.test.until(lambda: _now(listener.port), lambda p: p is not None,
                                     "the API to listen")
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    async def stop(self) -> None:
        root, self.root = self.root, None
        if root is not None and root.running:
            await root.stopService()


async def _now(value: T) -> T:
    return value


# Small synchronous file helpers: the tests' own file I/O is tiny and local.
def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _size(path: str) -> int:
    return os.path.getsize(path)


class APIIntegrationTest(TestCase):
    timeout = 400

    def temp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.daemon = Daemon(self, self.data_dir)

    async def until(self, probe: Callable[[], Awaitable[T]], check: Callable[[T], bool],
                    what: str, timeout: float = WAIT, interval: float = 0.05) -> T:
        deadline = self.reactor.seconds() + timeout
        while True:
            value = await probe()
            if check(value):
                return value
            if self.reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}; last value: {value!r}")
            await deferLater(self.reactor, interval, lambda: None)

    async def api(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                  daemon: Daemon | None = None) -> tuple[int, Any]:
        headers: dict[bytes, list[bytes]] = dict(AUTH) if auth else {}
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode()
        url = (daemon or self.daemon).base + path
        response = await treq.request(method, url, headers=headers,  # type: ignore[arg-type]
                                      data=data, pool=self.pool)
        raw = await treq.content(response)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        return response.code, json.loads(raw) if ctype.startswith(b"application/json") else raw

    async def adopt(self, agent: RunningAgent, fingerprint: str | None = None) -> int:
        fp = fingerprint if fingerprint is not None else ":".join(
            agent.fingerprint[i:i + 2].upper() for i in range(0, 64, 2))
        code, body = await self.api("POST", "/api/agents", {
            "host": agent.host, "rpc_port": agent.port, "rpc_path": agent.rpc_path,
            "token": agent.token, "cert_fingerprint": fp})
        self.assertEqual(code, 201, body)
        return int(body["id"])

    async def command(self, command_id: int, daemon: Daemon | None = None) -> dict[str, Any]:
        code, body = await self.api("GET", f"/api/commands/{command_id}", daemon=daemon)
        self.assertEqual(code, 200, body)
        return dict(body)

    async def wait_final(self, command_id: int, daemon: Daemon | None = None
                         ) -> dict[str, Any]:
        return await self.until(lambda: self.command(command_id, daemon),
                                lambda c: c["status"] in ("success", "failed"),
                                f"command {command_id} to finish", interval=0.2)

    async def read_all(self, command_id: int, daemon: Daemon | None = None) -> bytes:
        """The whole stored output, page by page, checking offsets are contiguous."""
        out = b""
        while True:
            code, body = await self.api(
                "GET", f"/api/commands/{command_id}?offset={len(out)}&max_bytes=65536",
                daemon=daemon)
            self.assertEqual(code, 200, body)
            if not body["output"]:
                return out
            for chunk in body["output"]:
                self.assertEqual(chunk["offset"], len(out))
                out += base64.b64decode(chunk["data"])
            self.assertEqual(body["next_offset"], len(out))

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
        code, body = await self.api("POST", "/api/agents", {
            "host": agent.host, "rpc_port": agent.port, "rpc_path": agent.rpc_path,
            "token": agent.token, "cert_fingerprint": "0" * 64})
        self.assertEqual((code, body["field"]), (422, "cert_fingerprint"), body)
        # nothing listening: 422 with the reason
        code, body = await self.api("POST", "/api/agents", {
            "host": "127.0.0.1", "rpc_port": free_port(), "rpc_path": agent.rpc_path,
            "token": agent.token, "cert_fingerprint": agent.fingerprint})
        self.assertEqual(code, 422, body)
        self.assertTrue(body["reason"])
        # a wrong token: the agent answers 401, so 422 too
        code, body = await self.api("POST", "/api/agents", {
            "host": agent.host, "rpc_port": agent.port, "rpc_path": agent.rpc_path,
            "token": "wrong-token", "cert_fingerprint": agent.fingerprint})
        self.assertEqual((code, body.get("kind")), (422, "auth"), body)
        # The agent logs requests in order: once the wrong-token one shows, a request
        # made under the wrong pin would have shown before it.
        lines = await self.until(lambda: _now(request_lines(agent)),
                                 lambda ls: len(ls) > before, "the agent's log line")
        self.assertEqual(len(lines), before + 1, lines[before:])
        code, body = await self.api("GET", "/api/agents")
        self.assertEqual((body["total"], body["agents"]), (0, []))

        agent_id = await self.adopt(agent)
        code, rec = await self.api("GET", f"/api/agents/{agent_id}")
        self.assertEqual((rec["status"], rec["cert_fingerprint"]), ("online", agent.fingerprint))
        self.assertEqual(rec["details"]["rpc_port"], agent.port)
        # heartbeats keep it online (last_heartbeat moves on)
        first = rec["last_heartbeat"]
        rec = await self.until(lambda: self._agent(agent_id),
                               lambda r: r["last_heartbeat"] != first, "a heartbeat")
        self.assertEqual(rec["status"], "online")

        # the agent's certificate changes: the heartbeat refuses it, the API shows why
        await agent.stop()
        for name in os.listdir(agent.ssl_dir):
            os.unlink(os.path.join(agent.ssl_dir, name))
        await agent.restart()
        rec = await self.until(lambda: self._agent(agent_id),
                               lambda r: r["status"] == "offline" and "certificate" in (
                                   r["status_reason"] or ""),
                               "the changed certificate to be refused")
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
        script = ('echo first; i=0; while [ ! -e "$0" ] && [ $i -lt 6000 ]; do sleep 0.05; '
                  'i=$((i+1)); done; n=0; while [ $n -lt 50 ]; do echo "out $n"; '
                  'echo "err $n" >&2; n=$((n+1)); done; echo last')
        code, body = await self.api("POST", f"/api/agents/{agent_id}/commands", {
            "command": "/bin/sh", "args": ["-c", script, trigger], "timeout": 300})
        self.assertEqual(code, 201, body)
        self.assertEqual(body["status"], "running")
        cid = body["id"]

        # SSE, read with treq's streaming collect
        response = await treq.get(f"{self.daemon.base}/api/commands/{cid}/stream",
                                  headers=dict(AUTH),  # type: ignore[arg-type]
                                  pool=self.pool, unbuffered=True)
        self.assertEqual(response.code, 200)
        self.assertTrue((response.headers.getRawHeaders(b"content-type") or [b""])[0]
                        .startswith(b"text/event-stream"))
        parser = SSEParser()
        stream_done = treq.collect(response, parser.sink)

        # long-poll: the first line arrives while the command is blocked (still running)
        code, body = await self.until(
            lambda: self.api("GET", f"/api/commands/{cid}?offset=0&wait=5"),
            lambda r: bool(r[1]["output"]), "the first line")
        self.assertEqual(body["status"], "running")
        self.assertEqual(b"".join(base64.b64decode(c["data"]) for c in body["output"]),
                         b"first\n")
        self.assertEqual(body["next_offset"], 6)
        await self.until(lambda: _now(parser.events), lambda ev: len(ev) >= 1,
                         "the first SSE event")
        self.assertEqual(parser.events[0]["event"], "output")
        self.assertEqual(base64.b64decode(parser.events[0]["data"]["data"]), b"first\n")
        self.assertEqual(parser.events[0]["id"], "6")

        # follow the output with offsets until the command is complete
        _touch(trigger)
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
        expected_lines = [b"first"] + [f"{k} {n}".encode() for n in range(50)
                                       for k in ("out", "err")] + [b"last"]
        self.assertEqual(sorted(got.splitlines()), sorted(expected_lines))
        self.assertEqual(streams, {"stdout", "stderr"})
        stdout_only = b"".join(
            base64.b64decode(c["data"])
            for c in (await self.api("GET", f"/api/commands/{cid}"))[1]["output"]
            if c["stream"] == "stdout")
        self.assertEqual(stdout_only, b"first\n" + b"".join(
            f"out {n}\n".encode() for n in range(50)) + b"last\n")

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
        response = await treq.get(f"{self.daemon.base}/api/commands/{cid}/stream",
                                  headers={**AUTH, b"Last-Event-ID": [b"100"]},  # type: ignore
                                  pool=self.pool, unbuffered=True)
        again = SSEParser()
        await treq.collect(response, again.sink)
        tail = b"".join(base64.b64decode(e["data"]["data"]) for e in again.events
                        if e["event"] == "output")
        self.assertEqual(tail, got[100:])

    async def test_bulk_command_on_several_agents(self) -> None:
        await self.daemon.start()
        agents = [await start_agent(self) for _ in range(3)]
        ids = [await self.adopt(a) for a in agents]
        code, body = await self.api("POST", "/api/commands", {
            "agents": "all", "command": "hostname", "timeout": 60})
        self.assertEqual(code, 201, body)
        self.assertEqual(sorted(c["agent_id"] for c in body["commands"]), sorted(ids))
        expected = socket.gethostname().encode() + b"\n"
        for entry in body["commands"]:
            final = await self.wait_final(entry["id"])
            self.assertEqual((final["status"], final["exit_code"]), ("success", 0), final)
            self.assertEqual(final["agent_id"], entry["agent_id"])
            self.assertEqual(await self.read_all(entry["id"]), expected)
        code, body = await self.api("POST", "/api/commands", {
            "agents": ids[:2], "command": "/bin/echo", "args": ["two"]})
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
        _write(os.path.join(playbooks, "ping.yml"),
               ("- hosts: localhost\n"
                "  connection: local\n"
                "  gather_facts: false\n"
                "  tasks:\n"
                "    - name: ping\n"
                "      ansible.builtin.ping:\n"
                "    - name: say\n"
                "      ansible.builtin.debug:\n"
                "        msg: \"greeting={{ greeting }}\"\n"))
        agent_id = await self.adopt(agent)
        code, body = await self.api("POST", f"/api/agents/{agent_id}/ansible", {
            "playbook": "ping.yml", "extra_vars": {"greeting": "hello-from-api"},
            "timeout": 300})
        self.assertEqual(code, 201, body)
        self.assertEqual(body["kind"], "ansible")
        final = await self.wait_final(body["id"])
        output = await self.read_all(body["id"])
        self.assertEqual(final["status"], "success", output.decode("utf-8", "replace"))
        self.assertIn(b"greeting=hello-from-api", output)
        self.assertIn(b"PLAY RECAP", output)
        self.assertEqual(final["result"]["ansible"]["status"], "successful")
        # a playbook outside playbooks/ is refused by the API before the agent is asked
        code, body = await self.api("POST", f"/api/agents/{agent_id}/ansible",
                                    {"playbook": "../x.yml"})
        self.assertEqual((code, body["field"]), (400, "playbook"))

    async def test_daemon_restart_mid_command_loses_and_duplicates_nothing(self) -> None:
        await self.daemon.start()
        agent = await start_agent(self)
        agent_id = await self.adopt(agent)
        work = self.temp_dir()
        trigger, copy = os.path.join(work, "stop"), os.path.join(work, "printed")
        # Prints a deterministic numbered sequence without pause until told to stop
        # (the trigger) and at least 300 lines; every byte also goes to `copy`.
        script = ('i=0; while [ ! -e "$0" ] || [ $i -lt 300 ]; do '
                  'line=$(printf "line %06d\\n" $i); echo "$line"; echo "$line" >> "$1"; '
                  'i=$((i+1)); sleep 0.002; done; echo done; echo done >> "$1"')
        code, body = await self.api("POST", f"/api/agents/{agent_id}/commands", {
            "command": "/bin/sh", "args": ["-c", script, trigger, copy], "timeout": 600})
        self.assertEqual(code, 201, body)
        cid = body["id"]
        mid = await self.until(lambda: self.command(cid),
                               lambda c: c["output_offset"] >= 2000, "output to be stored")
        self.assertEqual(mid["status"], "running")

        await self.daemon.stop()
        # the process keeps printing while no daemon runs
        stopped_at = _size(copy)
        await self.until(lambda: _now(_size(copy)),
                         lambda n: n > stopped_at + 2000, "output while myxd is down")

        second = Daemon(self, self.data_dir)
        await second.start()
        rec = await self.command(cid, second)
        self.assertEqual(rec["status"], "running")
        resumed_from = rec["output_offset"]
        await self.until(lambda: self.command(cid, second),
                         lambda c: c["output_offset"] > resumed_from + 2000,
                         "the resumed poller to store more")
        _touch(trigger)
        final = await self.wait_final(cid, second)
        self.assertEqual((final["status"], final["exit_code"]), ("success", 0), final)
        stored = await self.read_all(cid, second)
        printed = _read(copy)
        self.assertEqual(len(stored), len(printed))
        self.assertEqual(stored, printed)
        lines = stored.splitlines()
        self.assertEqual(lines[-1], b"done")
        self.assertEqual(lines[:-1], [b"line %06d" % i for i in range(len(lines) - 1)])
        self.assertEqual(final["output_offset"], len(printed))

