"""Servers API (issue 4): add a server with SSH credentials, watch its install, reinstall,
uninstall, delete. `ServersAPI` holds the handlers; `mount` declares their routes
(with their models) in AdminAPI's Klein app under ``/api/servers``, through Klein's
``subroute``, AFTER the admin-token check::

    POST   /api/servers                 add a server and start its install   -> 201
    GET    /api/servers                 list servers
    GET    /api/servers/{id}            one server, with its agent's id and status
    GET    /api/servers/{id}/install    the latest install: every step, status, log
    POST   /api/servers/{id}/reinstall  start a reinstall (keeps port, path, token) -> 202
    POST   /api/servers/{id}/uninstall  start an uninstall                         -> 202
    DELETE /api/servers/{id}            delete the server's records (not its files)

Bad input is a 400 listing every field at fault; the private key and passphrase are
checked (decrypted in a thread) before anything is saved. Passwords, keys,
passphrases, sudo passwords and agent tokens are never part of a response or a
log line: servers are shown through the fields of `models.Server` only.
"""

# test-case-name: tests.install.test_servers_api

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from myxd._reactor import default_reactor
from myxd.api import models, validate
from myxd.api.errormap import json_response
from myxd.api.inputs import APIError
from myxd.api.serialize import agent_json
from myxd.audit import ACTOR, record_event
from myxd.install.installer import InstallInProgress, ServerNotFound
from myxd.install.ssh import KeyLoadError, load_private_key
from myxd.store.protocols import ServerLookup

if TYPE_CHECKING:
    from myxd.api.openapi import Routes

__all__ = ["ServersAPI", "mount", "server_json"]

_MAX_ID = models.MAX_ID


def _auth_kind(auth: dict[str, Any] | None) -> str | None:
    auth = auth or {}
    return (
        "private_key" if auth.get("private_key") else "password" if auth.get("password") else None
    )


