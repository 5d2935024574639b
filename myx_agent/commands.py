"""Command execution for the agent: at-most-once commands with a resumable,
file-backed combined output stream (docs/protocol.md, "execute_command",
"get_command_log", "cancel_command"; issue 2 section 6).

Layout under ``state_dir``:

- ``ids/id-<command_id>``: the at-most-once marker, a JSON object of a few dozen
  bytes (``{"kind": ..., "status": ...}``). It is created with ``O_EXCL`` and made
  durable (fsync of file and directory) before anything is spawned, and it is
  kept when retention removes the command, so a removed id is never run again.
- ``commands/c-<command_id>/``: ``meta.json`` (what was asked; never env values
  or extra_vars), ``proc.json`` (pid/session of the child, to kill orphans after
  an agent crash), ``output.log`` (the combined stream, raw bytes in arrival
  order), ``output.idx`` (8-byte big-endian records ``offset << 1 | is_stderr``,
  one per switch between stdout and stderr), and at the end ``result.json`` plus
  ``stdout.tail``/``stderr.tail`` (the last 64 KiB of each stream).

Memory stays bounded: output goes straight to the file; only the two 64 KiB
tails per running command and the position of the last stream switch live in
memory. Reads are ``os.pread`` of at most 1 MiB on the reactor thread (page
cache hits in practice; a thread hop would cost more than it saves).

What this module must never do: block the reactor on slow work (fsyncs, tree
deletions and Ansible runs go to threads), start a second process for a known
command_id, hang a reader of a command that can no longer end, or make up a
result.
"""

import base64
import itertools
import json
import os
import random
import re
import shutil
import signal
import struct
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from myx_agent import process as proc
from myx_agent.errors import (
    BUSY,
    COMMAND_ID_CONFLICT,
    INVALID_PARAMS,
    UNKNOWN_COMMAND,
    RPCError,
)

KIND_COMMAND = "command"
KIND_ANSIBLE = "ansible"

STDOUT = 1
STDERR = 2
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}

TAIL_BYTES = 64 * 1024
MAX_READ_BYTES = 1024 * 1024
MAX_WAIT = 30.0
INTERRUPTED_ERROR = "interrupted by agent restart"

COMMAND_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")

_RECORD = struct.Struct(">Q")
_LOG_FILE = "output.log"
_INDEX_FILE = "output.idx"
_META_FILE = "meta.json"
_PROC_FILE = "proc.json"
_RESULT_FILE = "result.json"
_TAIL_FILES = {STDOUT: "stdout.tail", STDERR: "stderr.tail"}


# ---------------------------------------------------------------------------
# Small file helpers


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(path: str, data: bytes, *, fsync: bool) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------
# The combined output stream


class _Tail:
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
        self._fd = os.open(os.path.join(directory, _LOG_FILE), flags, 0o600)
        try:
            self._ifd = os.open(os.path.join(directory, _INDEX_FILE), flags, 0o600)
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
        self.tails = {STDOUT: _Tail(), STDERR: _Tail()}
        self.closed = False

    def _record(self, i: int) -> Tuple[int, int]:
        (value,) = _RECORD.unpack(_pread_all(self._ifd, _RECORD.size, i * _RECORD.size))
        return min(value >> 1, self.size), (STDERR if value & 1 else STDOUT)

    def append(self, stream: int, data: bytes) -> None:
        if not data:
            return
        if stream != self._current:
            _write_all(self._ifd, _RECORD.pack((self.size << 1) | (1 if stream == STDERR else 0)))
            self._records += 1
            self._current = stream
            self._current_start = self.size
        try:
            _write_all(self._fd, data)
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
        return stream, _pread_all(self._fd, n, offset)

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
                    parts[stream].append(_pread_all(self._fd, take, end - take))
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


# ---------------------------------------------------------------------------
# Command state


class _FinishedInfo:
    """What is kept in memory about a finished command (its data is on disk)."""

    __slots__ = ("kind", "status", "finished_at", "size")

    def __init__(self, kind: str, status: str, finished_at: float, size: int) -> None:
        self.kind = kind
        self.status = status
        self.finished_at = finished_at
        self.size = size


class _Waiter:
    __slots__ = ("deferred", "offset", "max_bytes", "timer")

    def __init__(self, deferred: "Deferred[Dict[str, Any]]", offset: int, max_bytes: int) -> None:
        self.deferred = deferred
        self.offset = offset
        self.max_bytes = max_bytes
        self.timer: Optional[IDelayedCall] = None


class Execution:
    """What the runner needs from a running thing (a process or an Ansible run)."""

    def terminate(self) -> None:
        """Start killing the whole tree: SIGTERM now, SIGKILL after the grace."""
        raise NotImplementedError

    def force_close(self) -> None:
        """Last resort at agent stop: stop waiting for the child's pipes."""


class _Command:
    """A command that is running, or finished but not yet persisted."""

    def __init__(
        self, command_id: str, kind: str, directory: str, log: OutputLog, created_at: float
    ) -> None:
        self.command_id = command_id
        self.kind = kind
        self.directory = directory
        self.log = log
        self.created_at = created_at
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.execution: Optional[Execution] = None
        self.finished = False
        self.persisted = False
        self.timed_out = False
        self.cancelled = False
        self.interrupted = False
        self.terminating = False
        self.error: Optional[str] = None
        self.log_error: Optional[str] = None
        self.return_code: Optional[int] = None
        self.extra: Dict[str, Any] = {}
        self.result: Optional[Dict[str, Any]] = None
        self.tails: Dict[int, bytes] = {}
        self.waiters: List[_Waiter] = []
        self.timeout_call: Optional[IDelayedCall] = None
        self.end_listeners: List[Callable[[], None]] = []

    @property
    def status(self) -> str:
        if not self.finished or self.result is None:
            return "running"
        return "success" if self.result["success"] else "failed"


