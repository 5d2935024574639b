"""Unit tests of the JSON-RPC dispatcher, the method table, the HTTP gate and the Klein app.

No sockets: the dispatcher is fed bytes, the method table gets a stub runner
and a Clock, and the HTTP layer is driven through the AgentSite's protocols on
StringTransport, which shows exactly which bytes go out and when. The Klein
app is also tested on its own through StubTreq, and behind a gate that lets
through what the app must refuse.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List, Optional, Tuple, cast

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from myx_agent import __version__
from myx_agent.errors import BUSY, RPCError
from myx_agent.jsonrpc import Dispatcher, DispatchResult, Method, Param, integer
from myx_agent.methods import AgentMethods
from myx_agent.rpc_server import (
    KEEPALIVE_IDLE_TIMEOUT,
    NOT_FOUND_RESPONSE,
    TOO_LARGE_RESPONSE,
    UNAUTHORIZED_RESPONSE,
    AgentRPCApp,
    AgentSite,
    RequestGate,
    build_factory,
)

# --- helpers ------------------------------------------------------------------


def run(dispatcher: Dispatcher, body: Any) -> DispatchResult:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    d = dispatcher.dispatch(raw)
    results: List[DispatchResult] = []
    d.addCallback(results.append)
    assert results, "dispatch did not finish synchronously"
    return results[0]


def reply(dispatcher: Dispatcher, body: Any) -> Any:
    result = run(dispatcher, body)
    return None if result.body is None else json.loads(result.body)


def _num(name: str, value: Any) -> int:
    return integer()(name, value)


def spec_dispatcher(calls: Optional[List[Any]] = None) -> Dispatcher:
    """The methods used by the examples in section 7 of the JSON-RPC 2.0 spec."""
    seen = calls if calls is not None else []

    def record(name: str) -> Any:
        def handler(**kwargs: Any) -> None:
            seen.append((name, kwargs))

        return handler

    zero = lambda: 0  # noqa: E731
    return Dispatcher(
        [
            Method(
                "subtract",
                (Param("minuend", _num), Param("subtrahend", _num)),
                lambda minuend, subtrahend: minuend - subtrahend,
            ),
            Method(
                "sum",
                (Param("a", _num, zero), Param("b", _num, zero), Param("c", _num, zero)),
                lambda a, b, c: a + b + c,
            ),
            Method(
                "update",
                tuple(Param(n, _num) for n in "abcde"),
                record("update"),
            ),
            Method("notify_hello", (Param("value", _num),), record("notify_hello")),
            Method(
                "notify_sum",
                tuple(Param(n, _num) for n in "abc"),
                record("notify_sum"),
            ),
            Method("get_data", (), lambda: ["hello", 5]),
        ]
    )


class StubRunner:
    def __init__(self) -> None:
        self.calls: List[Any] = []
        self.running_count = 3
        self.log_result: Any = {
            "log_data": "",
            "log_type": None,
            "new_offset": 0,
            "is_final": False,
            "result": None,
        }
        self.raise_on_execute: Optional[Exception] = None

    def execute_command(self, *args: Any) -> Dict[str, Any]:
        self.calls.append(("execute_command", args))
        if self.raise_on_execute is not None:
            raise self.raise_on_execute
        return {"status": "running", "command_id": args[0]}

    def execute_ansible(self, *args: Any) -> Dict[str, Any]:
        self.calls.append(("execute_ansible", args))
        return {"status": "running", "command_id": args[0]}

    def get_command_log(self, *args: Any) -> Deferred[Dict[str, Any]]:
        self.calls.append(("get_command_log", args))
        if isinstance(self.log_result, Deferred):
            return self.log_result
        return succeed(self.log_result)

    def cancel_command(self, *args: Any) -> Dict[str, Any]:
        self.calls.append(("cancel_command", args))
        return {"command_id": args[0], "cancelled": True, "status": "running"}


class StubSystem:
    os_description = "Linux 6.1 (Test OS)"
    python_version = "3.11.7"

    def hostname(self) -> str:
        return "node-1"

    def load_avg(self) -> List[float]:
        return [0.1, 0.2, 0.3]

    def memory(self) -> Dict[str, int]:
        return {"total": 100, "available": 50}

    def disk(self) -> Dict[str, Any]:
        return {"path": "/", "total": 1000, "free": 400}


FINGERPRINT = "ab" * 32


class StubArtifacts:
    """Records what reaches the artifact cache (only checked params may)."""

    def __init__(self, calls: List[Any]) -> None:
        self.calls = calls

    def status(self, sha256: str, size: int) -> Deferred[Dict[str, Any]]:
        self.calls.append(("status", sha256, size))
        return succeed({"present": False, "offset": 0})

    def put_chunk(
        self, sha256: str, size: int, offset: int, data: bytes
    ) -> Deferred[Dict[str, Any]]:
        self.calls.append(("put_chunk", sha256, size, offset, data))
        return succeed({"offset": offset + len(data), "complete": False})


def agent_methods(
    runner: StubRunner,
    clock: Clock,
    sync_calls: List[Any],
    artifact_calls: Optional[List[Any]] = None,
) -> AgentMethods:
    now = [100.0]

    def sync(
        directory: str, archive: Optional[bytes], sha: str, version: str
    ) -> Deferred[Dict[str, Any]]:
        sync_calls.append((directory, archive, sha, version))
        return succeed({"changed": True, "version": version})

    methods = AgentMethods(
        runner=runner,
        rpc_port=24351,
        cert_fingerprint=FINGERPRINT,
        deployment_tool_dir="/opt/tool",
        sync_tool=sync,
        read_tool_version=lambda d: "1.2.3" if d == "/opt/tool" else None,
        system=StubSystem(),  # type: ignore[arg-type]
        artifacts=StubArtifacts([] if artifact_calls is None else artifact_calls),
        reactor=clock,
        monotonic=lambda: now[0],
    )
    now[0] = 160.5
    return methods


# --- the JSON-RPC 2.0 specification, section 7 -----------------------------------


class SpecExamplesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.calls: List[Any] = []
        self.d = spec_dispatcher(self.calls)

    def test_positional_params(self) -> None:
        self.assertEqual(
            reply(self.d, {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}),
            {"jsonrpc": "2.0", "result": 19, "id": 1},
        )
        self.assertEqual(
            reply(self.d, {"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}),
            {"jsonrpc": "2.0", "result": -19, "id": 2},
        )

    def test_named_params(self) -> None:
        self.assertEqual(
            reply(
                self.d,
                {
                    "jsonrpc": "2.0",
                    "method": "subtract",
                    "params": {"subtrahend": 23, "minuend": 42},
                    "id": 3,
                },
            ),
            {"jsonrpc": "2.0", "result": 19, "id": 3},
        )
        self.assertEqual(
            reply(
                self.d,
                {
                    "jsonrpc": "2.0",
                    "method": "subtract",
                    "params": {"minuend": 42, "subtrahend": 23},
                    "id": 4,
                },
            ),
            {"jsonrpc": "2.0", "result": 19, "id": 4},
        )

    def test_notifications(self) -> None:
        result = run(self.d, {"jsonrpc": "2.0", "method": "update", "params": [1, 2, 3, 4, 5]})
        self.assertIsNone(result.body)
        self.assertEqual(self.calls, [("update", {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})])
        self.assertIsNone(run(self.d, {"jsonrpc": "2.0", "method": "foobar"}).body)

    def test_non_existent_method(self) -> None:
        self.assertEqual(
            reply(self.d, {"jsonrpc": "2.0", "method": "foobar", "id": "1"})["error"]["code"],
            -32601,
        )
        self.assertEqual(
            reply(self.d, {"jsonrpc": "2.0", "method": "foobar", "id": "1"})["id"], "1"
        )

    def test_invalid_json(self) -> None:
        body = b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]'
        self.assertEqual(
            reply(self.d, body),
            {"jsonrpc": "2.0", "error": {"code": -32700, "message": "parse error"}, "id": None},
        )

    def test_invalid_request_object(self) -> None:
        r = reply(self.d, {"jsonrpc": "2.0", "method": 1, "params": "bar"})
        self.assertEqual((r["error"]["code"], r["id"]), (-32600, None))

    def test_batch_invalid_json(self) -> None:
        body = (
            b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
            b'{"jsonrpc": "2.0", "method"]'
        )
        r = reply(self.d, body)
        self.assertIsInstance(r, dict)
        self.assertEqual((r["error"]["code"], r["id"]), (-32700, None))

    def test_empty_array(self) -> None:
        r = reply(self.d, [])
        self.assertIsInstance(r, dict)
        self.assertEqual((r["error"]["code"], r["id"]), (-32600, None))

    def test_invalid_batch_not_empty(self) -> None:
        r = reply(self.d, [1])
        self.assertEqual(len(r), 1)
        self.assertEqual((r[0]["error"]["code"], r[0]["id"]), (-32600, None))

    def test_invalid_batch(self) -> None:
        r = reply(self.d, [1, 2, 3])
        self.assertEqual([(x["error"]["code"], x["id"]) for x in r], [(-32600, None)] * 3)

    def test_mixed_batch(self) -> None:
        r = reply(
            self.d,
            [
                {"jsonrpc": "2.0", "method": "sum", "params": [1, 2, 4], "id": "1"},
                {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
                {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": "2"},
                {"foo": "boo"},
                {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
                {"jsonrpc": "2.0", "method": "get_data", "id": "9"},
            ],
        )
        self.assertEqual(len(r), 5)
        got = {json.dumps(x["id"]): x for x in r}
        self.assertEqual(got['"1"'], {"jsonrpc": "2.0", "result": 7, "id": "1"})
        self.assertEqual(got['"2"'], {"jsonrpc": "2.0", "result": 19, "id": "2"})
        self.assertEqual(got["null"]["error"]["code"], -32600)
        self.assertEqual(got['"5"']["error"]["code"], -32601)
        self.assertEqual(got['"9"'], {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"})
        self.assertEqual(self.calls, [("notify_hello", {"value": 7})])

    def test_batch_all_notifications(self) -> None:
        result = run(
            self.d,
            [
                {"jsonrpc": "2.0", "method": "notify_sum", "params": [1, 2, 4]},
                {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
            ],
        )
        self.assertIsNone(result.body)
        self.assertEqual(len(self.calls), 2)


# --- request validation beyond the spec examples --------------------------------------


class RequestValidationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.d = spec_dispatcher()

    def test_bad_ids(self) -> None:
        for bad in ({}, [], True, False, {"a": 1}, [1]):
            r = reply(self.d, {"jsonrpc": "2.0", "method": "get_data", "id": bad})
            self.assertEqual((r["error"]["code"], r["id"]), (-32600, None), bad)

    def test_good_ids_are_echoed(self) -> None:
        for good in ("x", "", 0, -5, 1.5, 10**20, None):
            r = reply(self.d, {"jsonrpc": "2.0", "method": "get_data", "id": good})
            self.assertEqual(r, {"jsonrpc": "2.0", "result": ["hello", 5], "id": good})

    def test_null_id_is_not_a_notification(self) -> None:
        self.assertIsNotNone(run(self.d, {"jsonrpc": "2.0", "method": "get_data", "id": None}).body)

    def test_bad_version(self) -> None:
        for version in ("1.0", 2.0, None):
            r = reply(self.d, {"jsonrpc": version, "method": "get_data", "id": 7})
            self.assertEqual((r["error"]["code"], r["id"]), (-32600, 7))
        r = reply(self.d, {"method": "get_data", "id": 7})
        self.assertEqual(r["error"]["code"], -32600)

    def test_invalid_request_without_id_is_answered(self) -> None:
        r = reply(self.d, {"jsonrpc": "2.0", "method": "get_data", "params": 5})
        self.assertEqual((r["error"]["code"], r["id"]), (-32600, None))

    def test_bad_top_level(self) -> None:
        for body in (b"1", b'"x"', b"null", b"true"):
            r = reply(self.d, body)
            self.assertEqual((r["error"]["code"], r["id"]), (-32600, None), body)

    def test_parse_errors(self) -> None:
        for body in (b"", b"{", b"\xff\xfe{}", b'{"id": NaN}', b"[1e999, Infinity]", b"[" * 100000):
            r = reply(self.d, body)
            self.assertEqual((r["error"]["code"], r["id"]), (-32700, None), body[:20])

    def test_batch_cap(self) -> None:
        call = {"jsonrpc": "2.0", "method": "get_data", "id": 1}
        self.assertEqual(len(reply(self.d, [call] * 50)), 50)
        r = reply(self.d, [call] * 51)
        self.assertIsInstance(r, dict)
        self.assertEqual((r["error"]["code"], r["id"]), (-32600, None))

    def test_params_errors_name_the_param(self) -> None:
        cases = [
            ({"minuend": 1}, "subtrahend"),
            ({"minuend": 1, "subtrahend": 2, "extra": 3}, "extra"),
            ({"minuend": "1", "subtrahend": 2}, "minuend"),
            ({"minuend": True, "subtrahend": 2}, "minuend"),
            ({"minuend": 1.0, "subtrahend": 2}, "minuend"),
        ]
        for params, name in cases:
            r = reply(self.d, {"jsonrpc": "2.0", "method": "subtract", "params": params, "id": 1})
            self.assertEqual(r["error"]["code"], -32602, params)
            self.assertIn(f"'{name}'", r["error"]["message"])

    def test_too_many_positional(self) -> None:
        r = reply(self.d, {"jsonrpc": "2.0", "method": "subtract", "params": [1, 2, 3], "id": 1})
        self.assertEqual(r["error"]["code"], -32602)
        self.assertIn("at most 2", r["error"]["message"])

    def test_no_params_for_a_method_without_params(self) -> None:
        params: Any
        for params in ([], {}):
            r = reply(self.d, {"jsonrpc": "2.0", "method": "get_data", "params": params, "id": 1})
            self.assertEqual(r["result"], ["hello", 5])
        r = reply(self.d, {"jsonrpc": "2.0", "method": "get_data", "params": [1], "id": 1})
        self.assertEqual(r["error"]["code"], -32602)

    def test_internal_error_is_logged_not_shown(self) -> None:
        def broken() -> None:
            raise RuntimeError("secret detail /etc/shadow")

        d = Dispatcher([Method("broken", (), broken)])
        result = run(d, {"jsonrpc": "2.0", "method": "broken", "id": 1})
        assert result.body is not None
        self.assertEqual(
            json.loads(result.body),
            {"jsonrpc": "2.0", "error": {"code": -32603, "message": "internal error"}, "id": 1},
        )
        self.assertNotIn(b"secret", result.body)
        self.assertNotIn(b"Traceback", result.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unserialisable_result_is_internal_error(self) -> None:
        d = Dispatcher(
            [Method("odd", (), lambda: {"x": object()}), Method("nan", (), lambda: float("nan"))]
        )
        for name in ("odd", "nan"):
            r = reply(d, {"jsonrpc": "2.0", "method": name, "id": 1})
            self.assertEqual(r["error"]["code"], -32603)
        self.assertEqual(len(self.flushLoggedErrors()), 2)

    def test_rpc_error_passes_through(self) -> None:
        def busy() -> None:
            raise RPCError(BUSY, "busy: 32 commands running", {"running": 32})

        r = reply(
            Dispatcher([Method("busy", (), busy)]), {"jsonrpc": "2.0", "method": "busy", "id": 1}
        )
        self.assertEqual(
            r["error"],
            {"code": BUSY, "message": "busy: 32 commands running", "data": {"running": 32}},
        )

    def test_notification_errors_are_silent(self) -> None:
        self.assertIsNone(
            run(self.d, {"jsonrpc": "2.0", "method": "subtract", "params": ["x"]}).body
        )

    def test_deferred_and_coroutine_handlers(self) -> None:
        pending: Deferred[int] = Deferred()

        async def coro(x: int) -> int:
            return x * 2

        d = Dispatcher(
            [Method("later", (), lambda: pending), Method("coro", (Param("x", _num),), coro)]
        )
        self.assertEqual(
            reply(d, {"jsonrpc": "2.0", "method": "coro", "params": [21], "id": 1})["result"], 42
        )
        out: List[DispatchResult] = []
        d.dispatch(b'{"jsonrpc":"2.0","method":"later","id":2}').addCallback(out.append)
        self.assertEqual(out, [])
        pending.callback(5)
        self.assertEqual(json.loads(out[0].body or b"")["result"], 5)

    def test_log_summary(self) -> None:
        result = run(
            self.d,
            [
                {"jsonrpc": "2.0", "method": "get_data", "id": 1},
                {"jsonrpc": "2.0", "method": "nope", "id": 2},
            ],
        )
        self.assertEqual(result.methods, "batch[2]:get_data,nope")
        self.assertEqual(result.outcome, "errors 1/2 (-32601)")
        single = run(self.d, {"jsonrpc": "2.0", "method": "get_data", "id": 1})
        self.assertEqual((single.methods, single.outcome), ("get_data", "ok"))


# --- the agent's method table ---------------------------------------------------------


class MethodTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1764253000.5)
        self.runner = StubRunner()
        self.sync_calls: List[Any] = []
        self.artifact_calls: List[Any] = []
        self.methods = agent_methods(self.runner, self.clock, self.sync_calls, self.artifact_calls)
        self.d = Dispatcher(self.methods.table())

    def call(self, method: str, params: Any = None) -> Dict[str, Any]:
        request: Dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
        if params is not None:
            request["params"] = params
        result = reply(self.d, request)
        assert isinstance(result, dict)
        return result

    def test_allowlist(self) -> None:
        self.assertEqual(
            sorted(self.d.method_names),
            sorted(
                [
                    "health_check",
                    "heartbeat",
                    "get_status",
                    "get_port",
                    "execute_command",
                    "get_command_log",
                    "cancel_command",
                    "execute_ansible",
                    "sync_deployment_tool",
                    "artifact_status",
                    "put_artifact_chunk",
                ]
            ),
        )
        for name in ("table", "uptime", "__init__", "_runner", "rpc.discover", "__class__"):
            self.assertEqual(self.call(name)["error"]["code"], -32601, name)

    def test_simple_methods(self) -> None:
        self.assertEqual(self.call("health_check")["result"], {"status": "ok"})
        self.assertEqual(
            self.call("heartbeat")["result"],
            {"time": 1764253000.5, "version": __version__, "uptime": 60.5},
        )
        self.assertEqual(self.call("get_port")["result"], 24351)

    def test_get_status(self) -> None:
        self.assertEqual(
            self.call("get_status")["result"],
            {
                "version": __version__,
                "hostname": "node-1",
                "os": "Linux 6.1 (Test OS)",
                "python": "3.11.7",
                "uptime": 60.5,
                "load_avg": [0.1, 0.2, 0.3],
                "memory": {"total": 100, "available": 50},
                "disk": {"path": "/", "total": 1000, "free": 400},
                "running_commands": 3,
                "deployment_tool_version": "1.2.3",
                "deployment_tool_dir": "/opt/tool",
                "rpc_port": 24351,
                "cert_fingerprint": FINGERPRINT,
            },
        )

    def test_execute_command_defaults_and_order(self) -> None:
        self.assertEqual(
            self.call("execute_command", {"command": "hostname", "command_id": "c-1"})["result"],
            {"status": "running", "command_id": "c-1"},
        )
        self.call(
            "execute_command",
            ["/bin/sh", ["-c", "echo hi"], 5, "c:2.x_y-z", {"A": "1"}, "/tmp"],
        )
        self.assertEqual(
            self.runner.calls,
            [
                ("execute_command", ("c-1", "hostname", [], None, None, None)),
                (
                    "execute_command",
                    ("c:2.x_y-z", "/bin/sh", ["-c", "echo hi"], 5, {"A": "1"}, "/tmp"),
                ),
            ],
        )

    def test_get_command_log_defaults(self) -> None:
        self.call("get_command_log", {"command_id": "c-1"})
        self.call("get_command_log", ["c-1", 7, 2.5, 100])
        self.assertEqual(
            self.runner.calls,
            [
                ("get_command_log", ("c-1", 0, 0, 1048576)),
                ("get_command_log", ("c-1", 7, 2.5, 100)),
            ],
        )

    def test_execute_ansible_and_cancel(self) -> None:
        self.call("execute_ansible", {"playbook": "ping.yml", "command_id": "a-1"})
        self.call("execute_ansible", ["ping.yml", {"x": [1]}, 30, "a-2"])
        self.call("execute_ansible", {"playbook": "ping.yml", "command_id": "a-3", "check": True})
        self.call("cancel_command", ["a-2"])
        self.assertEqual(
            self.runner.calls,
            [
                ("execute_ansible", ("a-1", "ping.yml", {}, None, False)),
                ("execute_ansible", ("a-2", "ping.yml", {"x": [1]}, 30, False)),
                ("execute_ansible", ("a-3", "ping.yml", {}, None, True)),
                ("cancel_command", ("a-2",)),
            ],
        )

    def test_sync_deployment_tool(self) -> None:
        archive = b"\x1f\x8b binary"
        r = self.call(
            "sync_deployment_tool",
            {
                "archive": base64.b64encode(archive).decode(),
                "sha256": "AB" * 32,
                "version": "1.0.0",
            },
        )
        self.assertEqual(r["result"], {"changed": True, "version": "1.0.0"})
        self.assertEqual(self.sync_calls, [("/opt/tool", archive, "ab" * 32, "1.0.0")])

    def test_sync_deployment_tool_from_the_cache(self) -> None:
        # The new form: no archive, by name or null by position.
        for params in (
            {"sha256": "cd" * 32, "version": "2.0"},
            [None, "cd" * 32, "2.0"],
        ):
            r = self.call("sync_deployment_tool", params)
            self.assertEqual(r["result"], {"changed": True, "version": "2.0"})
        self.assertEqual(self.sync_calls, [("/opt/tool", None, "cd" * 32, "2.0")] * 2)

    def test_artifact_methods(self) -> None:
        data = bytes(range(256)) * 4
        r = self.call("artifact_status", {"sha256": "EF" * 32, "size": 1024})
        self.assertEqual(r["result"], {"present": False, "offset": 0})
        r = self.call(
            "put_artifact_chunk", ["ef" * 32, 4096, 1024, base64.b64encode(data).decode()]
        )
        self.assertEqual(r["result"], {"offset": 2048, "complete": False})
        self.assertEqual(
            self.artifact_calls,
            [("status", "ef" * 32, 1024), ("put_chunk", "ef" * 32, 4096, 1024, data)],
        )

    def test_chunk_size_limit(self) -> None:
        # 512 KiB decoded is the limit; one byte more is refused before any write.
        top = b"\0" * (512 * 1024)
        ok = {"sha256": "a" * 64, "size": 1 << 20, "offset": 0}
        r = self.call("put_artifact_chunk", {**ok, "data": base64.b64encode(top).decode()})
        self.assertEqual(r["result"]["offset"], len(top))
        r = self.call("put_artifact_chunk", {**ok, "data": base64.b64encode(top + b"x").decode()})
        self.assertEqual(r["error"]["code"], -32602)
        self.assertIn("'data'", r["error"]["message"])
        self.assertEqual(len(self.artifact_calls), 1)

    def test_runner_errors_reach_the_client(self) -> None:
        self.runner.raise_on_execute = RPCError(BUSY, "busy")
        r = self.call("execute_command", {"command": "x", "command_id": "c"})
        self.assertEqual(r["error"], {"code": BUSY, "message": "busy"})

    def test_bad_params(self) -> None:
        ok_cmd = {"command": "ls", "command_id": "c-1"}
        cases = [
            ("execute_command", {"command_id": "c-1"}, "command"),
            ("execute_command", {"command": "ls"}, "command_id"),
            ("execute_command", {**ok_cmd, "command": ""}, "command"),
            ("execute_command", {**ok_cmd, "command": 5}, "command"),
            ("execute_command", {**ok_cmd, "command": "a\x00b"}, "command"),
            ("execute_command", {**ok_cmd, "command_id": ""}, "command_id"),
            ("execute_command", {**ok_cmd, "command_id": "x" * 129}, "command_id"),
            ("execute_command", {**ok_cmd, "command_id": "a b"}, "command_id"),
            ("execute_command", {**ok_cmd, "command_id": "a/b"}, "command_id"),
            ("execute_command", {**ok_cmd, "command_id": 5}, "command_id"),
            ("execute_command", {**ok_cmd, "args": "ls"}, "args"),
            ("execute_command", {**ok_cmd, "args": ["a", 1]}, "args"),
            ("execute_command", {**ok_cmd, "timeout": 0}, "timeout"),
            ("execute_command", {**ok_cmd, "timeout": -1}, "timeout"),
            ("execute_command", {**ok_cmd, "timeout": True}, "timeout"),
            ("execute_command", {**ok_cmd, "timeout": "5"}, "timeout"),
            ("execute_command", {**ok_cmd, "env": {"A": 1}}, "env"),
            ("execute_command", {**ok_cmd, "env": {"A=B": "1"}}, "env"),
            ("execute_command", {**ok_cmd, "env": ["A"]}, "env"),
            ("execute_command", {**ok_cmd, "cwd": 5}, "cwd"),
            ("execute_command", {**ok_cmd, "cwd": ""}, "cwd"),
            ("execute_command", {**ok_cmd, "cwd": "a\x00b"}, "cwd"),
            ("execute_command", {**ok_cmd, "args": ["a\x00b"]}, "args"),
            ("execute_command", {**ok_cmd, "env": {"A": "a\x00b"}}, "env"),
            ("execute_command", {**ok_cmd, "env": {"": "1"}}, "env"),
            ("get_command_log", {"command_id": "a/b"}, "command_id"),
            ("cancel_command", {"command_id": "../x"}, "command_id"),
            ("execute_command", {**ok_cmd, "shell": True}, "shell"),
            ("get_command_log", {"command_id": "c", "offset": -1}, "offset"),
            ("get_command_log", {"command_id": "c", "offset": 1.5}, "offset"),
            ("get_command_log", {"command_id": "c", "wait": 30.5}, "wait"),
            ("get_command_log", {"command_id": "c", "wait": -0.1}, "wait"),
            ("get_command_log", {"command_id": "c", "max_bytes": 0}, "max_bytes"),
            ("get_command_log", {"command_id": "c", "max_bytes": 1048577}, "max_bytes"),
            ("get_command_log", {"command_id": "c", "max_bytes": False}, "max_bytes"),
            ("cancel_command", {}, "command_id"),
            ("execute_ansible", {"command_id": "a"}, "playbook"),
            (
                "execute_ansible",
                {"playbook": "p.yml", "command_id": "a", "extra_vars": []},
                "extra_vars",
            ),
            (
                "execute_ansible",
                {"playbook": "p.yml", "command_id": "a", "extra_vars": None},
                "extra_vars",
            ),
            ("execute_ansible", {"playbook": "p.yml", "command_id": "a", "check": "yes"}, "check"),
            ("execute_ansible", {"playbook": "p.yml", "command_id": "a", "check": 1}, "check"),
            (
                "sync_deployment_tool",
                {"archive": "!!!", "sha256": "a" * 64, "version": "1"},
                "archive",
            ),
            ("sync_deployment_tool", {"archive": "", "sha256": "a" * 63, "version": "1"}, "sha256"),
            ("sync_deployment_tool", {"archive": "", "sha256": "g" * 64, "version": "1"}, "sha256"),
            ("sync_deployment_tool", {"archive": "", "sha256": "a" * 64, "version": ""}, "version"),
            ("artifact_status", {"sha256": "../../etc/passwd", "size": 1}, "sha256"),
            ("artifact_status", {"sha256": "a" * 64 + "/x", "size": 1}, "sha256"),
            ("artifact_status", {"sha256": "a" * 64}, "size"),
            ("artifact_status", {"sha256": "a" * 64, "size": -1}, "size"),
            ("artifact_status", {"sha256": "a" * 64, "size": 1.0}, "size"),
            ("artifact_status", {"sha256": "a" * 64, "size": True}, "size"),
            ("put_artifact_chunk", {"sha256": "a" * 64, "size": 1, "offset": 0}, "data"),
            (
                "put_artifact_chunk",
                {"sha256": "a" * 64, "size": 1, "offset": -1, "data": "AA=="},
                "offset",
            ),
            (
                "put_artifact_chunk",
                {"sha256": "a" * 64, "size": 1, "offset": False, "data": "AA=="},
                "offset",
            ),
            (
                "put_artifact_chunk",
                {"sha256": "a" * 64, "size": 1, "offset": 0, "data": "not base64!"},
                "data",
            ),
            (
                "put_artifact_chunk",
                {"sha256": "a" * 64, "size": 1, "offset": 0, "data": 5},
                "data",
            ),
            (
                "put_artifact_chunk",
                {"sha256": "..", "size": 1, "offset": 0, "data": "AA=="},
                "sha256",
            ),
            ("health_check", {"x": 1}, "x"),
        ]
        for method, params, name in cases:
            r = self.call(method, params)
            self.assertIn("error", r, (method, params))
            self.assertEqual(r["error"]["code"], -32602, (method, params))
            self.assertIn(f"'{name}'", r["error"]["message"], (method, params))
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(self.sync_calls, [])
        self.assertEqual(self.artifact_calls, [])

    def test_boundaries_accepted(self) -> None:
        self.call("get_command_log", {"command_id": "x" * 128, "wait": 30, "max_bytes": 1048576})
        self.call(
            "get_command_log", {"command_id": "x", "wait": 0, "max_bytes": 1, "offset": 10**12}
        )
        self.assertEqual(
            [c[1] for c in self.runner.calls],
            [("x" * 128, 0, 30, 1048576), ("x", 10**12, 0, 1)],
        )


# --- the HTTP gate, driven byte by byte -----------------------------------------------

RPC_PATH = "Abcdefghijklmnop_-12"
TOKEN = "t0ken-for-tests-0123456789"


class Connection:
    """One server-side HTTP connection on a StringTransport."""

    def __init__(self, factory: Any) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.9", 5555))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.9", 5555))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


def request(
    body: bytes = b'{"jsonrpc":"2.0","method":"get_data","id":1}',
    *,
    method: bytes = b"POST",
    path: Optional[bytes] = None,
    token: Optional[bytes] = TOKEN.encode(),
    extra: bytes = b"",
    length: Optional[int] = None,
) -> bytes:
    head = (
        method
        + b" "
        + (path if path is not None else f"/{RPC_PATH}/rpc".encode())
        + b" HTTP/1.1\r\n"
    )
    head += b"Host: agent\r\n"
    if token is not None:
        head += b"X-Agent-Token: " + token + b"\r\n"
    head += b"Content-Length: " + str(len(body) if length is None else length).encode() + b"\r\n"
    return head + extra + b"\r\n" + body


class SpyDispatcher(Dispatcher):
    def __init__(self) -> None:
        super().__init__(spec_dispatcher()._methods.values())
        self.bodies: List[bytes] = []
        self.pending: Optional[Deferred[DispatchResult]] = None

    def dispatch(self, body: bytes) -> Deferred[DispatchResult]:
        self.bodies.append(body)
        if self.pending is not None:
            return self.pending
        return super().dispatch(body)


class HTTPGateTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dispatcher = SpyDispatcher()
        self.factory = build_factory(
            rpc_path=RPC_PATH, token=TOKEN, dispatcher=self.dispatcher, reactor=self.clock
        )
        self.events: List[Dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def connect(self) -> Connection:
        c = Connection(self.factory)
        self.addCleanup(c.close)
        return c

    def rpc_events(self) -> List[Dict[str, Any]]:
        return [
            e for e in self.events if e.get("log_namespace", "").startswith("myx_agent.rpc_server")
        ]

    def test_valid_request(self) -> None:
        c = self.connect()
        c.send(request())
        out = c.take()
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertIn(b"content-type: application/json", head.lower())
        self.assertIn(b"content-length: %d" % len(body), head.lower())
        self.assertEqual(json.loads(body), {"jsonrpc": "2.0", "result": ["hello", 5], "id": 1})
        self.assertFalse(c.transport.disconnecting)

    def test_keep_alive_serves_several_requests(self) -> None:
        c = self.connect()
        for i in range(3):
            c.send(request(b'{"jsonrpc":"2.0","method":"get_data","id":%d}' % i))
            body = c.take().partition(b"\r\n\r\n")[2]
            self.assertEqual(json.loads(body), {"jsonrpc": "2.0", "result": ["hello", 5], "id": i})
        self.assertFalse(c.transport.disconnecting)

    def test_unknown_paths_and_methods_get_identical_404(self) -> None:
        variants = [
            request(path=b"/"),
            request(path=b"/rpc"),
            request(path=b"/other/rpc"),
            request(path=f"/{RPC_PATH}/rpc/".encode()),
            request(path=f"/{RPC_PATH}/rpc?x=1".encode()),
            request(path=f"/{RPC_PATH}".encode()),
            request(path=f"/{RPC_PATH.lower()}/rpc".encode()),
            request(path=f"//{RPC_PATH}/rpc".encode()),
            request(method=b"GET", body=b""),
            request(method=b"HEAD", body=b""),
            request(method=b"PUT"),
            request(method=b"OPTIONS", body=b""),
            request(method=b"post"),
            request(method=b"GET", path=b"/", token=None, body=b""),
            request(path=b"/x", token=b"wrong-token-123456789"),
        ]
        for raw in variants:
            c = self.connect()
            c.send(raw)
            self.assertEqual(c.take(), NOT_FOUND_RESPONSE, raw[:60])
            self.assertTrue(c.transport.disconnecting)
        self.assertEqual(self.dispatcher.bodies, [])

    def test_missing_or_wrong_token(self) -> None:
        variants = [
            request(token=None),
            request(token=b""),
            request(token=b"wrong"),
            request(token=TOKEN.encode()[:-1]),
            request(token=TOKEN.encode() + b"x"),
            request(token=TOKEN.upper().encode()),
            request(extra=b"X-Agent-Token: " + TOKEN.encode() + b"\r\n"),  # two headers
        ]
        for raw in variants:
            c = self.connect()
            c.send(raw)
            self.assertEqual(c.take(), UNAUTHORIZED_RESPONSE, raw[:90])
            self.assertTrue(c.transport.disconnecting)
        self.assertEqual(
            json.loads(UNAUTHORIZED_RESPONSE.partition(b"\r\n\r\n")[2]),
            {"jsonrpc": "2.0", "error": {"code": -32001, "message": "unauthorized"}, "id": None},
        )
        self.assertEqual(self.dispatcher.bodies, [])

    def test_token_checked_before_the_body_is_read(self) -> None:
        c = self.connect()
        # Headers announce a body that never comes; the answer must not wait for it.
        raw = request(token=b"wrong", length=500000, body=b"", extra=b"Expect: 100-continue\r\n")
        c.send(raw)
        self.assertEqual(c.take(), UNAUTHORIZED_RESPONSE)
        c.send(b"x" * 10000)
        self.assertEqual(c.take(), b"")
        self.assertEqual(self.dispatcher.bodies, [])

    def test_declared_body_too_large(self) -> None:
        c = self.connect()
        c.send(request(length=1048577, body=b""))
        self.assertEqual(c.take(), TOO_LARGE_RESPONSE)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(self.dispatcher.bodies, [])
        head, _, body = TOO_LARGE_RESPONSE.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "))
        self.assertEqual(json.loads(body)["error"]["code"], -32600)

    def test_body_of_exactly_one_mib_is_accepted(self) -> None:
        call = b'{"jsonrpc":"2.0","method":"get_data","id":1}'
        body = call + b" " * (1048576 - len(call))
        c = self.connect()
        c.send(request(body))
        out = c.take()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"), out[:100])
        self.assertEqual(self.dispatcher.bodies, [body])

    def test_chunked_body_too_large(self) -> None:
        c = self.connect()
        head = (
            f"POST /{RPC_PATH}/rpc HTTP/1.1\r\nX-Agent-Token: {TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        c.send(head)
        chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
        for _ in range(16):
            c.send(chunk)
        self.assertEqual(c.take(), b"")
        c.send(chunk)
        self.assertEqual(c.take(), TOO_LARGE_RESPONSE)
        c.send(chunk + b"0\r\n\r\n")
        self.assertEqual(c.take(), b"")
        self.assertEqual(self.dispatcher.bodies, [])

    def test_chunked_body_within_limit(self) -> None:
        c = self.connect()
        call = b'{"jsonrpc":"2.0","method":"get_data","id":1}'
        c.send(
            f"POST /{RPC_PATH}/rpc HTTP/1.1\r\nX-Agent-Token: {TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + b"%x\r\n" % len(call)
            + call
            + b"\r\n0\r\n\r\n"
        )
        self.assertIn(b'"result":["hello",5]', c.take())

    def test_notification_gets_204(self) -> None:
        c = self.connect()
        c.send(request(b'[{"jsonrpc":"2.0","method":"notify_hello","params":[1]}]'))
        out = c.take()
        self.assertTrue(out.startswith(b"HTTP/1.1 204 No Content\r\n"), out)
        self.assertEqual(out.partition(b"\r\n\r\n")[2], b"")
        c.send(request(b'{"jsonrpc":"2.0","method":"notify_hello","params":[1]}'))
        self.assertTrue(c.take().startswith(b"HTTP/1.1 204 No Content\r\n"))

    def test_parse_error_over_http(self) -> None:
        c = self.connect()
        c.send(request(b"{nope"))
        out = c.take()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(json.loads(out.partition(b"\r\n\r\n")[2])["error"]["code"], -32700)

    def test_long_poll_answer_waits_and_client_gone_is_harmless(self) -> None:
        self.dispatcher.pending = Deferred()
        c = self.connect()
        c.send(request())
        self.assertEqual(c.take(), b"")
        self.dispatcher.pending.callback(DispatchResult(b'{"x":1}', "m", "ok"))
        self.assertTrue(c.take().endswith(b'\r\n\r\n{"x":1}'))

        self.dispatcher.pending = Deferred()
        c2 = self.connect()
        c2.send(request())
        c2.close()
        self.dispatcher.pending.callback(DispatchResult(b'{"x":2}', "m", "ok"))
        self.assertEqual(c2.take(), b"")
        self.assertTrue(any("client gone" in str(e.get("outcome")) for e in self.rpc_events()))

    def test_dispatcher_failure_is_internal_error(self) -> None:
        self.dispatcher.pending = Deferred()
        c = self.connect()
        c.send(request())
        self.dispatcher.pending.errback(RuntimeError("boom"))
        body = c.take().partition(b"\r\n\r\n")[2]
        self.assertEqual(json.loads(body)["error"], {"code": -32603, "message": "internal error"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_idle_keep_alive_timeout(self) -> None:
        self.assertGreaterEqual(KEEPALIVE_IDLE_TIMEOUT, 180)
        c = self.connect()
        c.send(request())
        c.take()
        self.clock.advance(180)
        self.assertFalse(c.transport.disconnecting)
        c.send(request())
        c.take()
        self.clock.advance(KEEPALIVE_IDLE_TIMEOUT - 1)
        self.assertFalse(c.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(c.transport.disconnecting)
        self.clock.advance(60)  # the abort timer after a timeout

    def test_one_log_event_per_request_without_secrets(self) -> None:
        for raw in (
            request(),
            request(
                b'[{"jsonrpc":"2.0","method":"get_data","id":1},{"jsonrpc":"2.0","method":"x","id":2}]'
            ),
            request(token=b"wrong-token-xyz-0000"),
            request(path=b"/nothing"),
            request(length=2000000, body=b""),
        ):
            c = self.connect()
            c.send(raw)
        events = [e for e in self.rpc_events() if "duration_ms" in e]
        self.assertEqual(len(events), 5)
        self.assertEqual(
            [(e["methods"], e["outcome"]) for e in events],
            [
                ("get_data", "ok"),
                ("batch[2]:get_data,x", "errors 1/2 (-32601)"),
                ("-", "http 401 unauthorized"),
                ("-", "http 404 not found"),
                ("-", "http 413 body too large"),
            ],
        )
        for e in events:
            self.assertEqual(e["peer"], "127.0.0.9")
            self.assertIsInstance(e["duration_ms"], float)
        from twisted.logger import formatEvent

        text = repr(self.events) + "".join(formatEvent(e) for e in self.events)
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(RPC_PATH, text)


class LateGateTests(TestCase):
    """If Twisted ever stops exposing the request line before the body,
    the same gate runs in process(), still before the body is parsed."""

    def setUp(self) -> None:
        from twisted.web import http

        original = http.HTTPChannel.allHeadersReceived

        def hide_request_line(channel: Any) -> None:
            saved = (channel._command, channel._path)
            del channel._command, channel._path
            try:
                original(channel)
            finally:
                channel._command, channel._path = saved

        self.patch(http.HTTPChannel, "allHeadersReceived", hide_request_line)
        self.dispatcher = SpyDispatcher()
        self.factory = build_factory(
            rpc_path=RPC_PATH, token=TOKEN, dispatcher=self.dispatcher, reactor=Clock()
        )

    def exchange(self, raw: bytes) -> bytes:
        c = Connection(self.factory)
        self.addCleanup(c.close)
        c.send(raw)
        return c.take()

    def test_same_answers(self) -> None:
        self.assertEqual(self.exchange(request(path=b"/x")), NOT_FOUND_RESPONSE)
        self.assertEqual(self.exchange(request(method=b"GET", body=b"")), NOT_FOUND_RESPONSE)
        self.assertEqual(self.exchange(request(token=b"nope")), UNAUTHORIZED_RESPONSE)
        self.assertEqual(self.dispatcher.bodies, [])
        self.assertIn(b'"result":["hello",5]', self.exchange(request()))


# --- the Klein app --------------------------------------------------------------------


def capture_events(case: TestCase) -> List[Dict[str, Any]]:
    events: List[Dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def request_events(events: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    return [(e["methods"], e["outcome"]) for e in events if "duration_ms" in e]


class BrokenDispatcher(Dispatcher):
    def __init__(self) -> None:
        super().__init__([])

    def dispatch(self, body: bytes) -> Deferred[DispatchResult]:
        raise RuntimeError("secret detail /etc/shadow")


class KleinAppTests(TestCase):
    """AgentRPCApp(...).resource() alone, in the plain Site that StubTreq builds."""

    def setUp(self) -> None:
        self.dispatcher = SpyDispatcher()
        self.events = capture_events(self)
        self.treq = self.stub(self.dispatcher)
        self.url = f"https://agent.test/{RPC_PATH}/rpc"

    def stub(self, dispatcher: Dispatcher) -> Any:
        app = AgentRPCApp(dispatcher=dispatcher, rpc_path=RPC_PATH, token=TOKEN, max_body=1000)
        return StubTreq(app.resource())

    async def post(
        self,
        body: bytes = b'{"jsonrpc":"2.0","method":"get_data","id":1}',
        *,
        url: Optional[str] = None,
        token: Optional[str] = TOKEN,
        method: str = "POST",
        treq: Any = None,
    ) -> Tuple[int, Any, bytes]:
        client = treq or self.treq
        headers = {"X-Agent-Token": [token]} if token is not None else {}
        response = await client.request(method, url or self.url, data=body, headers=headers)
        return response.code, response.headers, await client.content(response)

    def assert_not_found(self, code: int, headers: Any, body: bytes, what: Any) -> None:
        self.assertEqual(code, 404, what)
        self.assertEqual(body, b"not found\n", what)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain"], what)
        self.assertIsNone(headers.getRawHeaders(b"server"), what)
        self.assertIsNone(headers.getRawHeaders(b"date"), what)

    async def test_dispatch(self) -> None:
        code, headers, body = await self.post()
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), {"jsonrpc": "2.0", "result": ["hello", 5], "id": 1})
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        # Nothing that tells one agent version from another.
        self.assertIsNone(headers.getRawHeaders(b"server"))
        self.assertIsNone(headers.getRawHeaders(b"date"))
        self.assertEqual(request_events(self.events), [("get_data", "ok")])

    async def test_notification_gets_204(self) -> None:
        code, headers, body = await self.post(
            b'{"jsonrpc":"2.0","method":"notify_hello","params":[1]}'
        )
        self.assertEqual((code, body), (204, b""))
        self.assertIsNone(headers.getRawHeaders(b"content-type"))

    async def test_token_checked_again(self) -> None:
        for token in (None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
            code, headers, body = await self.post(token=token)
            self.assertEqual(code, 401, token)
            self.assertEqual(
                json.loads(body),
                {
                    "jsonrpc": "2.0",
                    "error": {"code": -32001, "message": "unauthorized"},
                    "id": None,
                },
            )
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(self.dispatcher.bodies, [])
        self.assertEqual(request_events(self.events), [("-", "http 401 unauthorized")] * 6)

    async def test_every_other_route_gets_the_fixed_404(self) -> None:
        base = "https://agent.test"
        cases = [
            ("POST", f"{base}/"),
            ("POST", f"{base}/rpc"),
            ("POST", f"{base}/{RPC_PATH}"),
            ("POST", f"{base}/{RPC_PATH}/rpc/"),
            ("POST", f"{base}/{RPC_PATH}/rpc/more"),  # an unknown sub-path
            ("POST", f"{base}/{RPC_PATH}/rpc?x=1"),
            ("POST", f"{base}/other-path-of-same-shape/rpc"),
            ("POST", f"{base}/{RPC_PATH.lower()}/rpc"),
            ("POST", f"{base}/%41{RPC_PATH[1:]}/rpc"),
            ("POST", f"{base}//{RPC_PATH}/rpc"),  # werkzeug would redirect
            ("GET", self.url),  # werkzeug would answer 405
            ("PUT", self.url),
            ("DELETE", f"{base}/x"),
        ]
        for method, url in cases:
            for token in (TOKEN, None):
                code, headers, body = await self.post(url=url, method=method, token=token)
                self.assert_not_found(code, headers, body, (method, url, token))
        self.assertEqual(self.dispatcher.bodies, [])
        self.assertEqual(
            request_events(self.events), [("-", "http 404 not found")] * (2 * len(cases))
        )

    async def test_body_too_large(self) -> None:
        call = b'{"jsonrpc":"2.0","method":"get_data","id":1}'
        code, _, body = await self.post(call + b" " * (1000 - len(call)))
        self.assertEqual(code, 200)
        code, headers, body = await self.post(call + b" " * (1001 - len(call)))
        self.assertEqual(code, 413)
        self.assertEqual(json.loads(body)["error"]["code"], -32600)
        self.assertEqual(len(self.dispatcher.bodies), 1)

    async def test_errors_are_json_never_a_page(self) -> None:
        code, headers, body = await self.post(treq=self.stub(BrokenDispatcher()))
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["error"], {"code": -32603, "message": "internal error"})
        self.assertNotIn(b"secret", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

        self.dispatcher.pending = Deferred()
        d = Deferred.fromCoroutine(self.post())
        self.dispatcher.pending.errback(RuntimeError("boom"))
        self.treq.flush()
        code, headers, body = await d
        self.assertEqual(json.loads(body)["error"], {"code": -32603, "message": "internal error"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            request_events(self.events), [("-", "error -32603"), ("-", "error -32603")]
        )

    async def test_long_poll_answer_waits(self) -> None:
        self.dispatcher.pending = Deferred()
        d = Deferred.fromCoroutine(self.post())
        self.treq.flush()
        self.assertFalse(d.called)
        self.dispatcher.pending.callback(DispatchResult(b'{"x":1}', "m", "ok"))
        self.treq.flush()
        code, _, body = await d
        self.assertEqual((code, body), (200, b'{"x":1}'))


class KleinBehindTheGateTests(TestCase):
    """What the gate lets through is rendered by the Klein app.

    Here the gate knows another path or token than the app, so requests pass
    the gate that the app must refuse: the app's refusals are the gate's exact
    bytes, and close the connection.
    """

    OTHER = "Zyxwvutsrqponmlk-_98"

    def setUp(self) -> None:
        self.dispatcher = SpyDispatcher()
        self.events = capture_events(self)

    def connect(self, gate: RequestGate) -> Connection:
        app = AgentRPCApp(dispatcher=self.dispatcher, rpc_path=RPC_PATH, token=TOKEN)
        c = Connection(AgentSite(app.resource(), gate, reactor=Clock()))
        self.addCleanup(c.close)
        return c

    def test_app_refuses_with_the_gate_bytes(self) -> None:
        c = self.connect(RequestGate(rpc_path=self.OTHER, token=TOKEN))
        c.send(request(path=f"/{self.OTHER}/rpc".encode()))
        self.assertEqual(c.take(), NOT_FOUND_RESPONSE)
        self.assertTrue(c.transport.disconnecting)

        c = self.connect(RequestGate(rpc_path=RPC_PATH, token=self.OTHER))
        c.send(request(token=self.OTHER.encode()))
        self.assertEqual(c.take(), UNAUTHORIZED_RESPONSE)
        self.assertTrue(c.transport.disconnecting)

        c = self.connect(RequestGate(rpc_path=RPC_PATH, token=TOKEN, max_body=1 << 21))
        c.send(request(b"[" + b" " * 1048576 + b"]"))
        self.assertEqual(c.take(), TOO_LARGE_RESPONSE)
        self.assertTrue(c.transport.disconnecting)

        self.assertEqual(self.dispatcher.bodies, [])
        self.assertEqual(
            request_events(self.events),
            [
                ("-", "http 404 not found"),
                ("-", "http 401 unauthorized"),
                ("-", "http 413 body too large"),
            ],
        )

    def test_unknown_route_after_the_gate(self) -> None:
        # werkzeug finds no route for this path; the answer is still the 404 bytes.
        c = self.connect(RequestGate(rpc_path=f"{RPC_PATH}/rpc/more", token=TOKEN))
        c.send(request(path=f"/{RPC_PATH}/rpc/more/rpc".encode()))
        self.assertEqual(c.take(), NOT_FOUND_RESPONSE)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(request_events(self.events), [("-", "http 404 not found")])

    def test_gate_and_app_agree_on_a_good_request(self) -> None:
        c = self.connect(RequestGate(rpc_path=RPC_PATH, token=TOKEN))
        c.send(request())
        self.assertIn(b'"result":["hello",5]', c.take())
        self.assertEqual(request_events(self.events), [("get_data", "ok")])


class AgentSiteTests(TestCase):
    def test_build_factory_serves_the_klein_app(self) -> None:
        from klein.resource import KleinResource

        factory = build_factory(
            rpc_path=RPC_PATH, token=TOKEN, dispatcher=SpyDispatcher(), reactor=Clock()
        )
        self.assertIsInstance(factory, Site)
        self.assertIsInstance(factory.resource, KleinResource)
        self.assertEqual(factory.timeOut, KEEPALIVE_IDLE_TIMEOUT)
        for shown in (repr(factory), repr(factory.resource), repr(vars(factory))):
            self.assertNotIn(TOKEN, shown)
            self.assertNotIn(RPC_PATH, shown)

    def test_host_header_is_not_routed_on(self) -> None:
        factory = build_factory(
            rpc_path=RPC_PATH, token=TOKEN, dispatcher=SpyDispatcher(), reactor=Clock()
        )
        for host in (b"\xff\xfe", b"", b"[::1]:8443", b"agent.example:1"):
            c = Connection(factory)
            self.addCleanup(c.close)
            raw = request().replace(b"Host: agent\r\n", b"Host: " + host + b"\r\n")
            c.send(raw)
            self.assertIn(b'"result":["hello",5]', c.take(), host)

    def test_a_failing_resource_gets_the_json_internal_error(self) -> None:
        from twisted.web.resource import Resource

        class Broken(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                raise RuntimeError("secret detail /etc/shadow")

        events = capture_events(self)
        site = AgentSite(Broken(), RequestGate(rpc_path=RPC_PATH, token=TOKEN), reactor=Clock())
        c = Connection(site)
        self.addCleanup(c.close)
        c.send(request())
        head, _, body = c.take().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertNotIn(b"server:", head.lower())
        self.assertEqual(json.loads(body)["error"], {"code": -32603, "message": "internal error"})
        self.assertNotIn(b"secret", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(request_events(events), [("-", "error -32603")])
        # The connection stays usable.
        self.assertFalse(c.transport.disconnecting)
