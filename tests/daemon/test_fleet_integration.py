"""The RPC client, heartbeats and the command queue against REAL agent processes.

Every test starts a real ``myx_agent`` on 127.0.0.1 (tests/support/agent_process.py)
and a real SQLite store in a temp dir, and drives the daemon's services on the
real reactor with short intervals set through Settings.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from myxd.config import Settings
from myxd.fleet.commands import CommandQueue
from myxd.fleet.heartbeat import HeartbeatService
from myxd.rpc import AgentEndpoint, AgentRPC, CertificateMismatch
from myxd.statuses import FINAL_STATUSES
from myxd.store import AgentRecord, CommandRecord, Store, StoreService
from tests.support.agent_process import REPO_ROOT, RunningAgent, start_agent

T = TypeVar("T")
WAIT = 120.0


def fast_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = dict(
        heartbeat_min_interval=0.2,
        heartbeat_max_interval=0.5,
        heartbeat_concurrency=16,
        rpc_retry_max_attempts=3,
        rpc_retry_base_delay=0.05,
        rpc_timeout=20,
        rpc_pool_idle_timeout=30,
        log_poll_interval=0.2,
        log_poll_wait=2,
        max_log_pollers=50,
        reinstall_after_cycles=1000,
    )
    base.update(overrides)
    return Settings(**base)


class Counter:
    def __init__(self) -> None:
        self.retries = 0
        self.errors: list[str] = []

    def rpc_retry(self) -> None:
        self.retries += 1

    def rpc_error(self, kind: str) -> None:
        self.errors.append(kind)


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def request_lines(agent: RunningAgent) -> list[str]:
    """The agent logs one line per HTTP request that reached it (any outcome)."""
    return [
        line for line in agent.log_text().splitlines() if " rpc " in line and " ms from " in line
    ]


class FleetTestCase(TestCase):
    timeout = 300

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)
        self.db_path = os.path.join(self.data_dir, "myxd.sqlite")

    async def open_store(self) -> StoreService:
        svc = StoreService(self.db_path, self.reactor)
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await svc.when_ready()
        return svc

    def make_rpc(self, settings: Settings, metrics: Any = None) -> AgentRPC:
        rpc = AgentRPC(self.reactor, settings, metrics=metrics)
        self.addCleanup(lambda: Deferred.fromCoroutine(rpc.close()))
        return rpc

    async def enrol(self, store: Store, agent: RunningAgent, fingerprint: str | None = None) -> int:
        return await store.add_agent(
            host=agent.host,
            rpc_port=agent.port,
            rpc_path=agent.rpc_path,
            token=agent.token,
            secret_key="unused-secret",
            cert_fingerprint=fingerprint or agent.fingerprint,
        )

    async def until(
        self,
        probe: Callable[[], Awaitable[T]],
        check: Callable[[T], bool],
        what: str,
        timeout: float = WAIT,
    ) -> T:
        deadline = self.reactor.seconds() + timeout
        while True:
            value = await probe()
            if check(value):
                return value
            if self.reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}; last value: {value!r}")
            await deferLater(self.reactor, 0.05, lambda: None)

    async def agent_rec(self, store: Store, agent_id: int) -> AgentRecord:
        rec = await store.get_agent(agent_id)
        assert rec is not None
        return rec

    async def command(self, store: Store, command_id: int) -> CommandRecord:
        rec = await store.get_command(command_id)
        assert rec is not None
        return rec

    async def wait_final(self, store: Store, command_id: int) -> CommandRecord:
        return await self.until(
            lambda: self.command(store, command_id),
            lambda c: c.status in FINAL_STATUSES,
            f"command {command_id} to finish",
        )

    async def stored_output(self, store: Store, command_id: int) -> tuple[bytes, bytes, bytes]:
        """(combined, stdout only, stderr only) as stored."""
        combined, out, err = b"", b"", b""
        while True:
            chunks = await store.read_output(command_id, len(combined))
            if not chunks:
                return combined, out, err
            for chunk in chunks:
                self.assertEqual(chunk.offset, len(combined))
                combined += chunk.data
                if chunk.stream == "stdout":
                    out += chunk.data
                else:
                    err += chunk.data

    async def agent_log(self, agent: RunningAgent, uid: str) -> tuple[bytes, bool]:
        """The agent's own combined stream of a command, read directly."""
        import base64

        data, offset = b"", 0
        while True:
            res = await agent.call("get_command_log", {"command_id": uid, "offset": offset})
            data += base64.b64decode(res["log_data"])
            if res["new_offset"] == offset:
                return data, bool(res["is_final"])
            offset = res["new_offset"]


