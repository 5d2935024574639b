# -*- test-case-name: tests.daemon.test_rpc_client,tests.daemon.test_rpc_tls -*-
"""`AgentRPC`: the daemon's JSON-RPC 2.0 client for myx_agent (docs/protocol.md).

A `twisted.web.client.Agent` with a persistent `HTTPConnectionPool`, so
heartbeats and log polls reuse connections (the pool's idle timeout is kept
below the agent's 180 s keep-alive). Requests go to the `IAgent` directly:
treq's per-request layers (URL parsing with IDNA checks, a cookie jar, redirect
and gzip agents) cost a third of the daemon's CPU per heartbeat and serve
nothing here, since an agent never redirects, compresses or sets cookies. Every connection is
pinned to the agent's certificate fingerprint (`myxd.rpc.tls`); a connection
made under one pin is never reused under another. Each call has a timeout on
the injected reactor, and retries follow `myxd.rpc.retry`: only idempotent
methods and `execute_*` (whose `command_id` the agent de-duplicates) are
retried.

It is a little over 500 lines because the pinned connection pool, the call
with its timeout, and the per-method wrappers (each with its result checks)
are one client; TLS pinning (``tls``) and the retry policy (``retry``) are
its own modules.

This module never logs a token, never turns TLS verification off, and never
blocks the reactor.
"""

# test-case-name: tests.daemon.test_rpc_client

from __future__ import annotations

import itertools
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConsumer,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from myxd._reactor import default_reactor
from myxd.metrics import NO_METRICS, RPCMetrics
from myxd.rpc.retry import (
    AgentRPCError,
    CallTimeout,
    HTTPStatusError,
    ProtocolError,
    RemoteError,
    is_cancellation,
    retry_call,
)
from myxd.rpc.tls import PinnedTLSPolicy, PinRegistry, normalize_fingerprint

if TYPE_CHECKING:
    from myxd.config import Settings
    from myxd.store.records import AgentRecord

__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_BATCH",
    "AgentEndpoint",
    "AgentRPC",
    "RPCCallError",
    "retry_is_safe",
]

# Methods that change nothing on the agent, or that the agent de-duplicates.
IDEMPOTENT_METHODS = frozenset(
    {
        "health_check",
        "heartbeat",
        "get_status",
        "get_port",
        "get_command_log",
        "cancel_command",
        # Writing the same bytes at the same offset again changes nothing.
        "artifact_status",
        "put_artifact_chunk",
    }
)
# execute_* carry a command_id; the agent runs each id at most once.
COMMAND_METHODS = frozenset({"execute_command", "execute_ansible"})
MAX_BATCH = 50  # the agent answers larger batches with -32600
MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a get_command_log reply is < 1.5 MiB

RPCCallError = RemoteError
"""The per-call error `AgentRPC.batch` returns in place of a result."""


