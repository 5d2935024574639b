"""The agent's artifact cache: files pushed by the daemon in chunks, kept by SHA-256.

Layout under ``<state_dir>/artifacts/``:

- ``<sha256>``: a complete, verified file (0644), the path the daemon passes
  to playbooks (``xray_archive_path`` ...);
- ``.partial/<sha256>``: a transfer in progress, written with ``pwrite`` at the
  chunk's offset, so pipelined chunks may arrive in any order;
- ``.partial/<sha256>.json``: ``{"size", "offset"}``, the contiguous prefix
  known to be written, so a transfer resumes after a dropped connection or an
  agent restart from the offset the agent reports.

A file becomes ``<sha256>`` only when every byte is there and the bytes hash to
its name; a mismatch deletes the partial and is an error. Over the cache's size
limit the least recently used complete files are evicted (use = a status
query that finds it, or a completed transfer); a declared size over the limit
is refused before anything is written.

File work runs in the reactor's thread pool (never blocks the reactor). Names
are checked against ``[0-9a-f]{64}``, so nothing is ever written outside the
cache directory. Methods: docs/protocol.md (``artifact_status``,
``put_artifact_chunk``).
"""

# test-case-name: tests.agent.test_artifacts

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from myx_agent.contract import MAX_CHUNK_BYTES
from myx_agent.errors import ARTIFACT_REJECTED, INVALID_PARAMS, RPCError
from myx_agent.imports import sha256 as fast_sha256

DEFAULT_CACHE_MAX_BYTES = 2 << 30
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")
_HASH_BLOCK = 1 << 20
# A partial transfer nobody touched for this long is removed.
PARTIAL_MAX_AGE = 24 * 3600.0

_log = Logger(namespace="myx_agent.artifacts")


class _Transfer:
    """One file being received: the contiguous prefix, and ranges beyond it."""

    def __init__(self, size: int, offset: int) -> None:
        self.size = size
        self.offset = offset
        self.beyond: Dict[int, int] = {}  # start -> end, past ``offset``
        self.finishing = False
        self.waiters: List[Deferred[Dict[str, Any]]] = []

    def add(self, start: int, end: int) -> bool:
        """Record ``[start, end)`` as written; True if the prefix grew."""
        if end <= self.offset:
            return False
        if start > self.offset:
            self.beyond[start] = max(end, self.beyond.get(start, 0))
            return False
        self.offset = end
        while True:
            nxt = [s for s in self.beyond if s <= self.offset]
            if not nxt:
                break
            for s in nxt:
                self.offset = max(self.offset, self.beyond.pop(s))
        return True


