# -*- test-case-name: tests.agent.test_commands -*-
"""The command records on disk under ``state_dir``: layout, recovery, retention.

Layout:

- ``ids/id-<command_id>``: the at-most-once marker, a JSON object of a few dozen
  bytes (``{"kind": ..., "status": ...}``). It is created with ``O_EXCL`` and made
  durable (fsync of file and directory) before anything is spawned, and it is
  kept when retention removes the command, so a removed id is never run again.
- ``commands/c-<command_id>/``: ``meta.json`` (what was asked; never env values
  or extra_vars), ``proc.json`` (what to kill after an agent crash, see
  ``execution.kill_leftovers``), ``output.log`` + ``output.idx`` (the combined
  stream, see ``outputlog``), and at the end ``result.json`` plus
  ``stdout.tail``/``stderr.tail`` (the last 64 KiB of each stream).

``Records`` also keeps the small in-memory index of finished commands (kind,
status, end time, size) that answers duplicates and drives retention.

What it must never do: write a record without its marker being there first,
leave a half-written record when creation fails, or trust a record it did not
create. The methods documented as "thread" do fsyncs or tree deletions and
must be run off the reactor thread; the others are short file operations.
"""

import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

from myx_agent.contract import (
    COMMAND_ID_RE,
    FAILED,
    INTERRUPTED_ERROR,
    KIND_ANSIBLE,
    KIND_COMMAND,
    status_of,
)
from myx_agent.outputlog import LOG_FILE, STDERR, STDOUT, OutputLog, write_all

META_FILE = "meta.json"
PROC_FILE = "proc.json"
RESULT_FILE = "result.json"
TAIL_FILES = {STDOUT: "stdout.tail", STDERR: "stderr.tail"}


# ---------------------------------------------------------------------------
# Small file helpers


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
        write_all(fd, data)
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


def command_result(
    *,
    kind: str,
    return_code: Optional[int],
    error: Optional[str],
    timed_out: bool,
    cancelled: bool,
    interrupted: bool,
    truncated: Dict[int, bool],
    started_at: Optional[float],
    finished_at: Optional[float],
    extra: Dict[str, Any],
) -> Dict[str, Any]:
    """The result a finished command stores (docs/protocol.md, "result"), without
    its tails. ``extra`` adds keys (``ansible``, whose status follows how the run
    ended); success needs exit code 0, no error and an ordinary end."""
    ansible = extra.get("ansible")
    if isinstance(ansible, dict):
        if cancelled:
            ansible["status"] = "canceled"
        elif timed_out:
            ansible["status"] = "timeout"
        elif interrupted:
            ansible["status"] = "failed"
    success = (
        return_code == 0
        and error is None
        and not (timed_out or cancelled or interrupted)
        and (not isinstance(ansible, dict) or ansible.get("status") == "successful")
    )
    result: Dict[str, Any] = {
        "success": success,
        "return_code": return_code,
        "stdout_truncated": truncated[STDOUT],
        "stderr_truncated": truncated[STDERR],
        "timed_out": timed_out,
        "cancelled": cancelled,
        "interrupted": interrupted,
        "error": error,
        "started_at": started_at,
        "finished_at": finished_at,
        "kind": kind,
    }
    result.update(extra)
    return result


def interrupted_result(
    kind: str, tails: Dict[int, Tuple[bytes, bool]], started: Any, now: float
) -> Dict[str, Any]:
    """The honest result of a command that was running when the agent went away."""
    extra: Dict[str, Any] = {}
    if kind == KIND_ANSIBLE:
        extra["ansible"] = {"status": "failed", "rc": None, "stats": {}}
    return command_result(
        kind=kind,
        return_code=None,
        error=INTERRUPTED_ERROR,
        timed_out=False,
        cancelled=False,
        interrupted=True,
        truncated={s: tails[s][1] for s in (STDOUT, STDERR)},
        started_at=started if isinstance(started, (int, float)) else None,
        finished_at=now,
        extra=extra,
    )


class FinishedInfo:
    """What is kept in memory about a finished command (its data is on disk)."""

    __slots__ = ("kind", "status", "finished_at", "size")

    def __init__(self, kind: str, status: str, finished_at: float, size: int) -> None:
        self.kind = kind
        self.status = status
        self.finished_at = finished_at
        self.size = size


