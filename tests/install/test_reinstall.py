"""Automatic reinstalls: the policy alone (Clock-driven), and the heartbeat's hook.

The hook's store is a real SQLite file and its clock a ``Clock``; the
installer is a recorder, so no connection is attempted.
"""

from __future__ import annotations

import dataclasses
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from myxd.install.agents import new_agent
from myxd.install.journal import InstallJournal
from myxd.install.reinstall import AutoReinstall, Decision, ReinstallPolicy
from myxd.install.session import InstallOutcome
from myxd.store import StoreService
from myxd.store.records import AgentRecord


def _new_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path)
    return path


class ReinstallPolicyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.policy = ReinstallPolicy(
            self.clock, base=100, max_delay=300, max_attempts=4, reset_after=10_000
        )

    def test_backoff_doubles_up_to_the_maximum(self) -> None:
        self.assertEqual([self.policy.delay(n) for n in (1, 2, 3, 4)], [100, 200, 300, 300])

    def test_attempts_wait_cap_and_reset(self) -> None:
        decide = self.policy.decide
        self.assertEqual(decide(1), Decision("go", 1))
        self.assertEqual(decide(1), Decision("wait", 1, 100))
        self.assertEqual(decide(2), Decision("go", 1), "servers are counted apart")
        self.clock.advance(100)
        self.assertEqual(decide(1), Decision("go", 2))
        self.clock.advance(199)
        self.assertEqual(decide(1).action, "wait")
        self.clock.advance(1)
        self.assertEqual(decide(1), Decision("go", 3))
        self.clock.advance(300)
        self.assertEqual(decide(1), Decision("go", 4))
        self.clock.advance(300)
        self.assertEqual(decide(1), Decision("cap", 4))
        self.assertEqual(decide(1), Decision("capped", 4))
        # A success lifts the cap for the next failure, but not the count.
        self.policy.succeeded(1)
        self.assertEqual(decide(1), Decision("cap", 4))
        # A long quiet period starts afresh, without a backoff.
        self.clock.advance(10_001)
        self.assertEqual(decide(1), Decision("go", 1))
        self.policy.forget(1)
        self.assertEqual(decide(1), Decision("go", 1))


class RecordingInstalls:
    def __init__(self) -> None:
        self.started: list[tuple[int, str, str]] = []
        self.running: set[int] = set()
        self.outcomes: dict[int, Deferred[InstallOutcome]] = {}

    def is_running(self, server_id: int) -> bool:
        return server_id in self.running

    def start(self, server_id: int, kind: str, *, actor: str = "api") -> Deferred[int]:
        self.started.append((server_id, kind, actor))
        self.outcomes[server_id] = Deferred()
        return succeed(len(self.started))

    def wait(self, server_id: int) -> Deferred[InstallOutcome] | None:
        return self.outcomes.get(server_id)


