# -*- test-case-name: tests.daemon.test_store -*-
"""The SQLite store service on a real file: opening and closing, secrets at rest,
schema upgrades with backup. The queries of each kind of record are tested in
test_store_agents, test_store_commands, test_store_events and test_store_servers."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial import unittest

from myxd.errors import (
    SchemaError,
    SecretKeyError,
    StoreError,
)
from myxd.store import StoreService
from myxd.store.crypto import SecretBox, load_or_create_key
from myxd.store.migrate import DEFAULT_SCHEMA_DIR, find_migrations

FP = "ab" * 32
AUTH = {
    "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nsecretkeymaterial",
    "passphrase": "hunter2-passphrase",
}
SUDO = {"mode": "sudo", "password": "sudo-password-xyz"}


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
            self.assertEqual(await self.sql("SELECT MAX(version) FROM schema_version"), [(LATEST,)])
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
            self.assertEqual(
                (svc.migration.from_version, svc.migration.to_version), (LATEST, LATEST)
            )
            self.assertIsNone(svc.migration.backup_path)
            rec = await self.store.get_agent(aid)
            self.assertEqual(rec.token, "token-20001-secret")
            self.assertEqual([n for n in os.listdir(self.dir) if ".bak-" in n], [])

        return d(go())

    def test_not_started(self) -> Deferred[Any]:
        svc = StoreService(os.path.join(self.dir, "other.sqlite"), reactor)
        return self.assertFailure(svc.store.get_agent(1), StoreError)

    def test_closed(self) -> Deferred[Any]:
        async def go() -> None:
            pending = self.store.add_event(actor="t", action="a", target=None, outcome="ok")
            await self.service.stopService()
            self.assertGreater(await pending, 0)  # in-flight work finished before close
            with self.assertRaises(StoreError):
                await self.store.get_agent(1)

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


# The shipped schema's version, and the one a test's extra migration takes.
LATEST = len(find_migrations(DEFAULT_SCHEMA_DIR))
NEXT = LATEST + 1

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
            svc = await self.open(schema_dir=self.schema_dir((f"{NEXT:03d}_region.sql", V2_SQL)))
            report = svc.migration
            assert report is not None
            self.assertEqual((report.from_version, report.to_version), (LATEST, NEXT))
            assert report.backup_path is not None
            self.assertRegex(
                os.path.basename(report.backup_path),
                rf"^myxd\.sqlite\.bak-v{LATEST}-\d{{8}}T\d{{6}}Z$",
            )
            self.assertEqual(stat.S_IMODE(os.stat(report.backup_path).st_mode), 0o600)
            self.assertEqual(
                await self.sql("SELECT version FROM schema_version ORDER BY 1"),
                [(v,) for v in range(1, NEXT + 1)],
            )
            self.assertEqual(await self.sql("SELECT region FROM agents"), [("unknown",)])
            self.assertEqual((await self.store.get_agent(aid)).token, "token-20001-secret")
            # The backup is the v1 database as it was.
            bak = sqlite3.connect(report.backup_path)
            try:
                self.assertEqual(
                    bak.execute("SELECT MAX(version) FROM schema_version").fetchone(), (LATEST,)
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
                (f"{NEXT:03d}_broken.sql", "CREATE TABLE half (x INTEGER);\nTHIS IS NOT SQL;\n")
            )
            svc = StoreService(self.path, reactor, schema_dir=broken)
            svc.startService()
            self.addCleanup(self.stop, svc)
            with self.assertRaises(SchemaError) as e:
                await svc.when_ready()
            self.assertIn(f"{NEXT:03d}_broken.sql", str(e.exception))
            self.flushLoggedErrors(SchemaError)
            await svc.stopService()
            conn = sqlite3.connect(self.path)
            try:
                self.assertEqual(
                    conn.execute("SELECT MAX(version) FROM schema_version").fetchone(), (LATEST,)
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

        gap = self.schema_dir((f"{NEXT + 1:03d}_x.sql", "SELECT 1;"))
        with self.assertRaises(SchemaError):
            find_migrations(gap)
        found = find_migrations(DEFAULT_SCHEMA_DIR)
        self.assertEqual([m.version for m in found], list(range(1, len(found) + 1)))
        self.assertTrue(all(re.search(r"/\d{3}_\w+\.sql$", m.path) for m in found))


class PhantomAgentMigrationTests(StoreTestBase):
    """Schema 003 (issue #9) upgrades a database at schema 002 that holds
    phantom agents: rows whose install never finished (no certificate
    fingerprint), left by failed adds."""

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "myxd.sqlite")
        v2 = os.path.abspath(self.mktemp())
        os.makedirs(v2)
        for name in ("001_initial.sql", "002_deployments.sql"):
            shutil.copy(os.path.join(DEFAULT_SCHEMA_DIR, name), v2)
        return d(self.open(schema_dir=v2))

    def test_phantoms_dropped_commands_kept_new_statuses_allowed(self) -> Deferred[Any]:
        async def go() -> None:
            self.assertEqual(await self.sql("SELECT MAX(version) FROM schema_version"), [(2,)])
            for sid, name, status in ((1, "good", "installed"), (2, "typo", "failed")):
                await self.sql(
                    "INSERT INTO servers (id, name, host, ssh_port, username, sudo_enc,"
                    " status, created_at, updated_at) VALUES (?, ?, '127.0.0.1', 22, 'u',"
                    " x'00', ?, 0, 0)",
                    sid,
                    name,
                    status,
                )
            for aid, sid, port, fp, status in (
                (1, 1, 20001, FP, "online"),
                (2, 2, 20002, "", "offline"),  # the phantom of the failed add
            ):
                await self.sql(
                    "INSERT INTO agents (id, server_id, host, rpc_port, rpc_path, token_enc,"
                    " secret_key_enc, cert_fingerprint, status, created_at, updated_at)"
                    " VALUES (?, ?, '127.0.0.1', ?, 'p', x'00', x'00', ?, ?, 0, 0)",
                    aid,
                    sid,
                    port,
                    fp,
                    status,
                )
            for cid, aid in ((1, 1), (2, 2)):
                await self.sql(
                    "INSERT INTO agent_commands (id, agent_id, command_uid, kind, command,"
                    " args, status, created_at, updated_at)"
                    " VALUES (?, ?, ?, 'command', 'uname', '[\"-a\"]', 'failed', 0, 0)",
                    cid,
                    aid,
                    f"uid-{cid}",
                )
                await self.sql(
                    "INSERT INTO command_output (command_id, offset, stream, data)"
                    " VALUES (?, 0, 'stdout', x'6869')",
                    cid,
                )
            await self.service.stopService()
            await self.open()  # the shipped schema: 003 (and what follows) applies
            self.assertEqual(await self.sql("SELECT MAX(version) FROM schema_version"), [(LATEST,)])
            self.assertEqual(await self.sql("SELECT id FROM agents"), [(1,)])
            self.assertEqual(
                await self.sql("SELECT id, agent_id, command, args FROM agent_commands"),
                [(1, 1, "uname", '["-a"]')],
            )
            self.assertEqual(await self.sql("SELECT command_id FROM command_output"), [(1,)])
            # Both servers stay: the failed one shows its install error, not an agent.
            self.assertEqual(
                await self.sql("SELECT id, tags FROM servers ORDER BY id"), [(1, ""), (2, "")]
            )
            self.assertEqual(await self.sql("PRAGMA foreign_key_check"), [])
            await self.store.update_command(1, status="cancelled")
            await self.store.update_command(1, status="timed_out")
            with self.assertRaises(sqlite3.IntegrityError):
                await self.sql("UPDATE agent_commands SET status = 'bogus' WHERE id = 1")

        return d(go())


class StableIdMigrationTests(StoreTestBase):
    """Schema 004: a database at schema 003 keeps every row and link, and from
    then on a deleted server's, agent's or command's id is never handed out
    again (INTEGER PRIMARY KEY alone reuses the highest one)."""

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "myxd.sqlite")
        v3 = os.path.abspath(self.mktemp())
        os.makedirs(v3)
        for name in ("001_initial.sql", "002_deployments.sql", "003_operator.sql"):
            shutil.copy(os.path.join(DEFAULT_SCHEMA_DIR, name), v3)
        return d(self.open(schema_dir=v3))

    async def add_server(self, name: str, sid: int | None = None) -> int:
        await self.sql(
            "INSERT INTO servers (id, name, host, ssh_port, username, sudo_enc, status,"
            " created_at, updated_at, tags) VALUES (?, ?, '127.0.0.1', 22, 'u', x'00',"
            " 'installed', 0, 0, ',de,')",
            sid,
            name,
        )
        return int((await self.sql("SELECT MAX(id) FROM servers"))[0][0])

    async def add_agent(self, sid: int, port: int) -> int:
        await self.sql(
            "INSERT INTO agents (server_id, host, rpc_port, rpc_path, token_enc,"
            " secret_key_enc, cert_fingerprint, status, created_at, updated_at, name, tags)"
            " VALUES (?, '127.0.0.1', ?, 'p', x'00', x'00', ?, 'online', 0, 0, 'n', '')",
            sid,
            port,
            FP,
        )
        return int((await self.sql("SELECT MAX(id) FROM agents"))[0][0])

    async def add_command(self, aid: int, uid: str) -> int:
        await self.sql(
            "INSERT INTO agent_commands (agent_id, command_uid, kind, command, args, status,"
            " created_at, updated_at) VALUES (?, ?, 'command', 'true', '[]', 'cancelled', 0, 0)",
            aid,
            uid,
        )
        cid = int((await self.sql("SELECT MAX(id) FROM agent_commands"))[0][0])
        await self.sql(
            "INSERT INTO command_output (command_id, offset, stream, data)"
            " VALUES (?, 0, 'stdout', x'6869')",
            cid,
        )
        return cid

    def test_rows_kept_and_ids_never_reused(self) -> Deferred[Any]:
        async def go() -> None:
            self.assertEqual(await self.sql("SELECT MAX(version) FROM schema_version"), [(3,)])
            s1, s2 = await self.add_server("one"), await self.add_server("two")
            a1, a2 = await self.add_agent(s1, 20001), await self.add_agent(s2, 20002)
            c1, c2 = await self.add_command(a1, "u1"), await self.add_command(a2, "u2")
            # Under schema 003, deleting the newest server hands its id out again:
            # the bug this migration fixes.
            s3 = await self.add_server("three")
            await self.sql("DELETE FROM servers WHERE id = ?", s3)
            self.assertEqual(await self.add_server("again"), s3)
            await self.sql("DELETE FROM servers WHERE id = ?", s3)
            snapshot = [
                "SELECT * FROM servers ORDER BY 1",
                "SELECT * FROM agents ORDER BY 1",
                "SELECT * FROM agent_commands ORDER BY 1",
                "SELECT * FROM command_output ORDER BY 1",
            ]
            before = {q: await self.sql(q) for q in snapshot}
            await self.service.stopService()
            await self.open()  # the shipped schema: 004 applies
            self.assertEqual(await self.sql("SELECT MAX(version) FROM schema_version"), [(LATEST,)])
            for query, rows in before.items():
                self.assertEqual(await self.sql(query), rows)
            self.assertEqual(await self.sql("PRAGMA foreign_key_check"), [])
            # The indexes came back with their tables.
            indexes = {
                r[0] for r in await self.sql("SELECT name FROM sqlite_master WHERE type = 'index'")
            }
            for name in ("agents_status", "agent_commands_agent", "agent_commands_created"):
                self.assertIn(name, indexes)
            # Cascades still work after the rebuild: the server takes its agent,
            # the agent its commands and their output.
            await self.sql("DELETE FROM servers WHERE id = ?", s2)
            self.assertEqual(await self.sql("SELECT id FROM agents"), [(a1,)])
            self.assertEqual(await self.sql("SELECT id FROM agent_commands"), [(c1,)])
            self.assertEqual(await self.sql("SELECT command_id FROM command_output"), [(c1,)])
            # The newest ids were deleted (s2, a2, c2): new rows get fresh ones.
            s4 = await self.add_server("four")
            self.assertGreater(s4, s2)
            a4 = await self.add_agent(s4, 20004)
            self.assertGreater(a4, a2)
            self.assertGreater(await self.add_command(a4, "u4"), c2)
            # An explicit id is still taken as given (tests and imports use them).
            self.assertEqual(await self.add_server("ten", 10), 10)

        return d(go())