#: (command_id, kind, status) of a record that retention removes.
Doomed = Tuple[str, str, str]


class Records:
    """The records of one state_dir, and the index of the finished ones."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.commands_dir = os.path.join(self.state_dir, "commands")
        self.ids_dir = os.path.join(self.state_dir, "ids")
        self.finished: Dict[str, FinishedInfo] = {}
        self.finished_bytes = 0

    def prepare(self) -> None:
        for d in (self.state_dir, self.commands_dir, self.ids_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    # -- paths and lookups --------------------------------------------------

    def marker_path(self, command_id: str) -> str:
        return os.path.join(self.ids_dir, "id-" + command_id)

    def command_dir(self, command_id: str) -> str:
        return os.path.join(self.commands_dir, "c-" + command_id)

    def ids_on_disk(self) -> List[str]:
        """Command ids that have a record directory, oldest name first."""
        return [
            name[2:]
            for name in sorted(os.listdir(self.commands_dir))
            if name.startswith("c-") and COMMAND_ID_RE.fullmatch(name[2:])
        ]

    def claimed(self, command_id: str) -> Optional[Dict[str, Any]]:
        """The marker of an id whose record is gone (or not in the index), or None
        if the id was never claimed. A marker without a status never reported
        success, so it reads as failed."""
        path = self.marker_path(command_id)
        if not os.path.lexists(path):
            return None
        marker = _read_json(path) or {}
        return {"kind": marker.get("kind"), "status": marker.get("status") or FAILED}

    def was_removed(self, command_id: str) -> bool:
        return os.path.lexists(self.marker_path(command_id))

    def add_finished(
        self, command_id: str, kind: str, status: str, finished_at: float, size: int
    ) -> None:
        old = self.finished.pop(command_id, None)
        if old is not None:
            self.finished_bytes -= old.size
        self.finished[command_id] = FinishedInfo(kind, status, finished_at, size)
        self.finished_bytes += size

    # -- creating and finishing ---------------------------------------------

    def create(self, command_id: str, kind: str, meta: Dict[str, Any]) -> OutputLog:
        """Claim the id (O_EXCL marker) and open the record; nothing runs yet.

        Raises OSError (FileExistsError for a claimed id) and then leaves nothing
        behind."""
        marker = self.marker_path(command_id)
        directory = self.command_dir(command_id)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                write_all(fd, _json_bytes({"kind": kind}))
            finally:
                os.close(fd)
            if os.path.lexists(directory):
                # A record without a marker was not made by this code (the
                # marker always comes first): do not trust or reuse it.
                shutil.rmtree(directory)
            os.mkdir(directory, 0o700)
            _write_file_atomic(os.path.join(directory, META_FILE), _json_bytes(meta), fsync=False)
            return OutputLog(directory, writable=True)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            try:
                os.unlink(marker)
            except OSError:
                pass
            raise

    def make_durable(self, command_id: str) -> None:
        """Thread: the marker (and record) must be on disk before anything runs."""
        directory = self.command_dir(command_id)
        _fsync_path(self.marker_path(command_id))
        _fsync_path(self.ids_dir, directory=True)
        _fsync_path(os.path.join(directory, META_FILE))
        _fsync_path(directory, directory=True)
        _fsync_path(self.commands_dir, directory=True)

    def write_proc_info(self, command_id: str, info: Dict[str, Any]) -> None:
        """What to kill if this agent dies while the command runs (no fsync:
        after a power loss nothing of it runs any more)."""
        path = os.path.join(self.command_dir(command_id), PROC_FILE)
        _write_file_atomic(path, _json_bytes(info), fsync=False)

    def persist(
        self, command_id: str, kind: str, result: Dict[str, Any], tails: Dict[int, bytes]
    ) -> None:
        """Thread: write the result; its fsync makes "finished" survive a crash."""
        directory = self.command_dir(command_id)
        for stream, name in TAIL_FILES.items():
            _write_file_atomic(os.path.join(directory, name), tails[stream], fsync=True)
        _write_file_atomic(os.path.join(directory, RESULT_FILE), _json_bytes(result), fsync=True)
        self._write_marker(command_id, kind, status_of(result))

    def _write_marker(self, command_id: str, kind: str, status: str) -> None:
        _write_file_atomic(
            self.marker_path(command_id), _json_bytes({"kind": kind, "status": status}), fsync=False
        )

    # -- reading -------------------------------------------------------------

    def open_log(self, command_id: str) -> OutputLog:
        """The stream of a finished command, read-only (FileNotFoundError if gone)."""
        return OutputLog(self.command_dir(command_id), writable=False)

    def read_result(self, command_id: str) -> Optional[Tuple[Dict[str, Any], Dict[int, bytes]]]:
        """The stored result and tails of a finished command, None if missing."""
        directory = self.command_dir(command_id)
        stored = _read_json(os.path.join(directory, RESULT_FILE))
        if stored is None:
            return None
        tails = {s: _read_bytes(os.path.join(directory, name)) for s, name in TAIL_FILES.items()}
        return stored, tails

    # -- recovery --------------------------------------------------------------

    def recover(
        self, command_id: str, now: float, kill_leftovers: Callable[[str, Dict[str, Any]], None]
    ) -> bool:
        """Index one record found at start; True if it was interrupted by a restart
        (then ``kill_leftovers(command_id, proc_info)`` runs and the record gets the
        honest interrupted result)."""
        directory = self.command_dir(command_id)
        meta = _read_json(os.path.join(directory, META_FILE)) or {}
        marker = _read_json(self.marker_path(command_id))
        kind = meta.get("kind") or (marker or {}).get("kind") or KIND_COMMAND
        result = _read_json(os.path.join(directory, RESULT_FILE))
        if result is not None and isinstance(result.get("finished_at"), (int, float)):
            status = status_of(result)
            if marker is None or marker.get("status") != status:
                self._write_marker(command_id, kind, status)
            size = _file_size(os.path.join(directory, LOG_FILE))
            self.add_finished(command_id, kind, status, float(result["finished_at"]), size)
            return False
        # No result: the agent stopped while it ran. Kill what may be left of it,
        # then record the honest outcome.
        proc_info = _read_json(os.path.join(directory, PROC_FILE)) or {}
        kill_leftovers(command_id, proc_info)
        log = OutputLog(directory, writable=False)
        try:
            tails = log.recover_tails()
            size = log.size
        finally:
            log.close()
        started = proc_info.get("started_at", meta.get("created_at"))
        result = interrupted_result(kind, tails, started, now)
        for stream, name in TAIL_FILES.items():
            _write_file_atomic(os.path.join(directory, name), tails[stream][0], fsync=False)
        _write_file_atomic(os.path.join(directory, RESULT_FILE), _json_bytes(result), fsync=True)
        self._write_marker(command_id, kind, FAILED)
        self.add_finished(command_id, kind, FAILED, now, size)
        return True

    # -- retention -------------------------------------------------------------

    def select_expired(
        self, now: float, max_age: float, max_bytes: int, batch: int
    ) -> Tuple[List[Doomed], bool]:
        """Take out of the index the finished commands past ``max_age`` or over the
        size cap (oldest first), at most ``batch``; True when more are due."""
        victims = [cid for cid, info in self.finished.items() if now - info.finished_at > max_age]
        victim_set = set(victims)
        excess = self.finished_bytes - sum(self.finished[c].size for c in victims) - max_bytes
        if excess > 0:
            by_age = sorted(
                (info.finished_at, cid)
                for cid, info in self.finished.items()
                if cid not in victim_set
            )
            for _, cid in by_age:
                if excess <= 0:
                    break
                victims.append(cid)
                excess -= self.finished[cid].size
        more = len(victims) > batch
        doomed: List[Doomed] = []
        for cid in victims[:batch]:
            info = self.finished.pop(cid)
            self.finished_bytes -= info.size
            doomed.append((cid, info.kind, info.status))
        return doomed, more

    def remove(self, doomed: List[Doomed], on_error: Callable[[str], None]) -> None:
        """Thread: delete records but keep each id's tiny marker."""
        for cid, kind, status in doomed:
            try:
                if not os.path.exists(self.marker_path(cid)):
                    self._write_marker(cid, kind, status)
                shutil.rmtree(self.command_dir(cid))
            except FileNotFoundError:
                pass
            except Exception:
                on_error(cid)