def retry_is_safe(method: str) -> bool:
    """True for methods that may be sent again after a failed attempt."""
    return method in IDEMPOTENT_METHODS or method in COMMAND_METHODS


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class AgentEndpoint:
    """Where and how to reach one agent. `token` and `path` never show in repr."""

    host: str
    port: int
    path: str = field(repr=False)
    token: str = field(repr=False)
    fingerprint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", normalize_fingerprint(self.fingerprint))

    @classmethod
    def from_record(cls, rec: AgentRecord) -> AgentEndpoint:
        return cls(
            host=rec.host,
            port=rec.rpc_port,
            path=rec.rpc_path,
            token=rec.token,
            fingerprint=rec.cert_fingerprint,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/{self.path.strip('/')}/rpc"

    @cached_property
    def _request_parts(self) -> tuple[bytes, bytes]:
        # (URL, token) as bytes, built once per endpoint (retries reuse them).
        return self.url.encode("ascii"), self.token.encode("utf-8")

    @property
    def target(self) -> str:
        """host:port, for logs (the path is part of the secret-ish address)."""
        return f"{self.host}:{self.port}"


@implementer(IBodyProducer)
class _BytesProducer:
    """Writes the whole body at once: no cooperator, so no global reactor."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyReader(Protocol):
    """Collects a response body up to a cap; cancelling it drops the connection.

    (treq's collector cannot be cancelled cleanly, and a cancelled read must
    stop the body, not fire its Deferred a second time.)
    """

    def __init__(self, cap: int) -> None:
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._cap = cap
        self._chunks: list[bytes] = []
        self._size = 0

    def _stop(self) -> None:
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._cap:
            self._stop()
            self.done.errback(ProtocolError(f"response larger than {self._cap} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class _QuietHTTP11ClientFactory(HTTPConnectionPool._factory):  # type: ignore[misc,valid-type]
    # One "Starting factory"/"Stopping factory" log pair per connection would
    # flood the log with 10,000 agents.
    noisy = False


class _PinnedPool(HTTPConnectionPool):
    """A pool whose keys include the pin, so a connection verified against an old
    certificate is never handed to a request made under a new one."""

    _factory = _QuietHTTP11ClientFactory

    def __init__(self, reactor: Any, pins: PinRegistry) -> None:
        super().__init__(reactor, persistent=True)
        self._pins = pins
        # POST is never retried by the pool itself; our retry policy decides.
        self.retryAutomatically = False

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Any:
        pin = None
        if isinstance(key, tuple) and len(key) == 3:
            host = key[1].decode("ascii") if isinstance(key[1], bytes) else str(key[1])
            pin = self._pins.get(host.strip("[]"), key[2])
        return super().getConnection((key, pin), endpoint)


@implementer(IStreamClientEndpoint)
class _LazyPinnedEndpoint:
    """Builds the TLS endpoint only when the pool has no connection to reuse.

    Twisted's Agent asks for an endpoint on every request, pooled or not; its
    standard factory builds a HostnameEndpoint (IDNA checks, and a resolver
    thread even for an IP literal) each time. Here a warm request costs one
    small object, and a cold one connects straight to an IP literal.
    """

    __slots__ = ("_host", "_port", "_owner")

    def __init__(self, owner: _PinnedEndpointFactory, host: bytes, port: int) -> None:
        self._owner = owner
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        owner = self._owner
        host = self._host.decode("ascii")
        inner: IStreamClientEndpoint
        if isIPAddress(host):
            inner = TCP4ClientEndpoint(owner.reactor, host, self._port, timeout=owner.timeout)
        elif isIPv6Address(host):
            inner = TCP6ClientEndpoint(owner.reactor, host, self._port, timeout=owner.timeout)
        else:
            inner = HostnameEndpoint(owner.reactor, host, self._port, timeout=owner.timeout)
        creator = owner.policy.creatorForNetloc(self._host, self._port)
        connected: Deferred[Any] = wrapClientTLS(creator, inner).connect(protocolFactory)
        return connected


@implementer(IAgentEndpointFactory)
class _PinnedEndpointFactory:
    """HTTPS only, pinned through `PinnedTLSPolicy`; see `_LazyPinnedEndpoint`."""

    def __init__(self, reactor: Any, policy: PinnedTLSPolicy, timeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"agents are reached over https, not {uri.scheme!r}")
        return _LazyPinnedEndpoint(self, uri.host, uri.port)


class AgentRPC(Service):
    """JSON-RPC client for agents. One instance per daemon (it owns the pool).

    As a service it closes the pool's cached connections when it is stopped.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime | None,
        settings: Settings,
        *,
        http_agent: IAgent | None = None,
        metrics: RPCMetrics | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._reactor: IReactorTime = default_reactor(reactor)
        self._settings = settings
        self._metrics: RPCMetrics = NO_METRICS if metrics is None else metrics
        self._max_response_bytes = max_response_bytes
        self.pins = PinRegistry()
        self._pool: HTTPConnectionPool | None = None
        if http_agent is None:
            pool = _PinnedPool(reactor, self.pins)
            pool.maxPersistentPerHost = max(1, int(settings.rpc_pool_max_per_host))
            # Twisted annotates this as int; any number of seconds works for callLater.
            pool.cachedConnectionTimeout = float(  # type: ignore[assignment]
                settings.rpc_pool_idle_timeout
            )
            self._pool = pool
            endpoints = _PinnedEndpointFactory(
                reactor, PinnedTLSPolicy(self.pins), float(settings.rpc_timeout)
            )
            http_agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        self._http_agent: IAgent = http_agent
        self._ids = itertools.count(1)

    # -- public API -------------------------------------------------------------

    async def call(
        self,
        ep: AgentEndpoint,
        method: str,
        params: dict[str, Any] | list[Any] | None = None,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call one method; returns its result or raises `AgentRPCError`.

        `retry` defaults to `retry_is_safe(method)`; `timeout` to rpc_timeout.
        """
        result, _attempts = await self.call_with_attempts(
            ep, method, params, retry=retry, timeout=timeout
        )
        return result

    async def call_with_attempts(
        self,
        ep: AgentEndpoint,
        method: str,
        params: dict[str, Any] | list[Any] | None = None,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> tuple[Any, int]:
        """Like `call`, and also returns how many requests were made."""
        if retry is None:
            retry = retry_is_safe(method)
        limit = self._timeout(timeout)

        async def attempt() -> Any:
            req_id = next(self._ids)
            request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
            if params is not None:
                request["params"] = params
            payload = await self._post(ep, _dumps(request), limit)
            return _single_result(payload, req_id)

        return await self._retrying(attempt, ep, method, retry)

    async def batch(
        self,
        ep: AgentEndpoint,
        calls: Sequence[tuple[str, dict[str, Any] | list[Any] | None]],
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> list[Any]:
        """Several calls in ONE HTTP request; returns results in order.

        A call that got a JSON-RPC error yields a `RPCCallError` (= `RemoteError`)
        in its slot instead of raising; a failure of the request as a whole raises
        `AgentRPCError`. `retry` defaults to true when every method is retry-safe.
        """
        if not calls:
            return []
        if len(calls) > MAX_BATCH:
            raise ValueError(f"a batch holds at most {MAX_BATCH} calls")
        if retry is None:
            retry = all(retry_is_safe(method) for method, _ in calls)
        limit = self._timeout(timeout)
        label = "+".join(method for method, _ in calls)
        attempts_box = [0]

        async def attempt() -> list[Any]:
            attempts_box[0] += 1
            ids = [next(self._ids) for _ in calls]
            requests = []
            for req_id, (method, params) in zip(ids, calls):
                request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
                if params is not None:
                    request["params"] = params
                requests.append(request)
            payload = await self._post(ep, _dumps(requests), limit)
            return _batch_results(payload, ids, attempts_box[0])

        results, _attempts = await self._retrying(attempt, ep, label, retry)
        return results

    async def close(self) -> None:
        """Close the pool's cached connections (in-flight requests finish on their own)."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.close())

    # -- internals --------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        value = float(self._settings.rpc_timeout if timeout is None else timeout)
        if value <= 0:
            raise ValueError("timeout must be > 0")
        return value

    async def _retrying(
        self, attempt: Any, ep: AgentEndpoint, method: str, retry: bool
    ) -> tuple[Any, int]:
        return await retry_call(
            attempt,
            clock=self._reactor,
            max_retries=int(self._settings.rpc_retry_max_attempts),
            base_delay=float(self._settings.rpc_retry_base_delay),
            retry=retry,
            method=method,
            target=ep.target,
            log=self.log,
            on_retry=self._on_retry,
            on_final=self._on_final,
        )

    def _on_retry(self, reason: str) -> None:
        self._metrics.rpc_retry()

    def _on_final(self, error: AgentRPCError) -> None:
        self._metrics.rpc_error(error.kind)

    async def _post(self, ep: AgentEndpoint, body: bytes, timeout: float) -> Any:
        d = Deferred.fromCoroutine(self._exchange(ep, body))
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()  # aborts the request and its connection

        timer = self._reactor.callLater(timeout, expire)
        try:
            return await d
        except Exception as exc:
            # Twisted reports a cancelled request as ResponseNeverReceived
            # ([CancelledError]); sort out whose cancellation it was.
            if timed_out:
                raise CallTimeout(timeout) from None
            if is_cancellation(exc):
                raise CancelledError() from exc
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _exchange(self, ep: AgentEndpoint, body: bytes) -> Any:
        # Register the pin right before the request: the TLS policy and the pool
        # both read it synchronously inside Agent.request.
        self.pins.set(ep.host, ep.port, ep.fingerprint)
        url, token = ep._request_parts
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"X-Agent-Token": [token],
            }
        )
        response = await self._http_agent.request(b"POST", url, headers, _BytesProducer(body))
        reader = _BodyReader(self._max_response_bytes)
        response.deliverBody(reader)
        length = getattr(response, "length", UNKNOWN_LENGTH)
        if isinstance(length, int) and length > self._max_response_bytes:
            # Abandon the body: the connection is dropped rather than drained.
            reader.done.addErrback(lambda _: None)
            reader.done.cancel()
            raise ProtocolError(f"response too large ({length} bytes)")
        body = await reader.done
        code = int(response.code)
        if code != 200:
            raise HTTPStatusError(code)
        try:
            return json.loads(body)
        except ValueError:
            raise ProtocolError("agent response is not valid JSON") from None


