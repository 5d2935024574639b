# -*- test-case-name: tests.agent.test_outputlog -*-
"""One command's combined output stream on disk, and the tails kept in memory.

``output.log`` holds the raw bytes of stdout and stderr in arrival order;
``output.idx`` holds one 8-byte big-endian record ``offset << 1 | is_stderr``
per switch between the two streams. An offset is mapped to its stream with a
binary search over the fixed-size records, so the index is never held in
memory. Each stream also keeps its last ``TAIL_BYTES`` in memory (``Tail``),
which become ``stdout``/``stderr`` of the final result. ``Followers`` are the
long-polls waiting at its end.

What it must never do: hold more than the two tails and a few integers in
memory, or read more than the caller asked for (reads are single ``pread``s,
cheap page-cache hits on the reactor thread). It knows nothing of commands,
results or the RPC layer.
"""

import itertools
import os
import struct
from typing import Callable, Dict, Generic, Iterable, List, Optional, Tuple, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

STDOUT = 1
STDERR = 2
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
TAIL_BYTES = 64 * 1024

LOG_FILE = "output.log"
INDEX_FILE = "output.idx"

_RECORD = struct.Struct(">Q")
T = TypeVar("T")


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pread_all(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class Tail:
    """The last TAIL_BYTES of one stream, and how much it ever received."""

    __slots__ = ("buf", "total")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= TAIL_BYTES:
            self.buf = bytearray(data[-TAIL_BYTES:])
            return
        self.buf += data
        # Trim only when twice the size, so trimming is amortised O(1) per byte.
        if len(self.buf) > 2 * TAIL_BYTES:
            del self.buf[:-TAIL_BYTES]

    def value(self) -> bytes:
        return bytes(self.buf[-TAIL_BYTES:])

    @property
    def truncated(self) -> bool:
        return self.total > TAIL_BYTES


class OutputLog:
    """One command's combined stream: a log file plus an index of stream switches.

    Offsets are raw bytes of the log file. Segment i of the index starts at
    record i's offset and runs to record i+1's (or the end). Any offset is
    mapped to its stream with a binary search over fixed-size records, so the
    index never has to be held in memory.
    """

    def __init__(self, directory: str, *, writable: bool) -> None:
        flags = (os.O_RDWR | os.O_APPEND | os.O_CREAT) if writable else os.O_RDONLY
        self._fd = os.open(os.path.join(directory, LOG_FILE), flags, 0o600)
        try:
            self._ifd = os.open(os.path.join(directory, INDEX_FILE), flags, 0o600)
        except OSError:
            os.close(self._fd)
            raise
        self.size = os.fstat(self._fd).st_size
        # A torn last record (crash mid-write) is ignored.
        self._records = os.fstat(self._ifd).st_size // _RECORD.size
        self._current = 0
        self._current_start = 0
        if self._records:
            self._current_start, self._current = self._record(self._records - 1)
        self.tails = {STDOUT: Tail(), STDERR: Tail()}
        self.closed = False

    def _record(self, i: int) -> Tuple[int, int]:
        (value,) = _RECORD.unpack(pread_all(self._ifd, _RECORD.size, i * _RECORD.size))
        return min(value >> 1, self.size), (STDERR if value & 1 else STDOUT)

    def append(self, stream: int, data: bytes) -> None:
        if not data:
            return
        if stream != self._current:
            write_all(self._ifd, _RECORD.pack((self.size << 1) | (1 if stream == STDERR else 0)))
            self._records += 1
            self._current = stream
            self._current_start = self.size
        try:
            write_all(self._fd, data)
        except OSError:
            # Keep offsets honest if part of the chunk made it to disk.
            self.size = os.fstat(self._fd).st_size
            raise
        self.size += len(data)
        self.tails[stream].add(data)

    def _segment(self, offset: int) -> Tuple[int, int]:
        """(stream, end of its segment) for the byte at ``offset`` < size."""
        if self._records == 0:
            return STDOUT, self.size
        if offset >= self._current_start:
            return self._current, self.size
        lo, hi = 0, self._records - 1
        # Largest i with record(i).offset <= offset; record 0 is at offset 0.
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._record(mid)[0] <= offset:
                lo = mid
            else:
                hi = mid - 1
        start, stream = self._record(lo)
        if start > offset:
            return STDOUT, start
        end = self._record(lo + 1)[0] if lo + 1 < self._records else self.size
        return stream, end

    def read(self, offset: int, max_bytes: int) -> Tuple[Optional[int], bytes]:
        """Bytes from ``offset`` up to ``max_bytes``, stopping at a stream switch."""
        if offset >= self.size:
            return None, b""
        stream, end = self._segment(offset)
        n = min(max_bytes, end - offset)
        return stream, pread_all(self._fd, n, offset)

    def recover_tails(self, max_records: int = 100000) -> Dict[int, Tuple[bytes, bool]]:
        """Tails rebuilt from the files (after a crash), walking segments backwards."""
        parts: Dict[int, List[bytes]] = {STDOUT: [], STDERR: []}
        need = {STDOUT: TAIL_BYTES, STDERR: TAIL_BYTES}
        truncated = {STDOUT: False, STDERR: False}
        end = self.size
        first = max(0, self._records - max_records)
        exhausted = first == 0
        segments: Iterable[Tuple[int, int]] = (
            self._record(i) for i in range(self._records - 1, first - 1, -1)
        )
        if exhausted:
            # Bytes before the first record, if the index lost it.
            segments = itertools.chain(segments, [(0, STDOUT)])
        for start, stream in segments:
            start = min(start, end)
            seglen = end - start
            if seglen > 0:
                if need[stream] > 0:
                    take = min(need[stream], seglen)
                    parts[stream].append(pread_all(self._fd, take, end - take))
                    need[stream] -= take
                    if seglen > take:
                        truncated[stream] = True
                else:
                    truncated[stream] = True
            end = start
            if truncated[STDOUT] and truncated[STDERR]:
                break
        if not exhausted:
            for s in (STDOUT, STDERR):
                if need[s] == 0:
                    truncated[s] = True
        return {s: (b"".join(reversed(parts[s])), truncated[s]) for s in (STDOUT, STDERR)}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            os.close(self._ifd)


class Followers(Generic[T]):
    """Readers long-polling at the end of one log (``tail -f``).

    Each waits up to its own ``wait`` seconds; ``wake()`` answers all of them at
    once (new bytes, or the end of the command). An answer is ``read(offset,
    max_bytes)`` at that moment; a reader that goes away cancels its Deferred.
    """

    __slots__ = ("_read", "_call_later", "_waiting")

    def __init__(
        self,
        read: Callable[[int, int], T],
        call_later: Callable[..., IDelayedCall],
    ) -> None:
        self._read = read
        self._call_later = call_later
        self._waiting: List[_Waiter[T]] = []

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def wait(self, offset: int, max_bytes: int, seconds: float) -> "Deferred[T]":
        def cancel(_: "Deferred[T]") -> None:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            if waiter.timer.active():
                waiter.timer.cancel()

        d: Deferred[T] = Deferred(cancel)
        waiter = _Waiter(d, offset, max_bytes, self._call_later(seconds, self._expire, d))
        self._waiting.append(waiter)
        return d

    def _expire(self, d: "Deferred[T]") -> None:
        for waiter in self._waiting:
            if waiter.deferred is d:
                self._waiting.remove(waiter)
                self._answer(waiter)
                return

    def wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if waiter.timer.active():
                waiter.timer.cancel()
            self._answer(waiter)

    def _answer(self, waiter: "_Waiter[T]") -> None:
        try:
            response = self._read(waiter.offset, waiter.max_bytes)
        except Exception:
            waiter.deferred.errback()
            return
        waiter.deferred.callback(response)


class _Waiter(Generic[T]):
    __slots__ = ("deferred", "offset", "max_bytes", "timer")

    def __init__(
        self, deferred: "Deferred[T]", offset: int, max_bytes: int, timer: IDelayedCall
    ) -> None:
        self.deferred = deferred
        self.offset = offset
        self.max_bytes = max_bytes
        self.timer = timer
