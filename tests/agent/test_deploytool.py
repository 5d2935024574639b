"""sync_deployment_tool: real tar.gz archives, real files, the reactor's threads."""

import hashlib
import io
import os
import stat
import tarfile
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from myx_agent import deploytool
from myx_agent.deploytool import (
    HASH_FILE,
    read_deployment_tool_version,
    sync_deployment_tool,
)
from myx_agent.errors import INVALID_PARAMS, SYNC_FAILED, RPCError

Entry = Tuple[str, str, Any]  # (kind, name, payload)


def make_archive(entries: List[Entry]) -> bytes:
    """kind: "file" (payload bytes or (bytes, mode)), "dir", "symlink" (target),
    "hardlink" (target), "fifo"."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for kind, name, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data, mode = payload if isinstance(payload, tuple) else (payload, 0o644)
                info.size = len(data)
                info.mode = mode
                tf.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = payload
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tf.addfile(info)
    return buf.getvalue()


def tool_entries(version: str = "1.0.0", extra: Optional[List[Entry]] = None) -> List[Entry]:
    entries: List[Entry] = [
        ("file", "VERSION", version.encode() + b"\n"),
        ("dir", "playbooks", None),
        ("file", "playbooks/ping.yml", b"- hosts: localhost\n"),
        ("file", "scripts/run.sh", (b"#!/bin/sh\necho hi\n", 0o4777)),
        ("file", "inventory/localhost.ini", b"localhost ansible_connection=local\n"),
        ("symlink", "playbooks/alias.yml", "ping.yml"),
    ]
    return entries + (extra or [])


def exists(path: str) -> bool:
    return os.path.exists(path)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(root: str) -> Dict[str, Any]:
    """Every path under root with its content, link target or 'dir'."""
    out: Dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


class SyncTests(unittest.TestCase):
    def setUp(self) -> None:
        self.parent = os.path.abspath(self.mktemp())
        os.makedirs(self.parent)
        self.tool = os.path.join(self.parent, "myx-deployment-tool")

    def sync(
        self, archive: bytes, digest: Optional[str] = None, version: str = "1.0.0"
    ) -> Deferred:
        return sync_deployment_tool(
            self.tool, archive, digest if digest is not None else sha(archive), version
        )

    async def rejected(self, d: Deferred, code: int = SYNC_FAILED) -> RPCError:
        try:
            await d
        except RPCError as e:
            self.assertEqual(e.code, code, e.message)
            return e
        raise AssertionError("expected an RPCError")

    def leftovers(self) -> List[str]:
        return sorted(n for n in os.listdir(self.parent) if ".new-" in n or ".old-" in n)

    async def test_install_then_skip_then_update(self) -> None:
        self.assertIsNone(read_deployment_tool_version(self.tool))
        archive = make_archive(tool_entries())
        self.assertEqual(await self.sync(archive), {"changed": True, "version": "1.0.0"})
        self.assertEqual(read_deployment_tool_version(self.tool), "1.0.0")
        ping = read_bytes(os.path.join(self.tool, "playbooks", "ping.yml"))
        self.assertEqual(ping, b"- hosts: localhost\n")
        self.assertEqual(os.readlink(os.path.join(self.tool, "playbooks", "alias.yml")), "ping.yml")
        # Modes come from us, not the archive: no setuid, no world-writable.
        mode = stat.S_IMODE(os.stat(os.path.join(self.tool, "scripts", "run.sh")).st_mode)
        self.assertEqual(mode, 0o755)
        mode = stat.S_IMODE(os.stat(os.path.join(self.tool, "VERSION")).st_mode)
        self.assertEqual(mode, 0o644)
        self.assertEqual(
            read_bytes(os.path.join(self.tool, HASH_FILE)).strip().decode(), sha(archive)
        )

        # Same version and hash: nothing is touched.
        before = os.stat(self.tool).st_ino
        self.assertEqual(await self.sync(archive), {"changed": False, "version": "1.0.0"})
        self.assertEqual(os.stat(self.tool).st_ino, before)

        # A new version replaces the whole tree (a removed file is gone).
        entries = [e for e in tool_entries("1.1.0") if e[1] != "scripts/run.sh"]
        archive2 = make_archive(entries + [("file", "playbooks/new.yml", b"new\n")])
        result = await self.sync(archive2, version="1.1.0")
        self.assertEqual(result, {"changed": True, "version": "1.1.0"})
        self.assertEqual(read_deployment_tool_version(self.tool), "1.1.0")
        self.assertFalse(exists(os.path.join(self.tool, "scripts", "run.sh")))
        self.assertTrue(exists(os.path.join(self.tool, "playbooks", "new.yml")))
        self.assertEqual(self.leftovers(), [])

    async def test_same_version_different_archive_is_installed(self) -> None:
        await self.sync(make_archive(tool_entries()))
        changed = make_archive(tool_entries(extra=[("file", "extra.txt", b"x")]))
        self.assertEqual((await self.sync(changed))["changed"], True)
        self.assertTrue(exists(os.path.join(self.tool, "extra.txt")))

    async def test_wrapping_directory_is_accepted(self) -> None:
        entries = [(k, "deployment-tool/" + n, p) for k, n, p in tool_entries()]
        entries.insert(0, ("dir", "deployment-tool", None))
        await self.sync(make_archive(entries))
        self.assertEqual(read_deployment_tool_version(self.tool), "1.0.0")
        self.assertTrue(exists(os.path.join(self.tool, "playbooks", "ping.yml")))
        entries = [(k, "./" + n, p) for k, n, p in tool_entries()]
        await self.sync(make_archive(entries + [("file", "./x", b"")]))
        self.assertTrue(exists(os.path.join(self.tool, "x")))

    async def test_sha_mismatch_keeps_old_tree(self) -> None:
        await self.sync(make_archive(tool_entries()))
        before = snapshot(self.tool)
        archive = make_archive(tool_entries("2.0.0"))
        err = await self.rejected(self.sync(archive, digest="0" * 64, version="2.0.0"))
        self.assertIn("sha256 mismatch", err.message)
        self.assertEqual(snapshot(self.tool), before)
        await self.rejected(self.sync(archive, digest="xyz", version="2.0.0"), INVALID_PARAMS)

    async def test_unsafe_members_are_rejected_and_nothing_escapes(self) -> None:
        await self.sync(make_archive(tool_entries()))
        before = snapshot(self.tool)
        outside_before = sorted(os.listdir(self.parent))
        cases: List[List[Entry]] = [
            [("file", "../evil", b"x")],
            [("file", "playbooks/../../evil", b"x")],
            [("file", "/tmp/evil-abs", b"x")],
            [("symlink", "link", "/etc")],
            [("symlink", "link", "../..")],
            [("symlink", "playbooks/link", "../../evil")],
            # Lexically inside, really outside: d -> . then e -> d/.. (= parent).
            [("symlink", "d", "."), ("symlink", "e", "d/..")],
            # Files come before links, so "e/evil" makes e a real directory
            # and the link "e" conflicts instead of being written through.
            [("file", "e/evil", b"x"), ("symlink", "e", "playbooks")],
            # A link below a link that leaves the tree is never created.
            [("symlink", "d", "."), ("symlink", "e", "d/.."), ("symlink", "e/f", "x")],
            [("hardlink", "hard", "VERSION")],
            [("fifo", "pipe", None)],
            [("file", "VERSION", b"dup\n")],
        ]
        for extra in cases:
            archive = make_archive(tool_entries("3.0.0", extra))
            err = await self.rejected(self.sync(archive, version="3.0.0"))
            self.assertIn("rejected", err.message)
            self.assertEqual(snapshot(self.tool), before, extra)
            self.assertEqual(sorted(os.listdir(self.parent)), outside_before, extra)
        self.assertFalse(exists(os.path.join(os.path.dirname(self.parent), "evil")))
        self.assertFalse(exists("/tmp/evil-abs"))

    async def test_bad_archives(self) -> None:
        err = await self.rejected(self.sync(b"not a tarball"))
        self.assertIn("tar.gz", err.message)
        good = make_archive(tool_entries())
        await self.rejected(self.sync(good[: len(good) // 2]))
        no_version = make_archive([("file", "playbooks/x.yml", b"x")])
        err = await self.rejected(self.sync(no_version))
        self.assertIn("VERSION", err.message)
        err = await self.rejected(self.sync(good, version="9.9.9"))
        self.assertIn("expected '9.9.9'", err.message)
        self.assertFalse(exists(self.tool))
        self.assertEqual(self.leftovers(), [])

    async def test_swap_without_rename_exchange(self) -> None:
        """Filesystems without RENAME_EXCHANGE fall back to two renames."""
        self.patch(deploytool, "_rename_exchange", lambda a, b: False)
        await self.sync(make_archive(tool_entries()))
        await self.sync(make_archive(tool_entries("1.2.0")), version="1.2.0")
        self.assertEqual(read_deployment_tool_version(self.tool), "1.2.0")
        self.assertEqual(self.leftovers(), [])

    async def test_swap_is_an_exchange(self) -> None:
        """The installed path is never missing: the new tree takes its place by
        exchange, and a process inside the old tree keeps a consistent view."""
        await self.sync(make_archive(tool_entries()))
        old_fd = os.open(self.tool, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, old_fd)
        seen = []
        real = deploytool._rename_exchange

        def spy(a: str, b: str) -> bool:
            ok = real(a, b)
            seen.append((ok, os.path.isdir(b)))
            return ok

        self.patch(deploytool, "_rename_exchange", spy)
        await self.sync(make_archive(tool_entries("1.3.0")), version="1.3.0")
        self.assertEqual(seen, [(True, True)])
        self.assertEqual(read_deployment_tool_version(self.tool), "1.3.0")
        self.assertEqual(self.leftovers(), [])

    async def test_stale_temporary_trees_are_cleaned(self) -> None:
        stale = os.path.join(self.parent, ".myx-deployment-tool.new-deadbeef")
        os.makedirs(os.path.join(stale, "x"))
        await self.sync(make_archive(tool_entries()))
        self.assertEqual(self.leftovers(), [])
