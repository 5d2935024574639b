"""The route table of the admin API and the OpenAPI 3.1 document derived from it.

Each route is declared once with `Routes.route(...)`: that registers it on the Klein
app *and* records its method, path, query model, body model and response models
(from `myxd.api.models`). `build_document` turns the recorded operations and the
models' JSON Schemas into the document served at GET /api/openapi.json, so a route
cannot exist undocumented and the documented shapes are the validated ones.

This module does no I/O and knows nothing about the store.
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from klein import Klein
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from myxd.api import models

__all__ = ["Operation", "Routes", "build_document", "openapi_path"]

_CONVERTER_RE = re.compile(
    r"<(?:(?P<conv>[a-zA-Z_]+)(?:\([^)]*\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>"
)

_ERROR_TEXT = {
    400: "Bad input: `errors` lists every field at fault, `field` names the first.",
    401: "Missing or wrong admin token.",
    404: "Unknown id or path.",
    405: "Method not allowed on this path.",
    409: "Conflict with the current state.",
    413: "Request body too large.",
    422: "The agent could not be checked; `reason` says why.",
    502: "The agent could not be reached; `reason` says why.",
    507: "The daemon's data dir is full; nothing was kept.",
}

#: Methods that write to the store: any of them answers 507 when the data dir is
#: full (myxd/api/errormap.py maps StoreFull), so each one documents it.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: A response is a model (JSON) or a media type (text, event streams).
Answer = Union[type[BaseModel], str]


def openapi_path(rule: str) -> str:
    """werkzeug rule text ("/api/agents/<int:agent_id>") -> OpenAPI path ("{agent_id}")."""
    path = _CONVERTER_RE.sub(lambda m: "{" + m.group("name") + "}", rule)
    return path.rstrip("/") or "/"


@dataclass(frozen=True)
class Operation:
    """One documented route."""

    method: str
    rule: str
    summary: str
    responses: dict[int, Answer]
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    errors: tuple[int, ...] = ()
    public: bool = False
    headers: tuple[dict[str, Any], ...] = ()

    @property
    def path(self) -> str:
        return openapi_path(self.rule)

    def path_parameters(self) -> list[dict[str, Any]]:
        out = []
        for m in _CONVERTER_RE.finditer(self.rule):
            schema: dict[str, Any] = (
                {"type": "integer", "minimum": 0}
                if m.group("conv") == "int"
                else {"type": "string"}
            )
            out.append({"name": m.group("name"), "in": "path", "required": True, "schema": schema})
        return out


@dataclass
class Routes:
    """Collects the operations of the Klein apps whose routes it registers."""

    operations: list[Operation] = field(default_factory=list)

    def route(
        self, app: Klein, method: str, rule: str, *, prefix: str = "", **spec: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register `rule` on `app` (inside a subroute, give its `prefix`) and record it."""
        op = Operation(method=method, rule=prefix + rule, **spec)
        self.operations.append(op)
        return app.route(rule, methods=[method], strict_slashes=False)


def _error_responses(codes: tuple[int, ...], public: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wanted = set(codes) if public else {*codes, 401}
    for code in sorted(wanted):
        out[str(code)] = {
            "description": _ERROR_TEXT[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return out


def _answer(code: int, answer: Answer, refs: dict[type[BaseModel], Any]) -> dict[str, Any]:
    if isinstance(answer, str):
        return {
            "description": answer.split(";")[0],
            "content": {answer: {"schema": {"type": "string"}}},
        }
    return {
        "description": (answer.__doc__ or answer.__name__).strip().splitlines()[0],
        "content": {"application/json": {"schema": refs[answer]}},
    }


def _query_parameters(model: type[BaseModel], schema: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    props: dict[str, Any] = schema.get("properties", {})
    for name, prop in props.items():
        prop = dict(prop)
        description = prop.pop("description", name)
        prop.pop("title", None)
        out.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": prop,
                "description": description,
            }
        )
    return out


def build_document(version: str, operations: list[Operation]) -> dict[str, Any]:
    wanted: set[type[BaseModel]] = {models.Error}
    for op in operations:
        wanted |= {a for a in op.responses.values() if not isinstance(a, str)}
        if op.body is not None:
            wanted.add(op.body)
    # Requests are documented as they are validated, responses as they are written.
    keyed: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation" if issubclass(m, models.Request) else "serialization")
        for m in sorted(wanted, key=lambda m: m.__name__)
    ]
    refs_by_key, defs = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = defs.get("$defs", {})
    refs = {m: refs_by_key[(m, mode)] for m, mode in keyed}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {"summary": op.summary, "operationId": _op_id(op)}
        params = op.path_parameters()
        if op.query is not None:
            qschema = op.query.model_json_schema(ref_template="#/components/schemas/{model}")
            params += _query_parameters(op.query, qschema)
        params += list(op.headers)
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {
                "required": op.body_required,
                "content": {"application/json": {"schema": refs[op.body]}},
            }
        if op.public:
            entry["security"] = []
        responses = {str(c): _answer(c, a, refs) for c, a in op.responses.items()}
        errors = op.errors
        if op.method.upper() in WRITE_METHODS and 507 not in errors:
            errors = (*errors, 507)
        responses.update(_error_responses(errors, op.public))
        entry["responses"] = responses
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MyX admin API",
            "version": version,
            "description": "JSON API of the MyX daemon. Every route except GET /api/health "
            "needs `Authorization: Bearer <admin token>`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"adminToken": []}],
    }


def _op_id(op: Operation) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", op.path).strip("_")
    return f"{op.method.lower()}_{words}"
