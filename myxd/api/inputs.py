"""The admin API's raw input and output: the JSON body reader, strict JSON output,
the host-name check and `APIError`, the HTTP-level client error.

Typed fields are checked by the models (`myxd.api.models`, through
`myxd.api.validate`). Nothing here touches the store or the network, and nothing
here ever echoes a secret back (values are never quoted in error messages).
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Any

from twisted.web.iweb import IRequest

from myxd.errors import MyxError

__all__ = [
    "MAX_BODY_BYTES",
    "APIError",
    "json_bytes",
    "read_json_object",
    "valid_host",
]

# Request bodies are small JSON documents (a command line, a playbook name); 1 MiB
# leaves room for large extra_vars while bounding what one request can make us hold.
MAX_BODY_BYTES = 1024 * 1024

_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class APIError(MyxError):
    """A client error with a status code, a message and optionally the field at fault."""

    def __init__(self, code: int, message: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        out.update(self.extra)
        return out


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_bytes(obj: Any) -> bytes:
    """Strict JSON (no NaN/Infinity, which many clients reject): those become null."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError:
        # An agent's get_status may carry a NaN (e.g. a load average); it must not
        # turn a listing into a 500.
        text = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json_object(request: IRequest, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request body as a JSON object, or APIError naming field "body"."""
    content = request.content
    if content is None:
        raise APIError(400, "a JSON object body is required", "body")
    content.seek(0)
    raw = content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise APIError(413, f"request body larger than {max_bytes} bytes", "body")
    if not raw.strip():
        raise APIError(400, "a JSON object body is required", "body")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise APIError(400, "body is not valid UTF-8 JSON", "body") from None
    if not isinstance(doc, dict):
        raise APIError(400, "body must be a JSON object", "body")
    return doc


def valid_host(value: str) -> bool:
    """An IP address or an RFC 1123 host name (no port, no scheme, no brackets)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    if len(value) > 253:
        return False
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    return bool(labels) and all(_HOST_LABEL_RE.match(label) for label in labels)