def _remote_error(obj: Any, attempts: int = 1) -> RemoteError:
    if not isinstance(obj, dict):
        raise ProtocolError("malformed JSON-RPC error object")
    code = obj.get("code")
    message = obj.get("message")
    if not isinstance(code, int) or isinstance(code, bool):
        raise ProtocolError("malformed JSON-RPC error object")
    return RemoteError(code, message if isinstance(message, str) else "", obj.get("data"), attempts)


def _single_result(payload: Any, req_id: int) -> Any:
    if not isinstance(payload, dict) or payload.get("jsonrpc") != "2.0":
        raise ProtocolError("agent response is not a JSON-RPC 2.0 object")
    if "error" in payload and payload["error"] is not None:
        if payload.get("id") not in (req_id, None):
            raise ProtocolError("JSON-RPC response id does not match the request")
        raise _remote_error(payload["error"])
    if payload.get("id") != req_id:
        raise ProtocolError("JSON-RPC response id does not match the request")
    if "result" not in payload:
        raise ProtocolError("JSON-RPC response has neither result nor error")
    return payload["result"]


def _batch_results(payload: Any, ids: list[int], attempts: int) -> list[Any]:
    if isinstance(payload, dict):
        # The agent rejected the batch as a whole (e.g. -32600).
        if payload.get("error") is not None:
            raise _remote_error(payload["error"], attempts)
        raise ProtocolError("expected a JSON-RPC batch response")
    if not isinstance(payload, list):
        raise ProtocolError("expected a JSON-RPC batch response")
    by_id: dict[Any, Any] = {}
    for item in payload:
        if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
            raise ProtocolError("malformed item in JSON-RPC batch response")
        by_id[item.get("id")] = item
    out: list[Any] = []
    for req_id in ids:
        item = by_id.get(req_id)
        if item is None:
            raise ProtocolError(f"no response for request id {req_id} in the batch")
        if item.get("error") is not None:
            out.append(_remote_error(item["error"], attempts))
        elif "result" in item:
            out.append(item["result"])
        else:
            raise ProtocolError("JSON-RPC response has neither result nor error")
    return out
