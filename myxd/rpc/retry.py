# -*- test-case-name: tests.daemon.test_rpc_retry,tests.daemon.test_rpc_client -*-
"""Retry policy for agent RPC: error classes, the one classification, backoff, the loop.

Every failure of an agent call is sorted here, and only here, into one of three
kinds:

- ``retryable``: connection refused, reset, lost or timed out; TLS handshake
  failure; no response within the call timeout; HTTP 5xx.
- ``auth``: HTTP 401 (the agent rejected our token).
- ``final``: HTTP 400 and every other 4xx, JSON-RPC errors, malformed responses,
  and a certificate that does not match the pin. A changed certificate is never
  retried and is reported as `CertificateMismatch`.

The backoff is a pure function of the attempt number; the loop waits on the
injected clock with `deferLater`, never with sleep. Nothing here may log a
token, and a cancellation from the caller is never swallowed or retried.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from OpenSSL import SSL
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from myxd.errors import MyxError
from myxd.rpc.tls import PinMismatchError
from myxd.statuses import AUTH, ERROR_KINDS, FINAL, RETRYABLE

__all__ = [
    "AUTH",
    "FINAL",
    "KINDS",
    "RETRYABLE",
    "AgentRPCError",
    "CallTimeout",
    "CertificateMismatch",
    "HTTPStatusError",
    "ProtocolError",
    "RemoteError",
    "backoff_delay",
    "classify",
    "describe",
    "is_cancellation",
    "retry_call",
    "to_agent_error",
]

# The error kinds are defined once, in myxd.statuses (the store and metrics use them too).
KINDS = ERROR_KINDS

T = TypeVar("T")


class AgentRPCError(MyxError):
    """An agent call failed for good (after any retries).

    `kind` is 'retryable' (the agent could not be reached: retries ran out),
    'auth' or 'final'; `reason` is one line fit for an operator, never holding a
    token; `attempts` is how many requests were made.
    """

    def __init__(self, kind: str, reason: str, attempts: int = 1) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.attempts = attempts

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, reason={self.reason!r}, "
            f"attempts={self.attempts})"
        )


class RemoteError(AgentRPCError):
    """A JSON-RPC error object returned by the agent (always final)."""

    def __init__(self, code: int, message: str, data: Any = None, attempts: int = 1) -> None:
        super().__init__(FINAL, f"JSON-RPC error {code}: {message}", attempts)
        self.code = code
        self.message = message
        self.data = data


class CertificateMismatch(AgentRPCError):
    """The agent presented a certificate other than the pinned one; nothing was sent."""

    def __init__(
        self,
        reason: str,
        attempts: int = 1,
        *,
        expected: str | None = None,
        actual: str | None = None,
    ) -> None:
        super().__init__(FINAL, reason, attempts)
        self.expected = expected
        self.actual = actual


class HTTPStatusError(Exception):
    """One attempt got an HTTP status other than 200 (classified by `classify`)."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(f"HTTP {code}" + (f" ({message})" if message else ""))
        self.code = code


class CallTimeout(Exception):
    """One attempt got no complete response within the call timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no response within {seconds:g}s")
        self.seconds = seconds


class ProtocolError(Exception):
    """The agent answered with something that is not a valid JSON-RPC response."""


def backoff_delay(attempt: int, base: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base * 2**(n-1).

    With base 1 that is 1, 2, 4 s.
    """
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    return float(base) * (2 ** (attempt - 1))


def _unwrap(failure_or_exc: Failure | BaseException) -> BaseException:
    if isinstance(failure_or_exc, Failure):
        value = failure_or_exc.value
        return value if value is not None else Exception("unknown failure")
    return failure_or_exc


def _reasons(exc: BaseException) -> list[BaseException]:
    # ResponseFailed & co. wrap a list of Failures (the connection-lost reasons).
    out: list[BaseException] = []
    for reason in getattr(exc, "reasons", None) or []:
        out.append(_unwrap(reason))
    return out


def _pin_mismatch(exc: BaseException) -> PinMismatchError | None:
    if isinstance(exc, PinMismatchError):
        return exc
    for inner in _reasons(exc):
        if isinstance(inner, PinMismatchError):
            return inner
    return None


def is_cancellation(failure_or_exc: Failure | BaseException) -> bool:
    """True for a cancellation, also when Twisted's HTTP client wraps it.

    A cancelled request fails with ``ResponseNeverReceived([CancelledError])``
    rather than CancelledError; it must end the call, never be retried.
    """
    exc = _unwrap(failure_or_exc)
    # A call cancelled while still connecting fails with ConnectingCancelledError
    # (our own timeouts are turned into CallTimeout before they get here).
    if isinstance(exc, (CancelledError, neterror.ConnectingCancelledError)):
        return True
    return any(
        isinstance(inner, (CancelledError, neterror.ConnectingCancelledError))
        for inner in _reasons(exc)
    )