class PinnedRPCTests(FleetTestCase):
    async def test_pinned_heartbeat_marks_the_agent_online(self) -> None:
        agent = await start_agent(self)
        store = (await self.open_store()).store
        aid = await self.enrol(store, agent)
        settings = fast_settings()
        hb = HeartbeatService(store, self.make_rpc(settings), settings, self.reactor)
        stats = await hb.run_cycle()
        self.assertEqual((stats.agents, stats.ok, stats.failed), (1, 1, 0))
        rec = await self.agent_rec(store, aid)
        self.assertEqual(rec.status, "online")
        self.assertIsNotNone(rec.last_heartbeat)
        self.assertIsInstance(rec.version, str)
        assert rec.details is not None
        self.assertEqual(rec.details["cert_fingerprint"], agent.fingerprint)
        self.assertEqual(rec.details["rpc_port"], agent.port)

    async def test_wrong_pin_is_refused_before_any_request_is_sent(self) -> None:
        agent = await start_agent(self)
        store = (await self.open_store()).store
        wrong = "0" * 64
        aid = await self.enrol(store, agent, fingerprint=wrong)
        settings = fast_settings()
        counter = Counter()
        rpc = self.make_rpc(settings, counter)
        before = len(request_lines(agent))
        rec = await self.agent_rec(store, aid)
        with self.assertRaises(CertificateMismatch) as caught:
            await rpc.call(AgentEndpoint.from_record(rec), "heartbeat")
        self.assertEqual(
            (caught.exception.attempts, caught.exception.actual), (1, agent.fingerprint)
        )
        # The heartbeat marks it offline at once: final, no retry.
        hb = HeartbeatService(store, rpc, settings, self.reactor)
        stats = await hb.run_cycle()
        self.assertEqual(stats.failed, 1)
        rec = await self.agent_rec(store, aid)
        self.assertEqual((rec.status, rec.last_error_kind), ("offline", "final"))
        self.assertIn("certificate changed", rec.status_reason or "")
        self.assertEqual(counter.retries, 0)
        # Positive control: one correctly pinned call shows up in the agent's log,
        # and it is the only request the agent ever saw from this test.
        good = AgentEndpoint(agent.host, agent.port, agent.rpc_path, agent.token, agent.fingerprint)
        self.assertEqual(await rpc.call(good, "health_check"), {"status": "ok"})
        lines = await self.until(
            lambda: deferLater(self.reactor, 0, request_lines, agent),
            lambda lines: len(lines) > before,
            "the agent's log line",
        )
        self.assertEqual(len(lines), before + 1, lines[before:])
        self.assertIn("health_check", lines[-1])

    async def test_offline_after_retries_when_killed_and_back_when_restarted(self) -> None:
        agent = await start_agent(self)
        store = (await self.open_store()).store
        aid = await self.enrol(store, agent)
        settings = fast_settings()
        counter = Counter()
        hb = HeartbeatService(store, self.make_rpc(settings, counter), settings, self.reactor)
        hb.startService()
        self.addCleanup(hb.stopService)
        await self.until(
            lambda: self.agent_rec(store, aid), lambda a: a.status == "online", "agent online"
        )
        await agent.stop("KILL")
        rec = await self.until(
            lambda: self.agent_rec(store, aid), lambda a: a.status == "offline", "agent offline"
        )
        self.assertEqual(rec.last_error_kind, "retryable")
        self.assertIn("refused", rec.status_reason or "")
        self.assertGreaterEqual(counter.retries, 2)
        self.assertIn("retryable", counter.errors)
        await start_agent(self, reuse=agent)
        rec = await self.until(
            lambda: self.agent_rec(store, aid), lambda a: a.status == "online", "agent back online"
        )
        self.assertEqual(rec.failed_cycles, 0)
        self.assertIsNone(rec.status_reason)


