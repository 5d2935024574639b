"""The SQLite store on a real file: every query, output idempotence, bulk
heartbeats, secrets at rest, schema upgrades with backup, identities."""

from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial import unittest

from myxd import identity
from myxd.errors import (
    ConflictError,
    NotFoundError,
    OutputGapError,
    SchemaError,
    SecretKeyError,
)
from myxd.store import HeartbeatResult, OutputChunk, StoreService
from myxd.store import service as store_service_module
from myxd.store.crypto import SecretBox, load_or_create_key
from myxd.store.migrate import DEFAULT_SCHEMA_DIR

FP = "ab" * 32


def d(coro: Any) -> Deferred[Any]:
    return ensureDeferred(coro)


class StoreTestBase(unittest.TestCase):
    """A started StoreService on a fresh file in a temp dir."""

    # The store's Optional returns are checked by the assertions; Any keeps
    # the tests free of None-narrowing noise.
    store: Any

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "myxd.sqlite")
        return d(self.open())

    async def open(self, **kw: Any) -> StoreService:
        svc = StoreService(self.path, reactor, **kw)
        svc.startService()
        self.addCleanup(self.stop, svc)
        await svc.when_ready()
        self.service = svc
        self.store = svc.store
        return svc

    def stop(self, svc: StoreService) -> Any:
        if svc.running:
            return svc.stopService()
        return None

    async def agent(self, port: int, **kw: Any) -> int:
        args: dict[str, Any] = dict(
            host="127.0.0.1",
            rpc_port=port,
            rpc_path="p" * 20,
            token=f"token-{port}-secret",
            secret_key=f"key-{port}-secret",
            cert_fingerprint=FP,
        )
        args.update(kw)
        return int(await self.store.add_agent(**args))

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        def run(conn: Any) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(query, params).fetchall()]

        assert self.service.pool is not None
        return list(await self.service.pool.runWithConnection(run))


