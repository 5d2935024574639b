"""Structure-aware generated input for the agent's JSON-RPC surface (hypothesis).

``bodies()`` is a hypothesis strategy of raw HTTP request bodies (bytes): JSON-RPC
requests for every method of myx_agent/methods.py with each parameter either
valid, of a wrong type, missing, or joined by extra fields; ids of every kind;
batches (empty, mixed with notifications, larger than the agent's limit); and
bodies that are not JSON at all: invalid UTF-8, duplicate keys, NaN/Infinity,
numbers with thousands of digits, deep nesting, truncation.

``generate(count, seed)`` draws ``count`` bodies deterministically (hypothesis
is used as a generator; each body is then sent to a real agent and judged by
``problems``). ``problems(status, headers, body)`` lists what is wrong with one
answer: a 5xx, an unexpected status, a traceback, a body that is not JSON-RPC.

Never generates a program to run: ``command`` is drawn from a harmless
allowlist (``true``, ``echo``, a path that does not exist) when it has the
right type; any other string there is a wrong-type value or a path under
/nonexistent. Playbook names never name a real playbook (the agents under
test have an empty deployment-tool dir).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

# The agent's method table (myx_agent/methods.py), params in positional order.
# tests/reliability/test_agent_fuzz.py checks this against the real table.
METHODS: Dict[str, Tuple[str, ...]] = {
    "health_check": (),
    "heartbeat": (),
    "get_status": (),
    "get_port": (),
    "execute_command": ("command", "args", "timeout", "command_id", "env", "cwd"),
    "get_command_log": ("command_id", "offset", "wait", "max_bytes"),
    "cancel_command": ("command_id",),
    "execute_ansible": ("playbook", "extra_vars", "timeout", "command_id", "check"),
    "sync_deployment_tool": ("archive", "sha256", "version"),
    "artifact_status": ("sha256", "size"),
    "put_artifact_chunk": ("sha256", "size", "offset", "data"),
}
HARMLESS_COMMANDS = ("true", "echo", "/nonexistent/myx-fuzz")
MAX_BATCH = 50


class Pairs:
    """A JSON object written as these (key, value) pairs, duplicates included."""

    def __init__(self, pairs: List[Tuple[str, Any]]) -> None:
        self.pairs = pairs


def encode(value: Any) -> str:
    """JSON text; NaN/Infinity as the bare words Python writes; Pairs keep duplicates."""
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{encode(k)}:{encode(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, dict):
        return encode(Pairs(list(value.items())))
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return json.dumps(value)


_BIG = [10**400, -(10**400), 2**63, -(2**63) - 1, 2**64, 2**53 + 1, -1, 0]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(_BIG),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "\ud800", "\udfff\ud800", "\x00", "2.0", "../../etc/passwd", "-" * 300]),
)
any_json = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=10,
)

_command_id = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
VALID: Dict[str, Any] = {
    "command": st.sampled_from(HARMLESS_COMMANDS),
    "args": st.lists(st.text(max_size=20), max_size=4),
    "timeout": st.one_of(st.none(), st.floats(min_value=0.01, max_value=5)),
    "command_id": _command_id,
    "env": st.one_of(
        st.none(),
        st.dictionaries(
            st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), st.text(max_size=10), max_size=3
        ),
    ),
    "cwd": st.one_of(st.none(), st.sampled_from(["/", "/nonexistent", "relative", "/tmp"])),
    "offset": st.integers(min_value=0, max_value=10**6),
    "wait": st.floats(min_value=0, max_value=0.05),
    "max_bytes": st.integers(min_value=1, max_value=1 << 20),
    "playbook": st.sampled_from(
        ["ping.yml", "missing.yml", "../../etc/passwd", "/etc/passwd", "a/../../b.yml"]
    ),
    "extra_vars": st.dictionaries(st.text(max_size=8), any_json, max_size=4),
    "check": st.booleans(),
    "archive": st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
    "sha256": st.from_regex(r"[0-9a-fA-F]{64}", fullmatch=True),
    "version": st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True),
    "size": st.integers(min_value=0, max_value=10**6),
    "data": st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
}


def _wrong(name: str) -> Any:
    if name == "command":
        # A string of the wrong kind only ever names something that does not exist.
        return st.one_of(
            any_json.filter(lambda v: not isinstance(v, str)),
            st.text(max_size=20).map(lambda s: "/nonexistent/" + s.replace("\x00", "")),
        )
    return any_json


@st.composite
def params_for(draw: Any, method: str) -> Any:
    names = METHODS.get(method, ())
    style = draw(st.sampled_from(["named", "named", "named", "positional", "wrong"]))
    if style == "wrong":
        return draw(any_json.filter(lambda v: not isinstance(v, (dict, list))))
    values = []
    for name in names:
        mode = draw(st.sampled_from(["valid", "valid", "wrong", "missing"]))
        if mode == "missing":
            continue
        strategy = VALID[name] if mode == "valid" else _wrong(name)
        values.append((name, draw(strategy)))
    if style == "positional":
        extra = draw(st.lists(any_json, max_size=2))
        return [v for _, v in values] + extra
    extras = draw(st.lists(st.tuples(st.text(max_size=10), any_json), max_size=2))
    if values and draw(st.booleans()):
        extras.append((values[0][0], draw(any_json)))  # a duplicate key
    return Pairs(values + extras)


@st.composite
def request(draw: Any, notification: Optional[bool] = None) -> Any:
    method = draw(
        st.one_of(
            st.sampled_from(sorted(METHODS)),
            st.sampled_from(sorted(METHODS)),
            st.sampled_from(["rpc.discover", "__init__", "execute", "table", "_runner", ""]),
            any_json,
        )
    )
    fields: List[Tuple[str, Any]] = []
    if draw(st.integers(0, 9)) > 0:
        fields.append(("jsonrpc", "2.0" if draw(st.integers(0, 5)) else draw(any_json)))
    fields.append(("method", method))
    if draw(st.integers(0, 5)):
        key = method if isinstance(method, str) else "health_check"
        fields.append(("params", draw(params_for(key))))
    is_note = draw(st.booleans()) if notification is None else notification
    if not is_note:
        fields.append(
            ("id", draw(st.one_of(st.integers(), st.text(max_size=10), st.none(), any_json)))
        )
    fields += draw(st.lists(st.tuples(st.text(max_size=8), any_json), max_size=2))
    return Pairs(fields)


def _bytes_of(doc: Any) -> bytes:
    return encode(doc).encode("utf-8", "surrogatepass")


@st.composite
def mangled(draw: Any) -> bytes:
    """Bytes that are not a valid JSON-RPC document."""
    kind = draw(
        st.sampled_from(["utf8", "truncate", "nest", "digits", "garbage", "empty", "constant"])
    )
    if kind == "utf8":
        body = _bytes_of(draw(request()))
        at = draw(st.integers(0, len(body)))
        bad = draw(
            st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        )
        return body[:at] + bad + body[at:]
    if kind == "truncate":
        body = _bytes_of(draw(request()))
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if kind == "nest":
        depth = draw(st.sampled_from([100, 1000, 5000, 50000, 200000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return opener * depth + b"1" + closer * depth
    if kind == "digits":
        digits = draw(st.sampled_from([4300, 4301, 10000, 100000]))
        return (
            b'{"jsonrpc":"2.0","method":"get_command_log","params":{"offset":'
            + (b"9" * digits)
            + b'},"id":1}'
        )
    if kind == "constant":
        word = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]))
        return b'{"jsonrpc":"2.0","method":"get_command_log","id":' + word + b"}"
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"null", b"[]", b"{}", b"[[]]", b'""']))
    return draw(st.binary(max_size=300))


@st.composite
def batch(draw: Any) -> bytes:
    size = draw(st.one_of(st.integers(0, 8), st.integers(MAX_BATCH - 1, MAX_BATCH + 10)))
    items: List[Any] = []
    for _ in range(size):
        if size > 8:
            items.append(Pairs([("jsonrpc", "2.0"), ("method", "health_check"), ("id", 1)]))
        else:
            items.append(draw(st.one_of(request(), any_json)))
    return _bytes_of(items)


def bodies() -> Any:
    """Raw bodies: mostly requests, then batches, then mangled bytes."""
    return st.one_of(
        request().map(_bytes_of),
        request().map(_bytes_of),
        batch(),
        mangled(),
    )


def generate(count: int, seed_value: int) -> List[bytes]:
    """``count`` bodies, the same ones for the same seed."""
    out: List[bytes] = []

    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @seed(seed_value)
    @given(bodies())
    def collect(body: bytes) -> None:
        out.append(body)

    collect()
    return out


_OK_STATUSES = (200, 204, 413)


# Signs of a Python traceback or an HTML error page. The agent may echo a
# param name from the request ("unknown param 'Traceback'"), and hypothesis
# does generate such words, so a sign counts only when the answer holds it more
# often than the request did.
_LEAK_SIGNS = (b"Traceback", b'File "', b", line ", b"Error:", b"<html")


def problems(
    status: int, headers: Dict[bytes, List[bytes]], body: bytes, request: bytes = b""
) -> List[str]:
    """What is wrong with one authorized answer to *request* (empty: nothing)."""
    found = []
    if status >= 500:
        found.append(f"HTTP {status}")
    elif status not in _OK_STATUSES:
        found.append(f"unexpected HTTP {status}")
    for needle in _LEAK_SIGNS:
        if body.count(needle) > request.count(needle):
            found.append(f"{needle.decode()!r} in the body")
    if status == 200:
        try:
            doc = json.loads(body)
        except ValueError:
            found.append("200 with a body that is not JSON")
        else:
            items = doc if isinstance(doc, list) else [doc]
            if not items or not all(
                isinstance(i, dict) and i.get("jsonrpc") == "2.0" for i in items
            ):
                found.append("200 with a body that is not JSON-RPC 2.0")
    return found