def _edit_details(server: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """What an edit changed, as ``{field: {"from": old, "to": new}}``: never a password,
    key or passphrase (credentials show as their kind, sudo as its mode)."""
    out: dict[str, Any] = {"fields": sorted(k for k in fields if k != "host_key")}
    for key in ("name", "host", "ssh_port", "username", "host_key_fingerprint"):
        if key in fields and fields[key] != getattr(server, key):
            out[key] = {"from": getattr(server, key), "to": fields[key]}
    if "tags" in fields and sorted(fields["tags"]) != sorted(server.tags):
        out["tags"] = {"from": sorted(server.tags), "to": sorted(fields["tags"])}
    if "auth" in fields:
        # New credentials are a change even of the same kind: say so, without them.
        out["auth"] = {"from": _auth_kind(server.auth), "to": _auth_kind(fields["auth"])}
    if "sudo" in fields:
        old = server.sudo or {}
        out["sudo"] = {
            "from": old.get("mode", "none"),
            "to": fields["sudo"]["mode"],
            "password_set": bool(fields["sudo"].get("password")),
        }
    if "host_key" in fields and server.host_key is not None:
        out["host_key_dropped"] = True
    return out


def server_json(server: Any, agent: Any = None, *, install_running: bool = False) -> dict[str, Any]:
    """The API shape of a server: an allowlist; credentials show only as their kind."""
    auth = server.auth or {}
    sudo = server.sudo or {}
    return {
        "id": server.id,
        "name": server.name,
        "tags": list(getattr(server, "tags", ())),
        "host": server.host,
        "ssh_port": server.ssh_port,
        "username": server.username,
        "auth_method": _auth_kind(auth),
        "sudo": {"mode": sudo.get("mode", "none"), "password_set": bool(sudo.get("password"))},
        "host_key_fingerprint": server.host_key_fingerprint,
        "host_key": server.host_key,
        "status": server.status,
        "status_reason": server.status_reason,
        "created_at": server.created_at,
        "updated_at": getattr(server, "updated_at", None),
        "install_running": install_running,
        "agent_id": agent.id if agent is not None else None,
        "agent_status": agent.status if agent is not None else None,
        "agent": agent_json(agent) if agent is not None else None,
    }


def _sudo(value: Any) -> dict[str, Any]:
    if value is None or value == "none":
        return {"mode": "none", "password": None}
    if value == "sudo":
        return {"mode": "sudo", "password": None}
    return {"mode": value.mode, "password": value.password}


class ServersAPI:
    """The handlers of /api/servers; `mount` routes requests to them."""

    log = Logger()

    def __init__(
        self, store: ServerLookup, installer: Any, *, reactor: IReactorThreads | None = None
    ) -> None:
        self._store = store
        self._installer = installer
        self._reactor: IReactorThreads = default_reactor(reactor)

    async def _server_or_404(self, server_id: int) -> Any:
        if not 1 <= server_id <= _MAX_ID:
            raise ServerNotFound(str(server_id))
        server = await self._store.get_server(server_id)
        if server is None:
            raise ServerNotFound(str(server_id))
        return server

    async def _event(
        self, action: str, server_id: int, outcome: str, details: dict[str, Any] | None
    ) -> None:
        await record_event(self._store, self.log, action, f"server:{server_id}", outcome, details)

    async def _view(self, server: Any) -> dict[str, Any]:
        agent = await self._store.get_agent_for_server(server.id)
        return server_json(server, agent, install_running=self._installer.is_running(server.id))

    async def _check_key(self, auth: dict[str, Any]) -> None:
        if "private_key" not in auth:
            return
        try:
            await deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                load_private_key,
                auth["private_key"],
                auth.get("passphrase"),
            )
        except KeyLoadError as e:
            field = "auth.passphrase" if "passphrase" in str(e) else "auth.private_key"
            raise APIError(400, f"{field}: {e}", field) from None

    # -- handlers ------------------------------------------------------------
    async def list_servers(self, request: IRequest) -> bytes:
        q = validate.query(request, models.ServerListQuery)
        if q.q or q.tag:
            servers = await self._store.list_servers_filtered(tag=q.tag, q=q.q)
        else:
            servers = await self._store.list_servers()
        return json_response(request, {"servers": [await self._view(s) for s in servers]})

    async def create_server(self, request: IRequest) -> bytes:
        b = validate.body(request, models.NewServer)
        auth = b.auth.model_dump(exclude_none=True)
        await self._check_key(auth)
        server_id, _agent_id = await self._installer.create_server(
            name=b.name,
            host=b.host,
            ssh_port=b.ssh_port,
            username=b.username,
            auth=auth,
            sudo=_sudo(b.sudo),
            host_key_fingerprint=b.host_key_fingerprint,
            actor=ACTOR,
        )
        install_id = None
        if b.start:
            install_id = await self._installer.start(server_id, "install", actor=ACTOR)
        server = await self._server_or_404(server_id)
        created = {"server": await self._view(server), "install_id": install_id}
        return json_response(request, created, 201)

    async def get_server(self, request: IRequest, server_id: int) -> bytes:
        return json_response(request, await self._view(await self._server_or_404(server_id)))

    async def delete_server(self, request: IRequest, server_id: int) -> bytes:
        await self._server_or_404(server_id)
        await self._installer.delete_server(server_id, actor=ACTOR)
        return json_response(request, {"deleted": True, "id": server_id})

    async def edit_server(self, request: IRequest, server_id: int) -> bytes:
        b = validate.body(request, models.ServerEdit)
        changes = b.model_dump(exclude_unset=True)
        if not changes:
            raise APIError(400, "give at least one field to change", "name")
        nulls = [k for k, v in changes.items() if v is None and k != "host_key_fingerprint"]
        if nulls:
            raise APIError(400, f"{nulls[0]}: must not be null", nulls[0])
        server = await self._server_or_404(server_id)
        if self._installer.is_running(server_id):
            raise InstallInProgress(f"an install of server {server_id} is running")
        fields: dict[str, Any] = {
            k: v
            for k, v in changes.items()
            if k in ("name", "host", "ssh_port", "username", "tags")
        }
        if "auth" in changes:
            auth = b.auth.model_dump(exclude_none=True) if b.auth is not None else None
            if auth is not None:
                await self._check_key(auth)
            fields["auth"] = auth
        if "sudo" in changes:
            fields["sudo"] = _sudo(b.sudo)
        if "host_key_fingerprint" in changes:
            fields["host_key_fingerprint"] = b.host_key_fingerprint
        moved = ("host" in changes and b.host != server.host) or (
            "ssh_port" in changes and b.ssh_port != server.ssh_port
        )
        if moved or "host_key_fingerprint" in changes:
            # A new address is checked again on the next connect: against the
            # given fingerprint, or trusted on first use.
            fields["host_key"] = None
        await self._store.update_server(server_id, **fields)
        self.log.info(
            "server {server_id} edited: {fields}", server_id=server_id, fields=sorted(changes)
        )
        await self._event("server.edit", server_id, "ok", _edit_details(server, fields))
        return json_response(request, await self._view(await self._server_or_404(server_id)))

    async def bulk(self, request: IRequest) -> bytes:
        b = validate.body(request, models.ServerBulk)
        if b.action in ("tag", "untag") and b.tag is None:
            raise APIError(400, f"tag: is needed to {b.action} servers", "tag")
        results: list[dict[str, Any]] = []
        changed: dict[int, dict[str, Any]] = {}
        for server_id in dict.fromkeys(b.ids):
            try:
                server = await self._store.get_server(server_id)
                if server is None:
                    raise ServerNotFound(str(server_id))
                if b.action == "delete":
                    await self._installer.delete_server(server_id, actor=ACTOR)
                elif b.action in ("reinstall", "uninstall"):
                    await self._installer.start(server_id, b.action, actor=ACTOR)
                else:
                    assert b.tag is not None
                    old = sorted(server.tags)
                    tags = set(old) | {b.tag} if b.action == "tag" else set(old) - {b.tag}
                    await self._store.update_server(server_id, tags=sorted(tags))
                    changed[server_id] = {"tags": {"from": old, "to": sorted(tags)}}
            except ServerNotFound:
                results.append({"id": server_id, "ok": False, "error": f"no server {server_id}"})
            except InstallInProgress:
                results.append(
                    {"id": server_id, "ok": False, "error": "an install of it is running"}
                )
            except Exception as e:
                self.log.failure(
                    "bulk {action} of server {server_id}", action=b.action, server_id=server_id
                )
                results.append(
                    {"id": server_id, "ok": False, "error": f"failed: {type(e).__name__}"}
                )
            else:
                results.append({"id": server_id, "ok": True, "error": None})
        for r in results:
            # One row per server, whatever the outcome: who asked for what, and why
            # it was refused (the installs' own progress follows as their events).
            details: dict[str, Any] = {"action": b.action, **changed.get(r["id"], {})}
            if b.tag is not None:
                details["tag"] = b.tag
            if r["error"]:
                details["error"] = r["error"]
            await self._event("server.bulk", r["id"], "ok" if r["ok"] else "refused", details)
        return json_response(request, {"results": results})

    async def get_install(self, request: IRequest, server_id: int) -> bytes:
        await self._server_or_404(server_id)
        latest = await self._store.get_latest_install(server_id)
        if latest is None:
            raise APIError(404, "this server has no install yet")
        running = self._installer.is_running(server_id)
        return json_response(request, {"server_id": server_id, **latest, "running": running})

    async def _start(self, server_id: int, kind: str, forget_host_key: bool) -> dict[str, Any]:
        await self._server_or_404(server_id)
        if forget_host_key:
            if self._installer.is_running(server_id):
                raise InstallInProgress(f"an install of server {server_id} is running")
            await self._installer.forget_host_key(server_id, actor=ACTOR)
        install_id = await self._installer.start(server_id, kind, actor=ACTOR)
        return {"server_id": server_id, "install_id": install_id, "kind": kind}

    async def reinstall(self, request: IRequest, server_id: int) -> bytes:
        b = validate.optional_body(request, models.StartInstall)
        return json_response(
            request, await self._start(server_id, "reinstall", b.forget_host_key), 202
        )

    async def uninstall(self, request: IRequest, server_id: int) -> bytes:
        validate.optional_body(request, models.NoFields)
        return json_response(request, await self._start(server_id, "uninstall", False), 202)


