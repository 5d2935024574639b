# -*- test-case-name: tests.daemon.test_api,tests.daemon.test_heartbeat -*-
"""In-process metrics for myxd, rendered in the Prometheus text format (0.0.4).

The fleet code calls cheap hooks (`observe_heartbeat`, `rpc_error`, `poll_lag`, ...)
that only bump numbers in memory. Each caller takes the hooks it uses as a
Protocol (`HeartbeatMetrics`, `CommandMetrics`, `RPCMetrics`), so mypy checks that
`Metrics` has every hook a caller calls, and `NO_METRICS` stands in when a caller
is given none; gauges that mirror the store (agents and commands
by status) are read from the store at scrape time by the API, so they are never stale
and cost nothing between scrapes.

This module never blocks, never does I/O, never imports the reactor and never keeps
per-agent series (label values come from small fixed sets, so memory stays bounded
with 10,000 agents). It is a deliberately small registry instead of
`prometheus_client`, whose default registry is process-global state.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from myxd.statuses import AGENT_STATUSES, COMMAND_KINDS, COMMAND_STATUSES, ERROR_KINDS

__all__ = [
    "CONTENT_TYPE",
    "NO_METRICS",
    "CommandMetrics",
    "Counter",
    "HeartbeatMetrics",
    "Histogram",
    "Metrics",
    "NullMetrics",
    "RPCMetrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

RPC_ERROR_KINDS = ERROR_KINDS

# Heartbeats on loopback take ~1 ms, over a WAN tens of ms; a slow agent can hold a
# call until rpc_timeout (30 s), so the buckets span that whole range.
HEARTBEAT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Poll lag is how late a log poll runs after it was due; it should stay well below
# log_poll_interval (1 s) even with 1,000 pollers.
POLL_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CYCLE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _header(name: str, help_text: str, kind: str) -> list[str]:
    return [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]


class Counter:
    """A monotonically increasing counter with an optional single label."""

    def __init__(
        self,
        name: str,
        help_text: str,
        label: str | None = None,
        initial_labels: Iterable[str] = (),
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad metric name {name!r}")
        if label is not None and not _LABEL_RE.match(label):
            raise ValueError(f"bad label name {label!r}")
        self.name = name
        self.help = help_text
        self.label = label
        self._values: dict[str, float] = {v: 0.0 for v in initial_labels}
        if label is None:
            self._values[""] = 0.0

    def inc(self, label_value: str = "", amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def value(self, label_value: str = "") -> float:
        return self._values.get(label_value, 0.0)

    def render(self) -> list[str]:
        # The classic text format names the family exactly like its samples.
        family = f"{self.name}_total"
        lines = _header(family, self.help, "counter")
        for key in sorted(self._values):
            pairs = [(self.label, key)] if self.label is not None else []
            lines.append(f"{family}{_labels(pairs)} {_format_value(self._values[key])}")
        return lines


class Histogram:
    """A cumulative histogram with fixed upper bounds (the +Inf bucket is implied)."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad metric name {name!r}")
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be distinct and non-empty")
        self.name = name
        self.help = help_text
        self.bounds: tuple[float, ...] = tuple(bounds)
        # counts[i] counts observations in (bounds[i-1], bounds[i]]; the last slot is +Inf.
        self._counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        self._counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self._counts):
            running += n
            out.append((bound, running))
        return out

    def render(self) -> list[str]:
        lines = _header(self.name, self.help, "histogram")
        for bound, running in self.cumulative():
            le = _format_value(bound) if not math.isinf(bound) else "+Inf"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines.append(f"{self.name}_sum {_format_value(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class HeartbeatMetrics(Protocol):
    """The hooks the heartbeat scheduler calls (positionally)."""

    def observe_heartbeat(self, latency_seconds: float, /) -> None: ...

    def heartbeat_cycle(self, duration_seconds: float, agents: int, failed: int, /) -> None: ...

    def reinstall_requested(self) -> None: ...


class CommandMetrics(Protocol):
    """The hooks the command queue calls (positionally)."""

    def poll_lag(self, seconds: float, /) -> None: ...

    def command_created(self, kind: str, /) -> None: ...


class RPCMetrics(Protocol):
    """The hooks the agent RPC client calls (positionally)."""

    def rpc_retry(self) -> None: ...

    def rpc_error(self, kind: str, /) -> None: ...


class NullMetrics:
    """Every hook, doing nothing: for a caller given no metrics."""

    def observe_heartbeat(self, latency_seconds: float) -> None:
        pass

    def heartbeat_cycle(self, duration_seconds: float, agents: int = 0, failed: int = 0) -> None:
        pass

    def reinstall_requested(self) -> None:
        pass

    def poll_lag(self, seconds: float) -> None:
        pass

    def command_created(self, kind: str) -> None:
        pass

    def rpc_retry(self) -> None:
        pass

    def rpc_error(self, kind: str) -> None:
        pass


NO_METRICS = NullMetrics()


def _gauge_lines(
    name: str, help_text: str, label: str, values: Mapping[str, float], known: Iterable[str]
) -> list[str]:
    lines = _header(name, help_text, "gauge")
    merged = {k: 0.0 for k in known}
    for key, val in values.items():
        merged[str(key)] = float(val)
    for key in sorted(merged):
        lines.append(f"{name}{_labels([(label, key)])} {_format_value(merged[key])}")
    return lines


class Metrics:
    """The daemon's metrics. One instance per daemon, passed to whoever records."""

    def __init__(self) -> None:
        self.heartbeat_latency = Histogram(
            "myxd_heartbeat_latency_seconds",
            "Round-trip time of a successful heartbeat + get_status batch.",
            HEARTBEAT_BUCKETS,
        )
        self.rpc_errors = Counter(
            "myxd_rpc_errors",
            "Agent RPC calls that failed, by error kind (after retries).",
            "kind",
            RPC_ERROR_KINDS,
        )
        self.rpc_retries = Counter("myxd_rpc_retries", "Agent RPC attempts that were retried.")
        self.poll_lag_seconds = Histogram(
            "myxd_log_poll_lag_seconds",
            "How late a command log poll ran after it was due.",
            POLL_LAG_BUCKETS,
        )
        self.heartbeat_cycles = Counter("myxd_heartbeat_cycles", "Completed heartbeat cycles.")
        self.heartbeat_cycle_seconds = Histogram(
            "myxd_heartbeat_cycle_seconds", "Wall time of one heartbeat cycle.", CYCLE_BUCKETS
        )
        self.heartbeat_failures = Counter(
            "myxd_heartbeat_failures", "Agent heartbeats that failed."
        )
        self.reinstalls = Counter("myxd_reinstall_requests", "Agents handed to the reinstall hook.")
        self.commands_created = Counter(
            "myxd_commands_created",
            "Commands and ansible runs created, by kind.",
            "kind",
            COMMAND_KINDS,
        )
        self.api_requests = Counter(
            "myxd_api_requests", "Admin API responses, by HTTP status code.", "code"
        )

    # -- hooks for the fleet code (cheap, never raise on odd input) --------------

    def observe_heartbeat(self, latency_seconds: float) -> None:
        self.heartbeat_latency.observe(max(0.0, float(latency_seconds)))

    def rpc_error(self, kind: str) -> None:
        # Unknown kinds are folded into a fixed label so a bug cannot grow the series.
        self.rpc_errors.inc(kind if kind in RPC_ERROR_KINDS else "other")

    def rpc_retry(self) -> None:
        self.rpc_retries.inc()

    def poll_lag(self, seconds: float) -> None:
        self.poll_lag_seconds.observe(max(0.0, float(seconds)))

    def heartbeat_cycle(self, duration_seconds: float, agents: int = 0, failed: int = 0) -> None:
        self.heartbeat_cycles.inc()
        self.heartbeat_cycle_seconds.observe(max(0.0, float(duration_seconds)))
        if failed:
            self.heartbeat_failures.inc(amount=float(failed))

    def reinstall_requested(self) -> None:
        self.reinstalls.inc()

    def command_created(self, kind: str) -> None:
        self.commands_created.inc(kind if kind in COMMAND_KINDS else "other")

    def api_response(self, code: int) -> None:
        self.api_requests.inc(str(int(code)))

    # -- exposition ----------------------------------------------------------------

    def render(
        self,
        agent_counts: Mapping[str, int] | None = None,
        command_counts: Mapping[str, int] | None = None,
    ) -> str:
        """The whole exposition; gauge values are passed in by the scraper."""
        lines: list[str] = []
        lines += _gauge_lines(
            "myxd_agents", "Agents by status.", "status", agent_counts or {}, AGENT_STATUSES
        )
        lines += _gauge_lines(
            "myxd_commands", "Commands by status.", "status", command_counts or {}, COMMAND_STATUSES
        )
        for metric in (
            self.heartbeat_latency,
            self.heartbeat_cycle_seconds,
            self.heartbeat_cycles,
            self.heartbeat_failures,
            self.rpc_errors,
            self.rpc_retries,
            self.poll_lag_seconds,
            self.reinstalls,
            self.commands_created,
            self.api_requests,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"
