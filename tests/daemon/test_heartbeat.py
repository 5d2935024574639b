"""HeartbeatService on a Clock with an in-memory store and a scripted RPC client."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from myxd.fleet.heartbeat import CycleStats, HeartbeatService
from myxd.rpc import AgentEndpoint, AgentRPC, AgentRPCError, RemoteError
from myxd.store.records import AgentRecord
from tests.daemon.fleet_fakes import (
    FakeHTTPAgent,
    FakeRequest,
    FakeResponse,
    FakeStore,
    agent_record,
    rpc_result,
    settings,
)

STATUS = {"version": "0.1.0", "hostname": "node", "running_commands": 0}


class BatchRPC:
    """Stand-in for AgentRPC.batch: per-port behaviour, records visit order."""

    def __init__(self) -> None:
        self.visits: list[int] = []
        self.behaviour: dict[int, Any] = {}
        self.pending: list[Deferred[list[Any]]] = []
        self.hold = False
        self.in_flight = 0
        self.max_in_flight = 0

    async def batch(
        self,
        ep: AgentEndpoint,
        calls: Any,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> list[Any]:
        assert [m for m, _ in calls] == ["heartbeat", "get_status"]
        self.visits.append(ep.port)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                d: Deferred[list[Any]] = Deferred()
                self.pending.append(d)
                return await d
            out = self.behaviour.get(ep.port)
            if isinstance(out, BaseException):
                raise out
            if out is not None:
                return list(out)
            return [{"time": 1.0, "version": "0.1.0", "uptime": 5.0}, dict(STATUS)]
        finally:
            self.in_flight -= 1


class Metrics:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.cycles: list[tuple[float, int, int]] = []
        self.reinstalls = 0

    def observe_heartbeat(self, latency: float) -> None:
        self.latencies.append(latency)

    def heartbeat_cycle(self, duration: float, agents: int, failed: int) -> None:
        self.cycles.append((duration, agents, failed))

    def reinstall_requested(self) -> None:
        self.reinstalls += 1


class HeartbeatTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeStore(self.clock)
        self.rpc = BatchRPC()
        self.metrics = Metrics()
        self.hooked: list[tuple[int, str]] = []

    def service(self, *, hook: Any = "record", seed: int = 1, **overrides: Any) -> HeartbeatService:
        def record(agent: AgentRecord, reason: str) -> None:
            self.hooked.append((agent.id, reason))

        svc = HeartbeatService(
            self.store,
            self.rpc,  # type: ignore[arg-type]
            settings(**overrides),
            self.clock,
            reinstall_hook=record if hook == "record" else hook,
            rng=random.Random(seed),
            metrics=self.metrics,
        )
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    def add_agents(self, n: int, **kw: Any) -> list[AgentRecord]:
        return [self.store.add(agent_record(i, **kw)) for i in range(1, n + 1)]

    def cycle(self, svc: HeartbeatService) -> CycleStats:
        return self.successResultOf(Deferred.fromCoroutine(svc.run_cycle()))


class ScheduleTests(HeartbeatTestCase):
    def test_first_cycle_starts_from_start_service(self) -> None:
        self.add_agents(3)
        svc = self.service()
        svc.startService()
        self.assertEqual(self.rpc.visits, [])
        self.clock.advance(0)
        self.assertEqual(sorted(self.rpc.visits), [9001, 9002, 9003])
        self.assertEqual(svc.cycles, 1)

    def test_next_cycle_after_random_delay_in_range(self) -> None:
        self.add_agents(1)
        svc = self.service(seed=7, heartbeat_min_interval=20, heartbeat_max_interval=60)
        svc.startService()
        self.clock.advance(0)
        for cycle in range(2, 12):
            [call] = self.clock.getDelayedCalls()
            delay = call.getTime() - self.clock.seconds()
            self.assertTrue(20 <= delay <= 60, delay)
            self.clock.advance(delay - 0.5)
            self.assertEqual(svc.cycles, cycle - 1)
            self.clock.advance(0.5)
            self.assertEqual(svc.cycles, cycle)

    def test_delays_are_uniform_draws_within_bounds(self) -> None:
        svc = self.service(seed=3, heartbeat_min_interval=5, heartbeat_max_interval=9)
        draws = [svc.next_delay() for _ in range(2000)]
        self.assertTrue(all(5 <= d <= 9 for d in draws))
        # Spread over the range, not a constant.
        self.assertLess(min(draws), 5.5)
        self.assertGreater(max(draws), 8.5)
        reference = random.Random(3)
        self.assertEqual(draws[:5], [reference.uniform(5, 9) for _ in range(5)])

    def test_random_order_from_injected_rng(self) -> None:
        agents = self.add_agents(30)
        svc = self.service(seed=42, heartbeat_concurrency=1)
        self.cycle(svc)
        expected = list(agents)
        random.Random(42).shuffle(expected)
        self.assertEqual(self.rpc.visits, [a.rpc_port for a in expected])
        self.assertNotEqual(self.rpc.visits, sorted(self.rpc.visits))
        # A second cycle draws a different order.
        first = list(self.rpc.visits)
        self.rpc.visits.clear()
        self.cycle(svc)
        self.assertNotEqual(self.rpc.visits, first)
        self.assertEqual(sorted(self.rpc.visits), sorted(first))

    def test_stop_cancels_the_pending_cycle(self) -> None:
        self.add_agents(1)
        svc = self.service()
        svc.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(svc.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual(svc.cycles, 1)

    def test_stop_waits_for_the_running_cycle(self) -> None:
        self.add_agents(4)
        self.rpc.hold = True
        svc = self.service(heartbeat_concurrency=2)
        svc.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.rpc.pending), 2)
        self.rpc.pending[0].callback([{"version": "0.1.0"}, dict(STATUS)])
        d = svc.stopService()
        # In-flight visits are abandoned (not recorded as failures), finished
        # ones are written, and no further cycle is scheduled.
        self.successResultOf(d)
        written = [r for batch in self.store.heartbeat_writes for r in batch]
        self.assertEqual(len(written), 1)
        self.assertTrue(written[0].ok)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_waits_for_a_store_write_in_progress(self) -> None:
        self.add_agents(2)
        writing: Deferred[None] = Deferred()
        self.store.record_heartbeat_results = lambda results: writing  # type: ignore[method-assign]
        svc = self.service()
        svc.startService()
        self.clock.advance(0)
        d = svc.stopService()
        self.assertNoResult(d)
        writing.callback(None)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConcurrencyTests(HeartbeatTestCase):
    def test_never_more_than_n_in_flight(self) -> None:
        self.add_agents(50)
        self.rpc.hold = True
        svc = self.service(heartbeat_concurrency=5)
        d = Deferred.fromCoroutine(svc.run_cycle())
        done = 0
        while self.rpc.pending:
            self.assertLessEqual(self.rpc.in_flight, 5)
            self.assertEqual(len(self.rpc.pending), min(5, 50 - done))
            self.rpc.pending.pop(0).callback([{"version": "1"}, dict(STATUS)])
            done += 1
        stats = self.successResultOf(d)
        self.assertEqual(done, 50)
        self.assertEqual(self.rpc.max_in_flight, 5)
        self.assertEqual(svc.max_in_flight, 5)
        self.assertEqual((stats.agents, stats.ok, stats.failed), (50, 50, 0))

    def test_results_written_in_batches(self) -> None:
        self.add_agents(1200)
        svc = self.service(heartbeat_concurrency=64)
        stats = self.cycle(svc)
        self.assertEqual([len(b) for b in self.store.heartbeat_writes], [500, 500, 200])
        self.assertEqual(stats.ok, 1200)


class ResultTests(HeartbeatTestCase):
    def test_success_records_version_details_latency(self) -> None:
        self.add_agents(1)
        svc = self.service()
        stats = self.cycle(svc)
        [[result]] = self.store.heartbeat_writes
        self.assertTrue(result.ok)
        self.assertEqual(result.version, "0.1.0")
        self.assertEqual(result.details, STATUS)
        self.assertEqual(result.latency, 0.0)
        self.assertEqual(self.metrics.latencies, [0.0])
        self.assertEqual(self.metrics.cycles, [(0.0, 1, 0)])
        self.assertEqual(self.store.agents[1].status, "online")
        self.assertEqual(stats, svc.last_cycle)

    def test_failure_marks_offline_with_reason(self) -> None:
        self.add_agents(2)
        self.rpc.behaviour[9002] = AgentRPCError("retryable", "connection refused", 3)
        svc = self.service()
        stats = self.cycle(svc)
        self.assertEqual((stats.ok, stats.failed), (1, 1))
        self.assertEqual(self.store.agents[2].status, "offline")
        self.assertEqual(self.store.agents[2].status_reason, "connection refused")
        self.assertEqual(self.store.agents[1].status, "online")
        bad = [r for r in self.store.heartbeat_writes[0] if not r.ok]
        self.assertEqual(bad[0].error_kind, "retryable")

    def test_comes_back_online_on_next_success(self) -> None:
        self.add_agents(1)
        self.rpc.behaviour[9001] = AgentRPCError("retryable", "connection refused", 3)
        svc = self.service()
        self.cycle(svc)
        self.assertEqual(self.store.agents[1].status, "offline")
        del self.rpc.behaviour[9001]
        self.cycle(svc)
        self.assertEqual(self.store.agents[1].status, "online")
        self.assertEqual(self.store.agents[1].failed_cycles, 0)

    def test_jsonrpc_error_in_batch_is_a_final_failure(self) -> None:
        self.add_agents(1)
        self.rpc.behaviour[9001] = [{"version": "1"}, RemoteError(-32601, "method not found")]
        svc = self.service()
        self.cycle(svc)
        [[result]] = self.store.heartbeat_writes
        self.assertFalse(result.ok)
        self.assertEqual(result.error_kind, "final")
        self.assertIn("get_status", result.reason or "")

    def test_installing_agents_are_left_to_the_installer(self) -> None:
        self.store.add(agent_record(1, status="installing"))
        self.store.add(agent_record(2))
        svc = self.service()
        self.cycle(svc)
        self.assertEqual(self.rpc.visits, [9002])

    def test_unpinned_agents_are_installing_not_dead(self) -> None:
        # A failed first install leaves an agent with no certificate pin and a
        # status other than "installing": it is never visited, never marked dead,
        # never handed to the reinstall hook.
        self.store.add(agent_record(1, status="error", fingerprint=""))
        self.store.add(agent_record(2))
        svc = self.service(reinstall_after_cycles=1)
        for _ in range(3):
            self.cycle(svc)
        self.assertEqual(self.rpc.visits, [9002] * 3)
        self.assertEqual(self.hooked, [])
        self.assertEqual(svc.last_cycle.agents if svc.last_cycle else None, 1)


class RealClientTests(HeartbeatTestCase):
    """The service with the real AgentRPC over a fake HTTP agent: retry decisions."""

    def rpc_over(self, handler: Any) -> FakeHTTPAgent:
        http = FakeHTTPAgent(handler)
        self.rpc = AgentRPC(self.clock, settings(), http_agent=http)  # type: ignore[assignment]
        return http

    def test_401_goes_offline_at_once_without_retry(self) -> None:
        self.add_agents(1)
        http = self.rpc_over(lambda req: FakeResponse(401, b"{}"))
        svc = self.service()
        d = Deferred.fromCoroutine(svc.run_cycle())
        stats = self.successResultOf(d)  # no clock advance needed: nothing waits
        self.assertEqual(len(http.requests), 1)
        self.assertEqual(stats.failed, 1)
        [[result]] = self.store.heartbeat_writes
        self.assertEqual((result.ok, result.error_kind), (False, "auth"))
        self.assertEqual(self.store.agents[1].status, "offline")

    def test_400_goes_offline_at_once_without_retry(self) -> None:
        self.add_agents(1)
        http = self.rpc_over(lambda req: FakeResponse(400, b"{}"))
        svc = self.service()
        self.successResultOf(Deferred.fromCoroutine(svc.run_cycle()))
        self.assertEqual(len(http.requests), 1)
        self.assertEqual(self.store.heartbeat_writes[0][0].error_kind, "final")

    def test_unreachable_is_retried_before_offline(self) -> None:
        self.add_agents(1)
        http = self.rpc_over(lambda req: neterror.ConnectionRefusedError())
        svc = self.service()
        d = Deferred.fromCoroutine(svc.run_cycle())
        self.assertNoResult(d)
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertNoResult(d)
        self.clock.advance(4)
        self.successResultOf(d)
        self.assertEqual(len(http.requests), 4)
        [[result]] = self.store.heartbeat_writes
        self.assertEqual((result.ok, result.error_kind), (False, "retryable"))

    def test_one_batch_request_per_agent(self) -> None:
        self.add_agents(3)

        def handler(req: FakeRequest) -> FakeResponse:
            return rpc_result(req, {"version": "0.1.0"})

        http = self.rpc_over(handler)
        svc = self.service()
        self.successResultOf(Deferred.fromCoroutine(svc.run_cycle()))
        self.assertEqual(len(http.requests), 3)
        for req in http.requests:
            self.assertEqual([r["method"] for r in req.json], ["heartbeat", "get_status"])


class SurvivalTests(HeartbeatTestCase):
    def test_loop_survives_an_exception_in_a_cycle(self) -> None:
        self.add_agents(1)
        self.store.fail_next["list_agents"] = [RuntimeError("boom")]
        svc = self.service(heartbeat_min_interval=10, heartbeat_max_interval=10)
        svc.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.rpc.visits, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual(self.rpc.visits, [9001])

    def test_loop_survives_a_store_write_failure(self) -> None:
        self.add_agents(3)
        self.store.fail_next["record_heartbeat_results"] = [RuntimeError("disk full")]
        svc = self.service(heartbeat_min_interval=10, heartbeat_max_interval=10)
        svc.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        assert svc.last_cycle is not None
        self.assertEqual(svc.last_cycle.store_errors, 1)
        self.clock.advance(10)
        self.assertEqual(svc.cycles, 2)
        self.assertEqual(len(self.store.heartbeat_writes), 1)

    def test_loop_survives_a_bug_in_one_visit(self) -> None:
        self.add_agents(2)
        self.rpc.behaviour[9001] = ZeroDivisionError("bug")
        svc = self.service()
        stats = self.cycle(svc)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(stats.ok, 1)

    def test_loop_survives_a_failing_reinstall_hook(self) -> None:
        self.add_agents(1, failed_cycles=5)
        self.rpc.behaviour[9001] = AgentRPCError("retryable", "down", 3)

        def hook(agent: AgentRecord, reason: str) -> Deferred[None]:
            return fail(RuntimeError("installer broke"))

        svc = self.service(hook=hook, heartbeat_min_interval=10, heartbeat_max_interval=10)
        svc.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(10)
        self.assertEqual(svc.cycles, 2)


class ReinstallTests(HeartbeatTestCase):
    def test_hook_after_n_dead_cycles_then_every_n(self) -> None:
        self.add_agents(2)
        self.rpc.behaviour[9002] = AgentRPCError("retryable", "connection refused", 3)
        svc = self.service(reinstall_after_cycles=3)
        calls_per_cycle = []
        for _ in range(7):
            before = len(self.hooked)
            self.cycle(svc)
            calls_per_cycle.append(len(self.hooked) - before)
        self.assertEqual(calls_per_cycle, [0, 0, 1, 0, 0, 1, 0])
        self.assertEqual(self.hooked, [(2, "connection refused")] * 2)
        self.assertEqual(svc.reinstall_requests, 2)
        self.assertEqual(self.metrics.reinstalls, 2)
        events = [e for e in self.store.events if e["action"] == "agent.reinstall_requested"]
        self.assertEqual(
            [(e["target"], e["outcome"]) for e in events], [("agent:2", "requested")] * 2
        )

    def test_recovery_resets_the_count(self) -> None:
        self.add_agents(1)
        svc = self.service(reinstall_after_cycles=2)
        self.rpc.behaviour[9001] = AgentRPCError("retryable", "down", 3)
        self.cycle(svc)
        del self.rpc.behaviour[9001]
        self.cycle(svc)
        self.rpc.behaviour[9001] = AgentRPCError("retryable", "down", 3)
        self.cycle(svc)
        self.assertEqual(self.hooked, [])
        self.cycle(svc)
        self.assertEqual(self.hooked, [(1, "down")])

    def test_without_hook_records_event_and_counter(self) -> None:
        self.add_agents(1, failed_cycles=2)
        self.rpc.behaviour[9001] = AgentRPCError("auth", "unauthorized", 1)
        svc = self.service(hook=None, reinstall_after_cycles=3)
        stats = self.cycle(svc)
        self.assertEqual(stats.reinstall_requested, 1)
        self.assertEqual(svc.reinstall_requests, 1)
        [event] = self.store.events
        self.assertEqual(
            (event["action"], event["outcome"], event["details"]["failed_cycles"]),
            ("agent.reinstall_requested", "no_hook", 3),
        )

    def test_async_hook_is_not_awaited_by_the_cycle(self) -> None:
        self.add_agents(1, failed_cycles=9)
        self.rpc.behaviour[9001] = AgentRPCError("retryable", "down", 3)
        never: Deferred[None] = Deferred()
        svc = self.service(hook=lambda agent, reason: never)
        self.cycle(svc)  # would not complete if the hook were awaited
        self.assertEqual(svc.reinstall_requests, 1)
        never.callback(None)


class RecordingHookTests(HeartbeatTestCase):
    def test_coroutine_hook_runs(self) -> None:
        self.add_agents(1, failed_cycles=2)
        self.rpc.behaviour[9001] = AgentRPCError("retryable", "down", 3)
        seen: list[int] = []

        async def hook(agent: AgentRecord, reason: str) -> None:
            await succeed(None)
            seen.append(agent.id)

        svc = self.service(hook=hook)
        self.cycle(svc)
        self.assertEqual(seen, [1])
