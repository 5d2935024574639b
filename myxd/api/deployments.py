"""Admin API routes for artifacts, deployments and service drift (issue #8).

- ``/api/artifacts``: upload (the raw body, spooled to disk by twisted.web and
  hashed into the store in a thread), list, show, delete (refused while an
  unfinished deployment uses it);
- ``/api/deployments``: create, list, show, cancel; ``/api/playbooks``;
- ``/api/agents/<id>/services/refresh`` and ``/api/fleet/services`` (drift).

Routes are declared with `Routes.route`, so the OpenAPI document lists them
with their models (`myxd.api.deploy_models`). Errors go through the shared map
(`myxd.api.errormap`). Nothing here blocks the reactor.
"""

# test-case-name: tests.daemon.test_api_deployments

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.web.iweb import IRequest

from myxd.api import deploy_models as dm
from myxd.api import models, validate
from myxd.api.errormap import json_response
from myxd.api.inputs import APIError
from myxd.artifacts.store import Artifact, ArtifactStore
from myxd.audit import ACTOR
from myxd.deploy.drift import service_drift
from myxd.deploy.service import CHECKED_SERVICES, PLAYBOOK_SERVICES, DeploymentService
from myxd.store.deployments import TARGET_STATUSES, DeploymentRecord

if TYPE_CHECKING:
    from myxd.api.openapi import Routes

__all__ = ["DeploymentsAPI", "deployment_json", "mount"]


def artifact_json(a: Artifact) -> dict[str, Any]:
    return a.to_json()


def deployment_json(rec: DeploymentRecord, names: dict[int, str]) -> dict[str, Any]:
    counts = dict.fromkeys(TARGET_STATUSES, 0)
    for t in rec.targets:
        counts[t.status] = counts.get(t.status, 0) + 1
    return {
        "id": rec.id,
        "playbook": rec.playbook,
        "status": rec.status,
        "var_names": list(rec.var_names),
        "artifacts": dict(rec.artifacts),
        "batch_size": rec.batch_size,
        "max_failures": rec.max_failures,
        "timeout": rec.timeout,
        "actor": rec.actor,
        "created_at": rec.created_at,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "counts": counts,
        "targets": [
            {
                "agent_id": t.agent_id,
                "agent_name": names.get(t.agent_id),
                "command_id": t.command_id,
                "status": t.status,
                "changed": t.changed,
                "ok": t.ok,
                "failed": t.failed,
                "reason": t.reason,
                "bytes_sent": t.bytes_sent,
                "started_at": t.started_at,
                "finished_at": t.finished_at,
            }
            for t in rec.targets
        ],
    }


def _check_id(value: int, what: str) -> None:
    """Ids beyond SQLite's integer range exist nowhere: 404, not an overflow."""
    if not 1 <= value <= models.MAX_ID:
        raise APIError(404, f"there is no {what} {value}")


class DeploymentsAPI:
    """The handlers; `mount` routes requests to them."""

    def __init__(
        self,
        store: Any,
        deployments: DeploymentService,
        artifacts: ArtifactStore,
        playbooks: Callable[[], Sequence[str]],
    ) -> None:
        self._store = store
        self._deployments = deployments
        self._artifacts = artifacts
        self._playbooks = playbooks

    async def _names(self) -> dict[int, str]:
        """agent id -> a name: its server's or its own (as everywhere else), else the
        host name it reports."""
        names: dict[int, str] = {}
        for a in await self._store.list_agents():
            host = (a.details or {}).get("hostname")
            if a.server_id is not None or (a.name and a.name != a.host):
                names[a.id] = a.name
            elif isinstance(host, str):
                names[a.id] = host
        return names

    # -- artifacts -------------------------------------------------------------

    async def upload_artifact(self, request: IRequest) -> bytes:
        q = validate.query(request, dm.UploadQuery)
        content = request.content
        if content is None:
            raise APIError(400, "body: the artifact's bytes are missing", "body")
        content.seek(0)
        art = await self._artifacts.ingest(content, q.name, q.sha256)
        return json_response(request, artifact_json(art), 201)

    async def list_artifacts(self, request: IRequest) -> bytes:
        validate.query(request, models.NoQuery)
        arts = await self._artifacts.list_all()
        return json_response(request, {"artifacts": [artifact_json(a) for a in arts]})

    async def get_artifact(self, request: IRequest, artifact_id: str) -> bytes:
        return json_response(request, artifact_json(await self._artifacts.get(artifact_id)))

    async def delete_artifact(self, request: IRequest, artifact_id: str) -> bytes:
        await self._artifacts.get(artifact_id)
        users = await self._store.deployments.running_artifact_users(artifact_id)
        if users:
            raise APIError(
                409,
                f"artifact {artifact_id} is used by running deployment(s) "
                + ", ".join(str(u) for u in users),
            )
        await self._artifacts.delete(artifact_id)
        return json_response(request, {"deleted": True, "id": artifact_id})

    # -- deployments -----------------------------------------------------------

    def playbook_names(self) -> list[str]:
        """The deployment tool's playbooks (POST /api/ansible checks against them)."""
        return sorted(self._playbooks())

    async def list_playbooks(self, request: IRequest) -> bytes:
        return json_response(request, {"playbooks": sorted(self._playbooks())})

    async def create_deployment(self, request: IRequest) -> bytes:
        b = validate.body(request, dm.NewDeployment)
        rec = await self._deployments.create(
            playbook=b.playbook,
            agents=b.agents,
            vars=b.vars,
            artifacts=b.artifacts,
            batch_size=b.batch_size,
            max_failures=b.max_failures,
            timeout=b.timeout,
            actor=ACTOR,
        )
        return json_response(request, deployment_json(rec, await self._names()), 201)

    async def list_deployments(self, request: IRequest) -> bytes:
        q = validate.query(request, dm.DeploymentListQuery)
        rows = await self._store.deployments.list_deployments(
            limit=q.limit, before_id=q.before_id, status=q.status
        )
        names = await self._names()
        return json_response(
            request,
            {
                "deployments": [deployment_json(r, names) for r in rows],
                "next_before_id": rows[-1].id if rows and len(rows) == q.limit else None,
            },
        )

    async def get_deployment(self, request: IRequest, deployment_id: int) -> bytes:
        _check_id(deployment_id, "deployment")
        rec = await self._store.deployments.get_deployment(deployment_id)
        if rec is None:
            raise APIError(404, f"there is no deployment {deployment_id}")
        return json_response(request, deployment_json(rec, await self._names()))

    async def cancel_deployment(self, request: IRequest, deployment_id: int) -> bytes:
        _check_id(deployment_id, "deployment")
        if await self._store.deployments.get_deployment(deployment_id) is None:
            raise APIError(404, f"there is no deployment {deployment_id}")
        rec = await self._deployments.cancel(deployment_id, actor=ACTOR)
        return json_response(request, deployment_json(rec, await self._names()))

    # -- services and drift ----------------------------------------------------

    async def refresh_services(self, request: IRequest, agent_id: int) -> bytes:
        _check_id(agent_id, "agent")
        if await self._store.get_agent(agent_id) is None:
            raise APIError(404, f"there is no agent {agent_id}")
        services = await self._deployments.refresh_services(agent_id)
        return json_response(request, {"agent_id": agent_id, "services": services})

    async def fleet_services(self, request: IRequest) -> bytes:
        names = await self._names()
        current = await self._store.deployments.list_services()
        out = {}
        for service in CHECKED_SERVICES:
            playbooks = [p for p, s in PLAYBOOK_SERVICES.items() if s == service]
            targets = await self._store.deployments.successful_targets(playbooks)
            out[service] = service_drift(service, targets, current, names)
        return json_response(request, {"services": out})


