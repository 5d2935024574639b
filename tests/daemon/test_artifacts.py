"""The daemon's artifact store on a real filesystem (and a real full tmpfs)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from myxd.artifacts.store import (
    ArtifactInvalid,
    ArtifactMismatch,
    ArtifactNotFound,
    ArtifactStore,
    ArtifactStoreFull,
    ArtifactTooLarge,
    parse_dgst,
)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


class ArtifactStoreTests(TestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="myx-artifacts-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = ArtifactStore(os.path.join(self.root, "artifacts"), 1 << 20, reactor)

    def leftovers(self) -> list[str]:
        inc = os.path.join(self.store.root, ".incoming")
        return sorted(os.listdir(inc)) if os.path.isdir(inc) else []

    def test_ingest_is_content_addressed_and_listed(self) -> Deferred[Any]:
        async def go() -> None:
            data = os.urandom(300_000)
            sha = hashlib.sha256(data).hexdigest()
            art = await self.store.ingest(io.BytesIO(data), "Xray-linux-64.zip")
            self.assertEqual((art.id, art.name, art.size), (sha, "Xray-linux-64.zip", len(data)))
            self.assertEqual(_read(self.store.path(sha)), data)
            self.assertEqual(os.stat(self.store.path(sha)).st_mode & 0o777, 0o444)
            self.assertEqual(await self.store.get(sha), art)
            self.assertEqual(await self.store.list_all(), [art])
            # The same bytes again: the same artifact, its first name and time kept.
            again = await self.store.ingest(io.BytesIO(data), "other-name.zip", sha)
            self.assertEqual(again, art)
            self.assertEqual(await self.store.list_all(), [art])
            self.assertEqual(self.leftovers(), [])

        return d(go())

    def test_expected_sha256_mismatch_keeps_nothing(self) -> Deferred[Any]:
        async def go() -> None:
            data = b"release bytes"
            with self.assertRaises(ArtifactMismatch) as cm:
                await self.store.ingest(io.BytesIO(data), "x.zip", "0" * 64)
            self.assertIn(hashlib.sha256(data).hexdigest(), str(cm.exception))
            self.assertEqual(await self.store.list_all(), [])
            self.assertEqual(self.leftovers(), [])
            with self.assertRaises(ArtifactInvalid):
                await self.store.ingest(io.BytesIO(data), "x.zip", "not-hex")

        return d(go())

    def test_over_the_limit_keeps_nothing(self) -> Deferred[Any]:
        async def go() -> None:
            with self.assertRaises(ArtifactTooLarge) as cm:
                await self.store.ingest(io.BytesIO(b"x" * ((1 << 20) + 1)), "big.zip")
            self.assertIn("artifact_max_bytes", str(cm.exception))
            self.assertEqual(await self.store.list_all(), [])
            self.assertEqual(self.leftovers(), [])
            # Exactly at the limit is fine.
            art = await self.store.ingest(io.BytesIO(b"y" * (1 << 20)), "edge.zip")
            self.assertEqual(art.size, 1 << 20)

        return d(go())

    def test_names_are_file_names(self) -> Deferred[Any]:
        async def go() -> None:
            for bad in ("", "../x", "a/b", ".hidden", "x" * 201, "sp ace"):
                with self.assertRaises(ArtifactInvalid, msg=bad):
                    await self.store.ingest(io.BytesIO(b"1"), bad)
            self.assertEqual(await self.store.list_all(), [])

        return d(go())

    def test_dgst_beside_the_archive_is_checked_both_ways(self) -> Deferred[Any]:
        async def go() -> None:
            data = b"the archive"
            sha = hashlib.sha256(data).hexdigest()
            dgst = f"MD5= 00\nSHA1= 11\nSHA2-256= {sha.upper()}\nSHA2-512= 22\n".encode()
            self.assertEqual(parse_dgst(dgst.decode()), sha)
            await self.store.ingest(io.BytesIO(dgst), "X.zip.dgst")
            # An archive that does not match the stored .dgst is refused...
            with self.assertRaises(ArtifactMismatch):
                await self.store.ingest(io.BytesIO(b"tampered"), "X.zip")
            # ...the right one is kept.
            art = await self.store.ingest(io.BytesIO(data), "X.zip")
            self.assertEqual(art.id, sha)
            # A .dgst that contradicts a stored archive is refused too.
            with self.assertRaises(ArtifactMismatch):
                await self.store.ingest(io.BytesIO(b"SHA2-256= " + b"ab" * 32), "X.zip.dgst")
            with self.assertRaises(ArtifactInvalid):
                await self.store.ingest(io.BytesIO(b"no digest here"), "Y.zip.dgst")
            self.assertEqual(len(await self.store.list_all()), 2)

        return d(go())

    def test_delete_and_unknown_ids(self) -> Deferred[Any]:
        async def go() -> None:
            art = await self.store.ingest(io.BytesIO(b"abc"), "a.zip")
            await self.store.delete(art.id)
            self.assertEqual(await self.store.list_all(), [])
            self.assertFalse(_exists(self.store.path(art.id)))
            for bad in (art.id, "zz", "../../etc/passwd"):
                with self.assertRaises(ArtifactNotFound):
                    await self.store.get(bad)
                with self.assertRaises(ArtifactNotFound):
                    await self.store.delete(bad)

        return d(go())

    def test_bytes_without_metadata_are_not_listed_and_are_repaired(self) -> Deferred[Any]:
        async def go() -> None:
            art = await self.store.ingest(io.BytesIO(b"abc"), "a.zip")
            os.unlink(self.store.path(art.id) + ".json")  # a crash between the renames
            self.assertEqual(await self.store.list_all(), [])
            again = await self.store.ingest(io.BytesIO(b"abc"), "a.zip")
            self.assertEqual(again.id, art.id)
            self.assertEqual([a.id for a in await self.store.list_all()], [art.id])

        return d(go())


class FullDiskTests(TestCase):
    """The store on a real 1 MiB tmpfs."""

    def setUp(self) -> None:
        self.mnt = tempfile.mkdtemp(prefix="myx-artifacts-full-")
        self.addCleanup(shutil.rmtree, self.mnt, True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", self.mnt], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mnt], check=False)
        self.store = ArtifactStore(os.path.join(self.mnt, "artifacts"), 64 << 20, reactor)

    def test_full_disk_is_a_clear_error_and_leaves_nothing(self) -> Deferred[Any]:
        async def go() -> None:
            with self.assertRaises(ArtifactStoreFull) as cm:
                await self.store.ingest(io.BytesIO(os.urandom(3 << 20)), "big.zip")
            self.assertIn("no space left", str(cm.exception))
            self.assertEqual(os.listdir(os.path.join(self.store.root, ".incoming")), [])
            self.assertEqual(await self.store.list_all(), [])
            # Space is back: a small upload works at once.
            art = await self.store.ingest(io.BytesIO(b"small"), "small.zip")
            self.assertEqual(await self.store.list_all(), [art])

        return d(go())
