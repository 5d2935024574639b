"""The agent's artifact cache, in process on a real filesystem.

The RPC surface (``artifact_status``, ``put_artifact_chunk`` over TLS on a real
agent process) is tested with the method table; here: order, resume,
verification, eviction and confinement.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from myx_agent.artifacts import MAX_CHUNK_BYTES, ArtifactCache
from myx_agent.errors import ARTIFACT_REJECTED, INVALID_PARAMS, RPCError


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _listdir(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def chunks(data: bytes, size: int = MAX_CHUNK_BYTES) -> list[tuple[int, bytes]]:
    return [(o, data[o : o + size]) for o in range(0, len(data), size)]


class ArtifactCacheTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="myx-agent-artifacts-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cache = self.new_cache(64 << 20)

    def new_cache(self, max_bytes: int) -> ArtifactCache:
        return ArtifactCache(os.path.join(self.dir, "artifacts"), max_bytes, reactor)

    async def send(
        self, cache: ArtifactCache, data: bytes, order: list[tuple[int, bytes]] | None = None
    ) -> dict[str, Any]:
        sha = hashlib.sha256(data).hexdigest()
        last: dict[str, Any] = {}
        for off, part in order if order is not None else chunks(data):
            last = await cache.put_chunk(sha, len(data), off, part)
        return last

    def test_in_order_transfer_verifies_and_lands(self) -> Deferred[Any]:
        async def go() -> None:
            data = os.urandom(3 * MAX_CHUNK_BYTES + 1234)
            sha = hashlib.sha256(data).hexdigest()
            self.assertEqual(
                await self.cache.status(sha, len(data)), {"present": False, "offset": 0}
            )
            result = await self.send(self.cache, data)
            path = os.path.join(self.cache.root, sha)
            self.assertEqual(result, {"offset": len(data), "complete": True, "path": path})
            self.assertEqual(_read(path), data)
            self.assertEqual(_listdir(os.path.join(self.cache.root, ".partial")), [])
            self.assertEqual(
                await self.cache.status(sha, len(data)),
                {"present": True, "path": path, "offset": len(data)},
            )
            # A chunk re-sent after completion is answered as complete, writes nothing.
            again = await self.cache.put_chunk(sha, len(data), 0, data[:10])
            self.assertTrue(again["complete"])
            self.assertEqual(_listdir(os.path.join(self.cache.root, ".partial")), [])

        return d(go())

    def test_pipelined_chunks_in_any_order(self) -> Deferred[Any]:
        async def go() -> None:
            data = os.urandom(5 * 100_000 + 7)
            sha = hashlib.sha256(data).hexdigest()
            parts = chunks(data, 100_000)
            random.Random(4).shuffle(parts)
            results = await gatherResults(
                [self.cache.put_chunk(sha, len(data), o, p) for o, p in parts]
            )
            self.assertTrue(any(r["complete"] for r in results))
            self.assertEqual(_read(os.path.join(self.cache.root, sha)), data)

        return d(go())

    def test_interrupted_transfer_resumes_from_the_reported_offset(self) -> Deferred[Any]:
        async def go() -> None:
            data = os.urandom(4 * 65536)
            sha = hashlib.sha256(data).hexdigest()
            parts = chunks(data, 65536)
            for off, part in parts[:2]:
                await self.cache.put_chunk(sha, len(data), off, part)
            # A chunk beyond the prefix arrived too, but the connection dropped.
            await self.cache.put_chunk(sha, len(data), *parts[3])
            # A restarted agent (a new cache object) reports the durable prefix.
            fresh = self.new_cache(64 << 20)
            status = await fresh.status(sha, len(data))
            self.assertEqual(status, {"present": False, "offset": 2 * 65536})
            result = await self.send(fresh, data, [p for p in parts if p[0] >= status["offset"]])
            self.assertTrue(result["complete"])
            self.assertEqual(_read(os.path.join(fresh.root, sha)), data)

        return d(go())

    def test_hash_mismatch_keeps_nothing(self) -> Deferred[Any]:
        async def go() -> None:
            data = os.urandom(200_000)
            wrong = hashlib.sha256(b"something else").hexdigest()
            with self.assertRaises(RPCError) as cm:
                for off, part in chunks(data, 65536):
                    await self.cache.put_chunk(wrong, len(data), off, part)
            self.assertEqual(cm.exception.code, ARTIFACT_REJECTED)
            self.assertIn("nothing was kept", cm.exception.message)
            self.assertEqual(_listdir(os.path.join(self.cache.root, ".partial")), [])
            self.assertNotIn(wrong, _listdir(self.cache.root))

        return d(go())

    def test_chunks_that_do_not_fit_are_refused(self) -> Deferred[Any]:
        sha = hashlib.sha256(b"abc").hexdigest()
        cases = [
            (sha, 3, 2, b"xy"),  # past the declared size
            (sha, 3, -1, b"a"),  # negative offset
            (sha, 3, 0, b""),  # empty chunk of a non-empty file
            ("../../etc/passwd", 3, 0, b"abc"),  # not a digest: never a path
            ("A" * 63, 3, 0, b"abc"),
        ]
        for args in cases:
            with self.assertRaises(RPCError, msg=repr(args[:3])) as cm:
                self.cache.put_chunk(*args)
            self.assertEqual(cm.exception.code, INVALID_PARAMS)
        big = os.urandom(MAX_CHUNK_BYTES + 1)
        with self.assertRaises(RPCError) as cm:
            self.cache.put_chunk(hashlib.sha256(big).hexdigest(), len(big), 0, big)
        self.assertEqual(cm.exception.code, INVALID_PARAMS)
        with self.assertRaises(RPCError) as cm:
            self.cache.put_chunk(sha, (64 << 20) + 1, 0, b"abc")
        self.assertEqual(cm.exception.code, ARTIFACT_REJECTED)
        self.assertEqual(_listdir(self.cache.root), [])
        return d(self._nothing())

    async def _nothing(self) -> None:
        pass

    def test_full_cache_evicts_least_recently_used(self) -> Deferred[Any]:
        async def go() -> None:
            cache = self.new_cache(250_000)
            a, b, c = (os.urandom(100_000) for _ in range(3))
            sha = {k: hashlib.sha256(v).hexdigest() for k, v in (("a", a), ("b", b), ("c", c))}
            await self.send(cache, a)
            await self.send(cache, b)
            # a is used again, so b is now the least recently used.
            self.assertTrue((await cache.status(sha["a"], len(a)))["present"])
            await self.send(cache, c)
            self.assertEqual(
                sorted(n for n in _listdir(cache.root) if not n.startswith(".")),
                sorted([sha["a"], sha["c"]]),
            )

        return d(go())
