"""JSON shapes of store records as the admin API shows them (see `models` for the shapes).

Fields are copied from explicit allowlists (the response models' fields), so a new
secret column in a record can never leak through the API by default: an agent's
token and secret_key, and the values of a command's environment, are never part of
any response.
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations

import base64
from typing import Any

from myxd.api import models
from myxd.statuses import FINAL_STATUSES
from myxd.store.records import AgentRecord, CommandRecord, EventRecord, OutputChunk

__all__ = ["agent_json", "chunk_json", "command_json", "event_json", "FINAL_STATUSES"]


# The allowlists are the fields of the response models: what is documented is
# exactly what is copied, and nothing else.
_AGENT_FIELDS = tuple(models.Agent.model_fields)
_DERIVED = frozenset({"extra", "result", "final"})
_COMMAND_FIELDS = tuple(f for f in models.Command.model_fields if f not in _DERIVED)

# The agent's final result repeats the tail of stdout/stderr; the output endpoints
# already serve the whole stream, so the copies would only bloat every response.
_RESULT_DROP = frozenset({"stdout", "stderr"})


def agent_json(rec: AgentRecord) -> dict[str, Any]:
    out = {name: getattr(rec, name, None) for name in _AGENT_FIELDS}
    out["tags"] = list(rec.tags)
    out["name"] = rec.name or rec.host
    return out


def _extra_json(extra: dict[str, Any] | None) -> dict[str, Any] | None:
    if extra is None:
        return None
    out = dict(extra)
    env = out.get("env")
    if isinstance(env, dict):
        # Environment values often carry credentials: show which names were set only.
        out["env"] = sorted(str(k) for k in env)
    return out


def command_json(rec: CommandRecord) -> dict[str, Any]:
    out = {name: getattr(rec, name) for name in _COMMAND_FIELDS}
    out["extra"] = _extra_json(rec.extra)
    out["result"] = (
        None
        if rec.result is None
        else {k: v for k, v in rec.result.items() if k not in _RESULT_DROP}
    )
    out["final"] = rec.status in FINAL_STATUSES
    return out


def chunk_json(chunk: OutputChunk) -> dict[str, Any]:
    return {
        "offset": chunk.offset,
        "stream": chunk.stream,
        "data": base64.b64encode(chunk.data).decode("ascii"),
    }


def event_json(rec: EventRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "at": rec.created_at,
        "actor": rec.actor,
        "action": rec.action,
        "target": rec.target,
        "outcome": rec.outcome,
        "details": rec.details,
    }
