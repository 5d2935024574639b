"""Input checking for the admin API: JSON bodies, query arguments, typed fields.

Every check raises `APIError` with the HTTP status and the name of the offending
field, so a client always learns *what* was wrong. Nothing here touches the store or
the network, and nothing here ever echoes a secret back (values are never quoted in
error messages, only field names).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.web.iweb import IRequest

__all__ = [
    "MAX_BODY_BYTES",
    "APIError",
    "Body",
    "Query",
    "json_bytes",
    "read_json_object",
]

# Request bodies are small JSON documents (a command line, a playbook name); 1 MiB
# leaves room for large extra_vars while bounding what one request can make us hold.
MAX_BODY_BYTES = 1024 * 1024

_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class APIError(Exception):
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_text(field: str, value: str, *, max_len: int) -> str:
    if "\x00" in value:
        raise APIError(400, f"{field} must not contain NUL characters", field)
    if len(value) > max_len:
        raise APIError(400, f"{field} is longer than {max_len} characters", field)
    return value


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


class Body:
    """Typed access to the fields of a JSON object body, with an allowlist of names."""

    def __init__(self, doc: Mapping[str, Any], allowed: Collection[str]) -> None:
        for key in doc:
            if key not in allowed:
                raise APIError(
                    400, f"unknown field {key!r}" if len(key) <= 64 else "unknown field", key[:64]
                )
        self._doc = doc

    def has(self, name: str) -> bool:
        return name in self._doc

    def _get(self, name: str, required: bool) -> Any:
        if name not in self._doc:
            if required:
                raise APIError(400, f"{name} is required", name)
            return None
        return self._doc[name]

    def string(
        self,
        name: str,
        *,
        required: bool = True,
        max_len: int = 4096,
        allow_empty: bool = False,
        nullable: bool = False,
    ) -> str | None:
        value = self._get(name, required)
        if value is None:
            if name in self._doc and not nullable:
                raise APIError(400, f"{name} must be a string", name)
            return None
        if not isinstance(value, str):
            raise APIError(400, f"{name} must be a string", name)
        if not value and not allow_empty:
            raise APIError(400, f"{name} must not be empty", name)
        return _check_text(name, value, max_len=max_len)

    def integer(
        self,
        name: str,
        *,
        required: bool = True,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        value = self._get(name, required)
        if value is None:
            if name in self._doc:
                raise APIError(400, f"{name} must be an integer", name)
            return None
        if not _is_int(value):
            raise APIError(400, f"{name} must be an integer", name)
        if minimum is not None and value < minimum:
            raise APIError(400, f"{name} must be at least {minimum}", name)
        if maximum is not None and value > maximum:
            raise APIError(400, f"{name} must be at most {maximum}", name)
        return int(value)

    def timeout(self, name: str = "timeout", *, maximum: float = 30 * 86400) -> float | None:
        """A positive number of seconds, or null/absent for no timeout."""
        value = self._get(name, False)
        if value is None:
            return None
        if not _is_number(value):
            raise APIError(400, f"{name} must be a number of seconds or null", name)
        if value <= 0:
            raise APIError(400, f"{name} must be greater than 0", name)
        if value > maximum:
            raise APIError(400, f"{name} must be at most {maximum:g}", name)
        return float(value)

    def string_list(self, name: str, *, max_items: int = 4096, max_len: int = 131072) -> list[str]:
        value = self._get(name, False)
        if value is None:
            if name in self._doc:
                raise APIError(400, f"{name} must be an array of strings", name)
            return []
        if not isinstance(value, list):
            raise APIError(400, f"{name} must be an array of strings", name)
        if len(value) > max_items:
            raise APIError(400, f"{name} has more than {max_items} items", name)
        out: list[str] = []
        for i, item in enumerate(value):
            field = f"{name}[{i}]"
            if not isinstance(item, str):
                raise APIError(400, f"{field} must be a string", field)
            out.append(_check_text(field, item, max_len=max_len))
        return out

    def string_map(self, name: str, *, max_items: int = 1024) -> dict[str, str] | None:
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise APIError(400, f"{name} must be an object of strings or null", name)
        if len(value) > max_items:
            raise APIError(400, f"{name} has more than {max_items} entries", name)
        out: dict[str, str] = {}
        for key, item in value.items():
            field = f"{name}.{key[:64]}"
            if not key or "=" in key or "\x00" in key:
                raise APIError(400, f"{name} has an invalid variable name", field)
            if not isinstance(item, str):
                raise APIError(400, f"{field} must be a string", field)
            out[key] = _check_text(field, item, max_len=131072)
        return out

    def json_object(self, name: str) -> dict[str, Any]:
        value = self._get(name, False)
        if value is None:
            if name in self._doc:
                raise APIError(400, f"{name} must be an object", name)
            return {}
        if not isinstance(value, dict):
            raise APIError(400, f"{name} must be an object", name)
        return value

    def raw(self, name: str, *, required: bool = True) -> Any:
        return self._get(name, required)


class Query:
    """Typed access to query-string arguments, with an allowlist of names."""

    def __init__(self, request: IRequest, allowed: Collection[str]) -> None:
        # Parse the query string ourselves: request.args also holds form fields parsed
        # from a POST body, which are not query arguments.
        uri: bytes = request.uri
        args = parse_qs(urlsplit(uri).query, keep_blank_values=True)
        self._args: dict[str, str] = {}
        for raw_key, values in args.items():
            key = raw_key.decode("utf-8", "replace")
            if key not in allowed:
                raise APIError(400, "unknown query argument", key[:64])
            if len(values) != 1:
                raise APIError(400, f"{key} given more than once", key)
            try:
                self._args[key] = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(400, f"{key} is not valid UTF-8", key) from None

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        if name not in self._args:
            return default
        text = self._args[name]
        if not re.fullmatch(r"-?[0-9]{1,19}", text):
            raise APIError(400, f"{name} must be an integer", name)
        value = int(text)
        if value < minimum or value > maximum:
            raise APIError(400, f"{name} must be between {minimum} and {maximum}", name)
        return value

    def optional_integer(self, name: str, *, minimum: int, maximum: int) -> int | None:
        if name not in self._args:
            return None
        return self.integer(name, 0, minimum=minimum, maximum=maximum)

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        if name not in self._args:
            return default
        try:
            value = float(self._args[name])
        except ValueError:
            raise APIError(400, f"{name} must be a number", name) from None
        if not math.isfinite(value) or value < minimum or value > maximum:
            raise APIError(400, f"{name} must be between {minimum:g} and {maximum:g}", name)
        return value

    def choice(self, name: str, choices: Collection[str]) -> str | None:
        if name not in self._args:
            return None
        value = self._args[name]
        if value not in choices:
            raise APIError(400, f"{name} must be one of {', '.join(sorted(choices))}", name)
        return value
