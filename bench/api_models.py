"""Cost of request validation + response serialisation per request, per model library.

Candidates for declaring the admin API's shapes once (issue #11 §5): pydantic v2
(what myxd uses, through myxd.api.models), msgspec, and attrs + cattrs. Each one
validates the body of ``POST /api/agents/{id}/commands`` (a good one, and a bad one
with three field errors) and writes one ``Command`` response, like the handler.
Prints microseconds per request (median of several rounds) and how many field
errors each library reports for the bad body: the API must list every one.

    .venv/bin/python -m bench.api_models [--rounds 7] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import attrs
import cattrs
import msgspec

from myxd.api import models, validate
from myxd.api.inputs import APIError, json_bytes

GOOD = json.dumps(
    {"command": "ls", "args": ["-l", "/tmp"], "timeout": 30, "env": {"A": "1"}, "cwd": "/"}
).encode()
BAD = json.dumps({"command": 5, "args": [1], "timeout": -1}).encode()
RESPONSE: dict[str, Any] = {
    "id": 1,
    "agent_id": 2,
    "command_uid": "c" * 32,
    "kind": "command",
    "command": "ls",
    "args": ["-l"],
    "timeout": 30.0,
    "status": "pending",
    "exit_code": None,
    "reason": None,
    "attempts": 0,
    "output_offset": 0,
    "created_at": 1.7e9,
    "started_at": None,
    "finished_at": None,
    "extra": {"env": ["A"], "cwd": "/"},
    "result": None,
    "final": False,
}


# -- pydantic (the real code path) ------------------------------------------------------


def pydantic_request(raw: bytes) -> int:
    try:
        validate.validate(json.loads(raw), models.NewCommand)
    except APIError as e:
        return len(e.extra["errors"])
    json_bytes(RESPONSE)
    return 0


# -- msgspec ----------------------------------------------------------------------------


class MNewCommand(msgspec.Struct, forbid_unknown_fields=True):
    command: str
    args: list[str] = []
    timeout: Optional[float] = None
    env: Optional[dict[str, str]] = None
    cwd: Optional[str] = None


_mdec = msgspec.json.Decoder(MNewCommand)
_menc = msgspec.json.Encoder()


def msgspec_request(raw: bytes) -> int:
    try:
        spec = _mdec.decode(raw)
    except msgspec.ValidationError:
        return 1  # msgspec stops at the first error
    if spec.timeout is not None and spec.timeout <= 0:
        return 1
    _menc.encode(RESPONSE)
    return 0


# -- attrs + cattrs ---------------------------------------------------------------------


@attrs.frozen
class ANewCommand:
    command: str
    args: list[str] = attrs.field(factory=list)
    timeout: Optional[float] = None
    env: Optional[dict[str, str]] = None
    cwd: Optional[str] = None


_conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


_conv.register_structure_hook(str, _strict_str)


def cattrs_request(raw: bytes) -> int:
    try:
        _conv.structure(json.loads(raw), ANewCommand)
    except cattrs.BaseValidationError as e:
        return len(cattrs.transform_error(e))
    json_bytes(RESPONSE)
    return 0


CANDIDATES: dict[str, Callable[[bytes], int]] = {
    "pydantic v2": pydantic_request,
    "msgspec": msgspec_request,
    "attrs+cattrs": cattrs_request,
}


def per_request_us(fn: Callable[[bytes], int], raw: bytes, n: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn(raw)
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'library':<14} {'good µs/req':>12} {'bad µs/req':>11} {'errors listed':>14}")
    for name, fn in CANDIDATES.items():
        good = per_request_us(fn, GOOD, args.n, args.rounds)
        bad = per_request_us(fn, BAD, args.n, args.rounds)
        print(f"{name:<14} {good:>12.2f} {bad:>11.2f} {fn(BAD):>14}")
    print("(bad body has 3 field errors: command, args[0], timeout)")


if __name__ == "__main__":
    main()
