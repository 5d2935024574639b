"""Network faults between a real myxd and real agents (issue #12 §1).

Each test runs the daemon's real service tree (tap.makeService: store,
heartbeats, command queue, admin API) and real agent processes, with the
agent adopted at a FaultProxy's address. Outputs are compared byte for byte
with what the command wrote; "ran once" is counted by the command itself in a
marker file. Waits are on conditions; the one bound on time (how fast a
blackholed agent goes offline) is the documented worst case computed from
the settings, see docs/reliability.md.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.task import deferLater
from twisted.logger import Logger

from tests.reliability.harness import FaultTestCase, expected_output, marker_runs
from tests.support.agent_process import start_agent
from tests.support.faultproxy import DOWN, UP, FaultProxy

log = Logger()


def faults(proxy: FaultProxy) -> int:
    return sum(proxy.counts[k] for k in ("reset_up", "reset_down", "half_close_down"))


def report(test: str, proxy: FaultProxy, **extra: Any) -> None:
    """One log line of figures per scenario, for docs/reliability.md."""
    counts = {k: v for k, v in sorted(proxy.counts.items()) if not k.startswith("bytes_")}
    log.info("fault figures: {test} {counts} {extra}", test=test, counts=counts, extra=extra)


def offline_bound(settings: dict[str, Any]) -> float:
    """Worst case from a blackhole to 'offline' (docs/operations.md, "Offline
    detection"): the next cycle starts within heartbeat_max_interval, then
    1 + rpc_retry_max_attempts attempts of rpc_timeout each, with backoff waits
    of base, 2*base, ... between them."""
    retries = int(settings["rpc_retry_max_attempts"])
    base = float(settings["rpc_retry_base_delay"])
    return (
        float(settings["heartbeat_max_interval"])
        + (retries + 1) * float(settings["rpc_timeout"])
        + sum(base * 2**i for i in range(retries))
    )


class NetworkFaultTests(FaultTestCase):
    async def wait_online(self, agent_id: int) -> None:
        await self.until(
            lambda: self.agent_status(agent_id),
            lambda a: a["status"] == "online",
            f"agent {agent_id} online",
        )

    async def test_resets_during_output(self) -> None:
        await self.start_daemon()
        agent, proxy, aid = await self.proxied_agent()
        count = 8000  # 8000 * 265 bytes = 2.1 MB, written over ~2.5 s
        cid, marker = await self.run_script(aid, count, 0.02)
        rng = random.Random(12)
        wanted, seen, clean_since = 24, 0, 0
        # Arm one reset at a time, at a random byte count in a random direction,
        # and the next one only after the link carried 64 KiB again: repeated
        # resets, yet each call's retries can get through.
        while True:
            injected = faults(proxy)
            status = (await self.command(cid))["status"]
            if status in ("success", "failed", "cancelled", "timed_out"):
                break
            carried = proxy.counts["bytes_down"] + proxy.counts["bytes_up"]
            if injected != seen:
                seen, clean_since = injected, carried
            if (
                injected < wanted
                and proxy.limit_for(UP) is None
                and proxy.limit_for(DOWN) is None
                and carried - clean_since >= 65536
            ):
                pick = rng.random()
                if pick < 0.6:
                    proxy.reset_after(DOWN, rng.randrange(1500, 300000), times=1)
                elif pick < 0.8:
                    proxy.half_close(DOWN, rng.randrange(1500, 300000), times=1)
                else:
                    proxy.reset_after(UP, rng.randrange(300, 4000), times=1)
            await deferLater(self.reactor, 0.02, lambda: None)
        final = await self.wait_final(cid)
        self.assertEqual(final["status"], "success", final["reason"])
        self.assertGreaterEqual(faults(proxy), 5, dict(proxy.counts))
        stored = await self.read_all(cid)
        self.assertEqual(len(stored), count * 265)
        self.assertEqual(stored, expected_output(count))
        self.assertEqual(marker_runs(marker), 1)
        report("resets", proxy, bytes_compared=len(stored), commands=1)

    async def test_blackhole_goes_offline_in_time_and_comes_back(self) -> None:
        settings = dict(rpc_timeout=1.0, rpc_retry_max_attempts=2, rpc_retry_base_delay=0.1)
        daemon = await self.start_daemon(**settings)
        agent, proxy, aid = await self.proxied_agent()
        other = await start_agent(self)
        other_id = await self.adopt(other)
        await self.wait_online(aid)
        heartbeat = daemon.service("heartbeat")
        proxy.blackhole = True
        started = self.reactor.seconds()
        cycles_before = heartbeat.cycles
        before = await self.agent_status(other_id)
        rec = await self.until(
            lambda: self.agent_status(aid),
            lambda a: a["status"] == "offline",
            "the blackholed agent offline",
            interval=0.02,
        )
        elapsed = self.reactor.seconds() - started
        bound = offline_bound(daemon.settings)
        # The documented worst case, plus the store write and this poll's period.
        self.assertLessEqual(elapsed, bound + 1.0, (elapsed, bound))
        self.assertEqual(rec["last_error_kind"], "retryable")
        self.assertIn("no response within 1s", rec["status_reason"] or "")
        # After the configured retries: 1 + 2 attempts, each its own connection
        # into the hole (the pooled one and two fresh ones).
        self.assertGreaterEqual(proxy.counts["blackholed_connections"], 1)
        # Neither the cycle nor the other agent hung: cycles kept finishing and
        # the other agent kept being heard while the first was in the hole.
        await self.until(
            lambda: self.agent_status(other_id),
            lambda a: a["last_heartbeat"] > before["last_heartbeat"] and a["status"] == "online",
            "the other agent's next heartbeat",
        )
        await self.until(
            lambda: deferLater(self.reactor, 0, lambda: heartbeat.cycles),
            lambda n: n >= cycles_before + 2,
            "heartbeat cycles to keep finishing",
        )
        proxy.heal()
        await self.wait_online(aid)
        self.assertEqual((await self.agent_status(other_id))["status"], "online")
        self.assertEqual(self.status_log.changes(other_id), 0)
        report("blackhole", proxy, offline_after=round(elapsed, 2), bound=bound)

    async def test_slow_but_alive_never_goes_offline(self) -> None:
        daemon = await self.start_daemon(rpc_timeout=4.0)
        agent, proxy, aid = await self.proxied_agent()
        # One round trip is 2 * (0.15..0.35) s; a fresh TLS connection needs two
        # before the answer: at most 1.4 s, well below rpc_timeout.
        proxy.latency, proxy.jitter = 0.15, 0.2
        heartbeat = daemon.service("heartbeat")
        start = heartbeat.cycles
        cid, marker = await self.run_script(aid, 640, 0.01)
        await self.until(
            lambda: deferLater(self.reactor, 0, lambda: heartbeat.cycles),
            lambda n: n >= start + 10,
            "ten heartbeat cycles through the slow link",
        )
        final = await self.wait_final(cid)
        self.assertEqual(final["status"], "success", final["reason"])
        self.assertEqual(await self.read_all(cid), expected_output(640))
        self.assertEqual(marker_runs(marker), 1)
        self.assertNotIn("offline", self.status_log.statuses.get(aid, []))
        rec = await self.agent_status(aid)
        self.assertEqual((rec["status"], rec["total_failures"]), ("online", 0))
        self.assertGreater(proxy.counts["delayed_chunks"], 0)
        report("slow", proxy, cycles=heartbeat.cycles - start, bytes_compared=640 * 265)

    async def test_flapping_link(self) -> None:
        # Down for less than the retry budget (0.2 + 0.4 + 0.8 s of backoff):
        # every call gets through on a retry.
        daemon = await self.start_daemon()
        agent, proxy, aid = await self.proxied_agent()
        runs = [await self.run_script(aid, 1920, 0.15) for _ in range(4)]
        proxy.flap(up_for=0.8, down_for=0.4)
        for cid, _ in runs:
            await self.wait_final(cid)
        proxy.stop_flapping()
        for cid, marker in runs:
            final = await self.command(cid)
            self.assertEqual(final["status"], "success", final["reason"])
            self.assertEqual(await self.read_all(cid), expected_output(1920))
            self.assertEqual(marker_runs(marker), 1)
        flaps = proxy.counts["flaps"]
        self.assertGreaterEqual(flaps, 4)
        # A status change needs a whole down period: at most one offline and
        # one online per down period (here the retries cover every one of them).
        self.assertLessEqual(self.status_log.changes(aid), flaps)
        await self.wait_online(aid)
        report(
            "flapping",
            proxy,
            commands=len(runs),
            bytes_compared=len(runs) * 1920 * 265,
            status_changes=self.status_log.changes(aid),
        )
        del daemon

    async def test_link_down_longer_than_the_retry_budget_loses_no_output(self) -> None:
        # Down for 2.5 s, longer than one call's retries (0.2 + 0.4 + 0.8 s of
        # backoff): a read fails for good, and the poller must keep asking
        # (log_unreachable_limit) instead of failing a command that still runs.
        # This lost output before: 118,720 of 508,800 bytes stored, "failed".
        daemon = await self.start_daemon()
        agent, proxy, aid = await self.proxied_agent()
        cid, marker = await self.run_script(aid, 1920, 0.3)
        proxy.flap(up_for=1.0, down_for=2.5)
        await self.wait_final(cid)
        proxy.stop_flapping()
        final = await self.command(cid)
        self.assertEqual(final["status"], "success", final["reason"])
        self.assertEqual(await self.read_all(cid), expected_output(1920))
        self.assertEqual(marker_runs(marker), 1)
        self.assertGreaterEqual(proxy.counts["flaps"], 2)
        report("long_down", proxy, bytes_compared=1920 * 265)
        del daemon

    async def test_pooled_connection_closed_while_idle(self) -> None:
        # Heartbeats rare enough that the pooled connection really sits idle.
        daemon = await self.start_daemon(heartbeat_min_interval=30, heartbeat_max_interval=31)
        agent, proxy, aid = await self.proxied_agent()
        proxy.drop_on_reuse = 0.3
        ids = []
        for forward in (False, True, False, True):
            proxy.reuse_forward = forward
            drops = proxy.counts["reuse_drops"]
            # Let the pooled connection sit idle past drop_on_reuse first.
            await deferLater(self.reactor, 0.5, lambda: None)
            cid, marker = await self.run_script(aid, 128, 0.0)
            ids.append((cid, marker))
            final = await self.wait_final(cid)
            self.assertEqual(final["status"], "success", final["reason"])
            self.assertEqual(proxy.counts["reuse_drops"], drops + 1)
        for cid, marker in ids:
            self.assertEqual(await self.read_all(cid), expected_output(128))
            self.assertEqual(marker_runs(marker), 1)
        self.assertGreaterEqual(proxy.counts["reuse_drops"], 4)
        self.assertNotIn("offline", self.status_log.statuses.get(aid, []))
        report("pooled", proxy, commands=len(ids), bytes_compared=len(ids) * 128 * 265)
        del daemon
