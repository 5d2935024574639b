# -*- test-case-name: tests.daemon.test_heartbeat,tests.daemon.test_fleet_integration -*-
"""`HeartbeatService`: the daemon's periodic, randomized check of every agent.

Each cycle lists the agents, shuffles them, and visits them with a bounded number
in flight (a fixed set of workers pulling from one iterator, so 10,000 agents
never mean 10,000 Deferreds or 10,000 sequential round trips). A visit is ONE
JSON-RPC batch, `heartbeat` + `get_status`, retried per `myxd.rpc.retry`; 401
and 400 are not retried. Results are written in bulk, one transaction per batch
of results. Agents whose RPC has been dead for `reinstall_after_cycles` cycles
are handed to the reinstall hook. The next cycle starts after a random delay in
[heartbeat_min_interval, heartbeat_max_interval] on the injected clock.

Nothing that goes wrong in a cycle (an RPC, the store, the hook, a bug) may stop
the loop: every cycle is wrapped and its failure logged. This module never
blocks the reactor and never logs an agent token.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from myx_agent.poll import Poller
from myxd._reactor import default_reactor
from myxd.metrics import NO_METRICS, HeartbeatMetrics
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import FINAL, AgentRPCError, RemoteError
from myxd.store.records import AgentRecord, HeartbeatResult

if TYPE_CHECKING:
    from myxd.config import Settings
    from myxd.rpc.client import AgentRPC
    from myxd.store.protocols import HeartbeatStore

__all__ = ["CycleStats", "HeartbeatService"]

WRITE_BATCH = 500  # heartbeat results per store transaction
HEARTBEAT_CALLS: list[tuple[str, None]] = [("heartbeat", None), ("get_status", None)]


@dataclass(frozen=True)
class CycleStats:
    """What one heartbeat cycle did (for metrics and the API)."""

    number: int
    started_at: float
    duration: float
    agents: int
    ok: int
    failed: int
    reinstall_requested: int
    store_errors: int


class HeartbeatService(Service):
    """Visits every agent once per cycle; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        store: HeartbeatStore,
        rpc: AgentRPC,
        settings: Settings,
        reactor: IReactorTime | None = None,
        *,
        reinstall_hook: Callable[[AgentRecord, str], Any] | None = None,
        rng: random.Random | None = None,
        metrics: HeartbeatMetrics | None = None,
        write_batch: int = WRITE_BATCH,
    ) -> None:
        self._reactor: IReactorTime = default_reactor(reactor)
        self._store = store
        self._rpc = rpc
        self._settings = settings
        self.reinstall_hook = reinstall_hook
        self._rng = rng if rng is not None else random.Random()
        self._metrics: HeartbeatMetrics = NO_METRICS if metrics is None else metrics
        self._write_batch = max(1, int(write_batch))
        # The loop: a cycle, then the next after next_delay(), whatever happened.
        self._poller = Poller(
            self._guarded_cycle, self._reactor, lambda: self.next_delay(), name="heartbeat cycle"
        )
        self._workers: set[Deferred[None]] = set()
        self._stopping = False
        # agent id -> cycle number of its last reinstall request (bounded by #agents).
        self._reinstall_cycle: dict[int, int] = {}
        self.cycles = 0
        self.last_cycle: CycleStats | None = None
        self.reinstall_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        # The first cycle runs as soon as the reactor turns, not inside startService.
        self._poller.start(first_delay=0)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        # Visits in flight are abandoned (not recorded as failures); results
        # already collected are still written by the cycle before it returns.
        for worker in list(self._workers):
            worker.cancel()
        return self._poller.stop()

    def next_delay(self) -> float:
        """Seconds until the next cycle: uniform in [min, max] interval."""
        low = float(self._settings.heartbeat_min_interval)
        high = float(self._settings.heartbeat_max_interval)
        if high < low:
            low, high = high, low
        return self._rng.uniform(low, high)

    async def _guarded_cycle(self) -> None:
        try:
            await self.run_cycle()
        except CancelledError:
            pass
        # Any other failure is logged by the poller, which still schedules the next cycle.

    # -- one cycle ---------------------------------------------------------------

    async def run_cycle(self) -> CycleStats:
        """Visit every agent once; write results; hand dead agents to the hook."""
        clock = self._reactor
        started = clock.seconds()
        self.cycles += 1
        number = self.cycles
        # An agent without a certificate pin has never finished an install: it is
        # installing (or its install failed), not dead, so it is neither visited
        # nor counted towards a reinstall.
        agents = [
            a
            for a in await self._store.list_agents()
            if a.status != "installing" and a.cert_fingerprint
        ]
        self._rng.shuffle(agents)
        pending: list[HeartbeatResult] = []
        failed: list[tuple[AgentRecord, HeartbeatResult]] = []
        counts = {"ok": 0, "failed": 0, "store_errors": 0}
        queue = iter(agents)

        async def flush() -> None:
            if not pending:
                return
            batch = pending[:]
            del pending[:]
            try:
                await self._store.record_heartbeat_results(batch)
            except Exception:
                counts["store_errors"] += 1
                self.log.failure("could not store {count} heartbeat results", count=len(batch))

        async def worker() -> None:
            for agent in queue:
                if self._stopping:
                    return
                result = await self._visit_counted(agent)
                if result is None:
                    continue
                pending.append(result)
                if result.ok:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    failed.append((agent, result))
                if len(pending) >= self._write_batch:
                    await flush()

        limit = max(1, int(self._settings.heartbeat_concurrency))
        workers = [Deferred.fromCoroutine(worker()) for _ in range(min(limit, len(agents)))]
        for w in workers:
            self._workers.add(w)
            w.addBoth(self._forget_worker, w)
        await DeferredList(workers, consumeErrors=True)
        await flush()

        requested = 0
        if not self._stopping:
            requested = await self._check_reinstall(number, failed, agents)
        stats = CycleStats(
            number=number,
            started_at=started,
            duration=clock.seconds() - started,
            agents=len(agents),
            ok=counts["ok"],
            failed=counts["failed"],
            reinstall_requested=requested,
            store_errors=counts["store_errors"],
        )
        self.last_cycle = stats
        self._hook(self._metrics.heartbeat_cycle, stats.duration, stats.agents, stats.failed)
        self.log.info(
            "heartbeat cycle {number}: {agents} agents, {ok} ok, {failed} failed in "
            "{duration:.3f}s",
            number=number,
            agents=stats.agents,
            ok=stats.ok,
            failed=stats.failed,
            duration=stats.duration,
        )
        return stats

    def _forget_worker(self, result: object, worker: Deferred[None]) -> object:
        self._workers.discard(worker)
        if isinstance(result, Failure) and not result.check(CancelledError):
            self.log.failure("heartbeat worker failed", result)
            return None
        return None if isinstance(result, Failure) else result

    async def _visit_counted(self, agent: AgentRecord) -> HeartbeatResult | None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.visit(agent)
        except CancelledError:
            return None
        except Exception:
            self.log.failure("heartbeat of agent {agent_id} failed unexpectedly", agent_id=agent.id)
            return None
        finally:
            self.in_flight -= 1

    async def visit(self, agent: AgentRecord) -> HeartbeatResult:
        """Heartbeat one agent: ONE batch of heartbeat + get_status (with retries)."""
        clock = self._reactor
        t0 = clock.seconds()
        try:
            ep = AgentEndpoint.from_record(agent)
        except ValueError as e:
            return HeartbeatResult(
                agent_id=agent.id,
                at=self._store.now(),
                ok=False,
                reason=f"bad agent record: {e}",
                error_kind=FINAL,
            )
        try:
            hb, status = await self._rpc.batch(ep, HEARTBEAT_CALLS, retry=True)
        except AgentRPCError as e:
            self.log.info(
                "agent {agent_id} heartbeat failed ({kind}) after {attempts} attempt(s): {reason}",
                agent_id=agent.id,
                kind=e.kind,
                attempts=e.attempts,
                reason=e.reason,
            )
            return HeartbeatResult(
                agent_id=agent.id,
                at=self._store.now(),
                ok=False,
                reason=e.reason,
                error_kind=e.kind,
            )
        answered = clock.seconds()
        now = self._store.now()
        for name, value in (("heartbeat", hb), ("get_status", status)):
            if isinstance(value, RemoteError):
                return HeartbeatResult(
                    agent_id=agent.id,
                    at=now,
                    ok=False,
                    reason=f"{name}: {value.reason}",
                    error_kind=FINAL,
                )
            if not isinstance(value, dict):
                return HeartbeatResult(
                    agent_id=agent.id,
                    at=now,
                    ok=False,
                    reason=f"{name}: malformed result",
                    error_kind=FINAL,
                )
        version = hb.get("version")
        if not isinstance(version, str):
            version = status.get("version") if isinstance(status.get("version"), str) else None
        latency = answered - t0
        self._hook(self._metrics.observe_heartbeat, latency)
        return HeartbeatResult(
            agent_id=agent.id, at=now, ok=True, version=version, details=status, latency=latency
        )

    async def _check_reinstall(
        self,
        number: int,
        failed: list[tuple[AgentRecord, HeartbeatResult]],
        agents: list[AgentRecord],
    ) -> int:
        threshold = int(self._settings.reinstall_after_cycles)
        failed_ids = {agent.id for agent, _ in failed}
        for agent in agents:
            if agent.id not in failed_ids:
                self._reinstall_cycle.pop(agent.id, None)
        if threshold <= 0:
            return 0
        requested = 0
        for agent, result in failed:
            # The store just added this cycle's failure to the count read at start.
            dead_cycles = agent.failed_cycles + 1
            if dead_cycles < threshold:
                continue
            last = self._reinstall_cycle.get(agent.id)
            # Once handed over, wait another `threshold` dead cycles before asking again.
            if last is not None and number - last < threshold:
                continue
            self._reinstall_cycle[agent.id] = number
            requested += 1
            await self._request_reinstall(agent, result.reason or "unreachable", dead_cycles)
        return requested

    async def _request_reinstall(self, agent: AgentRecord, reason: str, dead_cycles: int) -> None:
        self.reinstall_requests += 1
        self._hook(self._metrics.reinstall_requested)
        hook = self.reinstall_hook
        self.log.warn(
            "agent {agent_id} RPC dead for {cycles} cycles ({reason}); {what}",
            agent_id=agent.id,
            cycles=dead_cycles,
            reason=reason,
            what="handing it to the reinstall hook" if hook else "no reinstall hook is configured",
        )
        try:
            await self._store.add_event(
                actor="heartbeat",
                action="agent.reinstall_requested",
                target=f"agent:{agent.id}",
                outcome="requested" if hook is not None else "no_hook",
                details={"failed_cycles": dead_cycles, "reason": reason},
            )
        except Exception:
            self.log.failure(
                "could not record the reinstall event of agent {agent_id}", agent_id=agent.id
            )
        if hook is None:
            return
        try:
            outcome = hook(agent, reason)
            if inspect.iscoroutine(outcome):
                outcome = Deferred.fromCoroutine(outcome)
            if isinstance(outcome, Deferred):
                # Not awaited: a reinstall takes minutes and must not hold the cycle.
                outcome.addErrback(self._hook_failed, agent.id)
        except Exception:
            self.log.failure("reinstall hook failed for agent {agent_id}", agent_id=agent.id)

    def _hook_failed(self, failure: Failure, agent_id: int) -> None:
        self.log.failure("reinstall hook failed for agent {agent_id}", failure, agent_id=agent_id)

    def _hook(self, hook: Callable[..., None], *args: float) -> None:
        # A metrics hook must never break the work it measures.
        try:
            hook(*args)
        except Exception:
            self.log.failure("metrics hook {name} failed", name=hook.__name__)