class CommandTests(FleetTestCase):
    async def start_queue(self, store: Store, settings: Settings) -> CommandQueue:
        queue = CommandQueue(store, self.make_rpc(settings), settings, self.reactor)
        queue.startService()
        self.addCleanup(lambda: queue.stopService() if queue.running else None)
        return queue

    async def test_full_output_is_stored_byte_identical(self) -> None:
        agent = await start_agent(self)
        store = (await self.open_store()).store
        aid = await self.enrol(store, agent)
        queue = await self.start_queue(store, fast_settings())
        script = (
            'i=0; while [ $i -lt 3000 ]; do echo "out line $i"; '
            'echo "err line $i" >&2; i=$((i+1)); done; printf "tail\\000\\377"'
        )
        rec = await queue.add_command(aid, "/bin/sh", ["-c", script], 120)
        final = await self.wait_final(store, rec.id)
        self.assertEqual((final.status, final.exit_code), ("success", 0))
        combined, out, err = await self.stored_output(store, rec.id)
        expected_out = b"".join(b"out line %d\n" % i for i in range(3000)) + b"tail\x00\xff"
        expected_err = b"".join(b"err line %d\n" % i for i in range(3000))
        self.assertEqual(out, expected_out)
        self.assertEqual(err, expected_err)
        agent_bytes, is_final = await self.agent_log(agent, rec.command_uid)
        self.assertTrue(is_final)
        self.assertEqual(combined, agent_bytes)
        self.assertEqual(final.output_offset, len(agent_bytes))
        assert final.result is not None
        self.assertNotIn("stdout", final.result)
        self.assertIsNotNone(final.finished_at)

    async def test_resume_after_myxd_restart_mid_command(self) -> None:
        agent = await start_agent(self)
        store_svc = await self.open_store()
        aid = await self.enrol(store_svc.store, agent)
        settings = fast_settings()
        queue = await self.start_queue(store_svc.store, settings)
        go = os.path.join(self.data_dir, "go")
        # Prints continuously; the second half waits for `go`, so it is certain to
        # be printed while myxd is down (no reliance on timing).
        script = (
            "import os, sys, time\n"
            "def out(i):\n"
            "    sys.stdout.write('%d\\n' % i); sys.stdout.flush(); time.sleep(0.002)\n"
            "for i in range(300): out(i)\n"
            "deadline = time.time() + 200\n"
            "while not os.path.exists(sys.argv[1]) and time.time() < deadline:\n"
            "    time.sleep(0.01)\n"
            "for i in range(300, 600): out(i)\n"
        )
        rec = await queue.add_command(aid, sys.executable, ["-u", "-c", script, go], 240)
        await self.until(
            lambda: self.command(store_svc.store, rec.id),
            lambda c: c.output_offset > 0,
            "first output stored",
        )
        # Stop "myxd" (the queue and the store) with the command still running.
        await queue.stopService()
        await store_svc.stopService()
        _touch(go)
        first_half = sum(len(b"%d\n" % i) for i in range(300))
        await self.until(
            lambda: self.agent_log(agent, rec.command_uid),
            lambda log: len(log[0]) > first_half,
            "output while myxd is down",
        )
        store_svc2 = await self.open_store()
        stopped_at = (await self.command(store_svc2.store, rec.id)).output_offset
        self.assertGreater(stopped_at, 0)
        self.assertLessEqual(stopped_at, first_half)
        queue2 = await self.start_queue(store_svc2.store, settings)
        self.assertTrue(queue2.running)
        final = await self.wait_final(store_svc2.store, rec.id)
        self.assertEqual(final.status, "success")
        combined, out, err = await self.stored_output(store_svc2.store, rec.id)
        self.assertEqual(combined, b"".join(b"%d\n" % i for i in range(600)))
        self.assertEqual(err, b"")
        agent_bytes, _ = await self.agent_log(agent, rec.command_uid)
        self.assertEqual(combined, agent_bytes)

    async def test_agent_reported_timeout_fails_without_retry(self) -> None:
        agent = await start_agent(self)
        store = (await self.open_store()).store
        aid = await self.enrol(store, agent)
        queue = await self.start_queue(store, fast_settings())
        rec = await queue.add_command(aid, "sleep", ["30"], 0.5)
        final = await self.wait_final(store, rec.id)
        self.assertEqual(final.status, "timed_out")
        self.assertIn("timed out", final.reason or "")
        assert final.result is not None
        self.assertTrue(final.result["timed_out"])
        self.assertEqual(final.attempts, 1)

    async def test_cancel(self) -> None:
        agent = await start_agent(self)
        store = (await self.open_store()).store
        aid = await self.enrol(store, agent)
        queue = await self.start_queue(store, fast_settings())
        rec = await queue.add_command(aid, "/bin/sh", ["-c", "echo started; sleep 60"], None)
        await self.until(
            lambda: self.command(store, rec.id), lambda c: c.output_offset > 0, "command started"
        )
        await queue.cancel(rec.id)
        final = await self.wait_final(store, rec.id)
        self.assertEqual((final.status, final.reason), ("cancelled", "cancelled"))
        combined, _, _ = await self.stored_output(store, rec.id)
        self.assertEqual(combined, b"started\n")

    async def test_ansible_playbook_through_the_queue(self) -> None:
        agent = await start_agent(self)
        shutil.copytree(
            os.path.join(REPO_ROOT, "deployment-tool"),
            agent.deployment_tool_dir,
            dirs_exist_ok=True,
        )
        store = (await self.open_store()).store
        aid = await self.enrol(store, agent)
        queue = await self.start_queue(store, fast_settings())
        rec = await queue.add_ansible(aid, "ping.yml", {"unused": "x"}, 240)
        final = await self.until(
            lambda: self.command(store, rec.id),
            lambda c: c.status in FINAL_STATUSES,
            "playbook to finish",
            timeout=280,
        )
        combined, _, _ = await self.stored_output(store, rec.id)
        self.assertEqual(final.status, "success", combined.decode("utf-8", "replace"))
        self.assertIn(b"PLAY [Ping the agent host]", combined)
        assert final.result is not None
        self.assertEqual(final.result["ansible"]["status"], "successful")
        agent_bytes, _ = await self.agent_log(agent, rec.command_uid)
        self.assertEqual(combined, agent_bytes)
