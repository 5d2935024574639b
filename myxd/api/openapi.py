# -*- test-case-name: tests.daemon.test_api -*-
"""The OpenAPI 3.0 description of the admin API, served at GET /api/openapi.json.

The document is plain data built here; a test compares it with the Klein app's URL
map in both directions, so a route cannot be added, removed or given another method
without this file following. Routes mounted from another Klein app (the servers API)
are described generically from that app's own URL map.

This module does no I/O and knows nothing about the store.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

from myxd.statuses import AGENT_STATUSES, COMMAND_KINDS, COMMAND_STATUSES, OUTPUT_STREAMS

__all__ = ["build_document", "openapi_path", "static_paths"]

_CONVERTER_RE = re.compile(
    r"<(?:(?P<conv>[a-zA-Z_]+)(?:\([^)]*\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>"
)


def openapi_path(rule: str) -> str:
    """werkzeug rule text ("/api/agents/<int:agent_id>") -> OpenAPI path ("{agent_id}")."""
    return _CONVERTER_RE.sub(lambda m: "{" + m.group("name") + "}", rule)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _resp(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = _json_content(schema)
    return out


_ERR = _ref("Error")


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input; `field` names what is wrong.",
        401: "Missing or wrong admin token.",
        404: "Unknown id.",
        409: "Conflict with the current state.",
        413: "Request body too large.",
        422: "The agent could not be checked; `reason` says why.",
        500: "Internal error (logged with the request id; no detail is returned).",
    }
    return {str(c): _resp(text[c], _ERR) for c in codes}


def _param(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


_AGENT_ID = _param("agent_id", "path", {"type": "integer", "minimum": 1}, "Agent id.")
_COMMAND_ID = _param("command_id", "path", {"type": "integer", "minimum": 1}, "Command id.")
_LIMIT = _param(
    "limit",
    "query",
    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
    "Page size.",
)
_OFFSET = _param(
    "offset", "query", {"type": "integer", "minimum": 0, "default": 0}, "Rows to skip."
)
_NULLABLE_NUMBER = {"type": "number", "nullable": True}
_NULLABLE_STRING = {"type": "string", "nullable": True}
_NULLABLE_INT = {"type": "integer", "nullable": True}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "field": {"type": "string", "description": "The input field at fault."},
            "reason": {"type": "string"},
        },
    },
    "Agent": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "server_id": _NULLABLE_INT,
            "host": {"type": "string"},
            "rpc_port": {"type": "integer"},
            "rpc_path": {"type": "string"},
            "cert_fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "status": {"type": "string", "enum": list(AGENT_STATUSES)},
            "status_reason": _NULLABLE_STRING,
            "rpc_supported": {"type": "boolean"},
            "rpc_last_check": _NULLABLE_NUMBER,
            "rpc_last_success": _NULLABLE_NUMBER,
            "last_heartbeat": _NULLABLE_NUMBER,
            "version": _NULLABLE_STRING,
            "details": {
                "type": "object",
                "nullable": True,
                "description": "The agent's last get_status result.",
            },
            "failed_cycles": {"type": "integer"},
            "total_failures": {"type": "integer"},
            "last_error_kind": _NULLABLE_STRING,
            "last_latency": _NULLABLE_NUMBER,
            "created_at": {"type": "number"},
            "updated_at": _NULLABLE_NUMBER,
        },
    },
    "AdoptAgent": {
        "type": "object",
        "additionalProperties": False,
        "required": ["host", "rpc_port", "rpc_path", "token", "cert_fingerprint"],
        "properties": {
            "host": {"type": "string", "description": "Host name or IP address."},
            "rpc_port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "rpc_path": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
            "token": {"type": "string", "description": "The agent's X-Agent-Token."},
            "cert_fingerprint": {
                "type": "string",
                "description": "SHA-256 of the certificate's DER bytes in hex; colons and "
                "case are ignored.",
            },
        },
    },
    "NewCommand": {
        "type": "object",
        "additionalProperties": False,
        "required": ["command"],
        "properties": {
            "command": {"type": "string", "minLength": 1},
            "args": {"type": "array", "items": {"type": "string"}, "default": []},
            "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "nullable": True},
            "env": {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True},
            "cwd": _NULLABLE_STRING,
        },
    },
    "NewAnsibleRun": {
        "type": "object",
        "additionalProperties": False,
        "required": ["playbook"],
        "properties": {
            "playbook": {
                "type": "string",
                "description": "Relative to the agent's deployment-tool playbooks/.",
            },
            "extra_vars": {"type": "object", "default": {}},
            "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "nullable": True},
        },
    },
    "BulkCommand": {
        "type": "object",
        "additionalProperties": False,
        "required": ["agents", "command"],
        "properties": {
            "agents": {
                "oneOf": [
                    {"type": "array", "items": {"type": "integer"}},
                    {"type": "string", "enum": ["all"]},
                ]
            },
            "command": {"type": "string", "minLength": 1},
            "args": {"type": "array", "items": {"type": "string"}, "default": []},
            "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "nullable": True},
            "env": {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True},
            "cwd": _NULLABLE_STRING,
        },
    },
    "BulkCommandResult": {
        "type": "object",
        "properties": {
            "commands": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "agent_id": {"type": "integer"},
                        "id": {"type": "integer"},
                        "status": {"type": "string"},
                        "error": {
                            "type": "string",
                            "description": "Set instead of id when the "
                            "command could not be created.",
                        },
                    },
                },
            },
        },
    },
    "Command": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "agent_id": {"type": "integer"},
            "command_uid": {"type": "string"},
            "kind": {"type": "string", "enum": list(COMMAND_KINDS)},
            "command": {"type": "string"},
            "args": {"type": "array", "items": {}},
            "timeout": _NULLABLE_NUMBER,
            "extra": {
                "type": "object",
                "nullable": True,
                "description": "cwd, env names (never values), playbook/extra_vars.",
            },
            "status": {"type": "string", "enum": list(COMMAND_STATUSES)},
            "final": {"type": "boolean"},
            "exit_code": _NULLABLE_INT,
            "reason": _NULLABLE_STRING,
            "result": {"type": "object", "nullable": True},
            "attempts": {"type": "integer"},
            "output_offset": {"type": "integer", "description": "Bytes of output stored so far."},
            "created_at": {"type": "number"},
            "started_at": _NULLABLE_NUMBER,
            "finished_at": _NULLABLE_NUMBER,
        },
    },
    "OutputChunk": {
        "type": "object",
        "properties": {
            "offset": {"type": "integer"},
            "stream": {"type": "string", "enum": list(OUTPUT_STREAMS)},
            "data": {"type": "string", "format": "byte"},
        },
    },
    "CommandWithOutput": {
        "allOf": [
            _ref("Command"),
            {
                "type": "object",
                "properties": {
                    "offset": {"type": "integer"},
                    "output": {"type": "array", "items": _ref("OutputChunk")},
                    "next_offset": {"type": "integer"},
                    "complete": {
                        "type": "boolean",
                        "description": "Final, and every stored byte was returned.",
                    },
                },
            },
        ],
    },
    "Event": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "at": {"type": "number"},
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "target": _NULLABLE_STRING,
            "outcome": {"type": "string"},
            "details": {"type": "object", "nullable": True},
        },
    },
}


def static_paths() -> dict[str, dict[str, Any]]:
    """Every route this app serves itself, keyed by OpenAPI path then method."""
    return {
        "/api/health": {
            "get": {
                "summary": "Liveness; the only route without the admin token.",
                "security": [],
                "responses": {
                    "200": _resp(
                        "OK", {"type": "object", "properties": {"status": {"type": "string"}}}
                    )
                },
            },
        },
        "/api/agents": {
            "get": {
                "summary": "List agents.",
                "parameters": [
                    _LIMIT,
                    _OFFSET,
                    _param(
                        "status",
                        "query",
                        {"type": "string", "enum": list(AGENT_STATUSES)},
                        "Only agents with this status.",
                    ),
                ],
                "responses": {
                    "200": _resp(
                        "A page of agents",
                        {
                            "type": "object",
                            "properties": {
                                "agents": {"type": "array", "items": _ref("Agent")},
                                "limit": {"type": "integer"},
                                "offset": {"type": "integer"},
                                "total": {"type": "integer"},
                            },
                        },
                    ),
                    **_errors(400, 401),
                },
            },
            "post": {
                "summary": "Adopt an agent installed without SSH. It is checked with "
                "one pinned get_status call before it is saved.",
                "requestBody": {"required": True, "content": _json_content(_ref("AdoptAgent"))},
                "responses": {
                    "201": _resp("Adopted", _ref("Agent")),
                    **_errors(400, 401, 409, 413, 422),
                },
            },
        },
        "/api/agents/{agent_id}": {
            "get": {
                "summary": "One agent.",
                "parameters": [_AGENT_ID],
                "responses": {"200": _resp("The agent", _ref("Agent")), **_errors(401, 404)},
            },
            "delete": {
                "summary": "Forget an agent (and its commands).",
                "parameters": [_AGENT_ID],
                "responses": {"200": _resp("Deleted", {"type": "object"}), **_errors(401, 404)},
            },
        },
        "/api/agents/{agent_id}/commands": {
            "get": {
                "summary": "The agent's commands, newest first.",
                "parameters": [_AGENT_ID, _LIMIT, _OFFSET],
                "responses": {
                    "200": _resp(
                        "A page of commands",
                        {
                            "type": "object",
                            "properties": {
                                "commands": {"type": "array", "items": _ref("Command")},
                                "limit": {"type": "integer"},
                                "offset": {"type": "integer"},
                                "next_offset": _NULLABLE_INT,
                            },
                        },
                    ),
                    **_errors(400, 401, 404),
                },
            },
            "post": {
                "summary": "Run a command on the agent.",
                "parameters": [_AGENT_ID],
                "requestBody": {"required": True, "content": _json_content(_ref("NewCommand"))},
                "responses": {
                    "201": _resp("Created", _ref("Command")),
                    **_errors(400, 401, 404, 413),
                },
            },
        },
        "/api/agents/{agent_id}/ansible": {
            "post": {
                "summary": "Run a playbook from the agent's deployment tool.",
                "parameters": [_AGENT_ID],
                "requestBody": {"required": True, "content": _json_content(_ref("NewAnsibleRun"))},
                "responses": {
                    "201": _resp("Created", _ref("Command")),
                    **_errors(400, 401, 404, 413),
                },
            },
        },
        "/api/commands": {
            "post": {
                "summary": 'Run one command on many agents (or "all").',
                "requestBody": {"required": True, "content": _json_content(_ref("BulkCommand"))},
                "responses": {
                    "201": _resp("Created", _ref("BulkCommandResult")),
                    **_errors(400, 401, 404, 413),
                },
            },
        },
        "/api/commands/{command_id}": {
            "get": {
                "summary": "A command's state and its output from `offset`.",
                "parameters": [
                    _COMMAND_ID,
                    _param(
                        "offset",
                        "query",
                        {"type": "integer", "minimum": 0, "default": 0},
                        "Byte offset in the combined output stream.",
                    ),
                    _param(
                        "wait",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": 30, "default": 0},
                        "Long-poll: wait up to this many seconds for output.",
                    ),
                    _param(
                        "max_bytes",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 1048576},
                        "Cap on output bytes returned.",
                    ),
                ],
                "responses": {
                    "200": _resp("The command", _ref("CommandWithOutput")),
                    **_errors(400, 401, 404),
                },
            },
        },
        "/api/commands/{command_id}/cancel": {
            "post": {
                "summary": "Cancel a running command (SIGTERM, then SIGKILL).",
                "parameters": [_COMMAND_ID],
                "responses": {
                    "200": _resp("Cancel requested", _ref("Command")),
                    **_errors(401, 404, 409),
                },
            },
        },
        "/api/commands/{command_id}/stream": {
            "get": {
                "summary": "Server-sent events: `output` events "
                "({offset, stream, data: base64}), then one `final` event. "
                "Each event id is the next offset; resume with "
                "Last-Event-ID or ?offset=.",
                "parameters": [
                    _COMMAND_ID,
                    _param("offset", "query", {"type": "integer", "minimum": 0}, "Start offset."),
                    _param(
                        "Last-Event-ID",
                        "header",
                        {"type": "integer", "minimum": 0},
                        "Resume after this event (overrides offset).",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "Event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 401, 404),
                },
            },
        },
        "/api/events": {
            "get": {
                "summary": "Audit trail, newest first.",
                "parameters": [
                    _LIMIT,
                    _param(
                        "before_id",
                        "query",
                        {"type": "integer", "minimum": 1},
                        "Only events older than this id (next page).",
                    ),
                ],
                "responses": {
                    "200": _resp(
                        "A page of events",
                        {
                            "type": "object",
                            "properties": {
                                "events": {"type": "array", "items": _ref("Event")},
                                "limit": {"type": "integer"},
                                "next_before_id": _NULLABLE_INT,
                            },
                        },
                    ),
                    **_errors(400, 401),
                },
            },
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {
                    "200": _resp("OpenAPI 3.0 document", {"type": "object"}),
                    **_errors(401),
                },
            },
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4).",
                "responses": {
                    "200": {
                        "description": "Metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401),
                },
            },
        },
    }


def mounted_paths(
    prefix: str, routes: Iterable[tuple[str, Iterable[str]]]
) -> dict[str, dict[str, Any]]:
    """Generic entries for routes of a mounted app: (rule relative to prefix, methods)."""
    out: dict[str, dict[str, Any]] = {}
    for rule, methods in routes:
        rel = openapi_path(rule)
        path = prefix.rstrip("/") + ("" if rel == "/" else rel)
        params = [
            _param(name, "path", {"type": "string"}, f"{name} (path)")
            for name in re.findall(r"{([^}]+)}", rel)
        ]
        for method in methods:
            m = method.lower()
            if m in ("head", "options"):
                continue
            op: dict[str, Any] = {
                "summary": f"{method.upper()} {path} (servers API)",
                "responses": {"200": _resp("OK", {"type": "object"}), **_errors(400, 401, 404)},
            }
            if params:
                op["parameters"] = params
            out.setdefault(path, {})[m] = op
    return out


def build_document(
    version: str, extra_paths: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    paths = static_paths()
    for path, ops in (extra_paths or {}).items():
        paths.setdefault(path, {}).update(ops)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "MyX admin API",
            "version": version,
            "description": "JSON API of the MyX daemon. Every route except GET /api/health "
            "needs `Authorization: Bearer <admin token>`.",
        },
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"adminToken": []}],
    }
