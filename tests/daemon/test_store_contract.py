# -*- test-case-name: tests.daemon.test_store_contract -*-
"""One contract, two stores: the SQLite ``Store`` and ``fleet_fakes.FakeStore``.

``FleetStoreContract`` holds every test of what the fleet uses of the store
(``myxd.store.protocols.FleetStore``). It runs once against the real store on
a real SQLite file and once against the in-memory fake that the heartbeat and
command-queue unit tests use, so the fake cannot drift from the store: a
behaviour the fleet relies on that the fake does not have fails here.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from myxd.errors import ConflictError, NotFoundError, OutputGapError
from myxd.store.protocols import FleetStore
from myxd.store.records import CommandRecord, HeartbeatResult, OutputChunk
from tests.daemon.fleet_fakes import FakeStore, agent_record
from tests.daemon.test_store import FP, StoreTestBase, d

if TYPE_CHECKING:
    _Mixin = unittest.TestCase
else:
    # Not a TestCase at run time, or Trial would run the contract on no store.
    _Mixin = object


class FleetStoreContract(_Mixin):
    """Mixed into a TestCase that provides ``store``, ``new_agent`` and ``now``."""

    store: FleetStore

    # provided by the concrete TestCase
    async def new_agent(self, status: str = "online") -> int:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    # helpers, for both stores
    async def command(self, agent_id: int, **kw: Any) -> CommandRecord:
        args: dict[str, Any] = dict(
            agent_id=agent_id, kind="command", command="echo", args=["hi"], timeout=5.0
        )
        args.update(kw)
        return await self.store.create_command(**args)

    async def get_command(self, command_id: int) -> CommandRecord:
        rec = await self.store.get_command(command_id)
        assert rec is not None
        return rec

    # -- agents ---------------------------------------------------------------

    def test_agents_listed_in_id_order_and_looked_up(self) -> Deferred[Any]:
        async def go() -> None:
            ids = [await self.new_agent() for _ in range(3)]
            self.assertEqual([a.id for a in await self.store.list_agents()], ids)
            rec = await self.store.get_agent(ids[1])
            assert rec is not None
            self.assertEqual(rec.id, ids[1])
            self.assertIsNone(await self.store.get_agent(max(ids) + 100))

        return d(go())

    def test_heartbeat_results(self) -> Deferred[Any]:
        async def go() -> None:
            good, bad, inst = (
                await self.new_agent(),
                await self.new_agent(),
                await self.new_agent("installing"),
            )
            await self.store.record_heartbeat_results(
                [
                    HeartbeatResult(good, 100.0, True, "1.2", {"load": 1}, 0.01),
                    HeartbeatResult(bad, 100.0, False, reason="refused", error_kind="retryable"),
                    HeartbeatResult(inst, 100.0, False, reason="refused", error_kind="final"),
                    HeartbeatResult(max(good, bad, inst) + 100, 100.0, True),  # unknown: ignored
                ]
            )
            eq = self.assertEqual
            g = await self.store.get_agent(good)
            assert g is not None
            eq(
                (g.status, g.status_reason, g.failed_cycles, g.last_error_kind, g.version),
                ("online", None, 0, None, "1.2"),
            )
            eq((g.details, g.last_latency, g.last_heartbeat), ({"load": 1}, 0.01, 100.0))
            eq((g.rpc_last_check, g.rpc_last_success, g.rpc_supported), (100.0, 100.0, True))
            b = await self.store.get_agent(bad)
            assert b is not None
            eq(
                (b.status, b.status_reason, b.failed_cycles, b.total_failures, b.last_error_kind),
                ("offline", "refused", 1, 1, "retryable"),
            )
            eq((b.rpc_last_check, b.last_heartbeat), (100.0, None))
            i = await self.store.get_agent(inst)
            assert i is not None
            # The installer owns an installing agent's status; the counters still move.
            eq((i.status, i.failed_cycles, i.last_error_kind), ("installing", 1, "final"))

            # Another failure counts up; a success resets the streak, keeps the total,
            # and keeps version, details and latency when the result has none.
            await self.store.record_heartbeat_results(
                [HeartbeatResult(bad, 101.0, False, reason="timeout")]
            )
            await self.store.record_heartbeat_results(
                [HeartbeatResult(bad, 102.0, True), HeartbeatResult(good, 102.0, True)]
            )
            b = await self.store.get_agent(bad)
            assert b is not None
            eq(
                (b.status, b.status_reason, b.failed_cycles, b.total_failures, b.last_error_kind),
                ("online", None, 0, 2, None),
            )
            g = await self.store.get_agent(good)
            assert g is not None
            eq(
                (g.version, g.details, g.last_latency, g.last_heartbeat),
                ("1.2", {"load": 1}, 0.01, 102.0),
            )

        return d(go())

    def test_bad_error_kind_refused(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.new_agent()
            with self.assertRaises(ValueError):
                await self.store.record_heartbeat_results(
                    [HeartbeatResult(aid, 1.0, False, reason="x", error_kind="weird")]
                )

        return d(go())

    # -- events ---------------------------------------------------------------

    def test_events_get_increasing_ids(self) -> Deferred[Any]:
        async def go() -> None:
            first = await self.store.add_event(actor="a", action="x", target="t", outcome="ok")
            second = await self.store.add_event(
                actor="a", action="y", target=None, outcome="failed", details={"n": 1}
            )
            self.assertGreater(first, 0)
            self.assertGreater(second, first)

        return d(go())

    # -- commands -------------------------------------------------------------

    def test_create_and_get_command(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.new_agent()
            before = self.now()
            rec = await self.command(aid, extra={"env": {"A": "1"}})
            eq = self.assertEqual
            eq(await self.store.get_command(rec.id), rec)
            eq(
                (rec.agent_id, rec.kind, rec.command, rec.args, rec.timeout, rec.extra),
                (aid, "command", "echo", ["hi"], 5.0, {"env": {"A": "1"}}),
            )
            eq(
                (rec.status, rec.exit_code, rec.reason, rec.result, rec.attempts),
                ("running", None, None, None, 0),
            )
            eq((rec.output_offset, rec.finished_at, rec.started_at), (0, None, rec.created_at))
            self.assertTrue(before <= rec.created_at <= self.now())
            pending = await self.command(aid, kind="ansible", status="pending")
            eq((pending.status, pending.started_at, pending.kind), ("pending", None, "ansible"))
            self.assertTrue(rec.command_uid and pending.command_uid != rec.command_uid)
            self.assertIsNone(await self.store.get_command(pending.id + 100))

        return d(go())

    def test_reserved_command_uid(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.new_agent()
            self.assertIsNone(await self.store.get_command_by_uid("reserved-1"))
            rec = await self.command(aid, kind="ansible", command_uid="reserved-1")
            self.assertEqual(rec.command_uid, "reserved-1")
            self.assertEqual(await self.store.get_command_by_uid("reserved-1"), rec)
            # At most once: a second command with that uid is refused.
            with self.assertRaises(ConflictError):
                await self.command(aid, command_uid="reserved-1")

        return d(go())

    def test_create_command_refusals(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.new_agent()
            with self.assertRaises(NotFoundError):
                await self.command(aid + 100)
            with self.assertRaises(ValueError):
                await self.command(aid, kind="shell")
            with self.assertRaises(ValueError):
                await self.command(aid, status="done")

        return d(go())

    def test_update_command_sets_only_what_is_given(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.new_agent()
            rec = await self.command(aid)
            await self.store.update_command(rec.id, attempts=2)
            await self.store.update_command(
                rec.id, status="success", exit_code=0, result={"rc": 0}, finished_at=50.0
            )
            got = await self.get_command(rec.id)
            self.assertEqual(
                (got.status, got.exit_code, got.result, got.attempts, got.finished_at),
                ("success", 0, {"rc": 0}, 2, 50.0),
            )
            self.assertEqual((got.reason, got.started_at), (None, rec.started_at))
            with self.assertRaises(NotFoundError):
                await self.store.update_command(rec.id + 100, status="failed")
            with self.assertRaises(ValueError):
                await self.store.update_command(rec.id, status="done")

        return d(go())

    def test_unfinished_commands_oldest_first(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.new_agent()
            a = await self.command(aid)
            b = await self.command(aid, status="pending")
            c = await self.command(aid)
            await self.store.update_command(a.id, status="failed")
            await self.store.update_command(c.id, status="success")
            e = await self.command(aid)
            got = [r.id for r in await self.store.list_unfinished_commands()]
            self.assertEqual(got, [b.id, e.id])

        return d(go())

    # -- output ---------------------------------------------------------------

    def test_append_output_is_idempotent_by_offset(self) -> Deferred[Any]:
        async def go() -> None:
            rec = await self.command(await self.new_agent())
            eq = self.assertEqual
            eq(await self.store.append_output(rec.id, 0, "stdout", b"hello "), 6)
            eq(await self.store.append_output(rec.id, 0, "stdout", b"hello "), 6)  # redelivered
            eq(await self.store.append_output(rec.id, 3, "stdout", b"lo wor"), 9)  # overlap
            eq(await self.store.append_output(rec.id, 9, "stderr", b"ld"), 11)
            eq(await self.store.append_output(rec.id, 11, "stdout", b""), 11)
            eq((await self.get_command(rec.id)).output_offset, 11)
            eq(
                await self.store.read_output(rec.id),
                [OutputChunk(0, "stdout", b"hello wor"), OutputChunk(9, "stderr", b"ld")],
            )

        return d(go())

    def test_append_output_refusals(self) -> Deferred[Any]:
        async def go() -> None:
            rec = await self.command(await self.new_agent())
            await self.store.append_output(rec.id, 0, "stdout", b"abc")
            with self.assertRaises(OutputGapError):
                await self.store.append_output(rec.id, 4, "stdout", b"x")
            with self.assertRaises(NotFoundError):
                await self.store.append_output(rec.id + 100, 0, "stdout", b"x")
            with self.assertRaises(ValueError):
                await self.store.append_output(rec.id, 3, "stdin", b"x")
            with self.assertRaises(ValueError):
                await self.store.append_output(rec.id, -1, "stdout", b"x")
            # None of the refused appends stored anything.
            self.assertEqual((await self.get_command(rec.id)).output_offset, 3)
            self.assertEqual(
                await self.store.read_output(rec.id), [OutputChunk(0, "stdout", b"abc")]
            )

        return d(go())

    def test_read_output_slices_and_merges(self) -> Deferred[Any]:
        async def go() -> None:
            rec = await self.command(await self.new_agent())
            for offset, stream, data in (
                (0, "stdout", b"ab"),
                (2, "stdout", b"cd"),
                (4, "stderr", b"EF"),
                (6, "stdout", b"gh"),
            ):
                await self.store.append_output(rec.id, offset, stream, data)
            eq = self.assertEqual
            read = self.store.read_output
            eq(
                await read(rec.id),
                [
                    OutputChunk(0, "stdout", b"abcd"),
                    OutputChunk(4, "stderr", b"EF"),
                    OutputChunk(6, "stdout", b"gh"),
                ],
            )
            eq(await read(rec.id, 1, 2), [OutputChunk(1, "stdout", b"bc")])
            eq(
                await read(rec.id, 3, 4),
                [
                    OutputChunk(3, "stdout", b"d"),
                    OutputChunk(4, "stderr", b"EF"),
                    OutputChunk(6, "stdout", b"g"),
                ],
            )
            eq(
                await read(rec.id, 5),
                [OutputChunk(5, "stderr", b"F"), OutputChunk(6, "stdout", b"gh")],
            )
            eq(await read(rec.id, 8), [])
            eq(await read(rec.id + 100), [])
            with self.assertRaises(ValueError):
                await read(rec.id, -1)
            with self.assertRaises(ValueError):
                await read(rec.id, 0, 0)

        return d(go())


class SQLiteStoreContractTests(FleetStoreContract, StoreTestBase):
    """The contract on the real store, on a real SQLite file."""

    _ports = itertools.count(21000)

    async def new_agent(self, status: str = "online") -> int:
        return await self.agent(next(self._ports), status=status)

    def now(self) -> float:
        return float(self.service.db.now())


class FakeStoreContractTests(FleetStoreContract, unittest.TestCase):
    """The same contract on the fleet tests' in-memory fake."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.fake = FakeStore(self.clock)
        self.store = self.fake
        self._ids = itertools.count(1)

    async def new_agent(self, status: str = "online") -> int:
        return self.fake.add(agent_record(next(self._ids), status=status, fingerprint=FP)).id

    def now(self) -> float:
        return float(self.clock.seconds())