_ID = "<int:deployment_id>"
#: (method, rule, handler, what the route table records)
ROUTES: tuple[tuple[str, str, Callable[..., Any], dict[str, Any]], ...] = (
    (
        "POST",
        "/api/artifacts",
        DeploymentsAPI.upload_artifact,
        {
            "summary": "Upload an artifact: the raw body (application/octet-stream).",
            "query": dm.UploadQuery,
            "responses": {201: dm.Artifact},
            "errors": (400, 413, 422, 507),
        },
    ),
    (
        "GET",
        "/api/artifacts",
        DeploymentsAPI.list_artifacts,
        {"summary": "List artifacts.", "responses": {200: dm.ArtifactList}, "errors": (400,)},
    ),
    (
        "GET",
        "/api/artifacts/<artifact_id>",
        DeploymentsAPI.get_artifact,
        {"summary": "One artifact.", "responses": {200: dm.Artifact}, "errors": (404,)},
    ),
    (
        "DELETE",
        "/api/artifacts/<artifact_id>",
        DeploymentsAPI.delete_artifact,
        {
            "summary": "Delete an artifact (refused while a running deployment uses it).",
            "responses": {200: dm.ArtifactDeleted},
            "errors": (404, 409),
        },
    ),
    (
        "GET",
        "/api/playbooks",
        DeploymentsAPI.list_playbooks,
        {"summary": "The deployment tool's playbooks.", "responses": {200: dm.PlaybookList}},
    ),
    (
        "POST",
        "/api/deployments",
        DeploymentsAPI.create_deployment,
        {
            "summary": "Run a playbook across agents, with artifacts and rolling batches.",
            "body": dm.NewDeployment,
            "responses": {201: dm.Deployment},
            "errors": (400, 413),
        },
    ),
    (
        "GET",
        "/api/deployments",
        DeploymentsAPI.list_deployments,
        {
            "summary": "Deployments, newest first.",
            "query": dm.DeploymentListQuery,
            "responses": {200: dm.DeploymentList},
            "errors": (400,),
        },
    ),
    (
        "GET",
        "/api/deployments/" + _ID,
        DeploymentsAPI.get_deployment,
        {
            "summary": "One deployment with its per-agent rows.",
            "responses": {200: dm.Deployment},
            "errors": (404,),
        },
    ),
    (
        "POST",
        "/api/deployments/" + _ID + "/cancel",
        DeploymentsAPI.cancel_deployment,
        {
            "summary": "Start no new targets and cancel running ones.",
            "responses": {200: dm.Deployment},
            "errors": (404,),
        },
    ),
    (
        "POST",
        "/api/agents/<int:agent_id>/services/refresh",
        DeploymentsAPI.refresh_services,
        {
            "summary": "Run check_service.py on the agent and store what it reports.",
            "responses": {200: dm.AgentServices},
            "errors": (404, 409, 502),
        },
    ),
    (
        "GET",
        "/api/fleet/services",
        DeploymentsAPI.fleet_services,
        {
            "summary": "Version and config drift of Xray and Caddy across the fleet.",
            "responses": {200: dm.FleetServices},
        },
    ),
)


def mount(app: Klein, routes: Routes, api_of: Callable[[Any], DeploymentsAPI]) -> None:
    """Declare `ROUTES` on `app` and in the route table."""
    for method, rule, func, spec in ROUTES:

        def handler(owner: Any, request: IRequest, _name: str = func.__name__, **kw: Any) -> Any:
            return getattr(api_of(owner), _name)(request, **kw)

        handler.__name__ = f"deploy_{func.__name__}"
        routes.route(app, method, rule, **spec)(handler)