class OpenTests(StoreTestBase):
    def test_pragmas(self) -> Deferred[Any]:
        async def go() -> None:
            self.assertEqual(await self.sql("PRAGMA journal_mode"), [("wal",)])
            self.assertEqual(await self.sql("PRAGMA foreign_keys"), [(1,)])
            self.assertEqual(await self.sql("SELECT MAX(version) FROM schema_version"), [(1,)])
            assert self.service.migration is not None
            self.assertEqual(self.service.migration.from_version, 0)
            for name in os.listdir(self.dir):
                if name.startswith("myxd.sqlite"):
                    mode = stat.S_IMODE(os.stat(os.path.join(self.dir, name)).st_mode)
                    self.assertEqual(mode, 0o600, name)
            self.assertIsNone(self.service.migration.backup_path)

        return d(go())

    def test_reopen_keeps_data_and_makes_no_backup(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.agent(20001)
            await self.service.stopService()
            svc = await self.open()
            assert svc.migration is not None
            self.assertEqual((svc.migration.from_version, svc.migration.to_version), (1, 1))
            self.assertIsNone(svc.migration.backup_path)
            rec = await self.store.get_agent(aid)
            self.assertEqual(rec.token, "token-20001-secret")
            self.assertEqual([n for n in os.listdir(self.dir) if ".bak-" in n], [])

        return d(go())

    def test_not_started(self) -> Deferred[Any]:
        svc = StoreService(os.path.join(self.dir, "other.sqlite"), reactor)
        return self.assertFailure(svc.store.get_agent(1), store_service_module.StoreError)

    def test_closed(self) -> Deferred[Any]:
        async def go() -> None:
            pending = self.store.add_event(actor="t", action="a", target=None, outcome="ok")
            await self.service.stopService()
            self.assertGreater(await pending, 0)  # in-flight work finished before close
            with self.assertRaises(store_service_module.StoreError):
                await self.store.get_agent(1)

        return d(go())


class AgentTests(StoreTestBase):
    def test_add_get(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.agent(20001, status="installing")
            rec = await self.store.get_agent(aid)
            self.assertEqual(rec.id, aid)
            self.assertEqual(rec.host, "127.0.0.1")
            self.assertEqual(rec.rpc_port, 20001)
            self.assertEqual(rec.token, "token-20001-secret")
            self.assertEqual(rec.secret_key, "key-20001-secret")
            self.assertEqual(rec.cert_fingerprint, FP)
            self.assertEqual(rec.status, "installing")
            self.assertIsNone(rec.server_id)
            self.assertFalse(rec.rpc_supported)
            self.assertEqual(rec.failed_cycles, 0)
            self.assertIsNone(rec.details)
            self.assertIsInstance(rec.created_at, float)
            self.assertNotIn("token-20001", repr(rec))
            self.assertNotIn("key-20001", repr(rec))
            self.assertIsNone(await self.store.get_agent(aid + 100))

        return d(go())

    def test_add_rejects(self) -> Deferred[Any]:
        async def go() -> None:
            first = await self.agent(20001)
            with self.assertRaises(ConflictError) as e:
                await self.agent(20001)
            self.assertIn(str(first), str(e.exception))
            with self.assertRaises(ValueError):
                await self.agent(20002, status="sleeping")
            with self.assertRaises(ValueError):
                await self.agent(70000)
            with self.assertRaises(NotFoundError):
                await self.agent(20003, server_id=99)
            self.assertEqual(len(await self.store.list_agents()), 1)

        return d(go())

    def test_list_paging_and_status(self) -> Deferred[Any]:
        async def go() -> None:
            ids = [await self.agent(20000 + i) for i in range(5)]
            await self.store.set_agent_status(ids[1], "offline", "refused")
            await self.store.set_agent_status(ids[3], "offline", "refused")
            self.assertEqual([a.id for a in await self.store.list_agents()], ids)
            page = await self.store.list_agents(limit=2, offset=1)
            self.assertEqual([a.id for a in page], ids[1:3])
            off = await self.store.list_agents(status="offline")
            self.assertEqual([a.id for a in off], [ids[1], ids[3]])
            self.assertEqual(off[0].status_reason, "refused")
            self.assertEqual(
                [a.id for a in await self.store.list_agents(status="offline", limit=1, offset=1)],
                [ids[3]],
            )
            with self.assertRaises(ValueError):
                await self.store.list_agents(status="bogus")
            self.assertEqual(
                await self.store.agent_counts_by_status(),
                {"online": 3, "offline": 2, "installing": 0, "error": 0},
            )

        return d(go())

    def test_delete_cascades_commands(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.agent(20001)
            cmd = await self.store.create_command(
                agent_id=aid, kind="command", command="true", args=[], timeout=None
            )
            await self.store.append_output(cmd.id, 0, "stdout", b"x")
            self.assertTrue(await self.store.delete_agent(aid))
            self.assertFalse(await self.store.delete_agent(aid))
            self.assertIsNone(await self.store.get_agent(aid))
            self.assertIsNone(await self.store.get_command(cmd.id))
            self.assertEqual(await self.sql("SELECT COUNT(*) FROM command_output"), [(0,)])

        return d(go())

    def test_set_status_and_update_agent(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.agent(20001)
            with self.assertRaises(ValueError):
                await self.store.set_agent_status(aid, "gone")
            await self.store.update_agent(
                aid,
                host="10.0.0.1",
                cert_fingerprint="cd" * 32,
                status="error",
                status_reason="cert changed",
            )
            rec = await self.store.get_agent(aid)
            self.assertEqual(
                (rec.host, rec.cert_fingerprint, rec.status, rec.status_reason),
                ("10.0.0.1", "cd" * 32, "error", "cert changed"),
            )
            # Only what is passed changes; None sets NULL.
            await self.store.update_agent(aid, status_reason=None)
            rec = await self.store.get_agent(aid)
            self.assertEqual((rec.host, rec.status, rec.status_reason), ("10.0.0.1", "error", None))
            with self.assertRaises(NotFoundError):
                await self.store.update_agent(aid + 1, host="x")
            with self.assertRaises(ValueError):
                await self.store.update_agent(aid, status="nope")

        return d(go())


class IdentityTests(StoreTestBase):
    def test_new_identity_shape(self) -> Deferred[Any]:
        async def go() -> None:
            seen: set[int] = set()
            for _ in range(20):
                ident = await self.store.new_agent_identity()
                self.assertTrue(identity.is_allowed_port(ident.rpc_port))
                self.assertRegex(ident.rpc_path, r"^[A-Za-z0-9_-]{16,32}$")
                self.assertGreaterEqual(len(ident.token), 40)
                self.assertGreaterEqual(len(ident.secret_key), 40)
                self.assertNotEqual(ident.token, ident.secret_key)
                self.assertNotIn(ident.token, repr(ident))
                self.assertNotIn(ident.rpc_port, seen)  # reserved until saved
                seen.add(ident.rpc_port)

        return d(go())

    def test_port_unique_in_db(self) -> Deferred[Any]:
        """new_agent_identity asks the DB (and its reservations) whether a port is taken."""

        async def go() -> None:
            await self.agent(20001)
            answers: list[tuple[int, bool]] = []
            real = store_service_module.new_identity

            def spy(taken: Any, rng: Any = None) -> identity.AgentIdentity:
                for port in (20001, 20002):
                    answers.append((port, taken(port)))
                return real(taken, rng)

            self.patch(store_service_module, "new_identity", spy)
            ident = await self.store.new_agent_identity()
            self.assertEqual(answers, [(20001, True), (20002, False)])
            answers.clear()

            def spy2(taken: Any, rng: Any = None) -> identity.AgentIdentity:
                answers.append((ident.rpc_port, taken(ident.rpc_port)))
                return real(taken, rng)

            self.patch(store_service_module, "new_identity", spy2)
            await self.store.new_agent_identity()
            self.assertEqual(answers, [(ident.rpc_port, True)])

        return d(go())

    def test_new_rpc_port_skips_taken_and_well_known(self) -> None:
        free = 24000
        taken = {p for p in range(identity.RPC_PORT_MIN, identity.RPC_PORT_MAX + 1) if p != free}
        self.assertEqual(identity.new_rpc_port(taken.__contains__, random.Random(1)), free)
        # A well-known port is never chosen even when nothing is taken.
        only = next(iter(identity.WELL_KNOWN_PORTS))
        rng = random.Random(2)
        for _ in range(2000):
            self.assertNotEqual(identity.new_rpc_port(lambda p: False, rng), only)
        with self.assertRaises(RuntimeError):
            identity.new_rpc_port(lambda p: True, random.Random(3), max_tries=50)

    def test_well_known_ports_documented_range(self) -> None:
        for port in (8080, 8443, 8000, 8888, 9000, 9090, 9200, 27017):
            self.assertFalse(identity.is_allowed_port(port), port)
        self.assertFalse(identity.is_allowed_port(7999))
        self.assertFalse(identity.is_allowed_port(65536))
        self.assertTrue(identity.is_allowed_port(24351))
        # Never in Linux's default ephemeral range, where outgoing connections live.
        for port in (32768, 40000, 60999):
            self.assertFalse(identity.is_allowed_port(port), port)
        self.assertTrue(identity.is_allowed_port(61000))
        rng = random.Random(4)
        for _ in range(2000):
            self.assertNotIn(identity.new_rpc_port(lambda p: False, rng), identity.EPHEMERAL_PORTS)

    def test_rpc_path_lengths(self) -> None:
        rng = random.Random(4)
        lengths = {len(identity.new_rpc_path(rng)) for _ in range(500)}
        self.assertEqual(min(lengths), 16)
        self.assertEqual(max(lengths), 32)


class HeartbeatTests(StoreTestBase):
    def test_bulk_results_one_transaction(self) -> Deferred[Any]:
        async def go() -> None:
            n = 2000
            ids = [await self.agent(10000 + i) for i in range(n)]
            await self.store.set_agent_status(ids[-1], "installing", "being installed")
            statements: list[str] = []

            def trace(conn: Any, on: bool) -> None:
                conn.set_trace_callback(statements.append if on else None)

            assert self.service.pool is not None
            await self.service.pool.runWithConnection(trace, True)
            results = [
                HeartbeatResult(a, 100.0, True, version="1.2", details={"load": i}, latency=0.01)
                if i % 2 == 0
                else HeartbeatResult(
                    a, 100.0, False, reason="connection refused", error_kind="retryable"
                )
                for i, a in enumerate(ids)
            ]
            await self.store.record_heartbeat_results(results)
            await self.service.pool.runWithConnection(trace, False)
            begins = [s for s in statements if s.strip().upper().startswith("BEGIN")]
            commits = [s for s in statements if s.strip().upper().startswith("COMMIT")]
            self.assertEqual((len(begins), len(commits)), (1, 1), statements[:5])

            counts = await self.store.agent_counts_by_status()
            self.assertEqual(
                counts, {"online": n // 2, "offline": n // 2 - 1, "installing": 1, "error": 0}
            )
            good = await self.store.get_agent(ids[0])
            self.assertEqual(
                (good.status, good.version, good.details, good.last_latency),
                ("online", "1.2", {"load": 0}, 0.01),
            )
            self.assertEqual(
                (good.last_heartbeat, good.rpc_last_success, good.rpc_last_check),
                (100.0, 100.0, 100.0),
            )
            self.assertTrue(good.rpc_supported)
            bad = await self.store.get_agent(ids[1])
            self.assertEqual(
                (
                    bad.status,
                    bad.status_reason,
                    bad.failed_cycles,
                    bad.total_failures,
                    bad.last_error_kind,
                    bad.rpc_last_check,
                ),
                ("offline", "connection refused", 1, 1, "retryable", 100.0),
            )
            self.assertIsNone(bad.last_heartbeat)
            inst = await self.store.get_agent(ids[-1])
            self.assertEqual(
                (inst.status, inst.status_reason, inst.failed_cycles),
                ("installing", "being installed", 1),
            )

            # A second failure counts up; a success resets the streak, keeps the total,
            # and keeps version/details when the result has none.
            await self.store.record_heartbeat_results(
                [HeartbeatResult(ids[1], 101.0, False, reason="timeout")]
            )
            self.assertEqual((await self.store.get_agent(ids[1])).failed_cycles, 2)
            await self.store.record_heartbeat_results(
                [HeartbeatResult(ids[1], 102.0, True), HeartbeatResult(ids[0], 102.0, True)]
            )
            back = await self.store.get_agent(ids[1])
            self.assertEqual(
                (back.status, back.status_reason, back.failed_cycles, back.total_failures),
                ("online", None, 0, 2),
            )
            kept = await self.store.get_agent(ids[0])
            self.assertEqual(
                (kept.version, kept.details, kept.last_heartbeat), ("1.2", {"load": 0}, 102.0)
            )

        return d(go())

    def test_bad_batch_changes_nothing(self) -> Deferred[Any]:
        async def go() -> None:
            a = await self.agent(20001)
            b = await self.agent(20002)
            with self.assertRaises(ValueError):
                await self.store.record_heartbeat_results(
                    [
                        HeartbeatResult(a, 1.0, True, version="9"),
                        HeartbeatResult(b, 1.0, False, reason="x", error_kind="weird"),
                    ]
                )
            self.assertIsNone((await self.store.get_agent(a)).version)
            await self.store.record_heartbeat_results([])  # no-op
            await self.store.record_heartbeat_results(
                [HeartbeatResult(a + 1000, 1.0, True)]
            )  # deleted agent: ignored

        return d(go())


class CommandTests(StoreTestBase):
    async def command(self, aid: int | None = None, **kw: Any) -> Any:
        if aid is None:
            aid = await self.agent(20001)
        args: dict[str, Any] = dict(
            agent_id=aid, kind="command", command="echo", args=["a", "b"], timeout=5.0
        )
        args.update(kw)
        return await self.store.create_command(**args)

    def test_create_get_update(self) -> Deferred[Any]:
        async def go() -> None:
            cmd = await self.command(extra={"env": {"A": "1"}, "cwd": "/tmp"})
            self.assertRegex(cmd.command_uid, r"^[0-9a-f]{32}$")
            self.assertEqual(
                (cmd.kind, cmd.command, cmd.args, cmd.timeout, cmd.status),
                ("command", "echo", ["a", "b"], 5.0, "running"),
            )
            self.assertEqual(cmd.extra, {"env": {"A": "1"}, "cwd": "/tmp"})
            self.assertEqual((cmd.attempts, cmd.output_offset), (0, 0))
            self.assertIsNotNone(cmd.started_at)
            self.assertIsNone(cmd.finished_at)
            self.assertEqual(await self.store.get_command(cmd.id), cmd)
            await self.store.update_command(cmd.id, attempts=2)
            await self.store.update_command(
                cmd.id,
                status="failed",
                exit_code=3,
                reason="exit 3",
                result={"success": False, "return_code": 3},
                finished_at=50.0,
            )
            got = await self.store.get_command(cmd.id)
            self.assertEqual(
                (got.status, got.exit_code, got.reason, got.result, got.attempts, got.finished_at),
                ("failed", 3, "exit 3", {"success": False, "return_code": 3}, 2, 50.0),
            )
            self.assertIsNone(await self.store.get_command(cmd.id + 1))
            with self.assertRaises(NotFoundError):
                await self.store.update_command(cmd.id + 1, status="success")
            with self.assertRaises(ValueError):
                await self.store.update_command(cmd.id, status="done")

        return d(go())

    def test_create_rejects(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.agent(20001)
            with self.assertRaises(NotFoundError):
                await self.command(aid + 1)
            with self.assertRaises(ValueError):
                await self.command(aid, kind="shell")
            with self.assertRaises(ValueError):
                await self.command(aid, status="queued")
            pending = await self.command(
                aid, kind="ansible", status="pending", command="ping.yml", args=[]
            )
            self.assertIsNone(pending.started_at)
            self.assertEqual(pending.kind, "ansible")

        return d(go())

    def test_lists_and_counts(self) -> Deferred[Any]:
        async def go() -> None:
            a = await self.agent(20001)
            b = await self.agent(20002)
            c1 = await self.command(a)
            c2 = await self.command(b, status="pending")
            c3 = await self.command(a)
            await self.store.update_command(c3.id, status="success", exit_code=0)
            self.assertEqual(
                [c.id for c in await self.store.list_commands()], [c3.id, c2.id, c1.id]
            )
            self.assertEqual(
                [c.id for c in await self.store.list_commands(agent_id=a)], [c3.id, c1.id]
            )
            self.assertEqual(
                [c.id for c in await self.store.list_commands(agent_id=a, limit=1, offset=1)],
                [c1.id],
            )
            self.assertEqual(
                [c.id for c in await self.store.list_unfinished_commands()], [c1.id, c2.id]
            )
            self.assertEqual(
                await self.store.command_counts_by_status(),
                {"pending": 1, "running": 1, "success": 1, "failed": 0},
            )

        return d(go())


class OutputTests(StoreTestBase):
    async def cmd_id(self) -> int:
        aid = await self.agent(20001)
        cmd = await self.store.create_command(
            agent_id=aid, kind="command", command="x", args=[], timeout=None
        )
        return int(cmd.id)

    async def everything(self, cid: int) -> bytes:
        chunks = await self.store.read_output(cid, 0, 1 << 24)
        return b"".join(c.data for c in chunks)

    def test_idempotent_append(self) -> Deferred[Any]:
        async def go() -> None:
            cid = await self.cmd_id()
            s = self.store
            self.assertEqual(await s.append_output(cid, 0, "stdout", b"hello "), 6)
            self.assertEqual(await s.append_output(cid, 0, "stdout", b"hello "), 6)  # same range
            self.assertEqual(await s.append_output(cid, 2, "stdout", b"llo"), 6)  # inside
            self.assertEqual(await s.append_output(cid, 3, "stdout", b"lo world"), 11)  # overlap
            self.assertEqual(await s.append_output(cid, 11, "stderr", b""), 11)  # empty
            self.assertEqual(await s.append_output(cid, 11, "stderr", b"oops\n"), 16)
            self.assertEqual(await s.append_output(cid, 0, "stdout", b"hello world"), 16)
            self.assertEqual(await self.everything(cid), b"hello worldoops\n")
            self.assertEqual((await s.get_command(cid)).output_offset, 16)
            rows = await self.sql("SELECT offset, stream, data FROM command_output ORDER BY offset")
            self.assertEqual(
                rows, [(0, "stdout", b"hello "), (6, "stdout", b"world"), (11, "stderr", b"oops\n")]
            )

        return d(go())

    def test_gap_refused(self) -> Deferred[Any]:
        async def go() -> None:
            cid = await self.cmd_id()
            await self.store.append_output(cid, 0, "stdout", b"abc")
            with self.assertRaises(OutputGapError) as e:
                await self.store.append_output(cid, 4, "stdout", b"e")
            self.assertEqual((e.exception.offset, e.exception.stored_offset), (4, 3))
            self.assertEqual(await self.everything(cid), b"abc")
            self.assertEqual((await self.store.get_command(cid)).output_offset, 3)
            with self.assertRaises(NotFoundError):
                await self.store.append_output(cid + 1, 0, "stdout", b"x")
            with self.assertRaises(ValueError):
                await self.store.append_output(cid, 3, "both", b"x")
            with self.assertRaises(ValueError):
                await self.store.append_output(cid, -1, "stdout", b"x")

        return d(go())

    def test_random_redelivery_is_byte_identical(self) -> Deferred[Any]:
        """Re-sent, overlapping windows of a stream (as after a restart) store it exactly once."""

        async def go() -> None:
            cid = await self.cmd_id()
            rng = random.Random(7)
            stream = bytes(rng.getrandbits(8) for _ in range(5000))
            kinds = ["stdout" if (i // 700) % 2 == 0 else "stderr" for i in range(len(stream))]
            stored = 0
            while stored < len(stream):
                start = rng.randint(max(0, stored - 300), stored)
                end = min(len(stream), start + rng.randint(1, 400))
                # One call never spans a stream switch, as with the agent's responses.
                kind = kinds[start]
                while end > start + 1 and kinds[end - 1] != kind:
                    end -= 1
                stored = await self.store.append_output(cid, start, kind, stream[start:end])
            self.assertEqual(await self.everything(cid), stream)
            chunks = await self.store.read_output(cid, 0, 1 << 24)
            for c in chunks:
                self.assertEqual(set(kinds[c.offset : c.offset + len(c.data)]), {c.stream})

        return d(go())

    def test_read_slicing(self) -> Deferred[Any]:
        async def go() -> None:
            cid = await self.cmd_id()
            s = self.store
            await s.append_output(cid, 0, "stdout", b"0123")
            await s.append_output(cid, 4, "stdout", b"4567")
            await s.append_output(cid, 8, "stderr", b"89")
            await s.append_output(cid, 10, "stdout", b"ABCD")
            self.assertEqual(
                await s.read_output(cid),
                [
                    OutputChunk(0, "stdout", b"01234567"),
                    OutputChunk(8, "stderr", b"89"),
                    OutputChunk(10, "stdout", b"ABCD"),
                ],
            )
            self.assertEqual(
                await s.read_output(cid, 2),
                [
                    OutputChunk(2, "stdout", b"234567"),
                    OutputChunk(8, "stderr", b"89"),
                    OutputChunk(10, "stdout", b"ABCD"),
                ],
            )
            self.assertEqual(
                await s.read_output(cid, 4, 5),
                [
                    OutputChunk(4, "stdout", b"4567"),
                    OutputChunk(8, "stderr", b"8"),
                ],
            )
            self.assertEqual(await s.read_output(cid, 9, 1), [OutputChunk(9, "stderr", b"9")])
            self.assertEqual(await s.read_output(cid, 13), [OutputChunk(13, "stdout", b"D")])
            self.assertEqual(await s.read_output(cid, 14), [])
            self.assertEqual(await s.read_output(cid, 1000), [])
            self.assertEqual(await s.read_output(cid + 1), [])
            with self.assertRaises(ValueError):
                await s.read_output(cid, -1)
            with self.assertRaises(ValueError):
                await s.read_output(cid, 0, 0)

        return d(go())


class EventTests(StoreTestBase):
    def test_events_newest_first(self) -> Deferred[Any]:
        async def go() -> None:
            ids = [
                await self.store.add_event(
                    actor="api",
                    action=f"a{i}",
                    target=f"agent:{i}",
                    outcome="ok",
                    details={"i": i} if i else None,
                )
                for i in range(5)
            ]
            events = await self.store.list_events()
            self.assertEqual([e.id for e in events], ids[::-1])
            first = events[-1]
            self.assertEqual(
                (first.actor, first.action, first.target, first.outcome, first.details),
                ("api", "a0", "agent:0", "ok", None),
            )
            self.assertEqual(events[0].details, {"i": 4})
            self.assertEqual(first.at, first.created_at)
            page = await self.store.list_events(limit=2, before_id=ids[3])
            self.assertEqual([e.id for e in page], [ids[2], ids[1]])
            self.assertEqual(await self.store.list_events(before_id=ids[0]), [])

        return d(go())


AUTH = {
    "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nsecretkeymaterial",
    "passphrase": "hunter2-passphrase",
}
SUDO = {"mode": "sudo", "password": "sudo-password-xyz"}


class ServerTests(StoreTestBase):
    async def server(self, **kw: Any) -> int:
        args: dict[str, Any] = dict(
            name="web-1", host="127.0.0.1", ssh_port=2222, username="deploy", auth=AUTH, sudo=SUDO
        )
        args.update(kw)
        return int(await self.store.add_server(**args))

    def test_add_get_list_update(self) -> Deferred[Any]:
        async def go() -> None:
            sid = await self.server(host_key_fingerprint="SHA256:abc")
            other = await self.server(
                name="web-2", auth=None, sudo={"mode": "none", "password": None}
            )
            rec = await self.store.get_server(sid)
            self.assertEqual(
                (
                    rec.name,
                    rec.host,
                    rec.ssh_port,
                    rec.username,
                    rec.auth,
                    rec.sudo,
                    rec.host_key_fingerprint,
                    rec.host_key,
                    rec.status,
                ),
                ("web-1", "127.0.0.1", 2222, "deploy", AUTH, SUDO, "SHA256:abc", None, "new"),
            )
            self.assertNotIn("hunter2", repr(rec))
            self.assertNotIn("sudo-password", repr(rec))
            self.assertEqual([s.id for s in await self.store.list_servers()], [sid, other])
            self.assertIsNone((await self.store.get_server(other)).auth)
            await self.store.update_server(sid, host_key="ssh-ed25519 AAAA", status="installing")
            await self.store.update_server(sid, status_reason="step 2", auth=None)
            rec = await self.store.get_server(sid)
            self.assertEqual(
                (rec.host_key, rec.status, rec.status_reason, rec.auth),
                ("ssh-ed25519 AAAA", "installing", "step 2", None),
            )
            with self.assertRaises(ValueError):
                await self.store.update_server(sid, status="happy")
            with self.assertRaises(NotFoundError):
                await self.store.update_server(999, status="failed")
            self.assertIsNone(await self.store.get_server(999))
            with self.assertRaises(ValueError):
                await self.server(ssh_port=0)

        return d(go())

    def test_delete_cascades(self) -> Deferred[Any]:
        async def go() -> None:
            sid = await self.server()
            aid = await self.agent(20001, server_id=sid, status="installing")
            with self.assertRaises(ConflictError):
                await self.agent(20002, server_id=sid)
            self.assertEqual((await self.store.get_agent_for_server(sid)).id, aid)
            self.assertIsNone(await self.store.get_agent_for_server(sid + 1))
            iid = await self.store.start_install(sid, "install")
            await self.store.record_install_step(iid, "check", "ok")
            self.assertTrue(await self.store.delete_server(sid))
            self.assertFalse(await self.store.delete_server(sid))
            self.assertIsNone(await self.store.get_agent(aid))
            self.assertEqual(await self.sql("SELECT COUNT(*) FROM install_steps"), [(0,)])

        return d(go())

    def test_installs(self) -> Deferred[Any]:
        async def go() -> None:
            sid = await self.server()
            self.assertIsNone(await self.store.get_latest_install(sid))
            old = await self.store.start_install(sid, "install")
            await self.store.finish_install(old, "failed", "no python3")
            iid = await self.store.start_install(sid, "reinstall")
            s = self.store
            await s.record_install_step(iid, "check_target", "running")
            await s.record_install_step(iid, "check_target", "ok", log="python 3.11")
            await s.record_install_step(iid, "upload", "running", log="sending")
            await s.record_install_step(iid, "upload", "failed", error="disk full")
            await s.record_install_step(iid, "sync_tool", "skipped")
            latest = await s.get_latest_install(sid)
            self.assertEqual(
                (latest["id"], latest["kind"], latest["status"], latest["error"]),
                (iid, "reinstall", "running", None),
            )
            self.assertIsNone(latest["finished_at"])
            steps = latest["steps"]
            self.assertEqual(
                [(x["step"], x["status"], x["log"], x["error"]) for x in steps],
                [
                    ("check_target", "ok", "python 3.11", None),
                    ("upload", "failed", "sending", "disk full"),
                    ("sync_tool", "skipped", None, None),
                ],
            )
            for x in steps:
                self.assertIsNotNone(x["started_at"])
                self.assertIsNotNone(x["finished_at"])
            await s.finish_install(iid, "ok")
            latest = await s.get_latest_install(sid)
            self.assertEqual(latest["status"], "ok")
            self.assertIsNotNone(latest["finished_at"])
            with self.assertRaises(ValueError):
                await s.start_install(sid, "upgrade")
            with self.assertRaises(NotFoundError):
                await s.start_install(sid + 1, "install")
            with self.assertRaises(ValueError):
                await s.record_install_step(iid, "x", "done")
            with self.assertRaises(NotFoundError):
                await s.record_install_step(iid + 5, "x", "ok")
            with self.assertRaises(ValueError):
                await s.finish_install(iid, "running")
            with self.assertRaises(NotFoundError):
                await s.finish_install(iid + 5, "ok")

        return d(go())


class SecretsAtRestTests(StoreTestBase):
    def raw_bytes(self) -> bytes:
        data = b""
        for name in os.listdir(self.dir):
            if name.startswith("myxd.sqlite"):
                with open(os.path.join(self.dir, name), "rb") as f:
                    data += f.read()
        return data

    def test_no_plaintext_in_sqlite_files(self) -> Deferred[Any]:
        async def go() -> None:
            ident = await self.store.new_agent_identity()
            sid = await self.store.add_server(
                name="s", host="h", ssh_port=22, username="u", auth=AUTH, sudo=SUDO
            )
            await self.store.add_agent(
                host="h",
                rpc_port=ident.rpc_port,
                rpc_path=ident.rpc_path,
                token=ident.token,
                secret_key=ident.secret_key,
                cert_fingerprint=FP,
                server_id=sid,
            )
            await self.store.update_server(sid, auth={"password": "pw-plaintext-123"})
            secrets_ = [
                ident.token,
                ident.secret_key,
                "secretkeymaterial",
                "hunter2-passphrase",
                "sudo-password-xyz",
                "pw-plaintext-123",
            ]
            # While open (data in the WAL) and after a clean close (checkpointed).
            raw = self.raw_bytes()
            self.assertIn(b"SQLite format 3", raw)
            for secret in secrets_:
                self.assertNotIn(secret.encode(), raw, secret)
            await self.service.stopService()
            raw = self.raw_bytes()
            for secret in secrets_:
                self.assertNotIn(secret.encode(), raw, secret)
            # ...and they still decrypt after a restart with the same key.
            await self.open()
            rec = await self.store.get_agent_for_server(sid)
            self.assertEqual((rec.token, rec.secret_key), (ident.token, ident.secret_key))
            self.assertEqual(
                (await self.store.get_server(sid)).auth, {"password": "pw-plaintext-123"}
            )

        return d(go())

    def test_key_file_mode_and_wrong_key(self) -> Deferred[Any]:
        async def go() -> None:
            key_path = os.path.join(self.dir, "secret.key")
            self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
            aid = await self.agent(20001)
            await self.service.stopService()
            os.rename(key_path, key_path + ".old")
            await self.open()  # a new key is created...
            with self.assertRaises(SecretKeyError):  # ...and cannot read the old secrets
                await self.store.get_agent(aid)

        return d(go())

    def test_key_helpers(self) -> None:
        path = os.path.join(self.dir, "k2")
        key = load_or_create_key(path)
        self.assertEqual(load_or_create_key(path), key)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(self.dir) if n.endswith(".tmp")], [])
        os.chmod(path, 0o644)
        load_or_create_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        box = SecretBox(key)
        self.assertEqual(box.decrypt(box.encrypt("x")), "x")
        self.assertEqual(box.decrypt_json(box.encrypt_json({"a": [1]})), {"a": [1]})
        self.assertNotIn(key.decode(), repr(box))
        bad = os.path.join(self.dir, "k3")
        with open(bad, "w") as f:
            f.write("not a key")
        with self.assertRaises(SecretKeyError):
            load_or_create_key(bad)


V2_SQL = """
ALTER TABLE agents ADD COLUMN region TEXT NOT NULL DEFAULT 'unknown';
CREATE TABLE notes (id INTEGER PRIMARY KEY, agent_id INTEGER REFERENCES agents (id));
"""


class MigrationTests(StoreTestBase):
    def schema_dir(self, *extra: tuple[str, str]) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        for name in os.listdir(DEFAULT_SCHEMA_DIR):
            if name.endswith(".sql"):
                shutil.copy(os.path.join(DEFAULT_SCHEMA_DIR, name), path)
        for name, text in extra:
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
        return path

    def test_upgrade_v1_to_v2_with_backup(self) -> Deferred[Any]:
        async def go() -> None:
            aid = await self.agent(20001)
            await self.service.stopService()
            svc = await self.open(schema_dir=self.schema_dir(("002_region.sql", V2_SQL)))
            report = svc.migration
            assert report is not None
            self.assertEqual((report.from_version, report.to_version), (1, 2))
            assert report.backup_path is not None
            self.assertRegex(
                os.path.basename(report.backup_path), r"^myxd\.sqlite\.bak-v1-\d{8}T\d{6}Z$"
            )
            self.assertEqual(stat.S_IMODE(os.stat(report.backup_path).st_mode), 0o600)
            self.assertEqual(
                await self.sql("SELECT version FROM schema_version ORDER BY 1"), [(1,), (2,)]
            )
            self.assertEqual(await self.sql("SELECT region FROM agents"), [("unknown",)])
            self.assertEqual((await self.store.get_agent(aid)).token, "token-20001-secret")
            # The backup is the v1 database as it was.
            bak = sqlite3.connect(report.backup_path)
            try:
                self.assertEqual(
                    bak.execute("SELECT MAX(version) FROM schema_version").fetchone(), (1,)
                )
                self.assertEqual(bak.execute("SELECT rpc_port FROM agents").fetchall(), [(20001,)])
                cols = [r[1] for r in bak.execute("PRAGMA table_info(agents)")]
                self.assertNotIn("region", cols)
            finally:
                bak.close()

        return d(go())

    def test_failed_upgrade_rolls_back(self) -> Deferred[Any]:
        async def go() -> None:
            await self.agent(20001)
            await self.service.stopService()
            broken = self.schema_dir(
                ("002_broken.sql", "CREATE TABLE half (x INTEGER);\nTHIS IS NOT SQL;\n")
            )
            svc = StoreService(self.path, reactor, schema_dir=broken)
            svc.startService()
            self.addCleanup(self.stop, svc)
            with self.assertRaises(SchemaError) as e:
                await svc.when_ready()
            self.assertIn("002_broken.sql", str(e.exception))
            self.flushLoggedErrors(SchemaError)
            await svc.stopService()
            conn = sqlite3.connect(self.path)
            try:
                self.assertEqual(
                    conn.execute("SELECT MAX(version) FROM schema_version").fetchone(), (1,)
                )
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                self.assertNotIn("half", tables)
            finally:
                conn.close()
            # The fixed code then opens it normally.
            await self.open()

        return d(go())

    def test_newer_or_foreign_database_refused(self) -> Deferred[Any]:
        async def go() -> None:
            await self.service.stopService()
            conn = sqlite3.connect(self.path)
            conn.execute("INSERT INTO schema_version VALUES (7, 0)")
            conn.commit()
            conn.close()
            svc = StoreService(self.path, reactor)
            svc.startService()
            self.addCleanup(self.stop, svc)
            with self.assertRaises(SchemaError) as e:
                await svc.when_ready()
            self.assertIn("newer", str(e.exception))
            await svc.stopService()

            other = os.path.join(self.dir, "foreign.sqlite")
            conn = sqlite3.connect(other)
            conn.execute("CREATE TABLE stuff (x)")
            conn.commit()
            conn.close()
            svc2 = StoreService(other, reactor)
            svc2.startService()
            self.addCleanup(self.stop, svc2)
            with self.assertRaises(SchemaError):
                await svc2.when_ready()
            self.flushLoggedErrors(SchemaError)

        return d(go())

    def test_schema_files_numbered(self) -> None:
        from myxd.store.migrate import find_migrations

        gap = self.schema_dir(("003_x.sql", "SELECT 1;"))
        with self.assertRaises(SchemaError):
            find_migrations(gap)
        found = find_migrations(DEFAULT_SCHEMA_DIR)
        self.assertEqual([m.version for m in found], list(range(1, len(found) + 1)))
        self.assertTrue(all(re.search(r"/\d{3}_\w+\.sql$", m.path) for m in found))
