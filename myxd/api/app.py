"""The admin API: a Klein app over the store, the command queue and the agent RPC client.

JSON in and out. Every route but GET /api/health and the web console's static files
(`console.PUBLIC_PATHS`) needs the admin bearer token (the `Gate` in front of the
routes checks it, so no route can forget). Each route is declared once in the route
table (`openapi.Routes`) with the models of its input and output (`models`), which
both validate the request and make the OpenAPI document. Errors are answered by the
one error map (`errormap`): bad input is a 400 listing every field at fault, an
unknown id a 404, and any unexpected failure a 500 JSON "internal error" whose
details go only to the log, under the request id.

Handlers never block the reactor (store and RPC calls are Deferreds), never log or
return an agent token or secret, and never leave half-written state: input is fully
checked before anything is written.

It is a little over 500 lines because each route's declaration (method, path,
models, summary) sits on top of its handler: the route table is readable in one
place. The pieces with their own job live beside it: `sse` (event streams),
`servers` (/api/servers), `validate`, `errormap`, and `fleet.adopt`.
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

import myxd
from myxd._reactor import default_reactor
from myxd.api import deployments, errormap, models, servers, validate
from myxd.api.console import PUBLIC_PATHS as CONSOLE_PATHS
from myxd.api.console import Console
from myxd.api.errormap import json_response
from myxd.api.gate import Gate, make_site
from myxd.api.inputs import APIError
from myxd.api.openapi import Routes, build_document
from myxd.api.serialize import (
    FINAL_STATUSES,
    agent_json,
    chunk_json,
    command_json,
    event_json,
)
from myxd.api.sse import serve_stream
from myxd.api.watch import OutputWatch
from myxd.audit import ACTOR, record_event
from myxd.fleet.adopt import Adopter
from myxd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from myxd.metrics import Metrics
from myxd.netpolicy import TargetPolicy
from myxd.store.records import AgentRecord, CommandRecord, OutputChunk

if TYPE_CHECKING:
    from myxd.api.deployments import DeploymentsAPI
    from myxd.api.servers import ServersAPI
    from myxd.config import Settings
    from myxd.fleet.commands import CommandQueue
    from myxd.rpc.client import AgentRPC
    from myxd.store.protocols import AdminStore

__all__ = ["AdminAPI"]

_MAX_ID = models.MAX_ID
_LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
    "description": "Resume after this event (overrides offset).",
}


def _check_id(value: int) -> int:
    if value < 1 or value > _MAX_ID:
        raise APIError(404, "no such id")
    return value


class AdminAPI:
    """Klein routes of the admin API; `resource()` is what the daemon serves."""

    _app = Klein()
    _routes = Routes()
    log = Logger()
    errormap.install(_app, log, "admin API")

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
        servers_api: ServersAPI | None = None,
        deployments_api: DeploymentsAPI | None = None,
        artifact_max_bytes: int = 0,
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
        self._deployments_api = deployments_api
        self._artifact_max_bytes = artifact_max_bytes
        self._adopter = Adopter(
            store,
            rpc,
            self._reactor,
            TargetPolicy(settings.allowed_target_networks, self._reactor),
        )
        self._console = Console()
        self._document = build_document(myxd.__version__, self.operations())

    # -- wiring ------------------------------------------------------------------

    @classmethod
    def operations(cls) -> list[Any]:
        """Every route of the API with its models (what the document is made from)."""
        return list(cls._routes.operations)

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
        large = {}
        if self._deployments_api is not None and self._artifact_max_bytes:
            large[b"/api/artifacts"] = self._artifact_max_bytes
        return make_site(
            self.resource(), self._reactor, admin_token=self._token, large_bodies=large
        )

    def openapi_document(self) -> dict[str, Any]:
        return self._document

    # -- lookups -----------------------------------------------------------------

    async def _agent_or_404(self, agent_id: int) -> AgentRecord:
        rec = await self._store.get_agent(_check_id(agent_id))
        if rec is None:
            raise APIError(404, f"no agent {agent_id}")
        return rec

    async def _command_or_404(self, command_id: int) -> CommandRecord:
        rec = await self._store.get_command(_check_id(command_id))
        if rec is None:
            raise APIError(404, f"There is no command {command_id}.")
        return rec

    async def _command_output_or_404(
        self, command_id: int, offset: int, max_bytes: int
    ) -> tuple[CommandRecord, list[OutputChunk]]:
        rec, chunks = await self._store.read_command_output(
            _check_id(command_id), offset, max_bytes
        )
        if rec is None:
            raise APIError(404, f"There is no command {command_id}.")
        return rec, chunks

    async def _event(
        self, action: str, target: str | None, outcome: str, details: dict[str, Any] | None = None
    ) -> None:
        await record_event(self._store, self.log, action, target, outcome, details)

    # -- health, docs, metrics ---------------------------------------------------

    @_routes.route(
        _app,
        "GET",
        "/api/health",
        summary="Liveness; needs no token.",
        responses={200: models.Health},
        public=True,
    )
    def health(self, request: IRequest) -> bytes:
        return json_response(request, {"status": "ok"})

    @_routes.route(
        _app,
        "GET",
        "/api/openapi.json",
        summary="This document.",
        responses={200: "application/json"},
    )
    def openapi_json(self, request: IRequest) -> bytes:
        return json_response(request, self._document)

    @_routes.route(
        _app,
        "GET",
        "/metrics",
        summary="Prometheus metrics (text format 0.0.4).",
        responses={200: METRICS_CONTENT_TYPE},
    )
    async def metrics(self, request: IRequest) -> bytes:
        agents = await self._store.agent_counts_by_status()
        commands = await self._store.command_counts_by_status()
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode("ascii"))
        return self._metrics.render(agents, commands)

    # -- agents ------------------------------------------------------------------

    @_routes.route(
        _app,
        "GET",
        "/api/agents",
        summary="List agents.",
        query=models.AgentListQuery,
        responses={200: models.AgentPage},
        errors=(400,),
    )
    async def list_agents(self, request: IRequest) -> bytes:
        q = validate.query(request, models.AgentListQuery)
        # Agents whose install never finished are not listed (issue #9): their
        # server shows the install's error instead.
        agents, total = await self._store.search_agents(
            q=q.q, status=q.status, tag=q.tag, limit=q.limit, offset=q.offset
        )
        page = {
            "agents": [agent_json(a) for a in agents],
            "limit": q.limit,
            "offset": q.offset,
            "total": total,
        }
        return json_response(request, page)

    @_routes.route(
        _app,
        "GET",
        "/api/agents/<int:agent_id>",
        summary="One agent.",
        responses={200: models.Agent},
        errors=(404,),
    )
    async def get_agent(self, request: IRequest, agent_id: int) -> bytes:
        return json_response(request, agent_json(await self._agent_or_404(agent_id)))

    @_routes.route(
        _app,
        "PATCH",
        "/api/agents/<int:agent_id>",
        summary="Rename an agent or set its tags.",
        body=models.AgentEdit,
        responses={200: models.Agent},
        errors=(400, 404, 413),
    )
    async def edit_agent(self, request: IRequest, agent_id: int) -> bytes:
        b = validate.body(request, models.AgentEdit)
        rec = await self._agent_or_404(agent_id)
        changes = b.model_dump(exclude_unset=True)
        if not changes or any(v is None for v in changes.values()):
            raise APIError(400, "give a name or tags to change", "name")
        await self._store.update_agent(rec.id, **changes)
        after = await self._agent_or_404(rec.id)
        # What changed, from and to (names and tags are never secrets).
        details: dict[str, Any] = {"fields": sorted(changes)}
        if "name" in changes and rec.name != after.name:
            details["name"] = {"from": rec.name, "to": after.name}
        if "tags" in changes and rec.own_tags != after.own_tags:
            details["tags"] = {"from": list(rec.own_tags), "to": list(after.own_tags)}
        await self._event("agent.edit", f"agent:{rec.id}", "ok", details)
        return json_response(request, agent_json(after))

    @_routes.route(
        _app,
        "DELETE",
        "/api/agents/<int:agent_id>",
        summary="Forget an agent (and its commands).",
        responses={200: models.Deleted},
        errors=(404,),
    )
    async def delete_agent(self, request: IRequest, agent_id: int) -> bytes:
        rec = await self._agent_or_404(agent_id)
        if not await self._store.delete_agent(rec.id):
            raise APIError(404, f"no agent {agent_id}")
        self.log.info("agent {agent_id} deleted through the API", agent_id=rec.id)
        await self._event("agent.delete", f"agent:{rec.id}", "ok", {"host": rec.host})
        return json_response(request, {"id": rec.id, "deleted": True})

    @_routes.route(
        _app,
        "POST",
        "/api/agents",
        summary="Adopt an agent installed without SSH, after one pinned get_status check.",
        body=models.AdoptAgent,
        responses={201: models.Agent},
        errors=(400, 409, 413, 422),
    )
    async def adopt_agent(self, request: IRequest) -> bytes:
        b = validate.body(request, models.AdoptAgent)
        rec = await self._adopter.adopt(
            host=b.host,
            port=b.rpc_port,
            path=b.rpc_path,
            token=b.token,
            fingerprint=b.cert_fingerprint,
            name=b.name,
            tags=b.tags or (),
        )
        return json_response(request, agent_json(rec), 201)

    # -- commands ----------------------------------------------------------------

    @_routes.route(
        _app,
        "GET",
        "/api/agents/<int:agent_id>/commands",
        summary="The agent's commands, newest first.",
        query=models.PageQuery,
        responses={200: models.CommandPage},
        errors=(400, 404),
    )
    async def list_agent_commands(self, request: IRequest, agent_id: int) -> bytes:
        q = validate.query(request, models.PageQuery)
        await self._agent_or_404(agent_id)
        rows = await self._store.list_commands(agent_id=agent_id, limit=q.limit, offset=q.offset)
        page = {
            "commands": [command_json(c) for c in rows],
            "limit": q.limit,
            "offset": q.offset,
            "next_offset": q.offset + len(rows) if len(rows) == q.limit else None,
        }
        return json_response(request, page)

    @_routes.route(
        _app,
        "POST",
        "/api/agents/<int:agent_id>/commands",
        summary="Run a command on the agent.",
        body=models.NewCommand,
        responses={201: models.Command},
        errors=(400, 404, 413),
    )
    async def create_command(self, request: IRequest, agent_id: int) -> bytes:
        await self._agent_or_404(agent_id)
        spec = validate.body(request, models.NewCommand)
        rec = await self._queue.add_command(
            agent_id,
            spec.command,
            spec.args,
            spec.timeout,
            env=spec.env,
            cwd=spec.cwd,
            actor=ACTOR,
        )
        return json_response(request, command_json(rec), 201)

    @_routes.route(
        _app,
        "POST",
        "/api/agents/<int:agent_id>/ansible",
        summary="Run a playbook from the agent's deployment tool.",
        body=models.NewAnsibleRun,
        responses={201: models.Command},
        errors=(400, 404, 413),
    )
    async def create_ansible(self, request: IRequest, agent_id: int) -> bytes:
        await self._agent_or_404(agent_id)
        b = validate.body(request, models.NewAnsibleRun)
        rec = await self._queue.add_ansible(
            agent_id, b.playbook, b.extra_vars, b.timeout, actor=ACTOR, check=b.check
        )
        return json_response(request, command_json(rec), 201)

    @_routes.route(
        _app,
        "POST",
        "/api/commands",
        summary='Run one command on many agents (or "all").',
        body=models.BulkCommand,
        responses={201: models.BulkResult},
        errors=(400, 404, 413),
    )
    async def create_commands(self, request: IRequest) -> bytes:
        spec = validate.body(request, models.BulkCommand)
        if (spec.command is None) == (spec.shell is None):
            raise APIError(400, "command: give either a command or a shell line", "command")
        if spec.shell is not None and spec.args:
            raise APIError(400, "args: a shell line takes no separate arguments", "args")
        command, args = (
            ("sh", ["-c", spec.shell]) if spec.shell is not None else (spec.command, spec.args)
        )
        assert command is not None
        agent_ids = await self._bulk_targets(spec.agents)

        async def one(agent_id: int) -> dict[str, Any]:
            try:
                rec = await self._queue.add_command(
                    agent_id,
                    command,
                    args,
                    spec.timeout,
                    env=spec.env,
                    cwd=spec.cwd,
                    actor=ACTOR,
                )
            except Exception:
                # One agent's failure must not hide the commands created for the others.
                self.log.failure("bulk command for agent {agent_id} failed", agent_id=agent_id)
                return {"agent_id": agent_id, "error": "could not create the command"}
            return {"agent_id": agent_id, "id": rec.id, "status": rec.status}

        results = await gatherResults([ensureDeferred(one(a)) for a in agent_ids])
        return json_response(request, {"commands": results}, 201)

    @_routes.route(
        _app,
        "POST",
        "/api/ansible",
        summary="Run a playbook of the deployment tool on many agents (one command each).",
        body=models.BulkAnsible,
        responses={201: models.BulkResult},
        errors=(400, 404, 413, 422),
    )
    async def create_ansible_runs(self, request: IRequest) -> bytes:
        spec = validate.body(request, models.BulkAnsible)
        if self._deployments_api is not None:
            known = sorted(self._deployments_api.playbook_names())
            if spec.playbook not in known:
                raise APIError(
                    422,
                    f"playbook '{spec.playbook}' is not in the deployment tool"
                    f" (available: {', '.join(known) or 'none'})",
                    "playbook",
                )
        agent_ids = await self._bulk_targets(spec.agents)

        async def one(agent_id: int) -> dict[str, Any]:
            try:
                rec = await self._queue.add_ansible(
                    agent_id,
                    spec.playbook,
                    spec.extra_vars,
                    spec.timeout,
                    actor=ACTOR,
                    check=spec.check,
                )
            except Exception:
                self.log.failure("bulk ansible for agent {agent_id} failed", agent_id=agent_id)
                return {"agent_id": agent_id, "error": "could not create the command"}
            return {"agent_id": agent_id, "id": rec.id, "status": rec.status}

        results = await gatherResults([ensureDeferred(one(a)) for a in agent_ids])
        return json_response(request, {"commands": results}, 201)

    @_routes.route(
        _app,
        "GET",
        "/api/commands",
        summary="Commands of every agent, newest first, with filters.",
        query=models.CommandListQuery,
        responses={200: models.CommandList},
        errors=(400,),
    )
    async def list_commands(self, request: IRequest) -> bytes:
        q = validate.query(request, models.CommandListQuery)
        rows, total = await self._store.search_commands(
            agent_id=q.agent_id,
            status=q.status,
            kind=q.kind,
            q=q.q,
            since=q.since,
            until=q.until,
            limit=q.limit,
            offset=q.offset,
        )
        page = {
            "commands": [command_json(c) for c in rows],
            "limit": q.limit,
            "offset": q.offset,
            "total": total,
        }
        return json_response(request, page)

    async def _bulk_targets(self, wanted: str | list[int]) -> list[int]:
        if isinstance(wanted, str):  # "all" or "tag:NAME", what the model lets through
            tag = wanted[4:].lower() if wanted.startswith("tag:") else None
            ids: list[int] = []
            while True:
                page, total = await self._store.search_agents(tag=tag, limit=1000, offset=len(ids))
                ids += [a.id for a in page]
                if not page or len(ids) >= total:
                    break
            if tag is not None and not ids:
                raise APIError(404, f"agents: no agent has the tag {tag!r}", "agents")
            return ids
        ids = list(dict.fromkeys(wanted))  # first occurrence order, no duplicates
        records = await gatherResults([ensureDeferred(self._store.get_agent(i)) for i in ids])
        missing = [i for i, rec in zip(ids, records) if rec is None]
        if missing:
            raise APIError(404, "agents: unknown agent ids", "agents", missing=missing[:100])
        return ids

    @_routes.route(
        _app,
        "GET",
        "/api/commands/<int:command_id>",
        summary="A command's state and its output from `offset` (long-poll with `wait`).",
        query=models.CommandReadQuery,
        responses={200: models.CommandWithOutput},
        errors=(400, 404),
    )
    async def get_command(self, request: IRequest, command_id: int) -> bytes:
        q = validate.query(request, models.CommandReadQuery)
        offset, max_bytes = q.offset, q.max_bytes
        # Record and output come from one store transaction, and a long-poll
        # subscribes before that read (a notification in between is kept by the
        # watch): a log reader costs one store trip per answer, not five.
        watch = (
            OutputWatch(self._queue, _check_id(command_id), self._reactor) if q.wait > 0 else None
        )
        try:
            rec, chunks = await self._command_output_or_404(command_id, offset, max_bytes)
            if offset > rec.output_offset:
                raise APIError(400, "offset: is past the end of the stored output", "offset")
            if watch is not None and not chunks and rec.status not in FINAL_STATUSES:
                rec, chunks = await self._long_poll(rec, offset, max_bytes, q.wait, watch)
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
        return json_response(request, out)

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

    @_routes.route(
        _app,
        "POST",
        "/api/commands/<int:command_id>/cancel",
        summary="Cancel a running command (SIGTERM, then SIGKILL).",
        body=models.CancelCommand,
        body_required=False,
        responses={200: models.Command},
        errors=(400, 404, 409, 413, 502),
    )
    async def cancel_command(self, request: IRequest, command_id: int) -> bytes:
        validate.optional_body(request, models.CancelCommand)
        rec = await self._command_or_404(command_id)
        if rec.status in FINAL_STATUSES:
            raise APIError(
                409, f"command {rec.id} already finished ({rec.status})", status=rec.status
            )
        rec = await self._queue.cancel(rec.id, actor=ACTOR)
        return json_response(request, command_json(rec))

    @_routes.route(
        _app,
        "GET",
        "/api/commands/<int:command_id>/stream",
        summary="Server-sent events: `output` events ({offset, stream, data: base64}), then "
        "one `final` event. Each event id is the next offset; resume with Last-Event-ID "
        "or ?offset=.",
        query=models.StreamQuery,
        headers=(_LAST_EVENT_ID,),
        responses={200: "text/event-stream"},
        errors=(400, 404),
    )
    async def stream_command(self, request: IRequest, command_id: int) -> bytes:
        offset = validate.query(request, models.StreamQuery).offset
        last_id = request.getHeader(b"last-event-id")
        if last_id is not None:
            text = (
                last_id.strip() if isinstance(last_id, str) else last_id.decode("latin-1").strip()
            )
            if not re.fullmatch(r"[0-9]{1,19}", text):
                raise APIError(400, "Last-Event-ID: must be a byte offset", "Last-Event-ID")
            offset = int(text)
        rec = await self._command_or_404(command_id)
        if offset > rec.output_offset:
            raise APIError(400, "offset: is past the end of the stored output", "offset")
        return await serve_stream(
            request, self._store, self._queue, self._reactor, rec.id, offset, self.sse_keepalive
        )

    # -- events ------------------------------------------------------------------

    @_routes.route(
        _app,
        "GET",
        "/api/events",
        summary="Audit trail, newest first.",
        query=models.EventListQuery,
        responses={200: models.EventPage},
        errors=(400,),
    )
    async def list_events(self, request: IRequest) -> bytes:
        q = validate.query(request, models.EventListQuery)
        rows = await self._store.list_events(
            limit=q.limit, before_id=q.before_id, kind=q.kind, target=q.target, actor=q.actor
        )
        page = {
            "events": [event_json(e) for e in rows],
            "limit": q.limit,
            "next_before_id": rows[-1].id if len(rows) == q.limit and rows else None,
        }
        return json_response(request, page)

    # -- servers: the routes of servers.ROUTES under /api/servers ------------------

    def _servers(self) -> ServersAPI:
        if self._servers_api is None:
            raise APIError(404, "the servers API is not enabled")
        return self._servers_api

    with _app.subroute("/api/servers") as _sub:
        servers.mount(_sub, _routes, "/api/servers", _servers)
    del _sub

    # -- artifacts, deployments, drift: the routes of deployments.ROUTES ----------

    def _deployments(self) -> DeploymentsAPI:
        if self._deployments_api is None:
            raise APIError(404, "deployments are not enabled")
        return self._deployments_api

    deployments.mount(_app, _routes, _deployments)

    # -- web console (static files; not part of the API document) ----------------

    @_app.route("/", methods=["GET"])
    def console_page(self, request: IRequest) -> Any:
        return self._console.resource()

    @_app.route("/console/", branch=True, methods=["GET"])
    def console_assets(self, request: IRequest) -> Any:
        return self._console.resource()
