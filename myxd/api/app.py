# -*- test-case-name: tests.daemon.test_api -*-
"""The admin API: a Klein app over the store, the command queue and the agent RPC client.

JSON in and out. Every route but GET /api/health and the web console's static files
(`console.PUBLIC_PATHS`) needs the admin bearer token (the `Gate` in front of the
routes checks it, so no route can forget). Bad input is a 400
that names the field, an unknown id a 404, and any unexpected failure a 500 JSON
"internal error" whose details go only to the log, under the request id.

Handlers never block the reactor (store and RPC calls are Deferreds), never log or
return an agent token or secret, and never leave half-written state: input is fully
checked before anything is written, and an agent is only saved after its pinned
check succeeded.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    gatherResults,
    succeed,
)
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

import myxd
from myxd._reactor import default_reactor
from myxd.api import openapi
from myxd.api.console import PUBLIC_PATHS as CONSOLE_PATHS
from myxd.api.console import Console
from myxd.api.gate import Gate, make_site, request_id
from myxd.api.inputs import APIError, Body, Query, json_bytes, read_json_object, valid_host
from myxd.api.serialize import (
    FINAL_STATUSES,
    agent_json,
    chunk_json,
    command_json,
    event_json,
)
from myxd.api.watch import OutputWatch
from myxd.errors import ConflictError, NotFoundError
from myxd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from myxd.metrics import Metrics
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import AgentRPCError, CertificateMismatch
from myxd.rpc.tls import normalize_fingerprint
from myxd.store.records import (
    AGENT_STATUSES,
    AgentRecord,
    CommandRecord,
    HeartbeatResult,
    OutputChunk,
)

if TYPE_CHECKING:
    from myxd.config import Settings
    from myxd.fleet.commands import CommandQueue
    from myxd.rpc.client import AgentRPC
    from myxd.store.protocols import AdminStore

__all__ = ["AdminAPI"]

_JSON = b"application/json"
_MAX_ID = 2**63 - 1
_MAX_BULK_AGENTS = 10000
_RPC_PATH_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Header-safe token characters: visible ASCII, no spaces (it goes into X-Agent-Token).
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,1024}$")
_COMMAND_FIELDS = ("command", "args", "timeout", "env", "cwd")
_SSE_READ_BYTES = 256 * 1024
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class _CommandSpec:
    command: str
    args: list[str]
    timeout: float | None
    env: dict[str, str] | None
    cwd: str | None


def _command_spec(body: Body) -> _CommandSpec:
    command = body.string("command", max_len=4096)
    assert command is not None
    cwd = body.string("cwd", required=False, max_len=4096, nullable=True)
    return _CommandSpec(
        command=command,
        args=body.string_list("args"),
        timeout=body.timeout("timeout"),
        env=body.string_map("env"),
        cwd=cwd,
    )


def _has_body(request: IRequest) -> bool:
    content = request.content
    if content is None:
        return False
    content.seek(0)
    return bool(content.read(1))


def _check_id(value: int) -> int:
    if value < 1 or value > _MAX_ID:
        raise APIError(404, "no such id")
    return value


def _json(request: IRequest, obj: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    return json_bytes(obj)


def _sse_event(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: ".encode() + json_bytes(data) + b"\n\n"


@implementer(IPushProducer)
class _FlowControl:
    """Lets the SSE writer wait while the client's socket is backed up."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiter: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._release()

    def stopProducing(self) -> None:
        self.stopped = True
        self._release()

    def _release(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def ready(self) -> Deferred[None]:
        if not self.paused or self.stopped:
            return succeed(None)
        self._waiter = Deferred()
        return self._waiter


class AdminAPI:
    """Klein routes of the admin API; `resource()` is what the daemon serves."""

    _app = Klein()
    log = Logger()

    #: Seconds between SSE comment lines that keep idle proxies and clients awake.
    sse_keepalive = 15.0

    def __init__(
        self,
        store: AdminStore,
        queue: CommandQueue,
        rpc: AgentRPC,
        settings: Settings,
        reactor: IReactorTime | None = None,
        *,
        metrics: Metrics,
        admin_token: str,
        servers_api: Any = None,
    ) -> None:
        if not admin_token:
            raise ValueError("the admin API needs a non-empty admin token")
        self._store = store
        self._queue = queue
        self._rpc = rpc
        self._settings = settings
        self._reactor: IReactorTime = default_reactor(reactor)
        self._metrics = metrics
        self._token = admin_token.encode("utf-8")
        self._servers_api = servers_api
        self._console = Console()
        self._document = openapi.build_document(myxd.__version__, self._mounted_paths())

    # -- wiring ------------------------------------------------------------------

    def resource(self) -> IResource:
        """The root resource: the token gate in front of the Klein routes."""
        # The console's page and assets are public: they carry no data, and the page
        # asks for the token itself. Every /api/* route stays behind the token.
        return Gate(
            self._app.resource(),
            self._token,
            public=(b"/api/health", *CONSOLE_PATHS),
            on_response=self._metrics.api_response,
        )

    def site(self) -> Site:
        """A Site serving `resource()` that caps request bodies while they arrive."""
        return make_site(self.resource(), self._reactor)

    def openapi_document(self) -> dict[str, Any]:
        return self._document

    def _mounted_paths(self) -> dict[str, dict[str, Any]]:
        if self._servers_api is None:
            return {}
        described = getattr(self._servers_api, "openapi_paths", None)
        if callable(described):
            # The mounted app describes itself (paths already under /api/servers).
            return dict(described())
        app = getattr(self._servers_api, "_app", None)
        url_map = getattr(app, "url_map", None)
        if url_map is None:
            return {}
        routes = [
            (rule.rule, sorted(rule.methods or ()))
            for rule in url_map.iter_rules()
            if "__rest__" not in rule.rule
        ]
        return openapi.mounted_paths("/api/servers", routes)

    # -- errors ------------------------------------------------------------------

    @_app.handle_errors(APIError)
    def _client_error(self, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        assert isinstance(err, APIError)
        return _json(request, err.body(), err.code)

    @_app.handle_errors(NotFoundError)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, {"error": "not found"}, 404)

    @_app.handle_errors(ConflictError)
    def _conflict(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, {"error": "conflict with the current state"}, 409)

    @_app.handle_errors(AgentRPCError)
    def _agent_error(self, request: IRequest, failure: Failure) -> bytes:
        # The agent could not be asked (e.g. a cancel): the daemon itself is fine.
        err = failure.value
        assert isinstance(err, AgentRPCError)
        return _json(
            request,
            {
                "error": f"the agent could not be reached: {err.reason}",
                "reason": err.reason,
                "kind": err.kind,
            },
            502,
        )

    @_app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert isinstance(exc, HTTPException)
        code = exc.code or 500
        # Keep werkzeug's Allow / Location headers (405, trailing-slash redirects).
        for name, value in exc.get_headers():
            if name.lower() in ("allow", "location"):
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        name = (exc.name or "error").lower()
        return _json(request, {"error": name}, code)

    @_app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "admin API request {request_id} {method} failed",
            failure,
            request_id=request_id(request),
            method=request.method.decode("latin-1"),
        )
        if getattr(request, "startedWriting", False):
            # Headers are gone already (a stream): nothing sensible can be added.
            return b""
        return _json(request, {"error": "internal error", "request_id": request_id(request)}, 500)

    # -- lookups -----------------------------------------------------------------

    async def _agent_or_404(self, agent_id: int) -> AgentRecord:
        rec = await self._store.get_agent(_check_id(agent_id))
        if rec is None:
            raise APIError(404, f"no agent {agent_id}")
        return rec

    async def _command_or_404(self, command_id: int) -> CommandRecord:
        rec = await self._store.get_command(_check_id(command_id))
        if rec is None:
            raise APIError(404, f"no command {command_id}")
        return rec

    async def _command_output_or_404(
        self, command_id: int, offset: int, max_bytes: int
    ) -> tuple[CommandRecord, list[OutputChunk]]:
        rec, chunks = await self._store.read_command_output(
            _check_id(command_id), offset, max_bytes
        )
        if rec is None:
            raise APIError(404, f"no command {command_id}")
        return rec, chunks

    async def _event(
        self, action: str, target: str | None, outcome: str, details: dict[str, Any] | None = None
    ) -> None:
        try:
            await self._store.add_event(
                actor="admin-api", action=action, target=target, outcome=outcome, details=details
            )
        except Exception:
            # The audit row must not turn a done action into an error for the client.
            self.log.failure("could not record event {action}", action=action)

    # -- health, docs, metrics ---------------------------------------------------

    @_app.route("/api/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return _json(request, {"status": "ok"})

    @_app.route("/api/openapi.json", methods=["GET"])
    def openapi_json(self, request: IRequest) -> bytes:
        return _json(request, self._document)

    @_app.route("/metrics", methods=["GET"])
    async def metrics(self, request: IRequest) -> bytes:
        agents = await self._store.agent_counts_by_status()
        commands = await self._store.command_counts_by_status()
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode("ascii"))
        return self._metrics.render(agents, commands).encode("utf-8")

    # -- agents ------------------------------------------------------------------

    @_app.route("/api/agents", methods=["GET"])
    async def list_agents(self, request: IRequest) -> bytes:
        q = Query(request, {"limit", "offset", "status"})
        limit = q.integer("limit", 50, minimum=1, maximum=1000)
        offset = q.integer("offset", 0, minimum=0, maximum=_MAX_ID)
        status = q.choice("status", AGENT_STATUSES)
        agents = await self._store.list_agents(limit=limit, offset=offset, status=status)
        counts = await self._store.agent_counts_by_status()
        total = counts.get(status, 0) if status is not None else sum(counts.values())
        return _json(
            request,
            {
                "agents": [agent_json(a) for a in agents],
                "limit": limit,
                "offset": offset,
                "total": total,
            },
        )

    @_app.route("/api/agents/<int:agent_id>", methods=["GET"])
    async def get_agent(self, request: IRequest, agent_id: int) -> bytes:
        return _json(request, agent_json(await self._agent_or_404(agent_id)))

    @_app.route("/api/agents/<int:agent_id>", methods=["DELETE"])
    async def delete_agent(self, request: IRequest, agent_id: int) -> bytes:
        rec = await self._agent_or_404(agent_id)
        if not await self._store.delete_agent(rec.id):
            raise APIError(404, f"no agent {agent_id}")
        self.log.info("agent {agent_id} deleted through the API", agent_id=rec.id)
        await self._event("agent.delete", f"agent:{rec.id}", "ok", {"host": rec.host})
        return _json(request, {"id": rec.id, "deleted": True})

    @_app.route("/api/agents", methods=["POST"])
    async def adopt_agent(self, request: IRequest) -> bytes:
        body = Body(
            read_json_object(request), {"host", "rpc_port", "rpc_path", "token", "cert_fingerprint"}
        )
        host = body.string("host", max_len=253)
        assert host is not None
        if not valid_host(host):
            raise APIError(400, "host must be a host name or an IP address", "host")
        port = body.integer("rpc_port", minimum=1, maximum=65535)
        assert port is not None
        rpc_path = (body.string("rpc_path", max_len=130) or "").strip("/")
        if not _RPC_PATH_RE.match(rpc_path):
            raise APIError(400, "rpc_path must be 1-128 characters of [A-Za-z0-9_-]", "rpc_path")
        token = body.string("token", max_len=1024)
        assert token is not None
        if not _TOKEN_RE.match(token):
            raise APIError(400, "token must be visible ASCII characters without spaces", "token")
        try:
            fingerprint = normalize_fingerprint(body.string("cert_fingerprint", max_len=200) or "")
        except ValueError as e:
            raise APIError(400, str(e), "cert_fingerprint") from None

        target = f"{host}:{port}"
        endpoint = AgentEndpoint(
            host=host, port=port, path=rpc_path, token=token, fingerprint=fingerprint
        )
        started = self._reactor.seconds()
        try:
            status = await self._rpc.call(endpoint, "get_status", retry=False)
        except CertificateMismatch as e:
            await self._event("agent.adopt", target, "refused", {"reason": "certificate mismatch"})
            raise APIError(
                422,
                "the agent's certificate does not match cert_fingerprint",
                "cert_fingerprint",
                reason=e.reason,
            ) from None
        except AgentRPCError as e:
            await self._event("agent.adopt", target, "refused", {"reason": e.reason})
            raise APIError(
                422, f"the agent could not be checked: {e.reason}", reason=e.reason, kind=e.kind
            ) from None
        latency = self._reactor.seconds() - started
        if not isinstance(status, dict):
            raise APIError(
                422,
                "the agent answered get_status with something unexpected",
                reason="bad get_status result",
            )
        try:
            agent_id = await self._store.add_agent(
                host=host,
                rpc_port=port,
                rpc_path=rpc_path,
                token=token,
                secret_key=secrets.token_urlsafe(32),
                cert_fingerprint=fingerprint,
                status="online",
            )
        except ConflictError:
            raise APIError(
                409, "an agent with this rpc_port is already registered", "rpc_port"
            ) from None
        version = status.get("version")
        await self._store.record_heartbeat_results(
            [
                HeartbeatResult(
                    agent_id=agent_id,
                    at=self._reactor.seconds(),
                    ok=True,
                    version=version if isinstance(version, str) else None,
                    details=status,
                    latency=latency,
                )
            ]
        )
        self.log.info("agent {agent_id} adopted at {target}", agent_id=agent_id, target=target)
        await self._event(
            "agent.adopt", f"agent:{agent_id}", "ok", {"host": host, "rpc_port": port}
        )
        rec = await self._agent_or_404(agent_id)
        return _json(request, agent_json(rec), 201)

    # -- commands ----------------------------------------------------------------

    @_app.route("/api/agents/<int:agent_id>/commands", methods=["GET"])
    async def list_agent_commands(self, request: IRequest, agent_id: int) -> bytes:
        q = Query(request, {"limit", "offset"})
        limit = q.integer("limit", 50, minimum=1, maximum=1000)
        offset = q.integer("offset", 0, minimum=0, maximum=_MAX_ID)
        await self._agent_or_404(agent_id)
        rows = await self._store.list_commands(agent_id=agent_id, limit=limit, offset=offset)
        return _json(
            request,
            {
                "commands": [command_json(c) for c in rows],
                "limit": limit,
                "offset": offset,
                "next_offset": offset + len(rows) if len(rows) == limit else None,
            },
        )

    @_app.route("/api/agents/<int:agent_id>/commands", methods=["POST"])
    async def create_command(self, request: IRequest, agent_id: int) -> bytes:
        await self._agent_or_404(agent_id)
        spec = _command_spec(Body(read_json_object(request), _COMMAND_FIELDS))
        rec = await self._queue.add_command(
            agent_id,
            spec.command,
            spec.args,
            spec.timeout,
            env=spec.env,
            cwd=spec.cwd,
            actor="admin-api",
        )
        return _json(request, command_json(rec), 201)

    @_app.route("/api/agents/<int:agent_id>/ansible", methods=["POST"])
    async def create_ansible(self, request: IRequest, agent_id: int) -> bytes:
        await self._agent_or_404(agent_id)
        body = Body(read_json_object(request), {"playbook", "extra_vars", "timeout"})
        playbook = body.string("playbook", max_len=1024)
        assert playbook is not None
        if playbook.startswith("/") or ".." in playbook.split("/"):
            raise APIError(400, "playbook must be a relative path inside playbooks/", "playbook")
        extra_vars = body.json_object("extra_vars")
        timeout = body.timeout("timeout")
        rec = await self._queue.add_ansible(
            agent_id, playbook, extra_vars, timeout, actor="admin-api"
        )
        return _json(request, command_json(rec), 201)

    @_app.route("/api/commands", methods=["POST"])
    async def create_commands(self, request: IRequest) -> bytes:
        body = Body(read_json_object(request), ("agents", *_COMMAND_FIELDS))
        wanted = body.raw("agents")
        spec = _command_spec(body)
        agent_ids = await self._bulk_targets(wanted)

        async def one(agent_id: int) -> dict[str, Any]:
            try:
                rec = await self._queue.add_command(
                    agent_id,
                    spec.command,
                    spec.args,
                    spec.timeout,
                    env=spec.env,
                    cwd=spec.cwd,
                    actor="admin-api",
                )
            except Exception:
                # One agent's failure must not hide the commands created for the others.
                self.log.failure("bulk command for agent {agent_id} failed", agent_id=agent_id)
                return {"agent_id": agent_id, "error": "could not create the command"}
            return {"agent_id": agent_id, "id": rec.id, "status": rec.status}

        results = await gatherResults([ensureDeferred(one(a)) for a in agent_ids])
        return _json(request, {"commands": results}, 201)

    async def _bulk_targets(self, wanted: Any) -> list[int]:
        if wanted == "all":
            return [a.id for a in await self._store.list_agents()]
        if not isinstance(wanted, list) or not wanted:
            raise APIError(400, 'agents must be a non-empty array of agent ids or "all"', "agents")
        if len(wanted) > _MAX_BULK_AGENTS:
            raise APIError(400, f"agents has more than {_MAX_BULK_AGENTS} ids", "agents")
        ids: list[int] = []
        seen: set[int] = set()
        for i, value in enumerate(wanted):
            if not isinstance(value, int) or isinstance(value, bool) or not (1 <= value <= _MAX_ID):
                raise APIError(400, f"agents[{i}] must be an agent id", f"agents[{i}]")
            if value not in seen:
                seen.add(value)
                ids.append(value)
        records = await gatherResults([ensureDeferred(self._store.get_agent(i)) for i in ids])
        missing = [i for i, rec in zip(ids, records) if rec is None]
        if missing:
            raise APIError(404, "unknown agent ids", "agents", missing=missing[:100])
        return ids

    @_app.route("/api/commands/<int:command_id>", methods=["GET"])
    async def get_command(self, request: IRequest, command_id: int) -> bytes:
        q = Query(request, {"offset", "wait", "max_bytes"})
        offset = q.integer("offset", 0, minimum=0, maximum=_MAX_ID)
        wait = q.number("wait", 0.0, minimum=0.0, maximum=30.0)
        max_bytes = q.integer("max_bytes", 1048576, minimum=1, maximum=1048576)
        # Record and output come from one store transaction, and a long-poll
        # subscribes before that read (a notification in between is kept by the
        # watch): a log reader costs one store trip per answer, not five.
        watch = OutputWatch(self._queue, _check_id(command_id), self._reactor) if wait > 0 else None
        try:
            rec, chunks = await self._command_output_or_404(command_id, offset, max_bytes)
            if offset > rec.output_offset:
                raise APIError(400, "offset is past the end of the stored output", "offset")
            if watch is not None and not chunks and rec.status not in FINAL_STATUSES:
                rec, chunks = await self._long_poll(rec, offset, max_bytes, wait, watch)
        finally:
            if watch is not None:
                watch.close()
        next_offset = offset + sum(len(c.data) for c in chunks)
        out = command_json(rec)
        out.update(
            {
                "offset": offset,
                "output": [chunk_json(c) for c in chunks],
                "next_offset": next_offset,
                "complete": rec.status in FINAL_STATUSES and next_offset >= rec.output_offset,
            }
        )
        return _json(request, out)

    async def _long_poll(
        self, rec: CommandRecord, offset: int, max_bytes: int, wait: float, watch: OutputWatch
    ) -> tuple[CommandRecord, list[OutputChunk]]:
        """Wait for new output or the end (`watch` was subscribed before `rec` was read)."""
        deadline = self._reactor.seconds() + wait
        chunks: list[OutputChunk] = []
        while True:
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                return rec, chunks
            await watch.wait(remaining)
            rec, chunks = await self._command_output_or_404(rec.id, offset, max_bytes)
            if chunks or rec.status in FINAL_STATUSES:
                return rec, chunks

    @_app.route("/api/commands/<int:command_id>/cancel", methods=["POST"])
    async def cancel_command(self, request: IRequest, command_id: int) -> bytes:
        if _has_body(request):
            Body(read_json_object(request), ())
        rec = await self._command_or_404(command_id)
        if rec.status in FINAL_STATUSES:
            raise APIError(
                409, f"command {rec.id} already finished ({rec.status})", status=rec.status
            )
        rec = await self._queue.cancel(rec.id, actor="admin-api")
        return _json(request, command_json(rec))

    @_app.route("/api/commands/<int:command_id>/stream", methods=["GET"])
    async def stream_command(self, request: IRequest, command_id: int) -> bytes:
        q = Query(request, {"offset"})
        offset = q.integer("offset", 0, minimum=0, maximum=_MAX_ID)
        last_id = request.getHeader(b"last-event-id")
        if last_id is not None:
            text = (
                last_id.strip() if isinstance(last_id, str) else last_id.decode("latin-1").strip()
            )
            if not re.fullmatch(r"[0-9]{1,19}", text):
                raise APIError(400, "Last-Event-ID must be a byte offset", "Last-Event-ID")
            offset = int(text)
        rec = await self._command_or_404(command_id)
        if offset > rec.output_offset:
            raise APIError(400, "offset is past the end of the stored output", "offset")

        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method == b"HEAD":
            return b""
        watch = OutputWatch(self._queue, rec.id, self._reactor)
        flow = _FlowControl()
        closed = [False]

        def gone(_: object) -> None:
            closed[0] = True
            watch.close()
            flow.stopProducing()

        request.notifyFinish().addBoth(gone)  # type: ignore[attr-defined]
        request.registerProducer(flow, True)  # type: ignore[attr-defined]
        try:
            request.write(b"retry: 1000\n\n")
            await self._pump_events(request, rec.id, offset, watch, flow, closed)
        except CancelledError:
            raise
        except Exception:
            self.log.failure(
                "event stream {request_id} for command {command_id} failed",
                request_id=request_id(request),
                command_id=command_id,
            )
            if not closed[0]:
                request.write(
                    _sse_event(
                        "error", {"error": "internal error", "request_id": request_id(request)}
                    )
                )
        finally:
            watch.close()
            # After a disconnect the channel is gone (and the producer with it).
            if getattr(request, "channel", None) is not None:
                request.unregisterProducer()  # type: ignore[attr-defined]
        return b""

    async def _pump_events(
        self,
        request: IRequest,
        command_id: int,
        offset: int,
        watch: OutputWatch,
        flow: _FlowControl,
        closed: Sequence[bool],
    ) -> None:
        while not closed[0]:
            chunks = await self._store.read_output(command_id, offset, _SSE_READ_BYTES)
            for chunk in chunks:
                if closed[0]:
                    return
                end = chunk.offset + len(chunk.data)
                request.write(_sse_event("output", chunk_json(chunk), end))
                offset = end
            if chunks:
                await flow.ready()
                continue
            rec = await self._store.get_command(command_id)
            if closed[0]:
                return
            if rec is None:
                request.write(_sse_event("error", {"error": "command deleted"}))
                return
            if rec.status in FINAL_STATUSES and offset >= rec.output_offset:
                request.write(
                    _sse_event(
                        "final",
                        {
                            "id": rec.id,
                            "status": rec.status,
                            "exit_code": rec.exit_code,
                            "reason": rec.reason,
                            "output_offset": rec.output_offset,
                            "finished_at": rec.finished_at,
                        },
                        offset,
                    )
                )
                return
            woke = await watch.wait(self.sse_keepalive)
            if not woke and not closed[0]:
                request.write(b": keepalive\n\n")

    # -- events ------------------------------------------------------------------

    @_app.route("/api/events", methods=["GET"])
    async def list_events(self, request: IRequest) -> bytes:
        q = Query(request, {"limit", "before_id"})
        limit = q.integer("limit", 50, minimum=1, maximum=1000)
        before_id = q.optional_integer("before_id", minimum=1, maximum=_MAX_ID)
        rows = await self._store.list_events(limit=limit, before_id=before_id)
        return _json(
            request,
            {
                "events": [event_json(e) for e in rows],
                "limit": limit,
                "next_before_id": rows[-1].id if len(rows) == limit and rows else None,
            },
        )

    # -- servers (issue 4), mounted after the token gate -------------------------

    @_app.route("/api/servers", branch=True, methods=_ALL_METHODS)
    def servers(self, request: IRequest) -> Any:
        if self._servers_api is None:
            raise APIError(404, "the servers API is not enabled")
        return self._servers_api.resource()

    # The branch rule needs a non-empty rest, and a mounted app whose index is "/"
    # redirects "/api/servers" to "/api/servers/": serve that path too.
    @_app.route("/api/servers/", methods=_ALL_METHODS)
    def servers_index(self, request: IRequest) -> Any:
        return self.servers(request)

    # -- web console (static files; not part of the API document) ----------------

    @_app.route("/", methods=["GET"])
    def console_page(self, request: IRequest) -> Any:
        return self._console.resource()

    @_app.route("/console/", branch=True, methods=["GET"])
    def console_assets(self, request: IRequest) -> Any:
        return self._console.resource()
