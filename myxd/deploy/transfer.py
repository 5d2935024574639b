"""Push a file from the daemon's artifact store to an agent's cache, in chunks.

The agent side is ``artifact_status`` and ``put_artifact_chunk``
(docs/protocol.md). A push:

1. asks ``artifact_status(sha256, size)``: a file the agent already has is
   not sent again (0 bytes), and a partial one resumes from the agent's offset;
2. sends the rest in chunks of at most 512 KiB (base64 inside the agent's 1 MiB
   body limit), ``window`` of them in flight at once;
3. on a failed chunk, asks the status again and resumes from the reported
   offset (at most ``max_resumes`` times); the last chunk's reply, after the
   agent verified the SHA-256, carries the path to use in playbook vars.

Chunks are read from disk in the reactor's thread pool one window at a time,
so the daemon's memory per push is bounded by ``window`` chunks whatever the
file's size. Never blocks the reactor.
"""

# test-case-name: tests.daemon.test_transfer

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from myxd.errors import MyxError
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import AgentRPCError, RemoteError

CHUNK_BYTES = 512 * 1024
DEFAULT_WINDOW = 4
DEFAULT_MAX_RESUMES = 5


class TransferError(MyxError):
    """A push failed for good; the message is for the operator."""


class RPC(Protocol):
    async def call(
        self,
        ep: AgentEndpoint,
        method: str,
        params: dict[str, Any] | list[Any] | None = None,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> Any: ...


@dataclass(frozen=True)
class PushResult:
    path: str  # on the agent
    bytes_sent: int  # payload bytes (before base64) put on the wire this time
    resumed_from: int  # offset the agent reported first
    already_present: bool


class ArtifactPusher:
    """Sends files to agents; one object per daemon, any number of pushes at once."""

    log = Logger()

    def __init__(
        self,
        rpc: RPC,
        reactor: Any,
        *,
        window: int = DEFAULT_WINDOW,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        chunk_bytes: int = CHUNK_BYTES,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self._rpc = rpc
        self._reactor = reactor
        self.window = max(1, window)
        self.max_resumes = max_resumes
        self.chunk_bytes = chunk_bytes
        self._on_bytes = on_bytes

    async def push(
        self,
        ep: AgentEndpoint,
        path: str,
        sha256: str,
        size: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> PushResult:
        """Make sure the agent has ``path`` (``sha256``, ``size``); returns where."""
        status = await self._status(ep, sha256, size)
        if status.get("present"):
            return PushResult(str(status["path"]), 0, size, True)
        first = offset = _offset(status, size)
        # Every chunk the agent took counts, also those of a window that then failed.
        sent = _Counter()
        resumes = 0
        while True:
            try:
                reply = await self._send_from(ep, path, sha256, size, offset, progress, sent)
            except (AgentRPCError, OSError) as e:
                if isinstance(e, RemoteError):
                    # The agent refused (hash mismatch, size over its limit):
                    # sending again would not help.
                    raise TransferError(f"the agent refused the file: {e.reason}") from None
                resumes += 1
                if resumes > self.max_resumes:
                    reason = e.reason if isinstance(e, AgentRPCError) else str(e)
                    raise TransferError(
                        f"transfer failed after {self.max_resumes} resumes: {reason}"
                    ) from None
                status = await self._status(ep, sha256, size)
                if status.get("present"):
                    return PushResult(str(status["path"]), sent.n, first, False)
                offset = _offset(status, size)
                self.log.info(
                    "transfer of {sha256} to {target} resumes at {offset}",
                    sha256=sha256,
                    target=ep.target,
                    offset=offset,
                )
                continue
            if reply.get("complete"):
                return PushResult(str(reply["path"]), sent.n, first, False)
            # Every byte sent but the agent's prefix has a hole (a chunk lost in
            # a reset): ask where it stands and send the rest.
            status = await self._status(ep, sha256, size)
            if status.get("present"):
                return PushResult(str(status["path"]), sent.n, first, False)
            offset = _offset(status, size)

    async def _status(self, ep: AgentEndpoint, sha256: str, size: int) -> dict[str, Any]:
        try:
            reply = await self._rpc.call(ep, "artifact_status", {"sha256": sha256, "size": size})
        except RemoteError as e:
            raise TransferError(f"the agent refused the file: {e.reason}") from None
        except AgentRPCError as e:
            raise TransferError(f"cannot reach the agent: {e.reason}") from None
        if not isinstance(reply, dict):
            raise TransferError("the agent's artifact_status reply is not an object")
        return reply

    async def _send_from(
        self,
        ep: AgentEndpoint,
        path: str,
        sha256: str,
        size: int,
        offset: int,
        progress: Callable[[int, int], None] | None,
        sent: _Counter,
    ) -> dict[str, Any]:
        """Send ``[offset, size)`` a window at a time; the last reply."""
        last: dict[str, Any] = {"offset": offset, "complete": False}
        if size == 0:
            return await self._chunk(ep, sha256, size, 0, b"", sent)
        pos = offset
        while pos < size:
            spans = []
            for _ in range(self.window):
                if pos >= size:
                    break
                n = min(self.chunk_bytes, size - pos)
                spans.append((pos, n))
                pos += n
            blocks = await self._read(path, spans)
            replies = await gatherResults(
                [
                    Deferred.fromCoroutine(self._chunk(ep, sha256, size, off, data, sent))
                    for (off, _n), data in zip(spans, blocks)
                ],
                consumeErrors=True,
            ).addErrback(_first_error)
            for reply in replies:
                if reply.get("complete") or reply.get("offset", 0) >= last.get("offset", 0):
                    last = reply
            if progress is not None:
                progress(min(pos, size), size)
            if last.get("complete"):
                break
        return last

    async def _chunk(
        self, ep: AgentEndpoint, sha256: str, size: int, offset: int, data: bytes, sent: _Counter
    ) -> dict[str, Any]:
        # Counted when sent: a chunk whose reply is lost still went over the wire.
        sent.n += len(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        reply = await self._rpc.call(
            ep,
            "put_artifact_chunk",
            {
                "sha256": sha256,
                "size": size,
                "offset": offset,
                "data": base64.b64encode(data).decode("ascii"),
            },
        )
        if not isinstance(reply, dict):
            raise TransferError("the agent's put_artifact_chunk reply is not an object")
        return reply

    def _read(self, path: str, spans: list[tuple[int, int]]) -> Deferred[list[bytes]]:
        def read() -> list[bytes]:
            out = []
            with open(path, "rb") as f:
                for off, n in spans:
                    out.append(os.pread(f.fileno(), n, off))
            return out

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), read)


class _Counter:
    n = 0


def _offset(status: dict[str, Any], size: int) -> int:
    off = status.get("offset", 0)
    if not isinstance(off, int) or isinstance(off, bool) or not 0 <= off <= size:
        raise TransferError("the agent reported an impossible offset")
    return off


def _first_error(failure: Any) -> Any:
    """gatherResults wraps the first failure; unwrap it for the caller."""
    from twisted.internet.defer import FirstError

    if failure.check(FirstError):
        failure.value.subFailure.raiseException()
    failure.raiseException()
