"""Fakes for the RPC / heartbeat / command-queue unit tests (Clock-driven, no sockets).

`FakeHTTPAgent` is an `IAgent` that hands each request to a handler; `FakeStore`
implements the subset of `myxd.store.Store` the fleet uses, in memory, with the
same semantics (idempotent `append_output`, heartbeat counters); `ScriptedRPC`
stands in for `AgentRPC` with per-method handlers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from myxd.config import Settings
from myxd.errors import ConflictError, NotFoundError, OutputGapError
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import AgentRPCError, RemoteError
from myxd.statuses import (
    COMMAND_KINDS,
    COMMAND_STATUSES,
    ERROR_KINDS,
    OUTPUT_STREAMS,
    UNFINISHED_STATUSES,
)
from myxd.store.commands import MAX_READ_BYTES
from myxd.store.records import AgentRecord, CommandRecord, HeartbeatResult, OutputChunk

PIN = "ab" * 32
OTHER_PIN = "cd" * 32


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        heartbeat_min_interval=20,
        heartbeat_max_interval=60,
        heartbeat_concurrency=8,
        rpc_retry_max_attempts=3,
        rpc_retry_base_delay=1,
        rpc_timeout=5,
        log_poll_interval=1,
        log_poll_wait=10,
        max_log_pollers=100,
        reinstall_after_cycles=3,
    )
    base.update(overrides)
    return Settings(**base)


def endpoint(port: int = 8443) -> AgentEndpoint:
    return AgentEndpoint(
        host="127.0.0.1", port=port, path="secretpath", token="tok-123", fingerprint=PIN
    )


@implementer(IResponse)
class FakeResponse:
    def __init__(self, code: int, body: bytes | Any) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.version = (b"HTTP", 1, 1)
        self.code = code
        self.phrase = b"X"
        self.headers = Headers({b"Content-Type": [b"application/json"]})
        self.length = len(body)
        self.request = None
        self.previousResponse = None
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        if self._body:
            protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response


@dataclasses.dataclass
class FakeRequest:
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> list[bytes]:
        return list(self.headers.getRawHeaders(name) or [])


class _Consumer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@implementer(IAgent)
class FakeHTTPAgent:
    """Calls `handler(FakeRequest)`, which returns a FakeResponse, an exception, or a
    Deferred of either."""

    def __init__(self, handler: Callable[[FakeRequest], Any]) -> None:
        self.handler = handler
        self.requests: list[FakeRequest] = []
        self.cancelled = 0

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        consumer = _Consumer()
        if bodyProducer is not None:
            bodyProducer.startProducing(consumer)
        req = FakeRequest(method, uri, headers or Headers(), consumer.data)
        self.requests.append(req)
        out = self.handler(req)
        if isinstance(out, Deferred):

            def count_cancel(f: Failure) -> Failure:
                from twisted.internet.defer import CancelledError

                if f.check(CancelledError):
                    self.cancelled += 1
                return f

            return out.addErrback(count_cancel)
        if isinstance(out, BaseException):
            return fail(out)
        return succeed(out)


def rpc_result(req: FakeRequest, result: Any) -> FakeResponse:
    body = req.json
    if isinstance(body, list):
        return FakeResponse(
            200, [{"jsonrpc": "2.0", "id": r["id"], "result": result} for r in body]
        )
    return FakeResponse(200, {"jsonrpc": "2.0", "id": body["id"], "result": result})


def rpc_error(req: FakeRequest, code: int, message: str) -> FakeResponse:
    return FakeResponse(
        200, {"jsonrpc": "2.0", "id": req.json["id"], "error": {"code": code, "message": message}}
    )


def agent_record(
    agent_id: int,
    *,
    port: int | None = None,
    failed_cycles: int = 0,
    status: str = "online",
    fingerprint: str = PIN,
) -> AgentRecord:
    return AgentRecord(
        id=agent_id,
        server_id=None,
        host="127.0.0.1",
        rpc_port=port or 9000 + agent_id,
        rpc_path=f"path{agent_id}",
        token=f"token{agent_id}",
        secret_key="s",
        cert_fingerprint=fingerprint,
        status=status,
        status_reason=None,
        rpc_supported=True,
        rpc_last_check=None,
        rpc_last_success=None,
        last_heartbeat=None,
        version=None,
        details=None,
        failed_cycles=failed_cycles,
        created_at=0.0,
    )


class FakeStore:
    """In-memory stand-in for `myxd.store.Store`: the part the fleet uses.

    It provides `myxd.store.protocols.FleetStore` (mypy checks that), and
    tests/daemon/test_store_contract runs the same behaviour tests on it as on
    the SQLite store. Test seams on top: `add`/`put_command` to seed records,
    `fail_next[method]` to make the next call fail, `heartbeat_writes`, `events`,
    and `output`/`streams` to look at what was stored.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.agents: dict[int, AgentRecord] = {}
        self.commands: dict[int, CommandRecord] = {}
        self.output: dict[int, bytearray] = {}
        self.streams: dict[int, list[tuple[int, str, bytes]]] = {}
        self.events: list[dict[str, Any]] = []
        self.heartbeat_writes: list[list[HeartbeatResult]] = []
        self.fail_next: dict[str, list[BaseException]] = {}
        self._ids = itertools.count(1)

    def now(self) -> float:
        return float(self.clock.seconds())

    def _maybe_fail(self, name: str) -> None:
        queue = self.fail_next.get(name)
        if queue:
            raise queue.pop(0)

    def _d(self, name: str, fn: Callable[[], Any]) -> Deferred[Any]:
        def run() -> Any:
            self._maybe_fail(name)
            return fn()

        return maybeDeferred(run)

    # agents
    def add(self, rec: AgentRecord) -> AgentRecord:
        self.agents[rec.id] = rec
        return rec

    def list_agents(self) -> Deferred[list[AgentRecord]]:
        return self._d("list_agents", lambda: sorted(self.agents.values(), key=lambda a: a.id))

    def get_agent(self, agent_id: int) -> Deferred[AgentRecord | None]:
        return self._d("get_agent", lambda: self.agents.get(agent_id))

    def record_heartbeat_results(self, results: Sequence[HeartbeatResult]) -> Deferred[None]:
        results = list(results)

        def run() -> None:
            for r in results:
                if not r.ok and r.error_kind is not None and r.error_kind not in ERROR_KINDS:
                    raise ValueError(f"error_kind must be one of {', '.join(ERROR_KINDS)}")
            self.heartbeat_writes.append(results)
            for r in results:
                a = self.agents.get(r.agent_id)
                if a is None:
                    continue
                if r.ok:
                    a = dataclasses.replace(
                        a,
                        status="online",
                        status_reason=None,
                        failed_cycles=0,
                        last_error_kind=None,
                        rpc_supported=True,
                        rpc_last_check=r.at,
                        rpc_last_success=r.at,
                        last_heartbeat=r.at,
                        version=a.version if r.version is None else r.version,
                        details=a.details if r.details is None else r.details,
                        last_latency=a.last_latency if r.latency is None else r.latency,
                        updated_at=r.at,
                    )
                else:
                    # The installer owns an installing agent's status.
                    installing = a.status == "installing"
                    a = dataclasses.replace(
                        a,
                        status=a.status if installing else "offline",
                        status_reason=a.status_reason if installing else r.reason,
                        failed_cycles=a.failed_cycles + 1,
                        total_failures=a.total_failures + 1,
                        last_error_kind=r.error_kind,
                        rpc_last_check=r.at,
                        updated_at=r.at,
                    )
                self.agents[r.agent_id] = a

        return self._d("record_heartbeat_results", run)

    def add_event(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        details: dict[str, Any] | None = None,
    ) -> Deferred[int]:
        def run() -> int:
            self.events.append(
                dict(actor=actor, action=action, target=target, outcome=outcome, details=details)
            )
            return len(self.events)

        return self._d("add_event", run)

    # commands
    def create_command(
        self,
        *,
        agent_id: int,
        kind: str,
        command: str,
        args: Sequence[Any],
        timeout: float | None,
        extra: dict[str, Any] | None = None,
        status: str = "running",
        command_uid: str | None = None,
    ) -> Deferred[CommandRecord]:
        def run() -> CommandRecord:
            if kind not in COMMAND_KINDS:
                raise ValueError(f"kind must be one of {', '.join(COMMAND_KINDS)}")
            if status not in COMMAND_STATUSES:
                raise ValueError(f"status must be one of {', '.join(COMMAND_STATUSES)}")
            if agent_id not in self.agents:
                raise NotFoundError(f"agent {agent_id} not found")
            for other in self.commands.values():
                if command_uid is not None and other.command_uid == command_uid:
                    raise ConflictError(
                        f"command_uid {command_uid} is already used by command {other.id}"
                    )
            cid = next(self._ids)
            now = self.clock.seconds()
            rec = CommandRecord(
                id=cid,
                agent_id=agent_id,
                command_uid=command_uid or f"uid{cid}",
                kind=kind,
                command=command,
                args=list(args),
                timeout=timeout,
                extra=extra,
                status=status,
                exit_code=None,
                reason=None,
                result=None,
                attempts=0,
                output_offset=0,
                created_at=now,
                started_at=now if status == "running" else None,
                finished_at=None,
            )
            self.commands[cid] = rec
            self.output[cid] = bytearray()
            self.streams[cid] = []
            return rec

        return self._d("create_command", run)

    def put_command(self, rec: CommandRecord, output: bytes = b"") -> None:
        self.commands[rec.id] = rec
        self.output[rec.id] = bytearray(output)
        self.streams[rec.id] = [(0, "stdout", output)] if output else []

    def get_command(self, command_id: int) -> Deferred[CommandRecord | None]:
        return self._d("get_command", lambda: self.commands.get(command_id))

    def get_command_by_uid(self, command_uid: str) -> Deferred[CommandRecord | None]:
        return self._d(
            "get_command_by_uid",
            lambda: next((c for c in self.commands.values() if c.command_uid == command_uid), None),
        )

    def list_unfinished_commands(self) -> Deferred[list[CommandRecord]]:
        return self._d(
            "list_unfinished_commands",
            lambda: [
                c for _, c in sorted(self.commands.items()) if c.status in UNFINISHED_STATUSES
            ],
        )

    def update_command(
        self,
        command_id: int,
        *,
        status: str | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
        attempts: int | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> Deferred[None]:
        fields: dict[str, Any] = dict(
            status=status,
            exit_code=exit_code,
            reason=reason,
            result=result,
            attempts=attempts,
            started_at=started_at,
            finished_at=finished_at,
        )

        def run() -> None:
            if status is not None and status not in COMMAND_STATUSES:
                raise ValueError(f"status must be one of {', '.join(COMMAND_STATUSES)}")
            rec = self.commands.get(command_id)
            if rec is None:
                raise NotFoundError(f"command {command_id} not found")
            changes = {k: v for k, v in fields.items() if v is not None}
            self.commands[command_id] = dataclasses.replace(rec, **changes)

        return self._d("update_command", run)

    def append_output(
        self, command_id: int, offset: int, stream: str, data: bytes
    ) -> Deferred[int]:
        def run() -> int:
            if stream not in OUTPUT_STREAMS:
                raise ValueError(f"stream must be one of {', '.join(OUTPUT_STREAMS)}")
            if offset < 0:
                raise ValueError(f"offset must not be negative, not {offset}")
            rec = self.commands.get(command_id)
            if rec is None:
                raise NotFoundError(f"command {command_id} not found")
            stored = rec.output_offset
            if offset > stored:
                raise OutputGapError(command_id, offset, stored)
            end = offset + len(data)
            if end <= stored:
                return stored
            new = bytes(data[stored - offset :])
            self.output[command_id] += new
            self.streams[command_id].append((stored, stream, new))
            self.commands[command_id] = dataclasses.replace(rec, output_offset=end)
            return end

        return self._d("append_output", run)

    def read_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[list[OutputChunk]]:
        def run() -> list[OutputChunk]:
            if offset < 0:
                raise ValueError(f"offset must not be negative, not {offset}")
            if not 1 <= max_bytes <= MAX_READ_BYTES:
                raise ValueError(f"max_bytes must be in 1-{MAX_READ_BYTES}, not {max_bytes}")
            out: list[OutputChunk] = []
            budget = max_bytes
            for start, stream, data in self.streams.get(command_id, []):
                if budget <= 0:
                    break
                if start + len(data) <= offset:
                    continue
                if start < offset:
                    data, start = data[offset - start :], offset
                data = data[:budget]
                budget -= len(data)
                if out and out[-1].stream == stream:
                    out[-1] = OutputChunk(out[-1].offset, stream, out[-1].data + data)
                else:
                    out.append(OutputChunk(start, stream, data))
            return out

        return self._d("read_output", run)


class ScriptedRPC:
    """Stands in for AgentRPC: `handlers[method](ep, params)` returns a value, raises,
    or returns a Deferred. Records every call."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[AgentEndpoint, Any], Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}

    async def call_with_attempts(
        self,
        ep: AgentEndpoint,
        method: str,
        params: Any = None,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> tuple[Any, int]:
        self.calls.append((method, params))
        handler = self.handlers.get(method)
        if handler is None:
            raise RemoteError(-32601, "method not found")
        self.in_flight[method] = self.in_flight.get(method, 0) + 1
        self.max_in_flight[method] = max(self.max_in_flight.get(method, 0), self.in_flight[method])
        try:
            out = handler(ep, params)
            if isinstance(out, Deferred):
                out = await out
            if isinstance(out, BaseException):
                raise out
            return out, 1
        finally:
            self.in_flight[method] -= 1

    async def call(
        self,
        ep: AgentEndpoint,
        method: str,
        params: Any = None,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        result, _ = await self.call_with_attempts(ep, method, params, retry=retry, timeout=timeout)
        return result

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


def unreachable(attempts: int = 3) -> AgentRPCError:
    return AgentRPCError("retryable", "connection refused", attempts)
