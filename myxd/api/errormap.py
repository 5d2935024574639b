"""The one table from domain exceptions to HTTP answers, for every Klein app of myxd.

`ERROR_MAP` lists each domain exception (all derive from `MyxError`) with its status
and the JSON body a client sees; `install(app)` registers it on a Klein app with
`handle_errors`, followed by werkzeug's routing errors (404, 405) and a catch-all
500. The admin API, the servers routes and the web console all use it, so one
exception always gives the same answer wherever it is raised.

A body never carries a traceback, a token or a secret: a 500 says "internal error"
with the request id, and the details go to the log only.
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from myxd.api.gate import request_id
from myxd.api.inputs import APIError, json_bytes
from myxd.artifacts.store import (
    ArtifactError,
    ArtifactInvalid,
    ArtifactMismatch,
    ArtifactNotFound,
    ArtifactStoreFull,
    ArtifactTooLarge,
)
from myxd.deploy.service import DeploymentConflict, DeploymentInputError
from myxd.errors import (
    AgentCheckFailed,
    ConflictError,
    DuplicateAgent,
    MyxError,
    NotFoundError,
    StoreFull,
)
from myxd.install.installer import InstallInProgress, ServerNotFound
from myxd.netpolicy import TargetNotAllowed
from myxd.rpc.retry import AgentRPCError

__all__ = ["ERROR_MAP", "install", "json_response", "status_of"]

_JSON = b"application/json"

Body = Callable[[Any], dict[str, Any]]


def _api_error(e: APIError) -> dict[str, Any]:
    return e.body()


def _agent_error(e: AgentRPCError) -> dict[str, Any]:
    # The agent could not be asked (e.g. a cancel): the daemon itself is fine.
    return {
        "error": f"the agent could not be reached: {e.reason}",
        "reason": e.reason,
        "kind": e.kind,
    }


def _check_failed(e: AgentCheckFailed) -> dict[str, Any]:
    out: dict[str, Any] = {"error": str(e), "reason": e.reason}
    if e.field is not None:
        out["field"] = e.field
    if e.kind is not None:
        out["kind"] = e.kind
    return out


def _input_error(e: DeploymentInputError) -> dict[str, Any]:
    return {
        "error": str(e),
        "field": e.field,
        "errors": [{"field": e.field, "error": str(e)}],
    }


#: exception -> (status, or None for the exception's own ``code``; JSON body)
#: The first matching row wins, so a subclass goes before its base.
ERROR_MAP: tuple[tuple[type[MyxError], int | None, Body], ...] = (
    (APIError, None, _api_error),
    (NotFoundError, 404, lambda e: {"error": "not found"}),
    (ServerNotFound, 404, lambda e: {"error": "not found"}),
    (DuplicateAgent, 409, lambda e: {"error": str(e), "field": e.field}),
    (AgentCheckFailed, 422, _check_failed),
    (ConflictError, 409, lambda e: {"error": "conflict with the current state"}),
    (InstallInProgress, 409, lambda e: {"error": str(e)}),
    (AgentRPCError, 502, _agent_error),
    (ArtifactInvalid, 400, lambda e: {"error": str(e)}),
    (ArtifactTooLarge, 413, lambda e: {"error": str(e)}),
    (ArtifactMismatch, 422, lambda e: {"error": str(e)}),
    (ArtifactStoreFull, 507, lambda e: {"error": str(e)}),
    (StoreFull, 507, lambda e: {"error": str(e)}),
    (ArtifactNotFound, 404, lambda e: {"error": str(e)}),
    (ArtifactError, 500, lambda e: {"error": str(e)}),
    (DeploymentInputError, 400, _input_error),
    (TargetNotAllowed, 400, lambda e: {"error": str(e), "field": "host"}),
    (DeploymentConflict, 409, lambda e: {"error": str(e)}),
)


def status_of(exc: BaseException) -> tuple[int, dict[str, Any]] | None:
    """The (status, body) the map gives `exc`, or None when it is not a mapped error."""
    for kind, status, make_body in ERROR_MAP:
        if isinstance(exc, kind):
            code = status if status is not None else int(getattr(exc, "code", 500))
            return code, make_body(exc)
    return None


def json_response(request: IRequest, obj: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _JSON)
    return json_bytes(obj)


def install(app: Klein, log: Logger, what: str) -> None:
    """Register the map, routing errors and the catch-all 500 on `app` (in that order)."""

    def mapped(instance: Any, request: IRequest, failure: Failure) -> bytes:
        answer = status_of(failure.value) if failure.value is not None else None
        assert answer is not None
        return json_response(request, answer[1], answer[0])

    def routing(instance: Any, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert isinstance(exc, HTTPException)
        # Keep werkzeug's Allow / Location headers (405, trailing-slash redirects).
        for name, value in exc.get_headers():
            if name.lower() in ("allow", "location"):
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return json_response(request, {"error": (exc.name or "error").lower()}, exc.code or 500)

    def internal(instance: Any, request: IRequest, failure: Failure) -> bytes:
        rid = request_id(request)
        log.failure(
            "{what} request {request_id} {method} failed",
            failure,
            what=what,
            request_id=rid,
            method=request.method.decode("latin-1"),
        )
        if getattr(request, "startedWriting", False):
            # Headers are gone already (a stream): nothing sensible can be added.
            return b""
        return json_response(request, {"error": "internal error", "request_id": rid}, 500)

    # Klein calls each with the owning instance first (the apps are class attributes).
    app.handle_errors(*(row[0] for row in ERROR_MAP))(cast(Any, mapped))
    app.handle_errors(HTTPException)(cast(Any, routing))
    app.handle_errors(Exception)(cast(Any, internal))
