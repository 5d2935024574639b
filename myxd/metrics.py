"""The daemon's metrics, exposed in the Prometheus text format (0.0.4) by prometheus_client.

The fleet code calls cheap hooks (`observe_heartbeat`, `rpc_error`, `poll_lag`, ...)
that only bump numbers in memory. Gauges that mirror the store (agents and commands
by status) come from a custom collector fed at scrape time by the API, so they are
never stale and cost nothing between scrapes. The standard ``process_*`` metrics
(CPU, memory, open file descriptors, start time) come with it.

Each `Metrics` has its own `CollectorRegistry`, never prometheus_client's global
one, so two daemons (or two tests) in one process never share a series. This
module never blocks, never does I/O, never imports the reactor and never keeps
per-agent series (label values come from small fixed sets, so memory stays bounded
with 10,000 agents).
"""

# test-case-name: tests.daemon.test_api,tests.daemon.test_heartbeat

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from myxd.statuses import AGENT_STATUSES, COMMAND_KINDS, COMMAND_STATUSES, ERROR_KINDS

__all__ = [
    "AGENT_STATUSES",
    "COMMAND_STATUSES",
    "CONTENT_TYPE",
    "NO_METRICS",
    "CommandMetrics",
    "HeartbeatMetrics",
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


class StoreGauges(Collector):
    """Agents and commands by status, as last read from the store by the scraper."""

    def __init__(self) -> None:
        self.agents: Mapping[str, int] = {}
        self.commands: Mapping[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        for name, doc, known, values in (
            ("myxd_agents", "Agents by status.", AGENT_STATUSES, self.agents),
            ("myxd_commands", "Commands by status.", COMMAND_STATUSES, self.commands),
        ):
            family = GaugeMetricFamily(name, doc, labels=["status"])
            merged = {k: 0.0 for k in known}
            merged.update({str(k): float(v) for k, v in values.items()})
            for status in sorted(merged):
                family.add_metric([status], merged[status])
            yield family


class Metrics:
    """The daemon's metrics. One instance per daemon, passed to whoever records."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._store_gauges = StoreGauges()
        r.register(self._store_gauges)
        ProcessCollector(registry=r)
        self.heartbeat_latency = Histogram(
            "myxd_heartbeat_latency_seconds",
            "Round-trip time of a successful heartbeat + get_status batch.",
            buckets=HEARTBEAT_BUCKETS,
            registry=r,
        )
        self.rpc_errors = Counter(
            "myxd_rpc_errors",
            "Agent RPC calls that failed, by error kind (after retries).",
            ["kind"],
            registry=r,
        )
        for kind in RPC_ERROR_KINDS:
            self.rpc_errors.labels(kind)
        self.rpc_retries = Counter(
            "myxd_rpc_retries", "Agent RPC attempts that were retried.", registry=r
        )
        self.poll_lag_seconds = Histogram(
            "myxd_log_poll_lag_seconds",
            "How late a command log poll ran after it was due.",
            buckets=POLL_LAG_BUCKETS,
            registry=r,
        )
        self.heartbeat_cycles = Counter(
            "myxd_heartbeat_cycles", "Completed heartbeat cycles.", registry=r
        )
        self.heartbeat_cycle_seconds = Histogram(
            "myxd_heartbeat_cycle_seconds",
            "Wall time of one heartbeat cycle.",
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.heartbeat_failures = Counter(
            "myxd_heartbeat_failures", "Agent heartbeats that failed.", registry=r
        )
        self.reinstalls = Counter(
            "myxd_reinstall_requests", "Agents handed to the reinstall hook.", registry=r
        )
        self.commands_created = Counter(
            "myxd_commands_created",
            "Commands and ansible runs created, by kind.",
            ["kind"],
            registry=r,
        )
        for kind in COMMAND_KINDS:
            self.commands_created.labels(kind)
        self.api_requests = Counter(
            "myxd_api_requests", "Admin API responses, by HTTP status code.", ["code"], registry=r
        )

    # -- hooks for the fleet code (cheap, never raise on odd input) --------------

    def observe_heartbeat(self, latency_seconds: float) -> None:
        self.heartbeat_latency.observe(max(0.0, float(latency_seconds)))

    def rpc_error(self, kind: str) -> None:
        # Unknown kinds are folded into a fixed label so a bug cannot grow the series.
        self.rpc_errors.labels(kind if kind in RPC_ERROR_KINDS else "other").inc()

    def rpc_retry(self) -> None:
        self.rpc_retries.inc()

    def poll_lag(self, seconds: float) -> None:
        self.poll_lag_seconds.observe(max(0.0, float(seconds)))

    def heartbeat_cycle(self, duration_seconds: float, agents: int = 0, failed: int = 0) -> None:
        self.heartbeat_cycles.inc()
        self.heartbeat_cycle_seconds.observe(max(0.0, float(duration_seconds)))
        if failed:
            self.heartbeat_failures.inc(float(failed))

    def reinstall_requested(self) -> None:
        self.reinstalls.inc()

    def command_created(self, kind: str) -> None:
        self.commands_created.labels(kind if kind in COMMAND_KINDS else "other").inc()

    def api_response(self, code: int) -> None:
        # Status codes are a small fixed set (the API only answers with a few).
        self.api_requests.labels(str(int(code))).inc()

    # -- exposition ----------------------------------------------------------------

    def render(
        self,
        agent_counts: Mapping[str, int] | None = None,
        command_counts: Mapping[str, int] | None = None,
    ) -> bytes:
        """The whole exposition; the store-backed gauge values are passed in by the scraper."""
        # Single-threaded (the reactor): nothing can scrape between these lines.
        self._store_gauges.agents = agent_counts or {}
        self._store_gauges.commands = command_counts or {}
        return generate_latest(self.registry)
