"""Hostile deployment-tool archives over the real agent RPC (issue #12 §3, Archives).

A real agent process is sent, through ``sync_deployment_tool`` over pinned TLS,
archives holding ``../`` paths, absolute paths, symlinks and hard links out of
the tree, character and block devices, a FIFO, and a decompression bomb (a few
hundred KiB that inflate past the agent's 256 MiB limit). Each one must be
refused with the exact error code (-32010, "archive rejected"), the installed
tree must be unchanged, nothing may appear outside it, and the agent answers
``health_check`` after each one. The unit tests in tests/agent/test_deploytool.py
pin the same rules on the function; this runs them through the process.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import tarfile
from typing import Any

from twisted.trial.unittest import TestCase

from myx_agent.deploytool import MAX_TOTAL_BYTES
from myx_agent.errors import SYNC_FAILED
from tests.agent.test_deploytool import Entry, exists, make_archive, snapshot, tool_entries
from tests.support.agent_process import RunningAgent, start_agent
from tests.support.pinned_client import AgentRPCError

SYNC_FAILED_CODE = -32010


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces (the bomb is never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tf:
            info = tarfile.TarInfo("VERSION")
            info.size = 6
            tf.addfile(info, io.BytesIO(b"6.6.6\n"))
            info = tarfile.TarInfo("playbooks/huge.bin")
            info.size = size
            tf.addfile(info, io.BufferedReader(Zeros(size)))
    return buf.getvalue()


def device_archive(kind: bytes) -> bytes:
    entries = tool_entries("6.6.6")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for entry in entries:
            one = tarfile.open(fileobj=io.BytesIO(make_archive([entry])), mode="r:gz")
            member = one.getmembers()[0]
            tf.addfile(member, one.extractfile(member) if member.isreg() else None)
        info = tarfile.TarInfo("playbooks/dev")
        info.type = kind
        info.devmajor, info.devminor = (1, 3) if kind == tarfile.CHRTYPE else (7, 0)
        tf.addfile(info)
    return buf.getvalue()


class HostileArchiveTests(TestCase):
    async def sync(self, agent: RunningAgent, archive: bytes, version: str) -> Any:
        return await agent.call(
            "sync_deployment_tool",
            {
                "archive": base64.b64encode(archive).decode(),
                "sha256": hashlib.sha256(archive).hexdigest(),
                "version": version,
            },
        )

    async def test_hostile_archives_are_refused_and_nothing_escapes(self) -> None:
        self.assertEqual(SYNC_FAILED, SYNC_FAILED_CODE)
        agent = await start_agent(self)
        good = make_archive(tool_entries("1.0.0"))
        self.assertEqual(
            await self.sync(agent, good, "1.0.0"), {"changed": True, "version": "1.0.0"}
        )
        tool = agent.deployment_tool_dir
        parent = os.path.dirname(tool)
        before = snapshot(tool)
        outside = snapshot(agent.base_dir)
        for rel in list(outside):
            # The agent's own files change on their own (log, state); the check
            # is on paths appearing, and on the tree itself.
            outside[rel] = None
        escapes: list[Entry] = [
            ("file", "../evil", b"x"),
            ("file", "playbooks/../../evil", b"x"),
            ("file", os.path.join(parent, "evil-abs"), b"x"),
            ("file", "/tmp/myx-evil-abs", b"x"),
            ("symlink", "link", "/etc"),
            ("symlink", "playbooks/link", "../../evil"),
            ("hardlink", "hard", "/etc/passwd"),
            ("hardlink", "hard", "../outside"),
            ("fifo", "pipe", None),
        ]
        archives: list[tuple[str, bytes]] = [
            (repr(e), make_archive(tool_entries("6.6.6", [e]))) for e in escapes
        ]
        archives.append(("character device", device_archive(tarfile.CHRTYPE)))
        archives.append(("block device", device_archive(tarfile.BLKTYPE)))
        bomb_archive = bomb(MAX_TOTAL_BYTES + (16 << 20))
        self.assertLess(len(bomb_archive), 1 << 20)
        archives.append(("decompression bomb", bomb_archive))
        refused = 0
        for what, archive in archives:
            with self.assertRaises(AgentRPCError, msg=what) as ctx:
                await self.sync(agent, archive, "6.6.6")
            self.assertEqual(ctx.exception.code, SYNC_FAILED_CODE, (what, ctx.exception))
            self.assertIn("archive rejected", str(ctx.exception.message), what)
            self.assertEqual(snapshot(tool), before, what)
            now = {rel: None for rel in snapshot(agent.base_dir)}
            self.assertEqual(sorted(set(now) - set(outside)), [], what)
            self.assertEqual(await agent.call("health_check"), {"status": "ok"}, what)
            refused += 1
        self.assertEqual(refused, len(archives))
        self.assertFalse(exists("/tmp/myx-evil-abs"))
        self.assertFalse(exists(os.path.join(parent, "evil-abs")))
        self.assertFalse(exists(os.path.join(os.path.dirname(parent), "evil")))
        status = await agent.call("get_status")
        self.assertEqual(status["deployment_tool_version"], "1.0.0")
        self.assertNotIn("Traceback", agent.log_text())
