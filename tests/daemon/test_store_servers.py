# -*- test-case-name: tests.daemon.test_store_servers -*-
"""Server and install records on a real SQLite file."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from myxd.errors import (
    ConflictError,
    NotFoundError,
)
from tests.daemon.test_store import AUTH, SUDO, StoreTestBase, d


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