#: (method, rule under the prefix, handler, what the route table records)
ROUTES: tuple[tuple[str, str, Callable[..., Any], dict[str, Any]], ...] = (
    (
        "GET",
        "/",
        ServersAPI.list_servers,
        {
            "summary": "List servers (q: part of name or host; tag: one tag).",
            "query": models.ServerListQuery,
            "responses": {200: models.ServerList},
            "errors": (400,),
        },
    ),
    (
        "POST",
        "/",
        ServersAPI.create_server,
        {
            "summary": "Add a server with SSH credentials and start its install.",
            "body": models.NewServer,
            "responses": {201: models.ServerCreated},
            "errors": (400, 409, 413),
        },
    ),
    (
        "POST",
        "/bulk",
        ServersAPI.bulk,
        {
            "summary": "Reinstall, uninstall, delete, tag or untag many servers.",
            "body": models.ServerBulk,
            "responses": {200: models.ServerBulkResult},
            "errors": (400, 413),
        },
    ),
    (
        "PATCH",
        "/<int:server_id>",
        ServersAPI.edit_server,
        {
            "summary": "Edit a server. A new host or port drops the stored host key: the next "
            "connect checks it again (against host_key_fingerprint if given).",
            "body": models.ServerEdit,
            "responses": {200: models.Server},
            "errors": (400, 404, 409, 413),
        },
    ),
    (
        "GET",
        "/<int:server_id>",
        ServersAPI.get_server,
        {
            "summary": "One server, with its agent.",
            "responses": {200: models.Server},
            "errors": (404,),
        },
    ),
    (
        "DELETE",
        "/<int:server_id>",
        ServersAPI.delete_server,
        {
            "summary": "Delete the server's records (not its files).",
            "responses": {200: models.ServerDeleted},
            "errors": (404, 409),
        },
    ),
    (
        "GET",
        "/<int:server_id>/install",
        ServersAPI.get_install,
        {
            "summary": "The latest install: every step, its status and log.",
            "responses": {200: models.Install},
            "errors": (404,),
        },
    ),
    (
        "POST",
        "/<int:server_id>/reinstall",
        ServersAPI.reinstall,
        {
            "summary": "Start a reinstall (keeps port, path and token).",
            "body": models.StartInstall,
            "body_required": False,
            "responses": {202: models.InstallStarted},
            "errors": (400, 404, 409, 413),
        },
    ),
    (
        "POST",
        "/<int:server_id>/uninstall",
        ServersAPI.uninstall,
        {
            "summary": "Start an uninstall.",
            "body": models.NoFields,
            "body_required": False,
            "responses": {202: models.InstallStarted},
            "errors": (400, 404, 409, 413),
        },
    ),
)


def mount(app: Klein, routes: Routes, prefix: str, servers_of: Callable[[Any], ServersAPI]) -> None:
    """Declare `ROUTES` on `app` (a subroute at `prefix`) and in the route table.

    `servers_of(owner)` gives the `ServersAPI` of the object that owns `app`.
    """
    for method, rule, func, spec in ROUTES:

        def handler(owner: Any, request: IRequest, _name: str = func.__name__, **kw: Any) -> Any:
            # Looked up on the instance (a static name from ROUTES, never from the
            # wire), so a subclass or a test double can replace a handler.
            return getattr(servers_of(owner), _name)(request, **kw)

        # Klein names an endpoint after its function: each must be unique.
        handler.__name__ = f"servers_{func.__name__}"
        routes.route(app, method, rule, prefix=prefix, **spec)(handler)
