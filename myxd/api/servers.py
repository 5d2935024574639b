# -*- test-case-name: tests.install.test_servers_api -*-
"""Servers API (issue 4): add a server with SSH credentials, watch its install, reinstall,
uninstall, delete. A Klein app of its own, mounted by ``AdminAPI`` under
``/api/servers`` AFTER the admin-token check, so its routes are relative::

    POST   /                      add a server and start its install   -> 201
    GET    /                      list servers
    GET    /{id}                  one server, with its agent's id and status
    GET    /{id}/install          the latest install: every step, status, timestamps, log
    POST   /{id}/reinstall        start a reinstall (keeps port, path and token) -> 202
    POST   /{id}/uninstall        start an uninstall                              -> 202
    DELETE /{id}                  delete the server's records (not its files)

Bad input is a 400 that names the field; the private key and passphrase are
checked (decrypted in a thread) before anything is saved. Passwords, keys,
passphrases, sudo passwords and agent tokens are never part of a response or a
log line: servers are shown through an explicit allowlist of fields.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from myxd._reactor import default_reactor
from myxd.api.inputs import APIError, Body, json_bytes, read_json_object, valid_host
from myxd.api.serialize import agent_json
from myxd.install.hostkeys import InvalidFingerprint, parse_fingerprint
from myxd.install.installer import InstallInProgress, ServerNotFound
from myxd.install.ssh import KeyLoadError, load_private_key
from myxd.store.protocols import ServerLookup

__all__ = ["ServersAPI", "server_json"]

_JSON = b"application/json"
_MAX_ID = 2**63 - 1
_CREATE_FIELDS = (
    "name",
    "host",
    "ssh_port",
    "username",
    "auth",
    "sudo",
    "host_key_fingerprint",
    "start",
)
_MAX_SECRET = 16 * 1024


def server_json(server: Any, agent: Any = None, *, install_running: bool = False) -> dict[str, Any]:
    """The API shape of a server: an allowlist; credentials show only as their kind."""
    auth = server.auth or {}
    sudo = server.sudo or {}
    return {
        "id": server.id,
        "name": server.name,
        "host": server.host,
        "ssh_port": server.ssh_port,
        "username": server.username,
        "auth_method": (
            "private_key"
            if auth.get("private_key")
            else "password"
            if auth.get("password")
            else None
        ),
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


def _json(request: IRequest, obj: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    return json_bytes(obj)


def _secret(value: Any, field: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise APIError(400, f"{field} is required", field)
        return None
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{field} must be a non-empty string", field)
    if len(value) > _MAX_SECRET or "\x00" in value:
        raise APIError(400, f"{field} is too long or contains NUL", field)
    return value


def _parse_auth(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise APIError(
            400, "auth must be an object: {password} or {private_key, passphrase?}", "auth"
        )
    unknown = set(value) - {"password", "private_key", "passphrase"}
    if unknown:
        name = sorted(unknown)[0][:64]
        raise APIError(400, f"unknown field auth.{name}", f"auth.{name}")
    has_pw, has_key = "password" in value, "private_key" in value
    if has_pw == has_key:
        raise APIError(400, "auth needs exactly one of password or private_key", "auth")
    if has_pw:
        if "passphrase" in value:
            raise APIError(400, "passphrase goes with private_key", "auth.passphrase")
        return {"password": _secret(value["password"], "auth.password", required=True)}
    out: dict[str, Any] = {
        "private_key": _secret(value["private_key"], "auth.private_key", required=True)
    }
    passphrase = _secret(value.get("passphrase"), "auth.passphrase", required=False)
    if passphrase is not None:
        out["passphrase"] = passphrase
    return out


def _parse_sudo(value: Any) -> dict[str, Any]:
    if value is None or value == "none":
        return {"mode": "none", "password": None}
    if value == "sudo":
        return {"mode": "sudo", "password": None}
    if isinstance(value, dict):
        unknown = set(value) - {"mode", "password"}
        if unknown:
            name = sorted(unknown)[0][:64]
            raise APIError(400, f"unknown field sudo.{name}", f"sudo.{name}")
        mode = value.get("mode", "sudo")
        if mode not in ("none", "sudo"):
            raise APIError(400, "sudo.mode must be 'none' or 'sudo'", "sudo.mode")
        password = _secret(value.get("password"), "sudo.password", required=False)
        if mode == "none" and password is not None:
            raise APIError(400, "a sudo password needs sudo.mode 'sudo'", "sudo.password")
        return {"mode": mode, "password": password}
    raise APIError(400, "sudo must be 'none', 'sudo' or {mode, password}", "sudo")


class ServersAPI:
    """Routes under /api/servers. ``resource()`` is what AdminAPI mounts."""

    _app = Klein()
    log = Logger()

    def __init__(
        self, store: ServerLookup, installer: Any, *, reactor: IReactorThreads | None = None
    ) -> None:
        self._store = store
        self._installer = installer
        self._reactor: IReactorThreads = default_reactor(reactor)

    def resource(self) -> IResource:
        return self._app.resource()

    # -- errors --------------------------------------------------------------
    @_app.handle_errors(APIError)
    def _client_error(self, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        assert isinstance(err, APIError)
        return _json(request, err.body(), err.code)

    @_app.handle_errors(InstallInProgress)
    def _conflict(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, {"error": str(failure.value)}, 409)

    @_app.handle_errors(ServerNotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, {"error": "not found"}, 404)

    @_app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert isinstance(exc, HTTPException)
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                request.setHeader(b"allow", value.encode("latin-1"))
        return _json(request, {"error": (exc.name or "error").lower()}, exc.code or 500)

    @_app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "servers API {method} {path} failed",
            failure,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1", "replace"),
        )
        return _json(request, {"error": "internal error"}, 500)

    # -- helpers -------------------------------------------------------------
    async def _server_or_404(self, server_id: int) -> Any:
        if not 1 <= server_id <= _MAX_ID:
            raise ServerNotFound(str(server_id))
        server = await self._store.get_server(server_id)
        if server is None:
            raise ServerNotFound(str(server_id))
        return server

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
            raise APIError(400, str(e), field) from None

    # -- routes --------------------------------------------------------------
    @_app.route("/", methods=["GET"], strict_slashes=False)
    async def list_servers(self, request: IRequest) -> bytes:
        servers = await self._store.list_servers()
        return _json(request, {"servers": [await self._view(s) for s in servers]})

    @_app.route("/", methods=["POST"], strict_slashes=False)
    async def create_server(self, request: IRequest) -> bytes:
        body = Body(read_json_object(request), _CREATE_FIELDS)
        name = body.string("name", max_len=128)
        host = body.string("host", max_len=253)
        assert name is not None and host is not None
        if not valid_host(host):
            raise APIError(400, "host must be an IP address or a host name", "host")
        ssh_port = body.integer("ssh_port", required=False, minimum=1, maximum=65535) or 22
        username = body.string("username", max_len=64)
        assert username is not None
        if any(c.isspace() for c in username) or ":" in username:
            raise APIError(400, "username must not contain spaces or ':'", "username")
        auth = _parse_auth(body.raw("auth"))
        sudo = _parse_sudo(body.raw("sudo", required=False))
        pin = body.string("host_key_fingerprint", required=False, max_len=200, nullable=True)
        if pin is not None:
            try:
                parse_fingerprint(pin)
            except InvalidFingerprint as e:
                raise APIError(400, str(e), "host_key_fingerprint") from None
        start = body.raw("start", required=False)
        if start is not None and not isinstance(start, bool):
            raise APIError(400, "start must be a boolean", "start")
        await self._check_key(auth)
        server_id, _agent_id = await self._installer.create_server(
            name=name,
            host=host,
            ssh_port=ssh_port,
            username=username,
            auth=auth,
            sudo=sudo,
            host_key_fingerprint=pin,
        )
        install_id = None
        if start is not False:
            install_id = await self._installer.start(server_id, "install", actor="api")
        server = await self._server_or_404(server_id)
        return _json(request, {"server": await self._view(server), "install_id": install_id}, 201)

    @_app.route("/<int:server_id>", methods=["GET"], strict_slashes=False)
    async def get_server(self, request: IRequest, server_id: int) -> bytes:
        return _json(request, await self._view(await self._server_or_404(server_id)))

    @_app.route("/<int:server_id>", methods=["DELETE"], strict_slashes=False)
    async def delete_server(self, request: IRequest, server_id: int) -> bytes:
        await self._server_or_404(server_id)
        await self._installer.delete_server(server_id)
        return _json(request, {"deleted": True, "id": server_id})

    @_app.route("/<int:server_id>/install", methods=["GET"], strict_slashes=False)
    async def get_install(self, request: IRequest, server_id: int) -> bytes:
        await self._server_or_404(server_id)
        latest = await self._store.get_latest_install(server_id)
        if latest is None:
            raise APIError(404, "this server has no install yet")
        return _json(
            request,
            {"server_id": server_id, **latest, "running": self._installer.is_running(server_id)},
        )

    async def _start(self, request: IRequest, server_id: int, kind: str) -> bytes:
        await self._server_or_404(server_id)
        doc: dict[str, Any] = {}
        content = request.content
        if content is not None:
            content.seek(0)
            if content.read(1):
                doc = read_json_object(request)
        body = Body(doc, ("forget_host_key",) if kind == "reinstall" else ())
        forget = body.raw("forget_host_key", required=False)
        if forget is not None and not isinstance(forget, bool):
            raise APIError(400, "forget_host_key must be a boolean", "forget_host_key")
        if forget:
            if self._installer.is_running(server_id):
                raise InstallInProgress(f"an install of server {server_id} is running")
            await self._installer.forget_host_key(server_id)
        install_id = await self._installer.start(server_id, kind, actor="api")
        return _json(request, {"server_id": server_id, "install_id": install_id, "kind": kind}, 202)

    @_app.route("/<int:server_id>/reinstall", methods=["POST"], strict_slashes=False)
    async def reinstall(self, request: IRequest, server_id: int) -> bytes:
        return await self._start(request, server_id, "reinstall")

    @_app.route("/<int:server_id>/uninstall", methods=["POST"], strict_slashes=False)
    async def uninstall(self, request: IRequest, server_id: int) -> bytes:
        return await self._start(request, server_id, "uninstall")
