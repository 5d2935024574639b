"""Helpers shared by the admin API tests: an SSE parser, a Prometheus text parser,
an SSE-reading body protocol that can hang up, and URL-map utilities."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from werkzeug.routing import Map

TOKEN = "test-admin-token-0123456789"
AUTH = {b"Authorization": [f"Bearer {TOKEN}".encode()]}


class SSEParser:
    """Incremental text/event-stream parser (enough of the spec for our server)."""

    def __init__(self) -> None:
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.comments: list[str] = []
        self.retry: int | None = None

    def sink(self, data: bytes) -> None:
        """For treq.collect."""
        self.feed(data)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        new: list[dict[str, Any]] = []
        while b"\n\n" in self._buf:
            block, self._buf = self._buf.split(b"\n\n", 1)
            event: dict[str, Any] = {}
            datas: list[str] = []
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    datas.append(value)
                elif name == "retry":
                    self.retry = int(value)
                elif name in ("id", "event"):
                    event[name] = value
            if datas:
                event["data"] = json.loads("\n".join(datas))
                self.events.append(event)
                new.append(event)
        return new


class SSEReader(Protocol):
    """A body protocol: parses events as they arrive; `hang_up()` drops the connection."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.done: Deferred[None] = Deferred()
        self._waiters: list[tuple[Any, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed(data)
        self._check()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(None)
        self._check()

    def _check(self) -> None:
        still = []
        for pred, d in self._waiters:
            if pred(self.parser.events):
                d.callback(None)
            elif self.done.called:
                d.errback(AssertionError(f"stream ended; events: {self.parser.events!r}"))
            else:
                still.append((pred, d))
        self._waiters = still

    def wait_for(self, pred: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append((pred, d))
        self._check()
        return d

    def hang_up(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})?'
    r" (?P<value>[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|Inf|NaN))$"
)
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """Strict-ish parse of the text format 0.0.4; raises AssertionError on any bad line.

    Returns {family: {"type": ..., "help": ..., "samples": [(name, labels, value)]}}.
    """
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        if line.startswith("# HELP "):
            name: str = line.split(" ", 3)[2]
            families.setdefault(name, {"samples": []})["help"] = line.split(" ", 3)[3]
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            fam = families.setdefault(name, {"samples": []})
            assert "type" not in fam, f"second TYPE for {name}"
            assert not fam["samples"], f"TYPE after samples for {name}"
            fam["type"] = kind
            current = name
            continue
        assert not line.startswith("#"), f"line {lineno}: unexpected comment {line!r}"
        m = _SAMPLE_RE.match(line)
        assert m, f"line {lineno}: not a sample: {line!r}"
        sample = m.group("name")
        assert current is not None and sample.startswith(current), (
            f"line {lineno}: sample {sample} outside its family {current}"
        )
        fam_kind: str | None = families[current].get("type")
        suffix = sample[len(current) :]
        allowed = {
            "counter": ("",),
            "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(fam_kind or "", ("",))
        assert suffix in allowed, f"line {lineno}: {sample} not valid for a {fam_kind}"
        labels = dict(_LABEL_RE.findall(m.group("labels") or ""))
        value = float(m.group("value").replace("Inf", "inf"))
        families[current]["samples"].append((sample, labels, value))
    for name, fam in families.items():
        assert "type" in fam and "help" in fam, f"{name} lacks TYPE or HELP"
        if fam["type"] == "histogram":
            buckets = [(s[1]["le"], s[2]) for s in fam["samples"] if s[0].endswith("_bucket")]
            assert buckets and buckets[-1][0] == "+Inf", f"{name} lacks +Inf"
            les = [float(le.replace("+Inf", "inf")) for le, _ in buckets]
            assert les == sorted(les), f"{name} buckets out of order"
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{name} buckets not cumulative"
            count = [s[2] for s in fam["samples"] if s[0] == name + "_count"]
            assert count == [counts[-1]], f"{name}_count != +Inf bucket"
            total = [s[2] for s in fam["samples"] if s[0] == name + "_sum"]
            assert len(total) == 1 and not math.isnan(total[0])
    return families


def concrete_path(rule_text: str) -> str:
    """A request path that matches a werkzeug rule (every variable set to 1 / x)."""

    def fill(m: re.Match[str]) -> str:
        conv = m.group(1) or ""
        return "x" if conv.startswith("path") else "1"

    return re.sub(r"<(?:([a-zA-Z_]+)(?:\([^)]*\))?:)?[a-zA-Z_][a-zA-Z0-9_]*>", fill, rule_text)


def routes(url_map: Map) -> list[tuple[str, str]]:
    """(rule text, method) for every rule, HEAD/OPTIONS left out."""
    out = []
    for rule in url_map.iter_rules():
        for method in sorted(rule.methods or ()):
            if method not in ("HEAD", "OPTIONS"):
                out.append((rule.rule, method))
    return sorted(set(out))