class AutoReinstallTests(unittest.TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        base = _new_dir(self.mktemp())
        ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
        self.store = ss.store
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.installs = RecordingInstalls()
        self.policy = ReinstallPolicy(
            self.clock, base=100, max_delay=1000, max_attempts=3, reset_after=10_000
        )
        self.auto = AutoReinstall(
            self.store, InstallJournal(self.store), self.policy, self.installs
        )
        self.started = self.installs.started

    async def server(self, *, auth: object = None) -> tuple[int, AgentRecord]:
        sid = await self.store.add_server(
            name="s",
            host="127.0.0.1",
            ssh_port=22,
            username="root",
            auth=auth if auth is not None else {"password": "pw"},  # type: ignore[arg-type]
            sudo={"mode": "none"},
        )
        await new_agent(self.store, sid, "127.0.0.1", (1, 65535))
        agent = await self.store.get_agent_for_server(sid)
        assert agent is not None
        # As the heartbeat hands it over: an agent that was installed and pinned.
        return sid, dataclasses.replace(agent, cert_fingerprint="ab" * 32)

    async def actions(self) -> list[tuple[str, str]]:
        events = await self.store.list_events(limit=100)
        return [
            (e.action, e.outcome) for e in reversed(events) if e.action.endswith("auto_reinstall")
        ]

    async def test_never_pinned_agent_is_not_reinstalled(self) -> None:
        # An agent whose install never reached the pin step is installing (or
        # failed), not dead: it must not feed automatic reinstalls.
        sid, _ = await self.server()
        stored = await self.store.get_agent_for_server(sid)
        assert stored is not None
        self.assertEqual(stored.cert_fingerprint, "")
        for _ in range(5):
            await self.auto.hook(stored, "bad agent record")
            self.clock.advance(10_000)
        self.assertEqual(self.started, [])
        server = await self.store.get_server(sid)
        assert server is not None
        self.assertNotEqual(server.status, "needs_attention")
        self.assertEqual(await self.actions(), [("server.auto_reinstall", "skipped")] * 5)

    async def test_backoff_then_cap(self) -> None:
        sid, agent = await self.server()
        hook = self.auto.hook
        await hook(agent, "connection refused")
        self.assertEqual(self.started, [(sid, "reinstall", "auto")])
        # Within the backoff: nothing new starts.
        await hook(agent, "connection refused")
        self.clock.advance(99)
        await hook(agent, "connection refused")
        self.assertEqual(len(self.started), 1)
        self.clock.advance(2)  # > 100 s after the first
        await hook(agent, "connection refused")
        self.assertEqual(len(self.started), 2)
        self.clock.advance(150)  # the second wait is 200 s
        await hook(agent, "connection refused")
        self.assertEqual(len(self.started), 2)
        self.clock.advance(60)
        await hook(agent, "connection refused")
        self.assertEqual(len(self.started), 3)
        # Capped at 3 attempts: the server needs a person now, said once.
        self.clock.advance(5000)
        await hook(agent, "connection refused")
        await hook(agent, "connection refused")
        self.assertEqual(len(self.started), 3)
        server = await self.store.get_server(sid)
        assert server is not None
        self.assertEqual(server.status, "needs_attention")
        self.assertIn("3 automatic reinstalls", server.status_reason or "")
        acts = await self.actions()
        self.assertEqual(acts.count(("server.auto_reinstall", "started")), 3)
        self.assertEqual(acts.count(("server.auto_reinstall", "capped")), 1)
        # After a long quiet period the count starts again.
        self.clock.advance(20_000)
        await hook(agent, "connection refused")
        self.assertEqual(len(self.started), 4)

    async def test_a_successful_reinstall_lifts_the_cap(self) -> None:
        sid, agent = await self.server()
        for _ in range(4):
            await self.auto.hook(agent, "x")
            self.clock.advance(1000)
        self.assertEqual(len(self.started), 3)
        capped = ("server.auto_reinstall", "capped")
        self.assertEqual((await self.actions()).count(capped), 1)
        # The last reinstall reports success late: the cap is lifted (not the
        # count), so the next failure reaches the cap again and says so.
        self.installs.outcomes[sid].callback(InstallOutcome(1, sid, "reinstall", True))
        await self.auto.hook(agent, "x")
        self.assertEqual(len(self.started), 3)
        self.assertEqual((await self.actions()).count(capped), 2)

    async def test_no_credentials_needs_attention(self) -> None:
        sid, agent = await self.server(auth={})
        await self.store.update_server(sid, auth=None)
        await self.auto.hook(agent, "timed out")
        self.assertEqual(self.started, [])
        server = await self.store.get_server(sid)
        assert server is not None
        self.assertEqual(server.status, "needs_attention")
        self.assertIn("no SSH credentials", server.status_reason or "")
        self.assertIn(("server.auto_reinstall", "needs_attention"), await self.actions())

    async def test_adopted_agent_and_running_install_are_skipped(self) -> None:
        sid, agent = await self.server()
        await self.auto.hook(dataclasses.replace(agent, id=77, server_id=None), "x")
        self.installs.running.add(sid)
        await self.auto.hook(agent, "x")
        self.assertEqual(self.started, [])
        self.assertEqual(
            await self.actions(),
            [("agent.auto_reinstall", "skipped"), ("server.auto_reinstall", "skipped")],
        )
