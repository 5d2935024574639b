"""ArtifactPusher against the agent's real ArtifactCache, through an RPC stand-in
that drops calls on purpose (the real-agent path is in tests/deploy)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from myx_agent.artifacts import ArtifactCache
from myx_agent.errors import RPCError
from myxd.deploy.transfer import ArtifactPusher, TransferError
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import RETRYABLE, AgentRPCError, RemoteError


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class CacheRPC:
    """Calls go straight to an ArtifactCache; ``drop`` decides which chunk calls fail
    as a lost connection would (before or after the agent wrote the bytes)."""

    def __init__(self, cache: ArtifactCache) -> None:
        self.cache = cache
        self.calls: list[tuple[str, int | None]] = []
        self.chunk_bytes = 0  # received by the cache
        self.offered_bytes = 0  # put on the wire, received or not
        self.drop_before: set[int] = set()  # chunk call numbers lost on the way in
        self.drop_after: set[int] = set()  # written, but the reply is lost
        self._n = 0

    async def call(
        self, ep: Any, method: str, params: Any = None, *, retry: Any = None, timeout: Any = None
    ) -> Any:
        self.calls.append(
            (method, params.get("offset") if method == "put_artifact_chunk" else None)
        )
        try:
            if method == "artifact_status":
                return await self.cache.status(params["sha256"], params["size"])
            assert method == "put_artifact_chunk", method
            self._n += 1
            n = self._n
            self.offered_bytes += len(base64.b64decode(params["data"]))
            if n in self.drop_before:
                raise AgentRPCError(RETRYABLE, "connection lost", attempts=4)
            data = base64.b64decode(params["data"])
            self.chunk_bytes += len(data)
            reply = await self.cache.put_chunk(
                params["sha256"], params["size"], params["offset"], data
            )
            if n in self.drop_after:
                raise AgentRPCError(RETRYABLE, "connection lost", attempts=4)
            return reply
        except RPCError as e:
            raise RemoteError(e.code, e.message, e.data) from None


class PusherTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="myx-transfer-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cache = ArtifactCache(os.path.join(self.dir, "agent"), 64 << 20, reactor)
        self.rpc = CacheRPC(self.cache)
        self.ep = AgentEndpoint(
            host="127.0.0.1", port=1, path="p" * 16, token="t" * 32, fingerprint="ab" * 32
        )

    def file(self, size: int) -> tuple[str, str, bytes]:
        data = os.urandom(size)
        path = os.path.join(self.dir, "src")
        with open(path, "wb") as f:
            f.write(data)
        return path, hashlib.sha256(data).hexdigest(), data

    def pusher(self, **kw: Any) -> ArtifactPusher:
        return ArtifactPusher(self.rpc, reactor, chunk_bytes=64 * 1024, **kw)

    def test_sends_everything_once_then_nothing(self) -> Deferred[Any]:
        async def go() -> None:
            path, sha, data = self.file(10 * 65536 + 5)
            seen: list[tuple[int, int]] = []
            res = await self.pusher().push(
                self.ep, path, sha, len(data), lambda a, b: seen.append((a, b))
            )
            self.assertEqual(res.bytes_sent, len(data))
            self.assertFalse(res.already_present)
            self.assertEqual(_read(res.path), data)
            self.assertEqual(seen[-1], (len(data), len(data)))
            self.assertEqual(self.rpc.chunk_bytes, len(data))
            again = await self.pusher().push(self.ep, path, sha, len(data))
            self.assertEqual((again.bytes_sent, again.already_present), (0, True))
            self.assertEqual(self.rpc.chunk_bytes, len(data))

        return d(go())

    def test_lost_chunks_resume_from_the_agents_offset(self) -> Deferred[Any]:
        async def go() -> None:
            path, sha, data = self.file(12 * 65536)
            self.rpc.drop_before = {3, 9}
            self.rpc.drop_after = {6}
            res = await self.pusher(window=2).push(self.ep, path, sha, len(data))
            self.assertEqual(_read(res.path), data)
            # Resumed, not restarted: less than twice the file went over the wire,
            # and the result counts every chunk the agent took.
            self.assertLess(self.rpc.chunk_bytes, 2 * len(data))
            self.assertEqual(res.bytes_sent, self.rpc.offered_bytes)
            self.assertGreater(self.rpc.chunk_bytes, len(data) - 1)
            statuses = [c for c in self.rpc.calls if c[0] == "artifact_status"]
            self.assertGreaterEqual(len(statuses), 3)

        return d(go())

    def test_gives_up_after_max_resumes(self) -> Deferred[Any]:
        async def go() -> None:
            path, sha, data = self.file(4 * 65536)
            self.rpc.drop_before = set(range(1, 100))
            with self.assertRaises(TransferError) as cm:
                await self.pusher(max_resumes=2).push(self.ep, path, sha, len(data))
            self.assertIn("after 2 resumes", str(cm.exception))

        return d(go())

    def test_agent_refusal_is_final(self) -> Deferred[Any]:
        async def go() -> None:
            path, _sha, data = self.file(3 * 65536)
            wrong = hashlib.sha256(b"not it").hexdigest()
            with self.assertRaises(TransferError) as cm:
                await self.pusher().push(self.ep, path, wrong, len(data))
            self.assertIn("refused", str(cm.exception))
            self.assertIn("nothing was kept", str(cm.exception))
            small = ArtifactCache(os.path.join(self.dir, "small"), 1000, reactor)
            self.rpc.cache = small
            with self.assertRaises(TransferError) as cm:
                await self.pusher().push(self.ep, path, _sha, len(data))
            self.assertIn("cache limit", str(cm.exception))

        return d(go())
