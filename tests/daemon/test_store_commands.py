# -*- test-case-name: tests.daemon.test_store_commands -*-
"""Command records and their output on a real SQLite file: idempotent appends, reads."""

from __future__ import annotations

import json
import random
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred

from myxd.errors import (
    NotFoundError,
    OutputGapError,
)
from myxd.store import OutputChunk
from tests.daemon.test_store import StoreTestBase, d


class CommandTests(StoreTestBase):
    async def command(self, aid: int | None = None, **kw: Any) -> Any:
        if aid is None:
            aid = await self.agent(20001)
        args: dict[str, Any] = dict(
            agent_id=aid, kind="command", command="echo", args=["a", "b"], timeout=5.0
        )
        args.update(kw)
        return await self.store.create_command(**args)

    def test_env_values_are_stored_encrypted(self) -> Deferred[Any]:
        async def go() -> None:
            secret = "s3cr3t-env-value-0123456789"
            cmd = await self.command(extra={"env": {"DB_PASSWORD": secret}, "cwd": "/srv"})
            self.assertEqual(cmd.extra, {"env": {"DB_PASSWORD": secret}, "cwd": "/srv"})
            self.assertEqual(await self.store.get_command(cmd.id), cmd)
            rec, _ = await self.store.read_command_output(cmd.id)
            self.assertEqual(rec.extra["env"], {"DB_PASSWORD": secret})
            self.assertEqual([c.extra for c in await self.store.list_commands()], [cmd.extra])
            conn = sqlite3.connect(self.path)
            try:
                (raw,) = conn.execute(
                    "SELECT extra FROM agent_commands WHERE id = ?", (cmd.id,)
                ).fetchone()
                everything = "\n".join(conn.iterdump())
            finally:
                conn.close()
            # The name stays readable, the value is in no row of the file's dump.
            stored = json.loads(raw)
            self.assertEqual(stored["cwd"], "/srv")
            self.assertEqual(list(stored["env_enc"]), ["DB_PASSWORD"])
            self.assertNotIn("env", stored)
            self.assertNotIn(secret, raw)
            self.assertNotIn(secret, everything)

        return d(go())

    def test_plain_env_rows_of_older_versions_still_read(self) -> Deferred[Any]:
        async def go() -> None:
            cmd = await self.command()
            conn = sqlite3.connect(self.path)
            try:
                conn.execute(
                    "UPDATE agent_commands SET extra = ? WHERE id = ?",
                    (json.dumps({"env": {"A": "1"}}), cmd.id),
                )
                conn.commit()
            finally:
                conn.close()
            self.assertEqual((await self.store.get_command(cmd.id)).extra, {"env": {"A": "1"}})

        return d(go())

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
                {
                    "pending": 1,
                    "running": 1,
                    "success": 1,
                    "failed": 0,
                    "cancelled": 0,
                    "timed_out": 0,
                },
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


class CommandSearchTests(StoreTestBase):
    """The commands list with filters (issue #9)."""

    def test_filters_total_and_agent_name(self) -> Deferred[Any]:
        async def go() -> None:
            a1 = await self.agent(20001, name="alpha")
            a2 = await self.agent(20002, host="127.0.0.7")
            c1 = await self.store.create_command(
                agent_id=a1, kind="command", command="uname", args=["-a"], timeout=None
            )
            c2 = await self.store.create_command(
                agent_id=a2,
                kind="command",
                command="sh",
                args=["-c", "df | grep 100%"],
                timeout=None,
            )
            c3 = await self.store.create_command(
                agent_id=a2, kind="ansible", command="site.yml", args=[], timeout=None
            )
            await self.store.update_command(c1.id, status="cancelled")
            await self.store.update_command(c2.id, status="timed_out")

            async def ids(**kw: Any) -> tuple[list[int], int]:
                rows, total = await self.store.search_commands(**kw)
                return [r.id for r in rows], total

            self.assertEqual(await ids(), ([c3.id, c2.id, c1.id], 3))
            self.assertEqual(await ids(agent_id=a2), ([c3.id, c2.id], 2))
            self.assertEqual(await ids(status="cancelled"), ([c1.id], 1))
            self.assertEqual(await ids(kind="ansible"), ([c3.id], 1))
            self.assertEqual(await ids(q="100%"), ([c2.id], 1))
            self.assertEqual(await ids(q="UNAME"), ([c1.id], 1))
            self.assertEqual(await ids(limit=1, offset=1), ([c2.id], 3))
            self.assertEqual(await ids(since=c3.created_at + 1), ([], 0))
            self.assertEqual(await ids(until=c1.created_at), ([c1.id], 1))
            rec = await self.store.get_command(c1.id)
            self.assertEqual((rec.status, rec.agent_name), ("cancelled", "alpha"))
            self.assertEqual((await self.store.get_command(c2.id)).agent_name, "127.0.0.7")

        return d(go())