def _status_of(result: Dict[str, Any]) -> str:
    return "success" if result.get("success") else "failed"


# ---------------------------------------------------------------------------
# Processes


class _CommandProcess(ProcessProtocol, Execution):
    """Feeds one child's stdout/stderr into its command's stream."""

    #: After the child exits, how long to keep reading pipes that a background
    #: grandchild still holds open before giving up on them (the grandchild is
    #: left alone: a normal exit does not kill the session).
    PIPE_GRACE = 2.0

    def __init__(self, runner: "CommandRunner", command: _Command, argv0: str) -> None:
        self._runner = runner
        self._command = command
        self._argv0 = argv0
        self._cwd: Optional[str] = None
        self.pid: Optional[int] = None
        self._status = b""
        self._ended = False
        self._reaped = False
        self._pipe_call: Optional[IDelayedCall] = None
        self._kill_call: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        # Commands get no input: EOF on stdin at once.
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == proc.STATUS_FD:
            self._status = (self._status + data)[:256]
        elif childFD in (STDOUT, STDERR):
            self._runner._output(self._command, childFD, data)

    def processExited(self, reason: Failure) -> None:
        self._reaped = True
        if not self._ended:
            self._pipe_call = self._runner._call_later(self.PIPE_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        self._pipe_call = None
        if not self._ended and self.transport is not None:
            self._runner._log.info(
                "command {command_id}: exited but its pipes are still open "
                "(a background process holds them); closing them",
                command_id=self._command.command_id,
            )
            self.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        self._ended = True
        self._reaped = True
        if self._pipe_call is not None and self._pipe_call.active():
            self._pipe_call.cancel()
        self._pipe_call = None
        if self._kill_call is not None and self._kill_call.active() and self.pid is not None:
            # Nothing left in the session: drop the SIGKILL, so it can never hit
            # a later process group that reuses the number.
            if not proc.kill_group(self.pid, 0):
                self._kill_call.cancel()
        value = reason.value
        rc = proc.exit_code_from_status(
            getattr(value, "exitCode", None), getattr(value, "signal", None)
        )
        error = None
        if self._status:
            error = proc.describe_wrapper_failure(self._status, self._argv0, self._cwd)
            rc = None
        self._runner._finish(self._command, return_code=rc, error=error)

    def terminate(self) -> None:
        """SIGTERM the session now, SIGKILL it after the grace period."""
        if self._ended or self.pid is None or self._kill_call is not None:
            return
        # Until the child is reaped its pid cannot be reused, so it is safe to
        # signal it directly in case it has not reached setsid yet.
        proc.kill_group(self.pid, signal.SIGTERM, pid=self.pid)
        self._kill_call = self._runner._kill_later(self._runner.kill_grace, self._kill)

    def _kill(self) -> None:
        if self.pid is not None:
            proc.kill_group(self.pid, signal.SIGKILL, pid=None if self._reaped else self.pid)

    def force_close(self) -> None:
        if not self._ended and self.transport is not None:
            self.transport.loseConnection()


# ---------------------------------------------------------------------------
# The runner


class CommandRunner:
    """Runs commands and Ansible playbooks at most once per command_id."""

    _log = Logger()

    #: Retention sweep period (seconds), jittered by +-20 %.
    SWEEP_INTERVAL = 600.0
    #: At most this many commands are removed per sweep tick; the rest soon after.
    SWEEP_BATCH = 500
    #: First sweep after start.
    FIRST_SWEEP = 60.0
    #: At agent stop, how long beyond kill_grace to wait for children to end
    #: (SIGKILL is at kill_grace; this covers writing results and Ansible's
    #: worker threads noticing), then how long after forcing the rest.
    STOP_EXTRA_WAIT = 8.0
    STOP_FORCE_WAIT = 2.0

    def __init__(
        self,
        state_dir: str,
        *,
        deployment_tool_dir: str,
        max_concurrent: int = 32,
        reactor: Optional[Any] = None,
        retention_seconds: float = 7 * 86400,
        retention_max_bytes: int = 1 << 30,
        kill_grace: float = 5.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor: Any = reactor
        self._state_dir = os.path.abspath(state_dir)
        self._commands_dir = os.path.join(self._state_dir, "commands")
        self._ids_dir = os.path.join(self._state_dir, "ids")
        self.deployment_tool_dir = os.path.abspath(deployment_tool_dir)
        self.max_concurrent = max_concurrent
        self.retention_seconds = retention_seconds
        self.retention_max_bytes = retention_max_bytes
        self.kill_grace = kill_grace
        self._active: Dict[str, _Command] = {}
        self._finished: Dict[str, _FinishedInfo] = {}
        self._finished_bytes = 0
        self._timers: List[IDelayedCall] = []
        self._stop_kills: List[Tuple[IDelayedCall, Callable[[], None]]] = []
        self._sweep_call: Optional[IDelayedCall] = None
        self._started = False
        self._stopping = False
        self._boot_id: Optional[str] = None
        self._ansible_pool: Any = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Recover state from disk (interrupted commands become final) and
        schedule retention sweeps."""
        if self._started:
            return
        for d in (self._state_dir, self._commands_dir, self._ids_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._boot_id = proc.boot_id()
        recovered = interrupted = 0
        for name in sorted(os.listdir(self._commands_dir)):
            if not name.startswith("c-"):
                continue
            command_id = name[2:]
            if not COMMAND_ID_RE.match(command_id):
                continue
            try:
                if self._recover(command_id):
                    interrupted += 1
                recovered += 1
            except Exception:
                self._log.failure(
                    "cannot recover command {command_id}; leaving it on disk",
                    command_id=command_id,
                )
        self._started = True
        self._log.info(
            "command runner started: {recovered} commands on disk, "
            "{interrupted} interrupted by the restart",
            recovered=recovered,
            interrupted=interrupted,
            state_dir=self._state_dir,
        )
        self._schedule_sweep(self.FIRST_SWEEP)

    def stop(self) -> "Deferred[None]":
        """Kill running process trees, finish their records, close files."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        pending = [c for c in self._active.values() if not c.persisted]
        for command in pending:
            if not command.finished:
                command.interrupted = True
                self._terminate(command)
        if pending:
            self._log.info("stopping: waiting for {count} commands", count=len(pending))
            ok = await self._wait_all(pending, self.kill_grace + self.STOP_EXTRA_WAIT)
            if not ok:
                for command in pending:
                    if not command.finished:
                        if command.execution is not None:
                            command.execution.force_close()
                        self._finish(command, return_code=None, error=None)
                await self._wait_all(pending, self.STOP_FORCE_WAIT)
        for command in list(self._active.values()):
            if not command.log.closed:
                command.log.close()
        # Stragglers still in their grace period get their SIGKILL now.
        for call, func in self._stop_kills:
            if call.active():
                call.cancel()
                try:
                    func()
                except Exception:
                    self._log.failure("kill at stop failed")
        self._stop_kills = []
        for call in self._timers:
            if call.active():
                call.cancel()
        self._timers = []
        if self._ansible_pool is not None:
            pool, self._ansible_pool = self._ansible_pool, None
            pool.stop()
        self._started = False

    def _wait_all(self, commands: List[_Command], timeout: float) -> "Deferred[bool]":
        """Fires True when all have ended, False on timeout or when cancelled
        (a caller's own stop timeout must not abort the clean-up)."""

        def cancelled(d: "Deferred[bool]") -> None:
            if timer.active():
                timer.cancel()
            d.callback(False)

        done: Deferred[bool] = Deferred(cancelled)
        remaining = [c for c in commands if not c.persisted]
        if not remaining:
            done.callback(True)
            return done
        left = [len(remaining)]

        def one() -> None:
            left[0] -= 1
            if left[0] == 0 and not done.called:
                timer.cancel()
                done.callback(True)

        def expire() -> None:
            if not done.called:
                done.callback(False)

        timer = self._reactor.callLater(timeout, expire)
        for c in remaining:
            c.end_listeners.append(one)
        return done

    @property
    def running_count(self) -> int:
        return sum(1 for c in self._active.values() if not c.finished)

    # -- timers ------------------------------------------------------------

    def _call_later(self, delay: float, func: Callable[..., Any], *args: Any) -> IDelayedCall:
        self._timers = [t for t in self._timers if t.active()]
        call = self._reactor.callLater(delay, func, *args)
        self._timers.append(call)
        return call

    def _kill_later(self, delay: float, func: Callable[[], None]) -> IDelayedCall:
        """Schedule an escalation kill; agent stop runs it at once instead."""
        call = self._reactor.callLater(delay, func)
        self._stop_kills = [(c, f) for c, f in self._stop_kills if c.active()]
        self._stop_kills.append((call, func))
        return call

    def _now(self) -> float:
        return float(self._reactor.seconds())

    def _in_thread(self, func: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """Run blocking file work off the reactor thread; inline with a reactor
        that has no threads (a Clock in tests)."""
        if IReactorThreads.providedBy(self._reactor):
            return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), func, *args)
        try:
            return succeed(func(*args))
        except Exception:
            return fail()

    # -- paths -------------------------------------------------------------

    def _marker_path(self, command_id: str) -> str:
        return os.path.join(self._ids_dir, "id-" + command_id)

    def _command_dir(self, command_id: str) -> str:
        return os.path.join(self._commands_dir, "c-" + command_id)

    # -- recovery ----------------------------------------------------------

    def _recover(self, command_id: str) -> bool:
        """Load one command from disk; True if it was interrupted by a restart."""
        directory = self._command_dir(command_id)
        meta = _read_json(os.path.join(directory, _META_FILE)) or {}
        marker = _read_json(self._marker_path(command_id))
        kind = meta.get("kind") or (marker or {}).get("kind") or KIND_COMMAND
        size = _file_size(os.path.join(directory, _LOG_FILE))
        result = _read_json(os.path.join(directory, _RESULT_FILE))
        if result is not None and isinstance(result.get("finished_at"), (int, float)):
            status = _status_of(result)
            if marker is None or marker.get("status") != status:
                _write_file_atomic(
                    self._marker_path(command_id),
                    _json_bytes({"kind": kind, "status": status}),
                    fsync=False,
                )
            self._add_finished(command_id, kind, status, float(result["finished_at"]), size)
            return False
        # No result: the agent stopped while it ran. Kill what may be left of it,
        # then record the honest outcome.
        proc_info = _read_json(os.path.join(directory, _PROC_FILE)) or {}
        self._kill_leftovers(command_id, proc_info)
        log = OutputLog(directory, writable=False)
        try:
            tails = log.recover_tails()
            size = log.size
        finally:
            log.close()
        now = self._now()
        started = proc_info.get("started_at", meta.get("created_at"))
        result = {
            "success": False,
            "return_code": None,
            "stdout_truncated": tails[STDOUT][1],
            "stderr_truncated": tails[STDERR][1],
            "timed_out": False,
            "cancelled": False,
            "interrupted": True,
            "error": INTERRUPTED_ERROR,
            "started_at": started if isinstance(started, (int, float)) else None,
            "finished_at": now,
            "kind": kind,
        }
        if kind == KIND_ANSIBLE:
            result["ansible"] = {"status": "failed", "rc": None, "stats": {}}
        for stream, name in _TAIL_FILES.items():
            _write_file_atomic(os.path.join(directory, name), tails[stream][0], fsync=False)
        _write_file_atomic(os.path.join(directory, _RESULT_FILE), _json_bytes(result), fsync=True)
        _write_file_atomic(
            self._marker_path(command_id),
            _json_bytes({"kind": kind, "status": "failed"}),
            fsync=False,
        )
        self._add_finished(command_id, kind, "failed", now, size)
        self._log.info(
            "command {command_id} was interrupted by the agent restart", command_id=command_id
        )
        return True

    def _kill_leftovers(self, command_id: str, info: Dict[str, Any]) -> None:
        """SIGKILL what a crashed agent left running, if provably ours."""
        if not info or info.get("boot_id") != self._boot_id or self._boot_id is None:
            return
        pids: List[int] = []
        sid = info.get("pid")
        start = info.get("start_ticks")
        if isinstance(sid, int) and isinstance(start, int):
            pids.extend(proc.session_members(sid, start))
        marker = info.get("env_marker")
        if isinstance(marker, str) and marker:
            from myx_agent.ansible_executor import MARKER_ENV

            pids.extend(proc.pids_with_env_marker(MARKER_ENV, marker))
        if pids:
            killed = proc.signal_pids(sorted(set(pids)), signal.SIGKILL)
            self._log.warn(
                "command {command_id}: killed {count} processes left by the previous agent",
                command_id=command_id,
                count=killed,
            )

    def _add_finished(
        self, command_id: str, kind: str, status: str, finished_at: float, size: int
    ) -> None:
        old = self._finished.pop(command_id, None)
        if old is not None:
            self._finished_bytes -= old.size
        self._finished[command_id] = _FinishedInfo(kind, status, finished_at, size)
        self._finished_bytes += size

    # -- public methods ----------------------------------------------------

    def _check_id(self, command_id: str) -> None:
        if not isinstance(command_id, str) or not COMMAND_ID_RE.match(command_id):
            raise RPCError(
                INVALID_PARAMS, "invalid params: command_id must be 1-128 chars of [A-Za-z0-9._:-]"
            )

    def _existing(self, command_id: str, kind: str) -> Optional[Dict[str, Any]]:
        """The duplicate answer for a known id, None for a new one."""
        known_kind: Optional[str]
        status: str
        active = self._active.get(command_id)
        if active is not None:
            known_kind, status = active.kind, active.status
        elif command_id in self._finished:
            info = self._finished[command_id]
            known_kind, status = info.kind, info.status
        elif os.path.lexists(self._marker_path(command_id)):
            marker = _read_json(self._marker_path(command_id)) or {}
            known_kind = marker.get("kind")
            # A claimed id whose record is gone never reported success.
            status = marker.get("status") or "failed"
        else:
            return None
        if known_kind is not None and known_kind != kind:
            raise RPCError(
                COMMAND_ID_CONFLICT,
                f"command_id {command_id} is already used by a command of kind {known_kind}",
            )
        return {"status": status, "command_id": command_id, "duplicate": True}

    def _check_capacity(self) -> None:
        running = self.running_count
        if running >= self.max_concurrent:
            raise RPCError(
                BUSY,
                f"busy: {running} commands are already running "
                f"(max_concurrent_commands={self.max_concurrent}); nothing was started",
            )

    def _require_started(self) -> None:
        if not self._started or self._stopping:
            raise RPCError(BUSY, "busy: the agent is not accepting commands right now")

    def execute_command(
        self,
        command_id: str,
        command: str,
        args: List[str],
        timeout: Optional[float],
        env: Optional[Dict[str, str]],
        cwd: Optional[str],
    ) -> Dict[str, Any]:
        """Start ``command args`` (no shell) unless ``command_id`` is known."""
        self._check_id(command_id)
        if not isinstance(command, str) or not command or "\0" in command:
            raise RPCError(INVALID_PARAMS, "invalid params: command must be a non-empty string")
        args = list(args or [])
        if any(not isinstance(a, str) or "\0" in a for a in args):
            raise RPCError(INVALID_PARAMS, "invalid params: args must be strings without NUL")
        if timeout is not None and not timeout > 0:
            raise RPCError(INVALID_PARAMS, "invalid params: timeout must be > 0 or null")
        if env is not None:
            for k, v in env.items():
                if (
                    not isinstance(k, str)
                    or not isinstance(v, str)
                    or not k
                    or "=" in k
                    or "\0" in k
                    or "\0" in v
                ):
                    raise RPCError(
                        INVALID_PARAMS,
                        "invalid params: env names must be non-empty without '=' or NUL, "
                        "values strings without NUL",
                    )
        if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
            raise RPCError(INVALID_PARAMS, "invalid params: cwd must be a non-empty path or null")
        self._require_started()
        existing = self._existing(command_id, KIND_COMMAND)
        if existing is not None:
            return existing
        self._check_capacity()
        meta = {
            "kind": KIND_COMMAND,
            "command": command,
            "args": args,
            "cwd": cwd,
            "timeout": timeout,
            # Only the names: values may be secrets.
            "env_keys": sorted(env) if env else [],
        }
        cmd = self._create(command_id, KIND_COMMAND, meta)
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        error = proc.preflight(command, cwd, full_env)
        self._log.info(
            "command {command_id} accepted: {command}", command_id=command_id, command=command
        )
        if error is not None:
            cmd.started_at = self._now()
            self._finish(cmd, return_code=None, error=error)
        else:
            self._after_durable(
                cmd, lambda: self._spawn(cmd, command, args, full_env, cwd, timeout)
            )
        return {"status": cmd.status, "command_id": command_id}

    def execute_ansible(
        self, command_id: str, playbook: str, extra_vars: Dict[str, Any], timeout: Optional[float]
    ) -> Dict[str, Any]:
        """Run a playbook of the deployment tool with ansible-runner, at most once."""
        from myx_agent import ansible_executor

        self._check_id(command_id)
        if extra_vars is None:
            extra_vars = {}
        if not isinstance(extra_vars, dict):
            raise RPCError(INVALID_PARAMS, "invalid params: extra_vars must be a JSON object")
        if timeout is not None and not timeout > 0:
            raise RPCError(INVALID_PARAMS, "invalid params: timeout must be > 0 or null")
        self._require_started()
        existing = self._existing(command_id, KIND_ANSIBLE)
        if existing is not None:
            return existing
        playbook_path = ansible_executor.resolve_playbook(self.deployment_tool_dir, playbook)
        try:
            extra_json = json.dumps(extra_vars)
        except (TypeError, ValueError) as e:
            raise RPCError(
                INVALID_PARAMS, "invalid params: extra_vars is not JSON-serialisable"
            ) from e
        self._check_capacity()
        meta = {
            "kind": KIND_ANSIBLE,
            "playbook": playbook,
            "playbook_path": playbook_path,
            "timeout": timeout,
            "extra_vars_keys": sorted(extra_vars),
        }
        cmd = self._create(command_id, KIND_ANSIBLE, meta)
        self._log.info(
            "ansible run {command_id} accepted: {playbook}",
            command_id=command_id,
            playbook=playbook,
        )
        binary = ansible_executor.find_ansible_playbook()
        if binary is None:
            cmd.started_at = self._now()
            self._finish(
                cmd,
                return_code=None,
                error=f"ansible-playbook not found next to {sys.executable} or on PATH",
                extra={"ansible": {"status": "failed", "rc": None, "stats": {}}},
            )
        else:
            self._after_durable(
                cmd,
                lambda: self._start_ansible(cmd, playbook_path, extra_json, binary, timeout),
            )
        return {"status": cmd.status, "command_id": command_id}

    def get_command_log(
        self, command_id: str, offset: int, wait: float, max_bytes: int
    ) -> "Deferred[Dict[str, Any]]":
        """Bytes of the combined stream from ``offset`` (see docs/protocol.md)."""
        try:
            self._check_id(command_id)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise RPCError(INVALID_PARAMS, "invalid params: offset must be an integer >= 0")
            if (
                isinstance(max_bytes, bool)
                or not isinstance(max_bytes, int)
                or not (1 <= max_bytes <= MAX_READ_BYTES)
            ):
                raise RPCError(INVALID_PARAMS, "invalid params: max_bytes must be 1..1048576")
            if (
                isinstance(wait, bool)
                or not isinstance(wait, (int, float))
                or not (0 <= wait <= MAX_WAIT)
            ):
                raise RPCError(INVALID_PARAMS, "invalid params: wait must be 0..30")
            cmd = self._active.get(command_id)
            if cmd is None:
                return succeed(self._read_finished(command_id, offset, max_bytes))
            if offset > cmd.log.size:
                raise self._past_end(offset, cmd.log.size)
            if offset == cmd.log.size and not cmd.persisted and wait > 0:
                return self._wait(cmd, offset, max_bytes, wait)
            return succeed(self._read_active(cmd, offset, max_bytes))
        except RPCError:
            return fail()

    def cancel_command(self, command_id: str) -> Dict[str, Any]:
        """SIGTERM the command's tree, SIGKILL after the grace period."""
        self._check_id(command_id)
        cmd = self._active.get(command_id)
        if cmd is not None and not cmd.finished:
            cmd.cancelled = True
            self._log.info("command {command_id} cancelled", command_id=command_id)
            self._terminate(cmd)
            return {"command_id": command_id, "cancelled": True, "status": "running"}
        if cmd is not None:
            return {"command_id": command_id, "cancelled": False, "status": cmd.status}
        info = self._finished.get(command_id)
        if info is None:
            raise self._unknown(command_id)
        return {"command_id": command_id, "cancelled": False, "status": info.status}

    # -- creation ----------------------------------------------------------

    def _create(self, command_id: str, kind: str, meta: Dict[str, Any]) -> _Command:
        """Claim the id on disk and open the record; nothing runs yet."""
        marker = self._marker_path(command_id)
        directory = self._command_dir(command_id)
        now = self._now()
        meta = dict(meta, command_id=command_id, created_at=now)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _write_all(fd, _json_bytes({"kind": kind}))
            finally:
                os.close(fd)
            if os.path.lexists(directory):
                # A record without a marker was not made by this runner (the
                # marker always comes first): do not trust or reuse it.
                shutil.rmtree(directory)
            os.mkdir(directory, 0o700)
            _write_file_atomic(os.path.join(directory, _META_FILE), _json_bytes(meta), fsync=False)
            log = OutputLog(directory, writable=True)
        except BaseException:
            # Nothing was started: leave no half-written record behind.
            shutil.rmtree(directory, ignore_errors=True)
            try:
                os.unlink(marker)
            except OSError:
                pass
            raise
        cmd = _Command(command_id, kind, directory, log, now)
        self._active[command_id] = cmd
        return cmd

    def _make_durable(self, directory: str, marker: str) -> None:
        """Thread: the marker (and record) must be on disk before anything runs."""
        _fsync_path(marker)
        _fsync_path(self._ids_dir, directory=True)
        _fsync_path(os.path.join(directory, _META_FILE))
        _fsync_path(directory, directory=True)
        _fsync_path(self._commands_dir, directory=True)

    def _after_durable(self, cmd: _Command, start: Callable[[], None]) -> None:
        d = self._in_thread(self._make_durable, cmd.directory, self._marker_path(cmd.command_id))

        def durable(_: Any) -> None:
            if cmd.finished:
                return
            if cmd.cancelled or cmd.interrupted:
                # Cancelled (or the agent stopping) before it ever started.
                cmd.started_at = self._now()
                self._finish(cmd, return_code=None, error=None)
                return
            start()

        def not_durable(f: Failure) -> None:
            self._log.failure(
                "command {command_id}: cannot make its record durable; not started",
                f,
                command_id=cmd.command_id,
            )
            if not cmd.finished:
                cmd.started_at = self._now()
                self._finish(
                    cmd,
                    return_code=None,
                    error=f"not started: cannot record the command on disk: {f.getErrorMessage()}",
                )

        d.addCallbacks(durable, not_durable)
        d.addErrback(
            lambda f: self._log.failure(
                "command {command_id}: start failed", f, command_id=cmd.command_id
            )
        )

    def _spawn(
        self,
        cmd: _Command,
        command: str,
        args: List[str],
        env: Dict[str, str],
        cwd: Optional[str],
        timeout: Optional[float],
    ) -> None:
        protocol = _CommandProcess(self, cmd, command)
        protocol._cwd = cwd
        argv = proc.session_argv(command, args, cwd, env)
        cmd.started_at = self._now()
        try:
            self._reactor.spawnProcess(
                protocol, argv[0], argv, env=env, path=None, childFDs=dict(proc.CHILD_FDS)
            )
        except Exception as e:
            self._log.failure("command {command_id}: spawn failed", command_id=cmd.command_id)
            self._finish(cmd, return_code=None, error=f"cannot start {command}: {e}")
            return
        cmd.execution = protocol
        pid = protocol.pid
        if pid is not None:
            info = {
                "pid": pid,
                "start_ticks": proc.proc_start_ticks(pid),
                "boot_id": self._boot_id,
                "started_at": cmd.started_at,
            }
            try:
                _write_file_atomic(
                    os.path.join(cmd.directory, _PROC_FILE), _json_bytes(info), fsync=False
                )
            except OSError:
                self._log.failure(
                    "command {command_id}: cannot write proc.json", command_id=cmd.command_id
                )
        self._log.info(
            "command {command_id} started: pid {pid}", command_id=cmd.command_id, pid=pid
        )
        if timeout is not None:
            cmd.timeout_call = self._call_later(timeout, self._on_timeout, cmd)
        if cmd.cancelled or cmd.interrupted:
            self._terminate(cmd)

    def _start_ansible(
        self,
        cmd: _Command,
        playbook_path: str,
        extra_json: str,
        binary: str,
        timeout: Optional[float],
    ) -> None:
        from myx_agent import ansible_executor

        if self._ansible_pool is None:
            from twisted.python.threadpool import ThreadPool

            self._ansible_pool = ThreadPool(
                minthreads=0, maxthreads=max(1, self.max_concurrent), name="myx-ansible"
            )
            self._ansible_pool.start()
        run = ansible_executor.AnsibleRun(
            self._reactor,
            self._ansible_pool,
            command_id=cmd.command_id,
            playbook_path=playbook_path,
            deployment_tool_dir=self.deployment_tool_dir,
            extra_vars_json=extra_json,
            private_data_dir=os.path.join(cmd.directory, "ansible"),
            ansible_playbook=binary,
            kill_grace=self.kill_grace,
            on_output=lambda data: self._output(cmd, STDOUT, data),
            call_later=self._call_later,
            kill_later=self._kill_later,
        )
        cmd.execution = run
        cmd.started_at = self._now()
        try:
            _write_file_atomic(
                os.path.join(cmd.directory, _PROC_FILE),
                _json_bytes(
                    {
                        "env_marker": run.marker,
                        "boot_id": self._boot_id,
                        "started_at": cmd.started_at,
                    }
                ),
                fsync=False,
            )
        except OSError:
            self._log.failure(
                "ansible run {command_id}: cannot write proc.json", command_id=cmd.command_id
            )
        if timeout is not None:
            cmd.timeout_call = self._call_later(timeout, self._on_timeout, cmd)

        def done(summary: Dict[str, Any]) -> None:
            rc = summary.get("rc")
            self._finish(
                cmd,
                return_code=rc if isinstance(rc, int) else None,
                error=None,
                extra={"ansible": summary},
            )

        def failed(f: Failure) -> None:
            self._log.failure("ansible run {command_id} failed", f, command_id=cmd.command_id)
            self._finish(
                cmd,
                return_code=None,
                error=f"ansible-runner failed: {f.getErrorMessage()}",
                extra={"ansible": {"status": "failed", "rc": None, "stats": {}}},
            )

        run.start().addCallbacks(done, failed).addErrback(
            lambda f: self._log.failure("ansible run {command_id}", f, command_id=cmd.command_id)
        )
        if cmd.cancelled or cmd.interrupted:
            self._terminate(cmd)

    # -- running -----------------------------------------------------------

    def _output(self, cmd: _Command, stream: int, data: bytes) -> None:
        if cmd.finished or cmd.log.closed:
            return
        try:
            cmd.log.append(stream, data)
        except OSError as e:
            if cmd.log_error is None:
                cmd.log_error = f"output log write failed: {e}"
                self._log.error(
                    "command {command_id}: {error}", command_id=cmd.command_id, error=cmd.log_error
                )
            return
        if cmd.waiters:
            self._wake(cmd)

    def _on_timeout(self, cmd: _Command) -> None:
        cmd.timeout_call = None
        if cmd.finished:
            return
        cmd.timed_out = True
        self._log.info("command {command_id} timed out", command_id=cmd.command_id)
        self._terminate(cmd)

    def _terminate(self, cmd: _Command) -> None:
        if cmd.finished or cmd.terminating or cmd.execution is None:
            return
        cmd.terminating = True
        cmd.execution.terminate()

    def _finish(
        self,
        cmd: _Command,
        *,
        return_code: Optional[int],
        error: Optional[str],
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        if cmd.finished:
            return
        cmd.finished = True
        if cmd.timeout_call is not None and cmd.timeout_call.active():
            cmd.timeout_call.cancel()
        cmd.timeout_call = None
        cmd.finished_at = self._now()
        if extra:
            cmd.extra.update(extra)
        if cmd.interrupted:
            return_code = None
            error = INTERRUPTED_ERROR
        if error is None and cmd.log_error is not None:
            error = cmd.log_error
        ansible = cmd.extra.get("ansible")
        if isinstance(ansible, dict):
            if cmd.cancelled:
                ansible["status"] = "canceled"
            elif cmd.timed_out:
                ansible["status"] = "timeout"
            elif cmd.interrupted:
                ansible["status"] = "failed"
        success = (
            return_code == 0
            and error is None
            and not (cmd.timed_out or cmd.cancelled or cmd.interrupted)
            and (not isinstance(ansible, dict) or ansible.get("status") == "successful")
        )
        result: Dict[str, Any] = {
            "success": success,
            "return_code": return_code,
            "stdout_truncated": cmd.log.tails[STDOUT].truncated,
            "stderr_truncated": cmd.log.tails[STDERR].truncated,
            "timed_out": cmd.timed_out,
            "cancelled": cmd.cancelled,
            "interrupted": cmd.interrupted,
            "error": error,
            "started_at": cmd.started_at,
            "finished_at": cmd.finished_at,
            "kind": cmd.kind,
        }
        result.update(cmd.extra)
        cmd.result = result
        cmd.tails = {s: cmd.log.tails[s].value() for s in (STDOUT, STDERR)}
        self._log.info(
            "command {command_id} finished: success={success} return_code={return_code} "
            "error={error}",
            command_id=cmd.command_id,
            success=success,
            return_code=return_code,
            error=error,
            log_bytes=cmd.log.size,
        )
        d = self._in_thread(
            self._persist, cmd.directory, cmd.command_id, cmd.kind, result, dict(cmd.tails)
        )
        d.addCallbacks(lambda _: self._persisted(cmd), lambda f: self._persist_failed(cmd, f))
        d.addErrback(lambda f: self._log.failure("persisting a result", f))

    def _persist(
        self,
        directory: str,
        command_id: str,
        kind: str,
        result: Dict[str, Any],
        tails: Dict[int, bytes],
    ) -> None:
        """Thread: write the result; its fsync makes "finished" survive a crash."""
        for stream, name in _TAIL_FILES.items():
            _write_file_atomic(os.path.join(directory, name), tails[stream], fsync=True)
        _write_file_atomic(os.path.join(directory, _RESULT_FILE), _json_bytes(result), fsync=True)
        _write_file_atomic(
            self._marker_path(command_id),
            _json_bytes({"kind": kind, "status": _status_of(result)}),
            fsync=False,
        )

    def _persisted(self, cmd: _Command) -> None:
        cmd.persisted = True
        assert cmd.result is not None
        self._wake(cmd)
        size = cmd.log.size
        cmd.log.close()
        if self._active.get(cmd.command_id) is cmd:
            del self._active[cmd.command_id]
        self._add_finished(
            cmd.command_id, cmd.kind, _status_of(cmd.result), float(cmd.finished_at or 0), size
        )
        self._end(cmd)

    def _persist_failed(self, cmd: _Command, f: Failure) -> None:
        # Keep serving it from memory; after a restart it reads as interrupted.
        self._log.failure(
            "command {command_id}: cannot write its result", f, command_id=cmd.command_id
        )
        cmd.persisted = True
        self._wake(cmd)
        self._end(cmd)

    def _end(self, cmd: _Command) -> None:
        listeners, cmd.end_listeners = cmd.end_listeners, []
        for listener in listeners:
            try:
                listener()
            except Exception:
                self._log.failure("end listener failed")

    # -- reading -----------------------------------------------------------

    @staticmethod
    def _past_end(offset: int, size: int) -> RPCError:
        return RPCError(
            INVALID_PARAMS,
            f"invalid params: offset {offset} is past the end of the log ({size} bytes)",
        )

    def _unknown(self, command_id: str) -> RPCError:
        if os.path.lexists(self._marker_path(command_id)):
            return RPCError(
                UNKNOWN_COMMAND,
                f"unknown command_id: {command_id} (its record was removed by retention)",
            )
        return RPCError(UNKNOWN_COMMAND, f"unknown command_id: {command_id}")

    @staticmethod
    def _response(
        stream: Optional[int],
        data: bytes,
        new_offset: int,
        final: bool,
        result: Optional[Dict[str, Any]],
    ) -> Dict[str, Any]:
        return {
            "log_data": _b64(data),
            "log_type": STREAM_NAMES[stream] if (stream is not None and data) else None,
            "new_offset": new_offset,
            "is_final": final,
            "result": result,
        }

    @staticmethod
    def _with_tails(result: Dict[str, Any], tails: Dict[int, bytes]) -> Dict[str, Any]:
        out = dict(result)
        out["stdout"] = _b64(tails.get(STDOUT, b""))
        out["stderr"] = _b64(tails.get(STDERR, b""))
        return out

    def _read_active(self, cmd: _Command, offset: int, max_bytes: int) -> Dict[str, Any]:
        if offset > cmd.log.size:
            raise self._past_end(offset, cmd.log.size)
        stream, data = cmd.log.read(offset, max_bytes)
        new_offset = offset + len(data)
        # Final only once the result is durable, so what a reader saw as final
        # is what it reads after an agent crash too.
        final = cmd.persisted and new_offset == cmd.log.size
        result = None
        if final:
            assert cmd.result is not None
            result = self._with_tails(cmd.result, cmd.tails)
        return self._response(stream, data, new_offset, final, result)

    def _read_finished(self, command_id: str, offset: int, max_bytes: int) -> Dict[str, Any]:
        if command_id not in self._finished:
            raise self._unknown(command_id)
        directory = self._command_dir(command_id)
        try:
            log = OutputLog(directory, writable=False)
        except FileNotFoundError:
            raise self._unknown(command_id) from None
        try:
            size = log.size
            if offset > size:
                raise self._past_end(offset, size)
            stream, data = log.read(offset, max_bytes)
        finally:
            log.close()
        new_offset = offset + len(data)
        result = None
        if new_offset == size:
            stored = _read_json(os.path.join(directory, _RESULT_FILE))
            if stored is None:
                raise self._unknown(command_id)
            tails = {
                s: _read_bytes(os.path.join(directory, name)) for s, name in _TAIL_FILES.items()
            }
            result = self._with_tails(stored, tails)
        return self._response(stream, data, new_offset, result is not None, result)

    def _wait(
        self, cmd: _Command, offset: int, max_bytes: int, wait: float
    ) -> "Deferred[Dict[str, Any]]":
        def cancel(d: "Deferred[Dict[str, Any]]") -> None:
            if waiter in cmd.waiters:
                cmd.waiters.remove(waiter)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()

        d: Deferred[Dict[str, Any]] = Deferred(cancel)
        waiter = _Waiter(d, offset, max_bytes)
        waiter.timer = self._call_later(wait, self._expire_waiter, cmd, waiter)
        cmd.waiters.append(waiter)
        return d

    def _expire_waiter(self, cmd: _Command, waiter: _Waiter) -> None:
        if waiter in cmd.waiters:
            cmd.waiters.remove(waiter)
            self._answer(cmd, waiter)

    def _wake(self, cmd: _Command) -> None:
        waiters, cmd.waiters = cmd.waiters, []
        for waiter in waiters:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            self._answer(cmd, waiter)

    def _answer(self, cmd: _Command, waiter: _Waiter) -> None:
        try:
            response = self._read_active(cmd, waiter.offset, waiter.max_bytes)
        except Exception:
            waiter.deferred.errback()
            return
        waiter.deferred.callback(response)

    # -- retention ---------------------------------------------------------

    def _schedule_sweep(self, delay: float) -> None:
        if self._stopping:
            return
        self._sweep_call = self._reactor.callLater(delay, self._sweep_tick)

    def _sweep_tick(self) -> None:
        self._sweep_call = None
        more = False
        try:
            more = self.sweep()
        except Exception:
            self._log.failure("retention sweep failed; trying again next period")
        if more:
            self._schedule_sweep(1.0)
        else:
            self._schedule_sweep(self.SWEEP_INTERVAL * random.uniform(0.8, 1.2))

    def sweep(self) -> bool:
        """Remove finished commands past the retention window or the size cap
        (oldest first). Returns True when more are due than one batch removes."""
        now = self._now()
        victims = [
            cid
            for cid, info in self._finished.items()
            if now - info.finished_at > self.retention_seconds
        ]
        victim_set = set(victims)
        excess = self._finished_bytes - sum(self._finished[c].size for c in victims)
        excess -= self.retention_max_bytes
        if excess > 0:
            by_age = sorted(
                (info.finished_at, cid)
                for cid, info in self._finished.items()
                if cid not in victim_set
            )
            for _, cid in by_age:
                if excess <= 0:
                    break
                victims.append(cid)
                excess -= self._finished[cid].size
        more = len(victims) > self.SWEEP_BATCH
        victims = victims[: self.SWEEP_BATCH]
        if not victims:
            return False
        doomed = []
        for cid in victims:
            info = self._finished.pop(cid)
            self._finished_bytes -= info.size
            doomed.append((cid, info.kind, info.status))
        self._log.info("retention: removing {count} finished commands", count=len(doomed))
        d = self._in_thread(self._remove_records, doomed)
        d.addErrback(lambda f: self._log.failure("retention removal failed", f))
        return more

    def _remove_records(self, doomed: List[Tuple[str, str, str]]) -> None:
        """Thread: delete records but keep each id's tiny marker."""
        for cid, kind, status in doomed:
            try:
                marker = self._marker_path(cid)
                if not os.path.exists(marker):
                    _write_file_atomic(
                        marker, _json_bytes({"kind": kind, "status": status}), fsync=False
                    )
                shutil.rmtree(self._command_dir(cid))
            except FileNotFoundError:
                pass
            except Exception:
                self._log.failure("retention: cannot remove {command_id}", command_id=cid)
