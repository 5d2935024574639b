# -*- test-case-name: tests.agent.test_rpc_server -*-
"""A JSON-RPC 2.0 dispatcher, exactly per https://www.jsonrpc.org/specification.

It turns request bytes into response bytes: single requests and batches (at
most ``max_batch``), notifications (executed, never answered), id checks,
params by position or by name with a typed spec per method, and the spec's
error codes. It knows nothing about HTTP or authentication; the caller has
already checked the token.

Methods come only from the explicit table given to the Dispatcher: a name from
the wire is looked up in that dict and never used with getattr. A handler
error that is not an RPCError is logged with its traceback here and reaches
the client only as -32603 "internal error".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Pattern,
    Sequence,
    Tuple,
)

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from myx_agent.errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RPCError,
)

MAX_BATCH = 50

# (param name, wire value) -> checked value; raises RPCError(-32602).
Check = Callable[[str, Any], Any]

_MISSING = object()


@dataclass(frozen=True)
class Param:
    """One named param. ``default`` is a factory, called per request."""

    name: str
    check: Check
    default: Optional[Callable[[], Any]] = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Method:
    """An allowlisted method: its wire name, params in positional order, handler.

    The handler is called with the checked params as keyword arguments and may
    return a value, a Deferred or a coroutine.
    """

    name: str
    params: Tuple[Param, ...]
    handler: Callable[..., Any]


@dataclass(frozen=True)
class DispatchResult:
    """What to send back, and a summary for the request's one log event.

    ``body`` is None when there is nothing to send (HTTP 204).
    """

    body: Optional[bytes]
    methods: str
    outcome: str


def _show(value: object, limit: int = 64) -> str:
    """A short, printable rendering of a client-supplied name."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid_param(name: str, problem: str) -> RPCError:
    return RPCError(INVALID_PARAMS, f"invalid param '{name}': {problem}")


# --- checks for param specs -------------------------------------------------


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def string(
    *,
    min_len: int = 0,
    max_len: int = 1 << 20,
    pattern: Optional[Pattern[str]] = None,
    describe: str = "",
) -> Check:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise invalid_param(name, "must be a string")
        if pattern is not None:
            if not pattern.fullmatch(value):
                raise invalid_param(name, f"must be {describe or 'a valid value'}")
            return value
        if not min_len <= len(value) <= max_len:
            if min_len == 1 and len(value) == 0:
                raise invalid_param(name, "must not be empty")
            raise invalid_param(name, f"must be {min_len}-{max_len} characters long")
        if "\x00" in value:
            raise invalid_param(name, "must not contain NUL characters")
        return value

    return check


