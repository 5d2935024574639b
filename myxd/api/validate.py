"""Validate a request against its model and say what is wrong in operator words.

`body(request, Model)` reads the JSON object body, `query(request, Model)` the query
string; both return the validated model or raise `APIError` (400) whose body lists
every field error: ``{"error": "<first>", "field": "<first field>", "errors": [...]}``.
A library's raw error dump never reaches a client: each pydantic error type is
translated here, and a value is never quoted back (it may be a secret).

The query string is parsed from the raw bytes: invalid UTF-8 and repeated names are
refused with a 400, never a 500. Nothing here touches the store or the network.
"""

# test-case-name: tests.daemon.test_api_models

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

from pydantic import BaseModel, ValidationError
from twisted.web.iweb import IRequest

from myxd.api.inputs import APIError, read_json_object

__all__ = ["body", "field_errors", "optional_body", "query"]

M = TypeVar("M", bound=BaseModel)

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "a boolean",
    "list": "an array",
    "dict": "an object",
    "model": "an object",
    "model_attributes": "an object",
    "dataclass": "an object",
}


def _field_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("="):
            continue  # a union branch tag, not a field
        elif part == "[key]":
            continue  # pydantic marks a bad dict key like this; the key itself is named
        else:
            out += ("." if out else "") + part[:64]
    return out or "body"


def _words(err: Any, field_messages: dict[str, str], field: str) -> str:
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", "is not valid"))
    if kind in ("string_pattern_mismatch", "union_tag_invalid", "union_tag_not_found"):
        return field_messages.get(field, "does not have the expected form")
    if kind in ("greater_than_equal",):
        return f"must be at least {ctx['ge']}"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else "is too short"
    if kind == "string_too_long":
        return f"is longer than {ctx['max_length']} characters"
    if kind == "too_short":
        return field_messages.get(field, f"needs at least {ctx.get('min_length')} items")
    if kind == "too_long":
        return f"has more than {ctx.get('max_length')} items"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected', 'the documented values')}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("int_from_float", "int_parsing", "int_parsing_size"):
        return "must be an integer"
    if kind in ("float_parsing",):
        return "must be a number"
    if kind in ("bool_parsing",):
        return "must be true or false"
    base = kind.removesuffix("_type").removesuffix("_parsing")
    if base in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[base]}"
    return "is not valid"


def field_errors(exc: ValidationError, model: type[BaseModel]) -> list[dict[str, str]]:
    """One {field, error} per field, in the order pydantic found them."""
    messages: dict[str, str] = getattr(model, "field_messages", {})
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False, include_input=False):
        field = _field_name(tuple(err["loc"]))
        if field in seen:
            continue  # a union reports once per branch: one line per field is enough
        seen.add(field)
        out.append({"field": field, "error": f"{field}: {_words(err, messages, field)}"})
    return out


def _refuse(exc: ValidationError, model: type[BaseModel]) -> APIError:
    errors = field_errors(exc, model)
    first = errors[0] if errors else {"field": "body", "error": "body: is not valid"}
    return APIError(400, first["error"], first["field"], errors=errors)


def validate(doc: Any, model: type[M]) -> M:
    """`doc` (already parsed JSON) as `model`, or APIError 400 listing every field."""
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise _refuse(e, model) from None


def body(request: IRequest, model: type[M]) -> M:
    """The request's JSON object body validated as `model`."""
    return validate(read_json_object(request), model)


def optional_body(request: IRequest, model: type[M]) -> M:
    """Like `body`, but an absent or empty body counts as {}."""
    content = request.content
    if content is None:
        return validate({}, model)
    content.seek(0)
    if not content.read(1):
        return validate({}, model)
    return body(request, model)


def _query_pairs(raw: bytes) -> list[tuple[bytes, bytes]]:
    pairs: list[tuple[bytes, bytes]] = []
    for part in raw.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        pairs.append(
            (
                unquote_to_bytes(name.replace(b"+", b" ")),
                unquote_to_bytes(value.replace(b"+", b" ")),
            )
        )
    return pairs


def query(request: IRequest, model: type[M]) -> M:
    """The query string validated as `model`; repeated names and bad UTF-8 are 400s."""
    # Parse the query string ourselves, from bytes: request.args also holds form
    # fields of a POST body, and urllib's str parsing fails on invalid UTF-8.
    uri: bytes = request.uri
    args: dict[str, str] = {}
    for raw_name, raw_value in _query_pairs(urlsplit(uri).query):
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "query: a name is not valid UTF-8", "query") from None
        if name not in model.model_fields:
            shown = name[:64]
            raise APIError(400, f"{shown}: unknown query argument", shown)
        if name in args:
            raise APIError(400, f"{name}: given more than once", name)
        try:
            args[name] = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, f"{name}: is not valid UTF-8", name) from None
    return validate(args, model)
