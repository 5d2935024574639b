"""Chunked transfers to a real agent process over pinned TLS (issue #8 §2, §5).

The daemon's real ``ArtifactPusher`` through the real ``AgentRPC`` client to a
real ``myx_agent`` process on 127.0.0.1: a file lands byte-identical and is not
sent twice; a transfer cut by killing the agent resumes from the offset the
restarted agent reports; a corrupted chunk is refused with -32011 at the end and
nothing is kept; a full cache evicts the least recently used file; a path-like
sha256 is -32602; the deployment tool installs from the cache.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from myxd.deploy.transfer import CHUNK_BYTES, ArtifactPusher, PushResult
from myxd.rpc.client import AgentEndpoint, AgentRPC
from myxd.rpc.retry import AgentRPCError, RemoteError
from tests.agent.test_agent_process import tool_archive
from tests.daemon.fleet_fakes import settings
from tests.support.agent_process import RunningAgent, start_agent

ARTIFACT_REJECTED = -32011
INVALID_PARAMS = -32602


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CountingRPC:
    """The real client, counting the payload bytes of every chunk it carries.

    ``before_chunk`` may run before a chunk is sent (to cut the transfer)."""

    def __init__(self, rpc: AgentRPC) -> None:
        self.rpc = rpc
        self.chunks = 0
        self.chunk_bytes = 0
        self.before_chunk: Any = None

    async def call(
        self,
        ep: AgentEndpoint,
        method: str,
        params: dict[str, Any] | list[Any] | None = None,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        if method == "put_artifact_chunk" and isinstance(params, dict):
            if self.before_chunk is not None:
                await self.before_chunk(self.chunks)
            self.chunks += 1
            self.chunk_bytes += len(base64.b64decode(params["data"]))
        return await self.rpc.call(ep, method, params, retry=retry, timeout=timeout)


class TransferTests(TestCase):
    timeout = 300

    async def agent(self, **config: Any) -> tuple[RunningAgent, AgentEndpoint]:
        agent = await start_agent(self, config_overrides=config)
        ep = AgentEndpoint(
            host=agent.host,
            port=agent.port,
            path=agent.rpc_path,
            token=agent.token,
            fingerprint=agent.fingerprint,
        )
        return agent, ep

    def setUp(self) -> None:
        self.rpc = AgentRPC(reactor, settings(rpc_timeout=30, rpc_retry_base_delay=0.05))
        self.addCleanup(lambda: Deferred.fromCoroutine(self.rpc.close()))
        self.counting = CountingRPC(self.rpc)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def pusher(self, window: int = 4) -> ArtifactPusher:
        return ArtifactPusher(self.counting, reactor, window=window)

    def cache(self, agent: RunningAgent) -> str:
        return os.path.join(agent.state_dir, "artifacts")

    def leftovers(self, agent: RunningAgent) -> list[str]:
        """Every file in the agent's cache, partials included."""
        root = self.cache(agent)
        out = []
        for dirpath, _dirs, files in os.walk(root):
            out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
        return sorted(out)

    async def push(
        self, pusher: ArtifactPusher, ep: AgentEndpoint, data: bytes, name: str
    ) -> PushResult:
        path = _write(os.path.join(self.dir, name), data)
        return await pusher.push(ep, path, _sha(data), len(data))

    async def test_lands_byte_identical_and_is_not_sent_twice(self) -> None:
        agent, ep = await self.agent()
        # Not a multiple of the chunk size: the last chunk is short.
        data = os.urandom(5 * CHUNK_BYTES + 12345)
        first = await self.push(self.pusher(), ep, data, "a.bin")
        expected = os.path.join(self.cache(agent), _sha(data))
        self.assertEqual(first.path, expected)
        self.assertEqual((first.bytes_sent, first.already_present), (len(data), False))
        self.assertEqual(_read(expected), data)
        self.assertEqual(self.leftovers(agent), [_sha(data)])
        # Full 512 KiB chunks (base64 in JSON) fit the agent's 1 MiB body limit.
        self.assertEqual(self.counting.chunks, 6)

        before = self.counting.chunk_bytes
        again = await self.push(self.pusher(), ep, data, "a.bin")
        self.assertEqual((again.bytes_sent, again.already_present), (0, True))
        self.assertEqual(again.path, expected)
        self.assertEqual(self.counting.chunk_bytes, before)

    async def test_a_cut_transfer_resumes_after_an_agent_restart(self) -> None:
        agent, ep = await self.agent()
        data = os.urandom(8 * CHUNK_BYTES)
        sha = _sha(data)
        reported: list[int] = []
        after_cut: list[int] = []

        async def cut(sent_so_far: int) -> None:
            if sent_so_far == 3 and not reported:
                # Three chunks are in; the agent dies mid-transfer and comes back.
                await agent.restart("KILL")
                status = await self.rpc.call(
                    ep, "artifact_status", {"sha256": sha, "size": len(data)}
                )
                reported.append(status["offset"])
                after_cut.append(self.counting.chunk_bytes)
                raise AgentRPCError("retryable", "connection cut by the test")

        self.counting.before_chunk = cut
        result = await self.push(self.pusher(window=1), ep, data, "big.bin")
        self.assertEqual(reported, [3 * CHUNK_BYTES])
        self.assertEqual(_read(result.path), data)
        resent = self.counting.chunk_bytes - after_cut[0]
        # Only what the agent lacked went again: the whole file minus its prefix.
        self.assertEqual(resent, len(data) - reported[0])
        self.assertLess(resent, len(data))
        self.assertEqual(self.counting.chunk_bytes, len(data))
        self.assertEqual(self.leftovers(agent), [sha])

    async def test_a_corrupted_chunk_is_refused_and_nothing_is_kept(self) -> None:
        agent, ep = await self.agent()
        data = os.urandom(3 * CHUNK_BYTES)
        sha, size = _sha(data), len(data)
        bad = bytearray(data)
        bad[CHUNK_BYTES + 77] ^= 0xFF
        replies = []
        for off in range(0, 2 * CHUNK_BYTES, CHUNK_BYTES):
            params = {
                "sha256": sha,
                "size": size,
                "offset": off,
                "data": base64.b64encode(bytes(bad[off : off + CHUNK_BYTES])).decode(),
            }
            replies.append(await self.rpc.call(ep, "put_artifact_chunk", params))
        self.assertEqual([r["offset"] for r in replies], [CHUNK_BYTES, 2 * CHUNK_BYTES])
        last = {
            "sha256": sha,
            "size": size,
            "offset": 2 * CHUNK_BYTES,
            "data": base64.b64encode(data[2 * CHUNK_BYTES :]).decode(),
        }
        with self.assertRaises(RemoteError) as e:
            await self.rpc.call(ep, "put_artifact_chunk", last)
        self.assertEqual(e.exception.code, ARTIFACT_REJECTED)
        self.assertIn("nothing was kept", e.exception.message)
        self.assertEqual(self.leftovers(agent), [])
        status = await self.rpc.call(ep, "artifact_status", {"sha256": sha, "size": size})
        self.assertEqual(status, {"present": False, "offset": 0})
        # The right bytes are then accepted from the start.
        result = await self.push(self.pusher(), ep, data, "good.bin")
        self.assertEqual((result.resumed_from, result.bytes_sent), (0, size))
        self.assertEqual(_read(result.path), data)

    async def test_a_full_cache_evicts_the_least_recently_used(self) -> None:
        agent, ep = await self.agent(artifact_cache_max_bytes=1 << 20)
        a, b, c = (os.urandom(400_000) for _ in range(3))
        pusher = self.pusher()
        await self.push(pusher, ep, a, "a")
        await self.push(pusher, ep, b, "b")
        # A status query that finds ``a`` is a use: ``b`` is now the oldest.
        status = await self.rpc.call(ep, "artifact_status", {"sha256": _sha(a), "size": len(a)})
        self.assertTrue(status["present"])
        await self.push(pusher, ep, c, "c")
        self.assertEqual(self.leftovers(agent), sorted([_sha(a), _sha(c)]))
        # A file larger than the whole cache is refused before a byte is sent.
        big = os.urandom((1 << 20) + 1)
        with self.assertRaises(RemoteError) as e:
            await self.rpc.call(ep, "artifact_status", {"sha256": _sha(big), "size": len(big)})
        self.assertEqual(e.exception.code, ARTIFACT_REJECTED)
        self.assertEqual(self.leftovers(agent), sorted([_sha(a), _sha(c)]))

    async def test_path_like_names_and_bad_chunks_are_invalid_params(self) -> None:
        agent, ep = await self.agent()
        chunk = base64.b64encode(b"x").decode()
        cases: list[tuple[str, dict[str, Any]]] = [
            ("artifact_status", {"sha256": "../../../../etc/passwd", "size": 1}),
            ("artifact_status", {"sha256": "/" + "a" * 63, "size": 1}),
            (
                "put_artifact_chunk",
                {"sha256": "../" + "a" * 61, "size": 1, "offset": 0, "data": chunk},
            ),
            # Chunks that do not fit the declared size.
            ("put_artifact_chunk", {"sha256": "a" * 64, "size": 1, "offset": 1, "data": chunk}),
            (
                "put_artifact_chunk",
                {
                    "sha256": "a" * 64,
                    "size": 1,
                    "offset": 0,
                    "data": base64.b64encode(b"xy").decode(),
                },
            ),
            # Larger than 512 KiB decoded.
            (
                "put_artifact_chunk",
                {
                    "sha256": "a" * 64,
                    "size": 1 << 20,
                    "offset": 0,
                    "data": base64.b64encode(b"\0" * (CHUNK_BYTES + 1)).decode(),
                },
            ),
        ]
        for method, params in cases:
            with self.assertRaises(RemoteError) as e:
                await self.rpc.call(ep, method, params)
            self.assertEqual(e.exception.code, INVALID_PARAMS, (method, params["sha256"]))
        self.assertEqual(self.leftovers(agent), [])
        self.assertEqual(sorted(os.listdir(agent.base_dir)), sorted(self.base_entries(agent)))

    @staticmethod
    def base_entries(agent: RunningAgent) -> list[str]:
        # What the agent itself makes beside its config: nothing named by a client.
        names = ["config.json", "agent.stdout", "agent.stderr", "ssl", "state"]
        return [n for n in names if os.path.exists(os.path.join(agent.base_dir, n))]

    async def test_deployment_tool_syncs_from_the_cache(self) -> None:
        agent, ep = await self.agent()
        archive = tool_archive("7.1.0")
        sha = _sha(archive)
        with self.assertRaises(RemoteError) as e:
            await self.rpc.call(ep, "sync_deployment_tool", {"sha256": sha, "version": "7.1.0"})
        self.assertEqual(e.exception.code, INVALID_PARAMS)
        self.assertIn("no artifact", e.exception.message)
        await self.push(self.pusher(), ep, archive, "tool.tar.gz")
        result = await self.rpc.call(
            ep, "sync_deployment_tool", {"sha256": sha, "version": "7.1.0"}
        )
        self.assertEqual(result, {"changed": True, "version": "7.1.0"})
        self.assertEqual(_read(os.path.join(agent.deployment_tool_dir, "VERSION")), b"7.1.0\n")
        status = await self.rpc.call(ep, "get_status")
        self.assertEqual(status["deployment_tool_version"], "7.1.0")
        # The old inline form still works for older daemons.
        older = tool_archive("7.2.0")
        result = await self.rpc.call(
            ep,
            "sync_deployment_tool",
            {
                "archive": base64.b64encode(older).decode(),
                "sha256": _sha(older),
                "version": "7.2.0",
            },
        )
        self.assertEqual(result, {"changed": True, "version": "7.2.0"})
