"""Unit tests of the admin API: StubTreq over AdminAPI(...).resource(), a real SQLite
store in a temp dir, and a fake command queue / RPC client (the real ones are wired in
test_api_integration)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from myxd.api import AdminAPI, deployments
from myxd.api.gate import BoundedRequest
from myxd.api.openapi import openapi_path
from myxd.api.servers import ServersAPI
from myxd.config import Settings
from myxd.metrics import Metrics
from myxd.rpc.retry import AgentRPCError, CertificateMismatch
from myxd.store import StoreService
from myxd.store.records import CommandRecord, HeartbeatResult
from tests.daemon.api_helpers import (
    AUTH,
    TOKEN,
    SSEReader,
    concrete_path,
    parse_prometheus,
    routes,
)

FP = "ab" * 32
FP_COLONS = ":".join(["AB"] * 32)
STATUS = {
    "version": "0.1.0",
    "hostname": "node-1",
    "rpc_port": 24351,
    "cert_fingerprint": FP,
    "running_commands": 0,
}


class FakeRPC:
    """Answers `call` from a script; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, Any, dict[str, Any]]] = []
        self.answer: Any = STATUS

    async def call(self, ep: Any, method: str, params: Any = None, **kw: Any) -> Any:
        self.calls.append((ep, method, params, kw))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class FakeQueue:
    """Records commands in the real store like CommandQueue would, without any RPC."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.added: list[dict[str, Any]] = []
        self.cancelled: list[int] = []
        self.subscribers: dict[int, list[Callable[..., Any]]] = {}
        self.fail_with: Exception | None = None

    async def add_command(
        self,
        agent_id: int,
        command: str,
        args: list[str],
        timeout: float | None,
        *,
        env: Any = None,
        cwd: Any = None,
        actor: str = "api",
    ) -> CommandRecord:
        if self.fail_with is not None:
            raise self.fail_with
        self.added.append(
            {
                "agent_id": agent_id,
                "command": command,
                "args": args,
                "timeout": timeout,
                "env": env,
                "cwd": cwd,
                "actor": actor,
            }
        )
        extra = {k: v for k, v in (("env", env), ("cwd", cwd)) if v is not None} or None
        return await self.store.create_command(
            agent_id=agent_id,
            kind="command",
            command=command,
            args=args,
            timeout=timeout,
            extra=extra,
        )

    async def add_ansible(
        self,
        agent_id: int,
        playbook: str,
        extra_vars: dict[str, Any],
        timeout: float | None,
        *,
        actor: str = "api",
        check: bool = False,
    ) -> CommandRecord:
        self.added.append(
            {
                "agent_id": agent_id,
                "playbook": playbook,
                "extra_vars": extra_vars,
                "timeout": timeout,
                **({"check": True} if check else {}),
            }
        )
        return await self.store.create_command(
            agent_id=agent_id,
            kind="ansible",
            command=playbook,
            args=[],
            timeout=timeout,
            extra={"playbook": playbook, "extra_vars": extra_vars},
        )

    async def cancel(self, command_id: int, *, actor: str = "api") -> CommandRecord:
        if self.fail_with is not None:
            raise self.fail_with
        self.cancelled.append(command_id)
        rec = await self.store.get_command(command_id)
        assert rec is not None
        return rec

    def subscribe(self, command_id: int, callback: Callable[..., Any]) -> Callable[[], None]:
        self.subscribers.setdefault(command_id, []).append(callback)

        def unsubscribe() -> None:
            self.subscribers[command_id].remove(callback)

        return unsubscribe

    def live_subscriptions(self) -> int:
        return sum(len(v) for v in self.subscribers.values())

    def notify(self, command_id: int) -> None:
        for cb in list(self.subscribers.get(command_id, [])):
            cb(command_id)


class APITestBase(TestCase):
    timeout = 120

    async def _setup(self) -> None:
        path = self.mktemp()
        import os

        os.makedirs(path)
        self.store_service = StoreService(os.path.join(path, "myxd.sqlite"), reactor)
        self.store_service.startService()
        await self.store_service.when_ready()
        self.addCleanup(self.store_service.stopService)
        self.store = self.store_service.store
        self.queue = FakeQueue(self.store)
        self.rpc = FakeRPC()
        self.metrics = Metrics()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.api = AdminAPI(
            self.store,
            self.queue,  # type: ignore[arg-type]
            self.rpc,  # type: ignore[arg-type]
            Settings(),
            self.clock,
            metrics=self.metrics,
            admin_token=TOKEN,
            servers_api=getattr(self, "servers_api", None),
        )
        self.resource = self.api.resource()
        self.stub: Any = StubTreq(self.resource)

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return ensureDeferred(self._setup())

    async def settle(self, d: Deferred[Any]) -> Any:
        """Pump the in-memory connection until `d` fires (the store answers on threads)."""
        deadline = time.monotonic() + 60
        # d.called is not enough: a called Deferred may still wait on an inner one.
        fired: list[bool] = []

        def mark(result: Any) -> Any:
            fired.append(True)
            return result

        d.addBoth(mark)
        while not fired:
            self.stub.flush()
            if fired:
                break
            if time.monotonic() > deadline:
                raise AssertionError("request did not complete")
            await deferLater(reactor, 0.002, lambda: None)
        return await d

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        auth: bool = True,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> tuple[Any, Any]:
        hdrs: dict[bytes, list[bytes]] = dict(AUTH) if auth else {}
        hdrs.update(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs[b"Content-Type"] = [b"application/json"]
        response = await self.settle(
            self.stub.request(method, "http://myxd" + path, headers=hdrs, data=data)
        )
        content = await self.settle(self.stub.content(response))
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0]
        parsed = json.loads(content) if ctype.startswith(b"application/json") else content
        return response, parsed

    async def add_agent(self, port: int, status: str = "online") -> int:
        agent_id = await self.store.add_agent(
            host="127.0.0.1",
            rpc_port=port,
            rpc_path="p" * 16,
            token="agent-token-secret",
            secret_key="agent-secret-key",
            cert_fingerprint=FP,
            status=status,
        )
        return int(agent_id)


class AuthTests(APITestBase):
    async def test_health_is_public(self) -> None:
        response, body = await self.request("GET", "/api/health", auth=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, {"status": "ok"})
        self.assertTrue(response.headers.getRawHeaders(b"x-request-id"))

    async def test_every_other_route_needs_the_token(self) -> None:
        checked = 0
        for rule, method in routes(AdminAPI._app.url_map):
            path = concrete_path(rule)
            if (rule, method) in (("/api/health", "GET"), ("/", "GET")):
                continue  # public: the health check and the console page (test_console)
            variants: list[dict[bytes, list[bytes]]] = [
                {},
                {b"Authorization": [b"Bearer wrong-token"]},
                {b"Authorization": [f"Basic {TOKEN}".encode()]},
                {b"Authorization": [f"Bearer {TOKEN}x".encode()]},
                {b"Authorization": [f"Bearer {TOKEN}".encode(), f"Bearer {TOKEN}".encode()]},
            ]
            for headers in variants:
                response, body = await self.request(
                    method, path, auth=False, headers=headers, body={} if method == "POST" else None
                )
                self.assertEqual(response.code, 401, (method, path, headers))
                self.assertEqual(body, {"error": "missing or wrong admin token"})
                checked += 1
        # every route of the app was visited, including the servers mount
        self.assertGreaterEqual(checked, 5 * 15)
        self.assertEqual(self.rpc.calls, [])
        self.assertEqual(self.queue.added, [])

    async def test_unknown_route_and_method(self) -> None:
        response, body = await self.request("GET", "/api/nope")
        self.assertEqual((response.code, body), (404, {"error": "not found"}))
        response, _ = await self.request("GET", "/api/nope", auth=False)
        self.assertEqual(response.code, 401)
        response, body = await self.request("PUT", "/api/agents", body={})
        self.assertEqual(response.code, 405)
        self.assertEqual(body, {"error": "method not allowed"})
        self.assertIn(b"POST", response.headers.getRawHeaders(b"allow")[0])

    async def test_body_cap(self) -> None:
        response, body = await self.request(
            "POST",
            "/api/agents",
            raw=b"{" + b" " * (1024 * 1024 + 10) + b"}",
            headers={b"Content-Type": [b"application/json"]},
        )
        self.assertEqual(response.code, 413)
        self.assertEqual(body["field"], "body")


def _bad(body: Any, field: str) -> tuple[Any, str]:
    return body, field


ADOPT_OK = {
    "host": "127.0.0.1",
    "rpc_port": 8123,
    "rpc_path": "abcdefghijklmnop",
    "token": "agent-token",
    "cert_fingerprint": FP,
}
RAW = object()


class BadInputTests(APITestBase):
    """Every POST route refuses bad input with 400 naming the field, and writes nothing."""

    def cases(self) -> dict[str, list[tuple[Any, str]]]:
        def adopt(**kw: Any) -> dict[str, Any]:
            d = dict(ADOPT_OK)
            for k, v in kw.items():
                if v is RAW:
                    d.pop(k)
                else:
                    d[k] = v
            return d

        command_cases = [
            _bad({}, "command"),
            _bad({"command": 5}, "command"),
            _bad({"command": ""}, "command"),
            _bad({"command": None}, "command"),
            _bad({"command": "ls", "args": "x"}, "args"),
            _bad({"command": "ls", "args": [1]}, "args[0]"),
            _bad({"command": "ls", "args": ["a", "b\x00"]}, "args[1]"),
            _bad({"command": "ls", "timeout": -1}, "timeout"),
            _bad({"command": "ls", "timeout": 0}, "timeout"),
            _bad({"command": "ls", "timeout": "5"}, "timeout"),
            _bad({"command": "ls", "timeout": True}, "timeout"),
            _bad({"command": "ls", "env": {"A": 1}}, "env.A"),
            _bad({"command": "ls", "env": ["A"]}, "env"),
            _bad({"command": "ls", "env": {"A=B": "x"}}, "env.A=B"),
            _bad({"command": "ls", "cwd": 3}, "cwd"),
            _bad({"command": "ls", "bogus": 1}, "bogus"),
        ]
        common = [
            _bad(b"not json", "body"),
            _bad(b"[1, 2]", "body"),
            _bad(b"", "body"),
            _bad(b"\xff\xfe", "body"),
            _bad(b'{"a": NaN}', "body"),
        ]
        return {
            "/api/agents": common
            + [
                _bad(adopt(host=RAW), "host"),
                _bad(adopt(host=5), "host"),
                _bad(adopt(host="not a host"), "host"),
                _bad(adopt(host="http://x/"), "host"),
                _bad(adopt(host=""), "host"),
                _bad(adopt(rpc_port=RAW), "rpc_port"),
                _bad(adopt(rpc_port="80"), "rpc_port"),
                _bad(adopt(rpc_port=True), "rpc_port"),
                _bad(adopt(rpc_port=0), "rpc_port"),
                _bad(adopt(rpc_port=70000), "rpc_port"),
                _bad(adopt(rpc_port=1.5), "rpc_port"),
                _bad(adopt(rpc_path=RAW), "rpc_path"),
                _bad(adopt(rpc_path="a b"), "rpc_path"),
                _bad(adopt(rpc_path="a/b"), "rpc_path"),
                _bad(adopt(rpc_path=[]), "rpc_path"),
                _bad(adopt(token=RAW), "token"),
                _bad(adopt(token="has space"), "token"),
                _bad(adopt(token="line\nbreak"), "token"),
                _bad(adopt(token=1), "token"),
                _bad(adopt(cert_fingerprint=RAW), "cert_fingerprint"),
                _bad(adopt(cert_fingerprint="zz" * 32), "cert_fingerprint"),
                _bad(adopt(cert_fingerprint="ab" * 31), "cert_fingerprint"),
                _bad(adopt(cert_fingerprint=64), "cert_fingerprint"),
                _bad(adopt(extra="x"), "extra"),
            ],
            "/api/agents/<int:agent_id>/commands": common + command_cases,
            "/api/agents/<int:agent_id>/ansible": common
            + [
                _bad({}, "playbook"),
                _bad({"playbook": 1}, "playbook"),
                _bad({"playbook": "../etc/x.yml"}, "playbook"),
                _bad({"playbook": "/etc/x.yml"}, "playbook"),
                _bad({"playbook": "ping.yml", "extra_vars": []}, "extra_vars"),
                _bad({"playbook": "ping.yml", "extra_vars": None}, "extra_vars"),
                _bad({"playbook": "ping.yml", "timeout": 0}, "timeout"),
                _bad({"playbook": "ping.yml", "timeout": "1"}, "timeout"),
                _bad({"playbook": "ping.yml", "env": {}}, "env"),
            ],
            "/api/commands": common
            + [
                _bad({"command": "ls"}, "agents"),
                _bad({"agents": "some", "command": "ls"}, "agents"),
                _bad({"agents": [], "command": "ls"}, "agents"),
                _bad({"agents": {}, "command": "ls"}, "agents"),
                _bad({"agents": ["1"], "command": "ls"}, "agents[0]"),
                _bad({"agents": [1, True], "command": "ls"}, "agents[1]"),
                _bad({"agents": [0], "command": "ls"}, "agents[0]"),
                _bad({"agents": "all"}, "command"),
                _bad({"agents": "all", "command": "ls", "shell": "ls"}, "command"),
                _bad({"agents": "all", "shell": "ls", "args": ["x"]}, "args"),
                _bad({"agents": "all", "shell": ""}, "shell"),
                _bad({"agents": "tag:a b", "shell": "ls"}, "agents"),
                _bad({"agents": "all", "command": "ls", "args": [None]}, "args[0]"),
                _bad({"agents": "all", "command": "ls", "whatever": 1}, "whatever"),
            ],
            "/api/ansible": common
            + [
                _bad({"playbook": "ping.yml"}, "agents"),
                _bad({"agents": "tag:", "playbook": "ping.yml"}, "agents"),
                _bad({"agents": "all"}, "playbook"),
                _bad({"agents": "all", "playbook": "../x.yml"}, "playbook"),
                _bad({"agents": "all", "playbook": "x.yml", "extra_vars": []}, "extra_vars"),
                _bad({"agents": "all", "playbook": "x.yml", "timeout": 0}, "timeout"),
            ],
            "/api/commands/<int:command_id>/cancel": [
                _bad(b"not json", "body"),
                _bad(b"[]", "body"),
                _bad({"force": True}, "force"),
            ],
        }

    async def test_bad_input_on_every_post_route(self) -> None:
        agent_id = await self.add_agent(20001)
        rec = await self.store.create_command(
            agent_id=agent_id, kind="command", command="x", args=[], timeout=None
        )
        cases = self.cases()
        # The server routes and the deployment routes have their own modules
        # (tests/install/test_servers_api.py, tests/daemon/test_api_deployments.py).
        own = {rule for _m, rule, _f, _s in deployments.ROUTES}
        post_rules = {
            rule
            for rule, method in routes(AdminAPI._app.url_map)
            if method == "POST" and not rule.startswith("/api/servers") and rule not in own
        }
        self.assertEqual(set(cases), post_rules, "every POST route needs bad-input cases")
        for rule, rule_cases in cases.items():
            path = rule.replace("<int:agent_id>", str(agent_id)).replace(
                "<int:command_id>", str(rec.id)
            )
            for payload, field in rule_cases:
                if isinstance(payload, bytes):
                    response, body = await self.request(
                        "POST", path, raw=payload, headers={b"Content-Type": [b"application/json"]}
                    )
                else:
                    response, body = await self.request("POST", path, body=payload)
                self.assertEqual(response.code, 400, (rule, payload, body))
                self.assertEqual(body.get("field"), field, (rule, payload, body))
                self.assertIsInstance(body.get("error"), str)
        # nothing was written and nobody was called
        self.assertEqual(self.rpc.calls, [])
        self.assertEqual(self.queue.added, [])
        self.assertEqual(self.queue.cancelled, [])
        self.assertEqual(len(await self.store.list_agents()), 1)
        self.assertEqual(len(await self.store.list_commands()), 1)

    async def test_bad_query_arguments(self) -> None:
        agent_id = await self.add_agent(20002)
        for path, field in [
            ("/api/agents?limit=0", "limit"),
            ("/api/agents?limit=abc", "limit"),
            ("/api/agents?limit=1001", "limit"),
            ("/api/agents?offset=-1", "offset"),
            ("/api/agents?status=bogus", "status"),
            ("/api/agents?sort=id", "sort"),
            ("/api/agents?limit=1&limit=2", "limit"),
            (f"/api/agents/{agent_id}/commands?offset=x", "offset"),
            ("/api/events?before_id=0", "before_id"),
            ("/api/events?limit=", "limit"),
        ]:
            response, body = await self.request("GET", path)
            self.assertEqual(response.code, 400, path)
            self.assertEqual(body["field"], field, path)


class NotFoundTests(APITestBase):
    async def test_unknown_ids(self) -> None:
        agent_id = await self.add_agent(20003)
        cmd = {"command": "true"}
        for method, path, body in [
            ("GET", "/api/agents/999", None),
            ("DELETE", "/api/agents/999", None),
            ("GET", "/api/agents/999/commands", None),
            ("POST", "/api/agents/999/commands", cmd),
            ("POST", "/api/agents/999/ansible", {"playbook": "ping.yml"}),
            ("GET", "/api/commands/999", None),
            ("POST", "/api/commands/999/cancel", None),
            ("GET", "/api/commands/999/stream", None),
            ("GET", "/api/agents/99999999999999999999999", None),
            ("GET", "/api/commands/0", None),
        ]:
            response, got = await self.request(method, path, body=body)
            self.assertEqual(response.code, 404, (method, path, got))
            self.assertIsInstance(got["error"], str)
        response, got = await self.request(
            "POST", "/api/commands", body={"agents": [agent_id, 998, 999], **cmd}
        )
        self.assertEqual(response.code, 404)
        self.assertEqual((got["field"], got["missing"]), ("agents", [998, 999]))
        self.assertEqual(self.queue.added, [])


class AgentTests(APITestBase):
    async def test_adopt(self) -> None:
        response, body = await self.request(
            "POST",
            "/api/agents",
            body={**ADOPT_OK, "cert_fingerprint": FP_COLONS, "rpc_path": "/abcdefghijklmnop/"},
        )
        self.assertEqual(response.code, 201, body)
        self.assertEqual(len(self.rpc.calls), 1)
        ep, method, _params, kw = self.rpc.calls[0]
        self.assertIn(method, ("get_status", "health_check"))
        self.assertEqual(kw.get("retry"), False)
        self.assertEqual(
            (ep.host, ep.port, ep.path, ep.token, ep.fingerprint),
            ("127.0.0.1", 8123, "abcdefghijklmnop", "agent-token", FP),
        )
        rec = await self.store.get_agent(body["id"])
        assert rec is not None
        self.assertEqual(
            (rec.cert_fingerprint, rec.status, rec.version, rec.rpc_path),
            (FP, "online", "0.1.0", "abcdefghijklmnop"),
        )
        self.assertEqual(rec.token, "agent-token")
        self.assertTrue(rec.secret_key)
        self.assertEqual(body["status"], "online")
        self.assertNotIn("token", body)
        self.assertNotIn("secret_key", body)
        events = await self.store.list_events()
        self.assertEqual([(e.action, e.outcome) for e in events], [("agent.adopt", "ok")])
        # the same port again is a conflict, checked after the agent answered
        response, body = await self.request("POST", "/api/agents", body=ADOPT_OK)
        self.assertEqual((response.code, body["field"]), (409, "rpc_port"))
        self.assertEqual(len(await self.store.list_agents()), 1)

    async def test_adopt_refused(self) -> None:
        self.rpc.answer = CertificateMismatch("certificate fingerprint 00ff... != pinned abab...")
        response, body = await self.request("POST", "/api/agents", body=ADOPT_OK)
        self.assertEqual(response.code, 422)
        self.assertEqual(body["field"], "cert_fingerprint")
        self.assertIn("certificate", body["reason"])
        self.rpc.answer = AgentRPCError("retryable", "connection refused")
        response, body = await self.request("POST", "/api/agents", body=ADOPT_OK)
        self.assertEqual(response.code, 422)
        self.assertEqual(body["reason"], "connection refused")
        self.assertIn("connection refused", body["error"])
        self.rpc.answer = AgentRPCError("auth", "HTTP 401 unauthorized")
        response, body = await self.request("POST", "/api/agents", body=ADOPT_OK)
        self.assertEqual((response.code, body["kind"]), (422, "auth"))
        self.assertEqual(await self.store.list_agents(), [])
        events = await self.store.list_events()
        self.assertEqual([e.outcome for e in events], ["refused"] * 3)
        self.assertNotIn("agent-token", json.dumps([e.details for e in events]))

    async def test_list_get_delete_and_pagination(self) -> None:
        ids = [await self.add_agent(21000 + i) for i in range(5)]
        await self.store.set_agent_status(ids[3], "offline", "unreachable")
        response, body = await self.request("GET", "/api/agents?limit=2")
        self.assertEqual(response.code, 200)
        self.assertEqual([a["id"] for a in body["agents"]], ids[:2])
        self.assertEqual((body["limit"], body["offset"], body["total"]), (2, 0, 5))
        _, body2 = await self.request("GET", "/api/agents?limit=2&offset=2")
        _, body3 = await self.request("GET", "/api/agents?limit=2&offset=4")
        self.assertEqual([a["id"] for a in body2["agents"] + body3["agents"]], ids[2:])
        _, off = await self.request("GET", "/api/agents?status=offline")
        self.assertEqual([a["id"] for a in off["agents"]], [ids[3]])
        self.assertEqual((off["total"], off["agents"][0]["status_reason"]), (1, "unreachable"))
        # an agent that reported a NaN is still listed, with null in its place
        await self.store.record_heartbeat_results(
            [
                HeartbeatResult(
                    agent_id=ids[0],
                    at=1.0,
                    ok=True,
                    version="9",
                    details={"load_avg": [float("nan")]},
                )
            ]
        )
        response, raw = await self.request("GET", f"/api/agents/{ids[0]}")
        self.assertEqual(response.code, 200)
        self.assertEqual((raw["id"], raw["details"]), (ids[0], {"load_avg": [None]}))
        for body_ in (body, raw):
            text = json.dumps(body_)
            self.assertNotIn("agent-token-secret", text)
            self.assertNotIn("agent-secret-key", text)
        response, body = await self.request("DELETE", f"/api/agents/{ids[0]}")
        self.assertEqual((response.code, body), (200, {"id": ids[0], "deleted": True}))
        response, _ = await self.request("GET", f"/api/agents/{ids[0]}")
        self.assertEqual(response.code, 404)
        events = await self.store.list_events()
        self.assertEqual(events[0].action, "agent.delete")


class CommandTests(APITestBase):
    async def test_create_and_read_output(self) -> None:
        agent_id = await self.add_agent(22000)
        response, body = await self.request(
            "POST",
            f"/api/agents/{agent_id}/commands",
            body={
                "command": "/bin/echo",
                "args": ["hi"],
                "timeout": 5,
                "env": {"SECRET": "s3"},
                "cwd": "/tmp",
            },
        )
        self.assertEqual(response.code, 201, body)
        self.assertEqual(body["status"], "running")
        self.assertNotIn("s3", json.dumps(body))
        self.assertEqual(body["extra"]["env"], ["SECRET"])
        self.assertEqual(
            self.queue.added[0],
            {
                "agent_id": agent_id,
                "command": "/bin/echo",
                "args": ["hi"],
                "timeout": 5.0,
                "env": {"SECRET": "s3"},
                "cwd": "/tmp",
                "actor": "admin-api",
            },
        )
        cid = body["id"]
        await self.store.append_output(cid, 0, "stdout", b"hello\n")
        await self.store.append_output(cid, 6, "stderr", b"oops\n")
        _, got = await self.request("GET", f"/api/commands/{cid}")
        self.assertEqual(
            [(c["offset"], c["stream"], base64.b64decode(c["data"])) for c in got["output"]],
            [(0, "stdout", b"hello\n"), (6, "stderr", b"oops\n")],
        )
        self.assertEqual((got["next_offset"], got["complete"]), (11, False))
        _, got = await self.request("GET", f"/api/commands/{cid}?offset=3")
        self.assertEqual([base64.b64decode(c["data"]) for c in got["output"]], [b"lo\n", b"oops\n"])
        _, got = await self.request("GET", f"/api/commands/{cid}?offset=3&max_bytes=2")
        self.assertEqual(
            ([base64.b64decode(c["data"]) for c in got["output"]], got["next_offset"]), ([b"lo"], 5)
        )
        response, got = await self.request("GET", f"/api/commands/{cid}?offset=12")
        self.assertEqual((response.code, got["field"]), (400, "offset"))
        await self.store.update_command(
            cid, status="success", exit_code=0, result={"success": True, "stdout": "aGVsbG8K"}
        )
        _, got = await self.request("GET", f"/api/commands/{cid}?offset=11")
        self.assertEqual((got["output"], got["complete"], got["exit_code"]), ([], True, 0))
        self.assertNotIn("stdout", got["result"])
        # paginated list for the agent, newest first
        for _ in range(2):
            await self.request("POST", f"/api/agents/{agent_id}/commands", body={"command": "x"})
        _, page1 = await self.request("GET", f"/api/agents/{agent_id}/commands?limit=2")
        _, page2 = await self.request("GET", f"/api/agents/{agent_id}/commands?limit=2&offset=2")
        self.assertEqual(page1["next_offset"], 2)
        self.assertIsNone(page2["next_offset"])
        ids = [c["id"] for c in page1["commands"] + page2["commands"]]
        self.assertEqual(ids, sorted(ids, reverse=True))
        self.assertEqual(len(ids), 3)

    async def test_ansible_and_cancel(self) -> None:
        agent_id = await self.add_agent(22001)
        response, body = await self.request(
            "POST",
            f"/api/agents/{agent_id}/ansible",
            body={"playbook": "ping.yml", "extra_vars": {"x": [1, 2]}, "timeout": 60},
        )
        self.assertEqual((response.code, body["kind"]), (201, "ansible"))
        self.assertEqual(self.queue.added[-1]["extra_vars"], {"x": [1, 2]})
        self.assertNotIn("check", self.queue.added[-1])
        response, checked = await self.request(
            "POST", f"/api/agents/{agent_id}/ansible", body={"playbook": "ping.yml", "check": True}
        )
        self.assertEqual(response.code, 201, checked)
        self.assertIs(self.queue.added[-1]["check"], True)
        response, err = await self.request(
            "POST", f"/api/agents/{agent_id}/ansible", body={"playbook": "ping.yml", "check": "yes"}
        )
        self.assertEqual((response.code, err["field"]), (400, "check"), err)
        self.queue.fail_with = AgentRPCError("retryable", "connection refused", 3)
        response, err = await self.request("POST", f"/api/commands/{body['id']}/cancel")
        self.assertEqual(
            (response.code, err["reason"], err["kind"]), (502, "connection refused", "retryable")
        )
        self.queue.fail_with = None
        response, body = await self.request("POST", f"/api/commands/{body['id']}/cancel")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.queue.cancelled), 1)
        await self.store.update_command(body["id"], status="failed", reason="cancelled")
        response, body = await self.request("POST", f"/api/commands/{body['id']}/cancel", body={})
        self.assertEqual((response.code, body["status"]), (409, "failed"))
        self.assertEqual(len(self.queue.cancelled), 1)

    async def test_bulk(self) -> None:
        ids = [await self.add_agent(23000 + i) for i in range(3)]
        response, body = await self.request(
            "POST",
            "/api/commands",
            body={"agents": [ids[2], ids[0], ids[2]], "command": "hostname"},
        )
        self.assertEqual(response.code, 201, body)
        self.assertEqual([c["agent_id"] for c in body["commands"]], [ids[2], ids[0]])
        for entry in body["commands"]:
            rec = await self.store.get_command(entry["id"])
            assert rec is not None
            self.assertEqual((rec.agent_id, rec.command), (entry["agent_id"], "hostname"))
        response, body = await self.request(
            "POST",
            "/api/commands",
            body={"agents": "all", "command": "hostname", "args": ["-f"], "timeout": 3},
        )
        self.assertEqual(sorted(c["agent_id"] for c in body["commands"]), ids)
        self.assertEqual(len({c["id"] for c in body["commands"]}), 3)

    async def test_internal_error_is_json_without_traceback(self) -> None:
        agent_id = await self.add_agent(22002)
        self.queue.fail_with = RuntimeError("boom: secret detail")
        response, body = await self.request(
            "POST", f"/api/agents/{agent_id}/commands", body={"command": "x"}
        )
        self.assertEqual(response.code, 500)
        self.assertEqual(body["error"], "internal error")
        self.assertEqual(
            body["request_id"], response.headers.getRawHeaders(b"x-request-id")[0].decode()
        )
        self.assertNotIn("boom", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # bulk: one failure is reported per agent, not as a 500
        response, body = await self.request(
            "POST", "/api/commands", body={"agents": [agent_id], "command": "x"}
        )
        self.assertEqual(response.code, 201)
        self.assertEqual(
            body["commands"], [{"agent_id": agent_id, "error": "could not create the command"}]
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LiveOutputTests(APITestBase):
    async def _command(self) -> int:
        agent_id = await self.add_agent(24000)
        rec = await self.store.create_command(
            agent_id=agent_id, kind="command", command="x", args=[], timeout=None
        )
        return rec.id

    async def test_long_poll_wakes_on_output(self) -> None:
        cid = await self._command()
        d = ensureDeferred(self.request("GET", f"/api/commands/{cid}?wait=30"))
        while self.queue.live_subscriptions() == 0:
            self.stub.flush()
            await deferLater(reactor, 0.002, lambda: None)
        self.assertFalse(d.called)
        await self.store.append_output(cid, 0, "stdout", b"line 1\n")
        self.queue.notify(cid)
        response, body = await d
        self.assertEqual([base64.b64decode(c["data"]) for c in body["output"]], [b"line 1\n"])
        self.assertEqual(self.queue.live_subscriptions(), 0)

    async def test_long_poll_times_out_on_the_clock(self) -> None:
        cid = await self._command()
        d = ensureDeferred(self.request("GET", f"/api/commands/{cid}?offset=0&wait=2.5"))
        while not self.clock.getDelayedCalls():
            self.stub.flush()
            await deferLater(reactor, 0.002, lambda: None)
        self.clock.advance(1)
        self.assertFalse(d.called)
        self.clock.advance(2)
        response, body = await d
        self.assertEqual((response.code, body["output"], body["next_offset"]), (200, [], 0))
        self.assertEqual(self.queue.live_subscriptions(), 0)
        # a final command never waits
        await self.store.update_command(cid, status="failed", reason="x")
        response, body = await self.request("GET", f"/api/commands/{cid}?wait=30")
        self.assertEqual((body["status"], body["complete"]), ("failed", True))

    async def _open_stream(
        self, path: str, headers: dict[bytes, list[bytes]] | None = None
    ) -> tuple[Any, SSEReader]:
        hdrs = dict(AUTH)
        hdrs.update(headers or {})
        response = await self.settle(self.stub.request("GET", "http://myxd" + path, headers=hdrs))
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
        )
        reader = SSEReader()
        response.deliverBody(reader)
        return response, reader

    async def wait_events(self, reader: SSEReader, pred: Callable[[list[Any]], bool]) -> None:
        await self.settle(reader.wait_for(pred))

    async def test_stream_output_then_final_and_resume(self) -> None:
        cid = await self._command()
        await self.store.append_output(cid, 0, "stdout", b"abc")
        _, reader = await self._open_stream(f"/api/commands/{cid}/stream")
        await self.wait_events(reader, lambda ev: len(ev) >= 1)
        await self.store.append_output(cid, 3, "stderr", b"def")
        self.queue.notify(cid)
        await self.wait_events(reader, lambda ev: len(ev) >= 2)
        await self.store.append_output(cid, 6, "stderr", b"g")
        await self.store.update_command(cid, status="success", exit_code=0)
        self.queue.notify(cid)
        await self.wait_events(reader, lambda ev: ev[-1].get("event") == "final")
        await self.settle(reader.done)
        events = reader.parser.events
        output = [
            (e["id"], e["data"]["offset"], e["data"]["stream"], base64.b64decode(e["data"]["data"]))
            for e in events
            if e["event"] == "output"
        ]
        self.assertEqual(
            output,
            [("3", 0, "stdout", b"abc"), ("6", 3, "stderr", b"def"), ("7", 6, "stderr", b"g")],
        )
        self.assertEqual(events[-1]["data"]["status"], "success")
        self.assertEqual(events[-1]["data"]["exit_code"], 0)
        self.assertEqual(reader.parser.retry, 1000)
        self.assertEqual(self.queue.live_subscriptions(), 0)
        # resume: Last-Event-ID wins over ?offset
        _, again = await self._open_stream(
            f"/api/commands/{cid}/stream?offset=0", {b"Last-Event-ID": [b"4"]}
        )
        await self.settle(again.done)
        self.assertEqual(
            [(e["event"], e["data"].get("data")) for e in again.parser.events],
            [("output", base64.b64encode(b"efg").decode()), ("final", None)],
        )
        _, again = await self._open_stream(f"/api/commands/{cid}/stream?offset=7")
        await self.settle(again.done)
        self.assertEqual([e["event"] for e in again.parser.events], ["final"])
        response, body = await self.request(
            "GET", f"/api/commands/{cid}/stream", headers={b"Last-Event-ID": [b"x"]}
        )
        self.assertEqual((response.code, body["field"]), (400, "Last-Event-ID"))
        response, body = await self.request("GET", f"/api/commands/{cid}/stream?offset=8")
        self.assertEqual((response.code, body["field"]), (400, "offset"))

    async def test_stream_keepalive_and_disconnect_cleans_up(self) -> None:
        cid = await self._command()
        _, reader = await self._open_stream(f"/api/commands/{cid}/stream")
        # the stream is idle once it waits on the clock for output or the keepalive
        while not self.clock.getDelayedCalls():
            self.stub.flush()
            await deferLater(reactor, 0.002, lambda: None)
        self.assertEqual(self.queue.live_subscriptions(), 1)
        self.clock.advance(self.api.sse_keepalive + 0.1)
        while "keepalive" not in reader.parser.comments:
            self.stub.flush()
            await deferLater(reactor, 0.002, lambda: None)
        reader.hang_up()
        while self.queue.live_subscriptions() != 0:
            self.stub.flush()
            await deferLater(reactor, 0.002, lambda: None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EventsTests(APITestBase):
    async def test_pagination(self) -> None:
        for i in range(5):
            await self.store.add_event(actor="t", action=f"a{i}", target=None, outcome="ok")
        seen: list[str] = []
        path = "/api/events?limit=2"
        for _ in range(5):
            response, body = await self.request("GET", path)
            self.assertEqual(response.code, 200)
            seen += [e["action"] for e in body["events"]]
            if body["next_before_id"] is None:
                break
            path = f"/api/events?limit=2&before_id={body['next_before_id']}"
        self.assertEqual(seen, ["a4", "a3", "a2", "a1", "a0"])


class OpenAPITests(APITestBase):
    async def test_document_matches_the_url_map(self) -> None:
        response, doc = await self.request("GET", "/api/openapi.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(doc["openapi"], "3.1.0")
        served = {
            (openapi_path(rule), method.lower())
            for rule, method in routes(AdminAPI._app.url_map)
            # the web console's static files are not part of the API
            if rule != "/" and not rule.startswith("/console/")
        }
        # every route, the servers routes included, is in the document
        self.assertIn(("/api/servers/{server_id}/install", "get"), served)
        documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
        self.assertEqual(served, documented)
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                self.assertIn("responses", op, (path, method))
                names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                self.assertEqual(names, set(_path_vars(path)), (path, method))
        # every $ref resolves
        refs = set(_refs(doc))
        self.assertTrue(refs)
        for ref in refs:
            self.assertIn(ref.rsplit("/", 1)[1], doc["components"]["schemas"])


def _path_vars(path: str) -> list[str]:
    import re

    return re.findall(r"{([^}]+)}", path)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"]] if "$ref" in node else []
        for v in node.values():
            out += _refs(v)
        return out
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


class FakeServersAPI(ServersAPI):
    """Answers two servers routes itself (the others stay the real ones)."""

    def __init__(self) -> None:
        pass

    async def list_servers(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"servers": [], "path": request.path.decode()}).encode()

    async def get_server(self, request: Any, server_id: int) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"id": server_id}).encode()

    async def delete_server(self, request: Any, server_id: int) -> bytes:
        return await self.get_server(request, server_id)


class ServersMountTests(APITestBase):
    servers_api = FakeServersAPI()

    async def test_mounted_after_the_token_check(self) -> None:
        response, body = await self.request("GET", "/api/servers/7")
        self.assertEqual((response.code, body), (200, {"id": 7}))
        response, body = await self.request("GET", "/api/servers")
        self.assertEqual((response.code, body["servers"]), (200, []))
        response, _ = await self.request("GET", "/api/servers/7", auth=False)
        self.assertEqual(response.code, 401)
        response, _ = await self.request("DELETE", "/api/servers/7", auth=False)
        self.assertEqual(response.code, 401)
        _, doc = await self.request("GET", "/api/openapi.json")
        self.assertEqual(set(doc["paths"]["/api/servers/{server_id}"]), {"get", "patch", "delete"})
        self.assertEqual(set(doc["paths"]["/api/servers"]), {"get", "post"})
        ok = doc["paths"]["/api/servers"]["get"]["responses"]["200"]
        self.assertEqual(
            ok["content"]["application/json"]["schema"], {"$ref": "#/components/schemas/ServerList"}
        )

    async def test_the_real_servers_api_mounts(self) -> None:
        from myxd.api.servers import ServersAPI

        class Installer:
            def is_running(self, server_id: int) -> bool:
                return False

        servers = ServersAPI(self.store, Installer(), reactor=IReactorThreads(reactor))
        api = AdminAPI(
            self.store,
            self.queue,  # type: ignore[arg-type]
            self.rpc,  # type: ignore[arg-type]
            Settings(),
            self.clock,
            metrics=self.metrics,
            admin_token=TOKEN,
            servers_api=servers,
        )
        self.stub = StubTreq(api.resource())
        for path in ("/api/servers", "/api/servers/"):
            response, body = await self.request("GET", path)
            self.assertEqual((response.code, body), (200, {"servers": []}), path)
        response, body = await self.request("GET", "/api/servers/5")
        self.assertEqual((response.code, body), (404, {"error": "not found"}))
        response, body = await self.request("POST", "/api/servers", body={"name": 5})
        self.assertEqual((response.code, body["field"]), (400, "name"))
        response, _ = await self.request("POST", "/api/servers", body={}, auth=False)
        self.assertEqual(response.code, 401)
        doc = api.openapi_document()
        self.assertIn("/api/servers/{server_id}/install", doc["paths"])
        self.assertEqual(set(doc["paths"]["/api/servers"]), {"get", "post"})

    async def test_without_servers_api(self) -> None:
        self.api._servers_api = None
        response, body = await self.request("GET", "/api/servers/7")
        self.assertEqual(response.code, 404)


class MetricsTests(APITestBase):
    async def test_scrape_parses_and_counts(self) -> None:
        a = await self.add_agent(25000)
        await self.add_agent(25001, status="offline")
        await self.store.create_command(
            agent_id=a, kind="command", command="x", args=[], timeout=None
        )
        for latency in (0.0004, 0.003, 0.003, 42.0):
            self.metrics.observe_heartbeat(latency)
        self.metrics.rpc_error("retryable")
        self.metrics.rpc_error("auth")
        self.metrics.rpc_error("weird")
        self.metrics.poll_lag(0.02)
        response, text = await self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(
            response.headers.getRawHeaders(b"content-type")[0].startswith(
                b"text/plain; version=0.0.4"
            )
        )
        fams = parse_prometheus(text.decode())
        agents = {s[1]["status"]: s[2] for s in fams["myxd_agents"]["samples"]}
        self.assertEqual(agents, {"online": 1, "offline": 1, "installing": 0, "error": 0})
        commands = {s[1]["status"]: s[2] for s in fams["myxd_commands"]["samples"]}
        self.assertEqual(commands["running"], 1)
        hb = {
            s[1].get("le"): s[2]
            for s in fams["myxd_heartbeat_latency_seconds"]["samples"]
            if s[0].endswith("_bucket")
        }
        self.assertEqual((hb["0.001"], hb["0.005"], hb["30.0"], hb["+Inf"]), (1, 3, 3, 4))
        errors = {s[1]["kind"]: s[2] for s in fams["myxd_rpc_errors_total"]["samples"]}
        self.assertEqual(errors, {"retryable": 1, "auth": 1, "final": 0, "other": 1})
        self.assertEqual(fams["myxd_log_poll_lag_seconds"]["type"], "histogram")
        self.assertIn("myxd_api_requests_total", fams)

    def test_metrics_provide_every_hook_the_daemon_calls(self) -> None:
        # The fleet and RPC code call the hooks through these protocols, so mypy
        # already refuses a Metrics without one; this checks the same at run time,
        # for every hook each protocol names.
        from myxd.metrics import (
            NO_METRICS,
            CommandMetrics,
            HeartbeatMetrics,
            RPCMetrics,
        )

        heartbeat: HeartbeatMetrics = self.metrics
        command: CommandMetrics = self.metrics
        rpc: RPCMetrics = self.metrics
        for proto in (HeartbeatMetrics, CommandMetrics, RPCMetrics):
            hooks = [n for n in vars(proto) if not n.startswith("_")]
            self.assertTrue(hooks, proto)
            for name in hooks:
                self.assertTrue(callable(getattr(self.metrics, name, None)), name)
                self.assertTrue(callable(getattr(NO_METRICS, name, None)), name)
        heartbeat.heartbeat_cycle(1.5, 10, 2)
        command.command_created("ansible")
        rpc.rpc_error("auth")
        sample = self.metrics.registry.get_sample_value
        self.assertEqual(sample("myxd_heartbeat_failures_total"), 2)
        self.assertEqual(sample("myxd_commands_created_total", {"kind": "ansible"}), 1)
        self.assertEqual(sample("myxd_rpc_errors_total", {"kind": "auth"}), 1)

    def test_parser_rejects_garbage(self) -> None:
        # the parser used above must be able to fail
        for bad in [
            "foo 1\n",
            "# TYPE foo gauge\nfoo{a=b} 1\n",
            "# HELP foo x\n# TYPE foo gauge\nfoo one\n",
            '# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 2\n'
            'h_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
        ]:
            self.assertRaises(AssertionError, parse_prometheus, bad)


class BoundedSiteTests(TestCase):
    """The Site from AdminAPI.site() stops keeping a too-large body while it arrives."""

    timeout = 60

    async def test_too_large_body_over_loopback(self) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        api = AdminAPI(
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            Settings(),
            reactor,
            metrics=Metrics(),
            admin_token=TOKEN,
        )
        site = api.site()
        self.assertIs(site.requestFactory, BoundedRequest)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        url = f"http://127.0.0.1:{port.getHost().port}/api/agents"
        big = b"x" * (3 * 1024 * 1024)
        response = await treq.post(
            url,
            data=big,
            headers=dict(AUTH),  # type: ignore[arg-type]
            pool=pool,
        )
        body = json.loads(await treq.content(response))
        self.assertEqual((response.code, body["field"]), (413, "body"))
        # unauthenticated: 401 (the token is checked before the size)
        response = await treq.post(url, data=big, pool=pool)
        self.assertEqual(response.code, 401)
        await treq.content(response)

    def test_chunked_body_is_capped(self) -> None:
        from twisted.web.test.requesthelper import DummyChannel

        req = BoundedRequest(DummyChannel())
        req.gotLength(None)
        for _ in range(3):
            req.handleContentChunk(b"y" * (512 * 1024))
        self.assertTrue(req.body_too_large)
        assert req.content is not None
        self.assertLessEqual(len(req.content.getvalue()), 1024 * 1024)
