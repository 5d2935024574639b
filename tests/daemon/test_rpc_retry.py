"""The retry policy: pure backoff, the one classification table, the Clock-driven loop."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from zope.interface import implementer

from myxd.rpc.retry import (
    AUTH,
    FINAL,
    RETRYABLE,
    AgentRPCError,
    CallTimeout,
    CertificateMismatch,
    HTTPStatusError,
    ProtocolError,
    RemoteError,
    backoff_delay,
    classify,
    describe,
    retry_call,
    to_agent_error,
)
from myxd.rpc.tls import PinMismatchError

PIN_A = "a" * 64
PIN_B = "b" * 64


class BackoffTests(TestCase):
    def test_base_one_gives_one_two_four(self) -> None:
        self.assertEqual([backoff_delay(n, 1) for n in (1, 2, 3)], [1.0, 2.0, 4.0])

    def test_scales_with_base(self) -> None:
        self.assertEqual([backoff_delay(n, 0.5) for n in (1, 2, 3)], [0.5, 1.0, 2.0])

    def test_attempt_zero_is_an_error(self) -> None:
        self.assertRaises(ValueError, backoff_delay, 0, 1)


class ClassifyTests(TestCase):
    TABLE: list[tuple[Any, str]] = [
        (neterror.ConnectionRefusedError(), RETRYABLE),
        (neterror.TCPTimedOutError(), RETRYABLE),
        (neterror.TimeoutError(), RETRYABLE),
        (neterror.ConnectionLost(), RETRYABLE),
        (neterror.ConnectionDone(), RETRYABLE),
        (ConnectionResetError(), RETRYABLE),
        (neterror.DNSLookupError("x"), RETRYABLE),
        (SSL.Error([("SSL routines", "", "wrong version number")]), RETRYABLE),
        (ResponseNeverReceived([Failure(neterror.ConnectionLost())]), RETRYABLE),
        (ResponseFailed([Failure(neterror.ConnectionLost())]), RETRYABLE),
        (CallTimeout(30), RETRYABLE),
        (DeferredTimeoutError(), RETRYABLE),
        (HTTPStatusError(500), RETRYABLE),
        (HTTPStatusError(502), RETRYABLE),
        (HTTPStatusError(503), RETRYABLE),
        (HTTPStatusError(401), AUTH),
        (HTTPStatusError(400), FINAL),
        (HTTPStatusError(404), FINAL),
        (HTTPStatusError(413), FINAL),
        (RemoteError(-32602, "invalid params"), FINAL),
        (RemoteError(-32000, "busy"), FINAL),
        (ProtocolError("not JSON"), FINAL),
        (PinMismatchError(PIN_A, PIN_B), FINAL),
        (ResponseNeverReceived([Failure(PinMismatchError(PIN_A, PIN_B))]), FINAL),
        (ValueError("a bug"), FINAL),
    ]

    def test_table(self) -> None:
        for exc, kind in self.TABLE:
            self.assertEqual(classify(exc), kind, repr(exc))
            self.assertEqual(classify(Failure(exc)), kind, repr(exc))

    def test_agent_errors_keep_their_kind(self) -> None:
        for kind in (RETRYABLE, AUTH, FINAL):
            self.assertEqual(classify(AgentRPCError(kind, "x")), kind)

    def test_certificate_mismatch_is_reported_distinctly(self) -> None:
        wrapped = ResponseNeverReceived([Failure(PinMismatchError(PIN_A, PIN_B))])
        err = to_agent_error(wrapped, 1)
        self.assertIsInstance(err, CertificateMismatch)
        assert isinstance(err, CertificateMismatch)
        self.assertEqual((err.kind, err.expected, err.actual), (FINAL, PIN_A, PIN_B))
        self.assertIn("certificate changed", err.reason)

    def test_reasons_are_readable(self) -> None:
        self.assertEqual(describe(neterror.ConnectionRefusedError()), "connection refused")
        self.assertIn("401", describe(HTTPStatusError(401)))
        self.assertEqual(describe(CallTimeout(2.5)), "no response within 2.5s")
        self.assertEqual(
            describe(ResponseNeverReceived([Failure(neterror.ConnectionLost())])),
            "no response: connection lost",
        )
        self.assertIn(
            "wrong version number",
            describe(SSL.Error([("SSL routines", "", "wrong version number")])),
        )


@implementer(ILogObserver)
class Events:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def named(self, fragment: str) -> list[dict[str, Any]]:
        return [e for e in self.events if fragment in e.get("log_format", "")]


class RetryLoopTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.times: list[float] = []
        self.events = Events()
        self.log = Logger(observer=self.events)

    def run_loop(
        self, outcomes: list[Any], *, max_retries: int = 3, retry: bool = True, base: float = 1.0
    ) -> Deferred[tuple[Any, int]]:
        remaining = list(outcomes)

        async def attempt() -> Any:
            self.times.append(self.clock.seconds())
            outcome = remaining.pop(0) if remaining else outcomes[-1]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return Deferred.fromCoroutine(
            retry_call(
                attempt,
                clock=self.clock,
                max_retries=max_retries,
                base_delay=base,
                retry=retry,
                method="heartbeat",
                target="127.0.0.1:1",
                log=self.log,
            )
        )

    def test_delays_are_exactly_one_two_four(self) -> None:
        d = self.run_loop([neterror.ConnectionRefusedError()], max_retries=3)
        self.assertEqual(self.times, [0.0])
        self.clock.advance(0.75)
        self.assertEqual(self.times, [0.0])
        self.clock.advance(0.25)
        self.assertEqual(self.times, [0.0, 1.0])
        self.clock.advance(1.75)
        self.assertEqual(len(self.times), 2)
        self.clock.advance(0.25)
        self.assertEqual(self.times, [0.0, 1.0, 3.0])
        self.clock.advance(3.75)
        self.assertEqual(len(self.times), 3)
        self.clock.advance(0.25)
        self.assertEqual(self.times, [0.0, 1.0, 3.0, 7.0])
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual((err.kind, err.attempts), (RETRYABLE, 4))

    def test_at_most_three_retries(self) -> None:
        d = self.run_loop([neterror.ConnectionRefusedError()], max_retries=3)
        self.clock.pump([1.0] * 20)
        self.assertEqual(self.times, [0.0, 1.0, 3.0, 7.0])
        err = self.failureResultOf(d, AgentRPCError).value
        self.assertEqual(err.attempts, 4)
        self.assertEqual(err.reason, "connection refused")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_success_after_retries_reports_attempts(self) -> None:
        d = self.run_loop([neterror.ConnectionLost(), HTTPStatusError(503), {"ok": 1}])
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), ({"ok": 1}, 3))

    def test_auth_and_final_are_not_retried(self) -> None:
        for exc, kind in (
            (HTTPStatusError(401), AUTH),
            (HTTPStatusError(400), FINAL),
            (RemoteError(-32602, "bad"), FINAL),
            (PinMismatchError(PIN_A, PIN_B), FINAL),
        ):
            self.times.clear()
            d = self.run_loop([exc])
            self.clock.pump([1.0] * 10)
            self.assertEqual(self.times, [self.times[0]], repr(exc))
            err = self.failureResultOf(d, AgentRPCError).value
            self.assertEqual((err.kind, err.attempts), (kind, 1))

    def test_retry_false_makes_one_attempt(self) -> None:
        d = self.run_loop([neterror.ConnectionRefusedError()], retry=False)
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(self.times), 1)
        self.assertEqual(self.failureResultOf(d, AgentRPCError).value.kind, RETRYABLE)

    def test_logs_each_retry_and_the_final_failure(self) -> None:
        d = self.run_loop([neterror.ConnectionRefusedError()])
        self.clock.pump([1.0] * 10)
        self.failureResultOf(d, AgentRPCError)
        retries = self.events.named("retrying in")
        self.assertEqual(
            [(e["attempt"], e["delay"], e["reason"]) for e in retries],
            [
                (1, 1.0, "connection refused"),
                (2, 2.0, "connection refused"),
                (3, 4.0, "connection refused"),
            ],
        )
        finals = self.events.named("failed after")
        self.assertEqual(len(finals), 1)
        self.assertEqual(
            (finals[0]["attempts"], finals[0]["reason"], finals[0]["kind"]),
            (4, "connection refused", RETRYABLE),
        )

    def test_cancellation_is_not_retried_or_wrapped(self) -> None:
        waiting: Deferred[None] = Deferred()

        async def attempt() -> None:
            self.times.append(self.clock.seconds())
            await waiting

        d = Deferred.fromCoroutine(
            retry_call(
                attempt,
                clock=self.clock,
                max_retries=3,
                base_delay=1,
                retry=True,
                method="heartbeat",
                target="t",
                log=self.log,
            )
        )
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(self.times), 1)

    def test_wrapped_cancellation_is_not_retried(self) -> None:
        d = self.run_loop([ResponseNeverReceived([Failure(CancelledError())])])
        self.failureResultOf(d, CancelledError)
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(self.times), 1)

    def test_cancelled_while_connecting_is_not_retried(self) -> None:
        # What the HTTP client raises when a stopping daemon cancels a call that
        # is still connecting: it must end the call, not count as an agent failure.
        d = self.run_loop([neterror.ConnectingCancelledError(("127.0.0.1", 1))])
        self.failureResultOf(d, CancelledError)
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(self.times), 1)

    def test_cancel_during_backoff_stops_the_loop(self) -> None:
        d = self.run_loop([neterror.ConnectionRefusedError()])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