def integer(*, minimum: Optional[int] = None, maximum: Optional[int] = None) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_param(name, "must be an integer")
        if minimum is not None and value < minimum:
            raise invalid_param(name, f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise invalid_param(name, f"must be <= {maximum}")
        return value

    return check


def number(
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    exclusive_minimum: bool = False,
) -> Check:
    def check(name: str, value: Any) -> float:
        if not is_number(value) or not math.isfinite(value):
            raise invalid_param(name, "must be a finite number")
        if minimum is not None:
            if exclusive_minimum and value <= minimum:
                raise invalid_param(name, f"must be > {minimum:g}")
            if not exclusive_minimum and value < minimum:
                raise invalid_param(name, f"must be >= {minimum:g}")
        if maximum is not None and value > maximum:
            raise invalid_param(name, f"must be <= {maximum:g}")
        return value

    return check


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid_param(name, "must be true or false")
    return value


def nullable(inner: Check) -> Check:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def string_list(*, max_items: int = 4096) -> Check:
    def check(name: str, value: Any) -> List[str]:
        if not isinstance(value, list):
            raise invalid_param(name, "must be an array of strings")
        if len(value) > max_items:
            raise invalid_param(name, f"must have at most {max_items} items")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise invalid_param(name, f"item {i} must be a string")
            if "\x00" in item:
                raise invalid_param(name, f"item {i} must not contain NUL characters")
        return list(value)

    return check


_ENV_NAME = re.compile(r"[^=\x00]+")


def env_map(name: str, value: Any) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise invalid_param(name, "must be an object of string to string")
    for key, item in value.items():
        if not _ENV_NAME.fullmatch(key):
            raise invalid_param(name, f"key {_show(key)!r} is not a valid variable name")
        if not isinstance(item, str):
            raise invalid_param(name, f"value of {_show(key)!r} must be a string")
        if "\x00" in item:
            raise invalid_param(name, f"value of {_show(key)!r} must not contain NUL")
    return dict(value)


def json_object(name: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_param(name, "must be a JSON object")
    return value


# --- the dispatcher -----------------------------------------------------------


def _error(code: int, message: str, request_id: Any) -> Dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": request_id}


def _encode(response: Mapping[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":"), allow_nan=False).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _valid_id(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return True
    return is_number(value) and not (isinstance(value, float) and not math.isfinite(value))


class _Outcome:
    """Per-request tallies for the log line."""

    __slots__ = ("names", "errors", "calls")

    def __init__(self) -> None:
        self.names: List[str] = []
        self.errors: List[int] = []
        self.calls = 0


class Dispatcher:
    """Dispatches JSON-RPC request bodies to an explicit method table."""

    log = Logger()

    def __init__(self, methods: Iterable[Method], *, max_batch: int = MAX_BATCH) -> None:
        self._methods: Dict[str, Method] = {}
        for m in methods:
            if m.name in self._methods:
                raise ValueError(f"duplicate method {m.name}")
            self._methods[m.name] = m
        self._max_batch = max_batch

    @property
    def method_names(self) -> Sequence[str]:
        return tuple(self._methods)

    def dispatch(self, body: bytes) -> Deferred[DispatchResult]:
        """Answer *body*. The Deferred never fails."""
        return Deferred.fromCoroutine(self.handle(body))

    async def handle(self, body: bytes) -> DispatchResult:
        tally = _Outcome()
        try:
            doc = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return DispatchResult(
                _encode(_error(PARSE_ERROR, "parse error", None)), "-", "parse error"
            )
        if isinstance(doc, list):
            if not doc:
                return self._single_error(INVALID_REQUEST, "invalid request: empty batch")
            if len(doc) > self._max_batch:
                return self._single_error(
                    INVALID_REQUEST,
                    f"invalid request: batch of {len(doc)} exceeds {self._max_batch}",
                )
            parts = await gatherResults([self._one(item, tally) for item in doc])
            answered = [p for p in parts if p is not None]
            body_out = b"[" + b",".join(answered) + b"]" if answered else None
            names = self._names(tally, batch=len(doc))
            return DispatchResult(body_out, names, self._verdict(tally))
        part = await self._one(doc, tally)
        return DispatchResult(part, self._names(tally, batch=None), self._verdict(tally))

    def _single_error(self, code: int, message: str) -> DispatchResult:
        return DispatchResult(_encode(_error(code, message, None)), "-", f"error {code}")

    @staticmethod
    def _names(tally: _Outcome, batch: Optional[int]) -> str:
        names = ",".join(tally.names) or "-"
        return names if batch is None else f"batch[{batch}]:{names}"

    @staticmethod
    def _verdict(tally: _Outcome) -> str:
        if not tally.errors:
            return "ok"
        if tally.calls == 1:
            return f"error {tally.errors[0]}"
        codes = ",".join(str(c) for c in sorted(set(tally.errors)))
        return f"errors {len(tally.errors)}/{tally.calls} ({codes})"

    def _one(self, request: Any, tally: _Outcome) -> Deferred[Optional[bytes]]:
        return Deferred.fromCoroutine(self._answer(request, tally))

    async def _answer(self, request: Any, tally: _Outcome) -> Optional[bytes]:
        """The encoded response to one request object, or None for a notification."""
        tally.calls += 1
        if not isinstance(request, dict):
            tally.names.append("-")
            tally.errors.append(INVALID_REQUEST)
            return _encode(_error(INVALID_REQUEST, "invalid request: not an object", None))
        request_id = request.get("id", _MISSING)
        if request_id is not _MISSING and not _valid_id(request_id):
            tally.names.append("-")
            tally.errors.append(INVALID_REQUEST)
            return _encode(
                _error(
                    INVALID_REQUEST,
                    "invalid request: id must be a string, a number or null",
                    None,
                )
            )
        notification = request_id is _MISSING
        reply_id = None if notification else request_id
        method_name = request.get("method", _MISSING)
        tally.names.append(_show(method_name) if isinstance(method_name, str) else "-")
        problem = None
        if request.get("jsonrpc") != "2.0":
            problem = 'jsonrpc must be exactly "2.0"'
        elif not isinstance(method_name, str):
            problem = "method must be a string"
        elif "params" in request and not isinstance(request["params"], (list, dict)):
            problem = "params must be an array or an object"
        if problem is not None:
            # An invalid request is answered even without an id (spec section 5).
            tally.errors.append(INVALID_REQUEST)
            return _encode(_error(INVALID_REQUEST, f"invalid request: {problem}", reply_id))

        response = await self._call(method_name, request.get("params", {}), tally)
        if notification:
            return None
        response["id"] = reply_id
        try:
            return _encode(response)
        except (TypeError, ValueError):
            self.log.failure("result of {method} is not JSON-serialisable", method=method_name)
            return _encode(_error(INTERNAL_ERROR, "internal error", reply_id))

    async def _call(self, name: str, params: Any, tally: _Outcome) -> Dict[str, Any]:
        method = self._methods.get(name)
        if method is None:
            tally.errors.append(METHOD_NOT_FOUND)
            return _error(METHOD_NOT_FOUND, f"method not found: {_show(name)}", None)
        try:
            kwargs = self._bind(method, params)
            result = method.handler(**kwargs)
            if isinstance(result, Deferred):
                result = await result
            elif hasattr(result, "__await__"):
                awaitable: Awaitable[Any] = result
                result = await awaitable
        except RPCError as e:
            tally.errors.append(e.code)
            return {"jsonrpc": "2.0", "error": e.to_json(), "id": None}
        except Exception:
            tally.errors.append(INTERNAL_ERROR)
            self.log.failure("internal error in {method}", method=name)
            return _error(INTERNAL_ERROR, "internal error", None)
        return {"jsonrpc": "2.0", "result": result, "id": None}

    @staticmethod
    def _bind(method: Method, params: Any) -> Dict[str, Any]:
        if isinstance(params, list):
            if len(params) > len(method.params):
                raise RPCError(
                    INVALID_PARAMS,
                    f"invalid params: {method.name} takes at most {len(method.params)}, "
                    f"got {len(params)}",
                )
            given: Mapping[str, Any] = {p.name: v for p, v in zip(method.params, params)}
        else:
            known = {p.name for p in method.params}
            for key in params:
                if key not in known:
                    raise RPCError(INVALID_PARAMS, f"unknown param '{_show(key)}'")
            given = params
        kwargs: Dict[str, Any] = {}
        for p in method.params:
            if p.name in given:
                kwargs[p.name] = p.check(p.name, given[p.name])
            elif p.default is None:
                raise RPCError(INVALID_PARAMS, f"missing param '{p.name}'")
            else:
                kwargs[p.name] = p.default()
        return kwargs