class ArtifactCache:
    """The cache behind ``artifact_status`` and ``put_artifact_chunk``."""

    def __init__(self, root: str, max_bytes: int, reactor: Any) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._partial = os.path.join(root, ".partial")
        self._reactor = reactor
        self._transfers: Dict[str, _Transfer] = {}
        # Guards the transfer table (touched from worker threads and the
        # reactor) and the directory during eviction.
        self._lock = threading.Lock()

    # -- RPC surface -----------------------------------------------------------

    def status(self, sha256: str, size: int) -> Deferred[Dict[str, Any]]:
        sha = self._check(sha256, size)
        return self._thread(self._status, sha, size)

    def put_chunk(
        self, sha256: str, size: int, offset: int, data: bytes
    ) -> Deferred[Dict[str, Any]]:
        sha = self._check(sha256, size)
        if offset < 0 or offset + len(data) > size:
            raise RPCError(
                INVALID_PARAMS,
                f"invalid params: chunk [{offset}, {offset + len(data)}) "
                f"does not fit the declared size {size}",
            )
        if len(data) > MAX_CHUNK_BYTES:
            raise RPCError(INVALID_PARAMS, f"invalid params: data: at most {MAX_CHUNK_BYTES} bytes")
        if len(data) == 0 and size != 0:
            raise RPCError(INVALID_PARAMS, "invalid params: data: must not be empty")
        d = self._thread(self._write, sha, size, offset, data)
        d.addCallback(self._after_write, sha, size)
        return d

    def path_of(self, sha256: str) -> str:
        return os.path.join(self.root, sha256)

    # -- on the reactor --------------------------------------------------------

    def _check(self, sha256: Any, size: Any) -> str:
        if not isinstance(sha256, str) or not _SHA256_RE.match(sha256.lower()):
            raise RPCError(INVALID_PARAMS, "invalid params: sha256: 64 hexadecimal characters")
        if size > self.max_bytes:
            raise RPCError(
                ARTIFACT_REJECTED,
                f"artifact of {size} bytes is over the agent's cache limit of "
                f"{self.max_bytes} bytes",
                {"max_bytes": self.max_bytes},
            )
        return sha256.lower()

    def _after_write(
        self, written: Tuple[int, Optional[str]], sha: str, size: int
    ) -> Deferred[Dict[str, Any]] | Dict[str, Any]:
        offset, done_path = written
        if done_path is not None:
            # Already complete (a chunk re-sent after the transfer finished).
            return {"offset": size, "complete": True, "path": done_path}
        if offset < size:
            return {"offset": offset, "complete": False}
        with self._lock:
            t = self._transfers[sha]
        # Every caller that completes the file (or re-sends its last chunk
        # meanwhile) waits on the one verification.
        waiter: Deferred[Dict[str, Any]] = Deferred()
        t.waiters.append(waiter)
        if not t.finishing:
            t.finishing = True

            def settle(result: Any) -> None:
                with self._lock:
                    if self._transfers.get(sha) is t:
                        del self._transfers[sha]
                waiters, t.waiters = t.waiters, []
                for w in waiters:
                    if isinstance(result, Failure):
                        w.errback(result)
                    else:
                        w.callback(result)

            self._thread(self._finish, sha, size).addBoth(settle)
        return waiter

    def _thread(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    # -- in worker threads -------------------------------------------------------

    def _dirs(self) -> None:
        os.makedirs(self._partial, mode=0o700, exist_ok=True)

    def _status(self, sha: str, size: int) -> Dict[str, Any]:
        path = self.path_of(sha)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and st.st_size == size:
            os.utime(path)  # use: most recently used
            return {"present": True, "path": path, "offset": size}
        return {"present": False, "offset": self._read_meta(sha, size)}

    def _read_meta(self, sha: str, size: int) -> int:
        try:
            with open(os.path.join(self._partial, sha + ".json"), "rb") as f:
                meta = json.loads(f.read(4096))
            if meta.get("size") == size and isinstance(meta.get("offset"), int):
                part = os.stat(os.path.join(self._partial, sha))
                return int(min(meta["offset"], part.st_size))
        except (OSError, ValueError, AttributeError):
            pass
        return 0

    def _write_meta(self, sha: str, size: int, offset: int) -> None:
        path = os.path.join(self._partial, sha + ".json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"size": size, "offset": offset}, f)
        os.replace(tmp, path)

    def _write(self, sha: str, size: int, offset: int, data: bytes) -> Tuple[int, Optional[str]]:
        self._dirs()
        final = self.path_of(sha)
        try:
            if os.stat(final).st_size == size:
                return size, final
        except FileNotFoundError:
            pass
        part = os.path.join(self._partial, sha)
        meta = os.path.join(self._partial, sha + ".json")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_size > size:
                # A stale partial of another declared size: start over.
                os.ftruncate(fd, 0)
                try:
                    os.unlink(meta)
                except FileNotFoundError:
                    pass
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        with self._lock:
            t = self._transfers.get(sha)
            if t is None or t.size != size:
                t = self._transfers[sha] = _Transfer(size, self._read_meta(sha, size))
            if t.add(offset, offset + len(data)) and t.offset < size:
                # Under the lock: progress records are written in order.
                self._write_meta(sha, size, t.offset)
            return t.offset, None

    def _finish(self, sha: str, size: int) -> Dict[str, Any]:
        part = os.path.join(self._partial, sha)
        meta = os.path.join(self._partial, sha + ".json")
        digest = fast_sha256()  # cryptography's OpenSSL: see myx_agent.imports
        with open(part, "rb") as f:
            while True:
                block = f.read(_HASH_BLOCK)
                if not block:
                    break
                digest.update(block)
            os.fsync(f.fileno())
        got = digest.hexdigest()
        if got != sha:
            _unlink(part)
            _unlink(meta)
            raise RPCError(
                ARTIFACT_REJECTED,
                f"artifact rejected: the bytes hash to {got}, not {sha}; nothing was kept",
                {"sha256": got},
            )
        final = self.path_of(sha)
        with self._lock:
            self._evict(keep=size)
            os.chmod(part, 0o644)
            os.replace(part, final)
            _unlink(meta)
        _log.info("artifact {sha256} received ({size} bytes)", sha256=sha, size=size)
        return {"offset": size, "complete": True, "path": final}

    def _evict(self, keep: int) -> None:
        """Remove least recently used complete files until ``keep`` more bytes fit;
        also partials untouched for ``PARTIAL_MAX_AGE``."""
        now = time.time()
        entries: List[Tuple[float, int, str]] = []
        total = 0
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if _SHA256_RE.match(name):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, path))
                total += st.st_size
        for name in os.listdir(self._partial):
            path = os.path.join(self._partial, name)
            try:
                if now - os.stat(path).st_mtime > PARTIAL_MAX_AGE:
                    _unlink(path)
            except FileNotFoundError:
                pass
        entries.sort()
        while entries and total + keep > self.max_bytes:
            _mtime, sz, path = entries.pop(0)
            _unlink(path)
            total -= sz
            _log.info("artifact cache full: evicted {path}", path=path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
