# -*- test-case-name: tests.daemon.test_store_agents -*-
"""Agent records on a real SQLite file: adoption, identities, status, bulk heartbeats."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred

from myxd import identity
from myxd.errors import (
    ConflictError,
    NotFoundError,
)
from myxd.store import HeartbeatResult
from myxd.store import agents as agents_module
from tests.daemon.test_store import FP, StoreTestBase, d


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
            real = agents_module.new_identity

            def spy(taken: Any, rng: Any = None) -> identity.AgentIdentity:
                for port in (20001, 20002):
                    answers.append((port, taken(port)))
                return real(taken, rng)

            self.patch(agents_module, "new_identity", spy)
            ident = await self.store.new_agent_identity()
            self.assertEqual(answers, [(20001, True), (20002, False)])
            answers.clear()

            def spy2(taken: Any, rng: Any = None) -> identity.AgentIdentity:
                answers.append((ident.rpc_port, taken(ident.rpc_port)))
                return real(taken, rng)

            self.patch(agents_module, "new_identity", spy2)
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


class SearchTests(StoreTestBase):
    """Names, tags and search (issue #9)."""

    def test_names_tags_search_and_no_phantoms(self) -> Deferred[Any]:
        async def go() -> None:
            sid = await self.store.add_server(
                name="Berlin-1",
                host="10.0.0.5",
                ssh_port=22,
                username="root",
                auth=None,
                sudo={"mode": "none"},
            )
            await self.store.update_server(sid, tags=["DE", "edge", "de"])
            linked = await self.agent(20001, server_id=sid, host="10.0.0.5")
            adopted = await self.agent(20002, name="caddy box", tags=["caddy"])
            bare = await self.agent(20003, host="127.0.0.9")
            await self.agent(20004, cert_fingerprint="", status="installing")  # never installed
            server = await self.store.get_server(sid)
            self.assertEqual(server.tags, ("de", "edge"))
            a = await self.store.get_agent(linked)
            self.assertEqual((a.name, a.tags, a.own_tags), ("Berlin-1", ("de", "edge"), ()))
            b = await self.store.get_agent(adopted)
            self.assertEqual((b.name, b.tags), ("caddy box", ("caddy",)))
            self.assertEqual((await self.store.get_agent(bare)).name, "127.0.0.9")

            async def ids(**kw: Any) -> tuple[list[int], int]:
                rows, total = await self.store.search_agents(**kw)
                return [r.id for r in rows], total

            self.assertEqual(await ids(), ([linked, adopted, bare], 3))
            self.assertEqual(await ids(q="berlin"), ([linked], 1))
            self.assertEqual(await ids(q="127.0.0.9"), ([bare], 1))
            self.assertEqual(await ids(q="%"), ([], 0))
            self.assertEqual(await ids(tag="de"), ([linked], 1))
            self.assertEqual(await ids(tag="CADDY"), ([adopted], 1))
            self.assertEqual(await ids(tag="d"), ([], 0))
            self.assertEqual(await ids(limit=1, offset=1), ([adopted], 3))
            await self.store.update_agent(adopted, name="renamed", tags=["x"])
            b = await self.store.get_agent(adopted)
            self.assertEqual((b.name, b.tags), ("renamed", ("x",)))

        return d(go())