def classify(failure_or_exc: Failure | BaseException) -> str:
    """'retryable', 'auth' or 'final' for any failure of one agent call attempt."""
    exc = _unwrap(failure_or_exc)
    if isinstance(exc, AgentRPCError):
        return exc.kind
    if _pin_mismatch(exc) is not None:
        return FINAL
    if isinstance(exc, HTTPStatusError):
        if exc.code == 401:
            return AUTH
        if 500 <= exc.code <= 599:
            return RETRYABLE
        return FINAL
    if isinstance(exc, (CallTimeout, DeferredTimeoutError)):
        return RETRYABLE
    if isinstance(exc, RequestGenerationFailed):
        return FINAL
    if isinstance(exc, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)):
        return RETRYABLE
    if isinstance(
        exc,
        (
            neterror.ConnectError,
            neterror.ConnectionClosed,
            neterror.DNSLookupError,
            SSL.Error,
            ConnectionError,
        ),
    ):
        return RETRYABLE
    return FINAL


def describe(failure_or_exc: Failure | BaseException) -> str:
    """A one-line reason for an operator (never includes request headers or body)."""
    exc = _unwrap(failure_or_exc)
    if isinstance(exc, AgentRPCError):
        return exc.reason
    mismatch = _pin_mismatch(exc)
    if mismatch is not None:
        return str(mismatch)
    if isinstance(exc, HTTPStatusError):
        return {
            401: "unauthorized: the agent rejected the token (HTTP 401)",
            400: "bad request (HTTP 400)",
        }.get(exc.code, str(exc))
    if isinstance(exc, (CallTimeout, ProtocolError)):
        return str(exc)
    if isinstance(exc, DeferredTimeoutError):
        return "no response within the call timeout"
    if isinstance(
        exc,
        (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed, RequestGenerationFailed),
    ):
        inner = _reasons(exc)
        what = {
            ResponseNeverReceived: "no response",
            ResponseFailed: "response failed",
            RequestTransmissionFailed: "request not sent",
            RequestGenerationFailed: "request not generated",
        }.get(type(exc), "failed")
        return f"{what}: {describe(inner[0])}" if inner else what
    if isinstance(exc, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (neterror.TCPTimedOutError, neterror.TimeoutError)):
        return "connect timed out"
    if isinstance(exc, neterror.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(exc, neterror.ConnectionDone):
        return "connection closed by the agent"
    if isinstance(exc, neterror.ConnectionClosed):
        return "connection lost"
    if isinstance(exc, SSL.Error):
        return f"TLS handshake failed: {_ssl_detail(exc)}"
    if isinstance(exc, neterror.ConnectError):
        return f"connect failed: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _ssl_detail(exc: SSL.Error) -> str:
    # pyOpenSSL packs [(lib, func, reason), ...] into args[0].
    try:
        items = exc.args[0]
        reasons = [str(item[-1]) for item in items if item]
        if reasons:
            return ", ".join(reasons)
    except (IndexError, TypeError):
        pass
    return type(exc).__name__


def to_agent_error(failure_or_exc: Failure | BaseException, attempts: int) -> AgentRPCError:
    """The public error for a failed call: kind, reason and attempt count."""
    exc = _unwrap(failure_or_exc)
    if isinstance(exc, AgentRPCError):
        exc.attempts = attempts
        return exc
    mismatch = _pin_mismatch(exc)
    if mismatch is not None:
        return CertificateMismatch(
            str(mismatch), attempts, expected=mismatch.expected, actual=mismatch.actual
        )
    return AgentRPCError(classify(exc), describe(exc), attempts)


_log = Logger(namespace="myxd.rpc.retry")


async def retry_call(
    attempt: Callable[[], Awaitable[T]],
    *,
    clock: IReactorTime,
    max_retries: int,
    base_delay: float,
    retry: bool,
    method: str,
    target: str,
    log: Logger | None = None,
    on_retry: Callable[[str], object] | None = None,
    on_final: Callable[[AgentRPCError], object] | None = None,
) -> tuple[T, int]:
    """Run `attempt` until it succeeds, fails non-retryably, or retries run out.

    `max_retries` counts retries after the first try, as the architecture does
    ("retry at most 3 times, waiting 1, 2, 4 s"): 3 means up to 4 calls.

    Returns (result, attempts). Raises `AgentRPCError` (or a subclass) on failure.
    Only 'retryable' failures are retried, and only when `retry` is true; the wait
    after failed attempt n is `backoff_delay(n, base_delay)` on `clock`.
    `target` names the agent (host:port) in logs and must not hold a secret.
    """
    log = log or _log
    limit = 1 + max(0, int(max_retries)) if retry else 1
    n = 0
    while True:
        n += 1
        try:
            return (await attempt(), n)
        except CancelledError:
            raise
        except Exception as exc:
            if is_cancellation(exc):
                raise CancelledError() from exc
            kind = classify(exc)
            reason = describe(exc)
            if kind == RETRYABLE and n < limit:
                delay = backoff_delay(n, base_delay)
                log.info(
                    "rpc {method} to {target}: attempt {attempt}/{max_attempts} failed "
                    "({reason}); retrying in {delay}s",
                    method=method,
                    target=target,
                    attempt=n,
                    max_attempts=limit,
                    reason=reason,
                    delay=delay,
                )
                if on_retry is not None:
                    on_retry(reason)
                await deferLater(clock, delay, lambda: None)
                continue
            final = to_agent_error(exc, n)
            log.warn(
                "rpc {method} to {target} failed after {attempts} attempt(s), {kind}: {reason}",
                method=method,
                target=target,
                attempts=n,
                kind=final.kind,
                reason=final.reason,
            )
            if on_final is not None:
                on_final(final)
            raise final from exc
