"""AgentRPC against a fake IAgent on a Clock: wire format, errors, retries, timeouts."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived

from myxd.rpc import (
    AgentEndpoint,
    AgentRPC,
    AgentRPCError,
    CertificateMismatch,
    RemoteError,
    RPCCallError,
)
from myxd.rpc.client import retry_is_safe
from myxd.rpc.tls import PinMismatchError
from tests.daemon.fleet_fakes import (
    OTHER_PIN,
    PIN,
    FakeHTTPAgent,
    FakeRequest,
    FakeResponse,
    agent_record,
    endpoint,
    rpc_error,
    rpc_result,
    settings,
)


class Metrics:
    def __init__(self) -> None:
        self.retries = 0
        self.errors: list[str] = []

    def rpc_retry(self) -> None:
        self.retries += 1

    def rpc_error(self, kind: str) -> None:
        self.errors.append(kind)


class ClientTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()

    def client(self, handler: Any, **overrides: Any) -> tuple[AgentRPC, FakeHTTPAgent]:
        agent = FakeHTTPAgent(handler)
        rpc = AgentRPC(self.clock, settings(**overrides), http_agent=agent, metrics=self.metrics)
        return rpc, agent

    def call(self, rpc: AgentRPC, method: str, params: Any = None, **kw: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(rpc.call(endpoint(), method, params, **kw))


class WireFormatTests(ClientTestCase):
    def test_call_posts_jsonrpc_with_token_header(self) -> None:
        rpc, agent = self.client(lambda req: rpc_result(req, {"status": "ok"}))
        result = self.successResultOf(self.call(rpc, "health_check"))
        self.assertEqual(result, {"status": "ok"})
        [req] = agent.requests
        self.assertEqual(req.method, b"POST")
        self.assertEqual(req.uri, b"https://127.0.0.1:8443/secretpath/rpc")
        self.assertEqual(req.header(b"X-Agent-Token"), [b"tok-123"])
        self.assertEqual(req.header(b"Content-Type"), [b"application/json"])
        body = req.json
        self.assertEqual(body["jsonrpc"], "2.0")
        self.assertEqual(body["method"], "health_check")
        self.assertIsInstance(body["id"], int)
        self.assertNotIn("params", body)
        self.assertNotIn(b" ", req.body)  # compact separators

    def test_params_and_distinct_ids(self) -> None:
        rpc, agent = self.client(lambda req: rpc_result(req, 1))
        self.successResultOf(self.call(rpc, "get_command_log", {"command_id": "c", "offset": 3}))
        self.successResultOf(self.call(rpc, "get_port", []))
        first, second = (r.json for r in agent.requests)
        self.assertEqual(first["params"], {"command_id": "c", "offset": 3})
        self.assertEqual(second["params"], [])
        self.assertNotEqual(first["id"], second["id"])

    def test_endpoint_hides_token_and_normalizes_pin(self) -> None:
        ep = AgentEndpoint("h", 1, "p", "sekrit", ":".join(["AB"] * 32))
        self.assertEqual(ep.fingerprint, PIN)
        self.assertNotIn("sekrit", repr(ep))
        self.assertNotIn("'p'", repr(ep))
        self.assertRaises(ValueError, AgentEndpoint, "h", 1, "p", "t", "xyz")

    def test_endpoint_from_record(self) -> None:
        ep = AgentEndpoint.from_record(agent_record(7))
        self.assertEqual(
            (ep.host, ep.port, ep.path, ep.token, ep.fingerprint),
            ("127.0.0.1", 9007, "path7", "token7", PIN),
        )

    def test_retry_safe_methods(self) -> None:
        for method in (
            "health_check",
            "heartbeat",
            "get_status",
            "get_port",
            "get_command_log",
            "cancel_command",
            "execute_command",
            "execute_ansible",
        ):
            self.assertTrue(retry_is_safe(method), method)
        self.assertFalse(retry_is_safe("sync_deployment_tool"))


class ErrorTests(ClientTestCase):
    def test_jsonrpc_error_is_final_remote_error(self) -> None:
        rpc, agent = self.client(lambda req: rpc_error(req, -32602, "invalid params: offset"))
        err = self.failureResultOf(self.call(rpc, "get_command_log", {}), RemoteError).value
        self.assertEqual(
            (err.code, err.message, err.kind, err.attempts),
            (-32602, "invalid params: offset", "final", 1),
        )
        self.assertEqual(len(agent.requests), 1)
        self.assertEqual(self.metrics.errors, ["final"])

    def test_401_is_auth_without_retry(self) -> None:
        rpc, agent = self.client(
            lambda req: FakeResponse(
                401,
                {
                    "jsonrpc": "2.0",
                    "error": {"code": -32001, "message": "unauthorized"},
                    "id": None,
                },
            )
        )
        d = self.call(rpc, "heartbeat")
        self.clock.pump([1.0] * 10)
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual((err.kind, err.attempts), ("auth", 1))
        self.assertEqual(len(agent.requests), 1)

    def test_400_and_404_are_final_without_retry(self) -> None:
        for code in (400, 404, 413):
            rpc, agent = self.client(lambda req, code=code: FakeResponse(code, b"x"))
            d = self.call(rpc, "heartbeat")
            self.clock.pump([1.0] * 10)
            err = self.failureResultOf(d, AgentRPCError).value
            self.assertEqual((err.kind, err.attempts), ("final", 1), code)
            self.assertEqual(len(agent.requests), 1)

    def test_5xx_is_retried_with_backoff(self) -> None:
        rpc, agent = self.client(lambda req: FakeResponse(503, b"busy"))
        d = self.call(rpc, "heartbeat")
        self.assertEqual(len(agent.requests), 1)
        self.clock.advance(1)
        self.assertEqual(len(agent.requests), 2)
        self.clock.advance(1.5)
        self.assertEqual(len(agent.requests), 2)
        self.clock.advance(0.5)
        self.assertEqual(len(agent.requests), 3)
        self.clock.advance(3.5)
        self.assertEqual(len(agent.requests), 3)
        self.clock.advance(0.5)
        self.assertEqual(len(agent.requests), 4)
        self.clock.pump([1.0] * 10)
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual((err.kind, err.attempts, err.reason), ("retryable", 4, "HTTP 503"))
        self.assertEqual(len(agent.requests), 4)
        self.assertEqual(self.metrics.retries, 3)
        self.assertEqual(self.metrics.errors, ["retryable"])

    def test_connection_refused_then_success(self) -> None:
        outcomes = [neterror.ConnectionRefusedError(), neterror.ConnectionRefusedError()]

        def handler(req: FakeRequest) -> Any:
            return outcomes.pop(0) if outcomes else rpc_result(req, "pong")

        rpc, agent = self.client(handler)
        d = Deferred.fromCoroutine(rpc.call_with_attempts(endpoint(), "heartbeat"))
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), ("pong", 3))

    def test_non_idempotent_method_is_not_retried(self) -> None:
        rpc, agent = self.client(lambda req: neterror.ConnectionRefusedError())
        d = self.call(rpc, "sync_deployment_tool", {"archive": "", "sha256": "", "version": ""})
        self.clock.pump([1.0] * 10)
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual((err.kind, err.attempts), ("retryable", 1))
        self.assertEqual(len(agent.requests), 1)

    def test_execute_command_is_retried_with_the_same_command_id(self) -> None:
        rpc, agent = self.client(lambda req: neterror.ConnectionLost())
        d = self.call(rpc, "execute_command", {"command": "true", "command_id": "c-9"})
        self.clock.pump([1.0] * 10)
        self.assertEqual(self.failureResultOf(d, AgentRPCError).value.attempts, 4)
        self.assertEqual([r.json["params"]["command_id"] for r in agent.requests], ["c-9"] * 4)

    def test_explicit_retry_false(self) -> None:
        rpc, agent = self.client(lambda req: neterror.ConnectionLost())
        d = self.call(rpc, "heartbeat", retry=False)
        self.clock.pump([1.0] * 10)
        self.failureResultOf(d, AgentRPCError)
        self.assertEqual(len(agent.requests), 1)

    def test_timeout_cancels_the_request_and_is_retryable(self) -> None:
        rpc, agent = self.client(lambda req: Deferred(), rpc_timeout=5)
        d = self.call(rpc, "heartbeat")
        self.clock.advance(4.5)
        self.assertEqual(agent.cancelled, 0)
        self.clock.advance(0.5)
        self.assertEqual(agent.cancelled, 1)
        self.assertEqual(len(agent.requests), 1)
        self.clock.advance(1)  # backoff 1 s
        self.assertEqual(len(agent.requests), 2)
        self.clock.pump([1.0] * 30)
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual((err.kind, err.attempts), ("retryable", 4))
        self.assertEqual(err.reason, "no response within 5s")
        self.assertEqual(agent.cancelled, 4)

    def test_per_call_timeout_overrides_setting(self) -> None:
        rpc, agent = self.client(lambda req: Deferred(), rpc_timeout=5)
        d = self.call(rpc, "get_command_log", {}, timeout=15, retry=False)
        self.clock.advance(14)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(
            self.failureResultOf(d, AgentRPCError).value.reason, "no response within 15s"
        )

    def test_certificate_mismatch_is_distinct_and_never_retried(self) -> None:
        mismatch = ResponseNeverReceived([Failure(PinMismatchError(PIN, OTHER_PIN))])
        rpc, agent = self.client(lambda req: mismatch)
        d = self.call(rpc, "heartbeat")
        self.clock.pump([1.0] * 10)
        err = self.failureResultOf(d, CertificateMismatch).value
        self.assertEqual(
            (err.kind, err.attempts, err.expected, err.actual), ("final", 1, PIN, OTHER_PIN)
        )
        self.assertEqual(len(agent.requests), 1)

    def test_malformed_responses_are_final(self) -> None:
        bodies: list[Any] = [
            b"not json",
            {"jsonrpc": "2.0", "id": 999999, "result": 1},  # wrong id
            {"jsonrpc": "1.0", "id": 1, "result": 1},
            [1, 2],
        ]
        for body in bodies:
            rpc, agent = self.client(lambda req, body=body: FakeResponse(200, body))
            d = self.call(rpc, "heartbeat")
            self.clock.pump([1.0] * 10)
            err = self.failureResultOf(d, AgentRPCError).value
            self.assertEqual((err.kind, err.attempts), ("final", 1), repr(body))

    def test_oversized_response_is_refused(self) -> None:
        agent = FakeHTTPAgent(lambda req: FakeResponse(200, b"x" * 2000))
        rpc = AgentRPC(self.clock, settings(), http_agent=agent, max_response_bytes=1000)
        d = self.call(rpc, "heartbeat")
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual(err.kind, "final")
        self.assertIn("too large", err.reason)

    def test_caller_cancellation_is_not_retried(self) -> None:
        rpc, agent = self.client(lambda req: Deferred())
        d = self.call(rpc, "heartbeat")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.pump([1.0] * 40)
        self.assertEqual(len(agent.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TwistedCancellationTests(ClientTestCase):
    """Twisted's HTTP client fails a cancelled request with
    ResponseNeverReceived([CancelledError]), not CancelledError."""

    @staticmethod
    def hanging(req: FakeRequest) -> Deferred[Any]:
        def canceller(d: Deferred[Any]) -> None:
            d.errback(ResponseNeverReceived([Failure(CancelledError())]))

        return Deferred(canceller)

    def test_timeout_is_reported_as_timeout_and_retried(self) -> None:
        rpc, agent = self.client(self.hanging, rpc_timeout=5)
        d = self.call(rpc, "heartbeat")
        self.clock.pump([1.0] * 30)
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual(
            (err.kind, err.attempts, err.reason), ("retryable", 4, "no response within 5s")
        )

    def test_caller_cancellation_ends_the_call(self) -> None:
        rpc, agent = self.client(self.hanging)
        d = self.call(rpc, "get_command_log", {})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.pump([1.0] * 60)
        self.assertEqual(len(agent.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StalledBody(FakeResponse):
    """Sends the headers and part of the body, then nothing."""

    def __init__(self) -> None:
        super().__init__(200, b'{"jsonrpc": "2.0", "id": 1, "result": 1}')
        self.length = 40
        self.stopped = 0
        self.protocol: Any = None

    def stopProducing(self) -> None:
        self.stopped += 1

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)
        protocol.dataReceived(b'{"jsonrpc"')


class BodyReadTests(ClientTestCase):
    def test_timeout_while_reading_the_body_drops_the_connection(self) -> None:
        responses: list[StalledBody] = []

        def handler(req: FakeRequest) -> StalledBody:
            responses.append(StalledBody())
            return responses[-1]

        rpc, agent = self.client(handler, rpc_timeout=5)
        d = self.call(rpc, "heartbeat", retry=False)
        self.clock.advance(5)
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual(err.reason, "no response within 5s")
        self.assertEqual(responses[0].stopped, 1)
        # The aborted connection reports its loss later: ignored, not an error.
        responses[0].protocol.connectionLost(Failure(neterror.ConnectionLost()))

    def test_cancel_while_reading_the_body(self) -> None:
        response = StalledBody()
        rpc, agent = self.client(lambda req: response)
        d = self.call(rpc, "heartbeat")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(response.stopped, 1)
        response.protocol.connectionLost(Failure(neterror.ConnectionLost()))
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(agent.requests), 1)


class BatchTests(ClientTestCase):
    def test_one_http_request_results_in_order(self) -> None:
        def handler(req: FakeRequest) -> FakeResponse:
            hb, st = req.json
            # Responses may come in any order; they are matched by id.
            return FakeResponse(
                200,
                [
                    {"jsonrpc": "2.0", "id": st["id"], "result": {"version": "0.1.0", "x": 1}},
                    {"jsonrpc": "2.0", "id": hb["id"], "result": {"time": 1.0}},
                ],
            )

        rpc, agent = self.client(handler)
        d = Deferred.fromCoroutine(
            rpc.batch(endpoint(), [("heartbeat", None), ("get_status", None)])
        )
        self.assertEqual(self.successResultOf(d), [{"time": 1.0}, {"version": "0.1.0", "x": 1}])
        [req] = agent.requests
        self.assertEqual([r["method"] for r in req.json], ["heartbeat", "get_status"])
        self.assertEqual(req.header(b"X-Agent-Token"), [b"tok-123"])

    def test_per_call_errors_are_returned(self) -> None:
        def handler(req: FakeRequest) -> FakeResponse:
            a, b = req.json
            return FakeResponse(
                200,
                [
                    {"jsonrpc": "2.0", "id": a["id"], "result": "ok"},
                    {
                        "jsonrpc": "2.0",
                        "id": b["id"],
                        "error": {"code": -32601, "message": "method not found"},
                    },
                ],
            )

        rpc, _ = self.client(handler)
        d = Deferred.fromCoroutine(rpc.batch(endpoint(), [("heartbeat", None), ("nope", None)]))
        ok, err = self.successResultOf(d)
        self.assertEqual(ok, "ok")
        self.assertIsInstance(err, RPCCallError)
        self.assertEqual(err.code, -32601)

    def test_whole_batch_rejected(self) -> None:
        rpc, _ = self.client(
            lambda req: FakeResponse(
                200,
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "too large"}},
            )
        )
        d = Deferred.fromCoroutine(rpc.batch(endpoint(), [("heartbeat", None)]))
        self.assertEqual(self.failureResultOf(d, RemoteError).value.code, -32600)

    def test_batch_retried_as_a_whole_when_idempotent(self) -> None:
        outcomes: list[Any] = [neterror.ConnectionRefusedError()]

        def handler(req: FakeRequest) -> Any:
            return outcomes.pop(0) if outcomes else rpc_result(req, 1)

        rpc, agent = self.client(handler)
        d = Deferred.fromCoroutine(
            rpc.batch(endpoint(), [("heartbeat", None), ("get_status", None)])
        )
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), [1, 1])
        self.assertEqual(len(agent.requests), 2)

    def test_missing_response_is_final(self) -> None:
        rpc, _ = self.client(
            lambda req: FakeResponse(
                200, [{"jsonrpc": "2.0", "id": req.json[0]["id"], "result": 1}]
            )
        )
        d = Deferred.fromCoroutine(
            rpc.batch(endpoint(), [("heartbeat", None), ("get_status", None)])
        )
        self.assertEqual(self.failureResultOf(d, AgentRPCError).value.kind, "final")

    def test_limits(self) -> None:
        rpc, agent = self.client(lambda req: rpc_result(req, 1))
        self.assertEqual(
            self.successResultOf(Deferred.fromCoroutine(rpc.batch(endpoint(), []))), []
        )
        self.failureResultOf(
            Deferred.fromCoroutine(rpc.batch(endpoint(), [("heartbeat", None)] * 51)), ValueError
        )
        self.assertEqual(agent.requests, [])
