# -*- test-case-name: tests.agent.test_commands -*-
"""Low-level process helpers for the agent: start a child in its own session,
and find or kill the processes a command left behind.

What it is for:
- ``spawn_in_session`` starts a command in a new session (``setsid``), in its
  cwd, with no Python interpreter in between. Without a cwd it is one
  ``posix_spawnp`` with ``setsid=True`` (glibc reports a failed exec as the
  call's errno); with a cwd, Twisted's fork path whose child calls ``setsid``,
  ``chdir`` and ``execvpe`` and, if one fails, writes ``"stage errno"`` on a
  close-on-exec status pipe (fd 3) and exits 127. Either way a command that
  cannot be started is reported as such, with its errno, never as an exit code.
- ``kill_group`` signals a whole process group (a command's session).
- ``proc_start_ticks``/``boot_id``/``session_members`` identify a process from a
  previous agent run safely (PID reuse), so a restarted agent can kill what a
  crashed one left running.
- ``pids_with_env_marker`` finds a process tree by an environment marker; used for
  Ansible, whose workers call ``setsid`` themselves and so leave the process group.

What it must never do: block for long (these are /proc reads and single
syscalls), leak an agent file descriptor or an ignored signal into a command,
or signal a process it cannot prove belongs to one of our commands. Linux only
(/proc), like the agent.
"""

import errno
import os
import signal
from typing import Any, Dict, List, Mapping, Optional, Sequence

#: The status pipe of the fork path (see the module docstring).
STATUS_FD = 3
#: childFDs: stdin pipe (closed at once), stdout, stderr.
CHILD_FDS: Dict[int, str] = {0: "w", 1: "r", 2: "r"}
#: childFDs of the fork path (a cwd to change to): plus the status pipe.
CHILD_FDS_WITH_STATUS: Dict[int, str] = {**CHILD_FDS, STATUS_FD: "r"}


class StartError(Exception):
    """A command could not be started; the message says why, for the result."""


def describe_start_failure(stage: str, num: int, command: str, cwd: Optional[str]) -> str:
    """A sentence for the result from the failed stage and its errno."""
    reason = os.strerror(num) if num else "unknown error"
    if stage == "exec":
        if num == errno.ENOENT:
            return f"executable not found: {command}"
        return f"cannot execute {command}: {reason}"
    if stage == "cwd":
        if num == errno.ENOENT:
            return f"cwd not found: {cwd}"
        return f"cannot change to cwd {cwd}: {reason}"
    return f"cannot create a session for {command}: {reason}"


def describe_status(status: bytes, command: str, cwd: Optional[str]) -> str:
    """Turn the fork child's ``"stage errno"`` report into a sentence."""
    try:
        stage, num_s = status.decode("ascii", "replace").split()
        return describe_start_failure(stage, int(num_s), command, cwd)
    except ValueError:
        return f"cannot start {command}"


def _ignored_signals() -> List[int]:
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec.
    return [s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN]


def _spawn_actions(fdmap: Mapping[int, int]) -> Optional[List[Any]]:
    """posix_spawn file actions: the mapped pipes onto 0-2, every other
    inheritable fd closed; None if the map cannot be applied in one pass."""
    if any(parent in fdmap for parent in fdmap.values()):
        return None
    actions: List[Any] = [(os.POSIX_SPAWN_DUP2, parent, child) for child, parent in fdmap.items()]
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in fdmap:
            continue
        try:
            inheritable = os.get_inheritable(fd)
        except OSError:
            continue  # the listing's own fd, already closed
        if inheritable:
            actions.append((os.POSIX_SPAWN_CLOSE, fd))
    return actions


def spawn_in_session(
    reactor: Any,
    protocol: Any,
    command: str,
    args: Sequence[str],
    env: Mapping[str, str],
    cwd: Optional[str],
) -> Any:
    """Start ``command args`` in a new session, in ``cwd``, connected to
    ``protocol`` (a ProcessProtocol). Returns the process transport. Raises
    StartError when the exec (or setsid) fails at once; with a cwd, a failure
    arrives later on ``protocol``'s STATUS_FD instead."""
    argv = [command, *args]
    child_fds = dict(CHILD_FDS if cwd is None else CHILD_FDS_WITH_STATUS)
    process_class = _session_process_class()
    try:
        return process_class(reactor, command, argv, dict(env), cwd, protocol, childFDs=child_fds)
    except OSError as e:
        raise StartError(describe_start_failure("exec", e.errno or 0, command, cwd)) from None


_SESSION_PROCESS: Optional[type] = None


def _session_process_class() -> type:
    """Twisted's Process, started in a new session (built once, on first use:
    twisted.internet.process is not needed before the first command)."""
    global _SESSION_PROCESS
    if _SESSION_PROCESS is not None:
        return _SESSION_PROCESS
    from twisted.internet.process import Process

    class SessionProcess(Process):
        def _trySpawnInsteadOfFork(
            self,
            path: Any,
            uid: Any,
            gid: Any,
            executable: str,
            args: List[str],
            environment: Mapping[str, str],
            kwargs: Dict[str, Any],
        ) -> bool:
            if path is not None:
                return False  # posix_spawn cannot chdir here: the fork path
            actions = _spawn_actions(kwargs["fdmap"])
            if actions is None:
                return False
            self.pid = os.posix_spawnp(
                executable,
                args,
                environment,
                file_actions=actions,
                setsigdef=_ignored_signals(),
                setsid=True,
            )
            self.status = -1
            return True

        def _execChild(
            self,
            path: Any,
            uid: Any,
            gid: Any,
            executable: str,
            args: List[str],
            environment: Mapping[str, str],
        ) -> None:
            # In the forked child: no exception may escape (Twisted would print
            # a traceback and exit 1), every failure is "stage errno" on fd 3.
            stage = "setsid"
            try:
                os.set_inheritable(STATUS_FD, False)
                for sig in _ignored_signals():
                    signal.signal(sig, signal.SIG_DFL)
                os.setsid()
                stage = "cwd"
                if path:
                    os.chdir(path)
                stage = "exec"
                os.execvpe(executable, args, environment)  # noqa: S606 (no shell, by contract)
            except OSError as e:
                try:
                    os.write(STATUS_FD, f"{stage} {e.errno or 0}".encode())
                finally:
                    os._exit(127)

    _SESSION_PROCESS = SessionProcess
    return SessionProcess


def preflight(command: str, cwd: Optional[str], env: Mapping[str, str]) -> Optional[str]:
    """The error an exec would meet, found before spawning (so a missing executable
    or cwd is final at once); None when it looks runnable. The spawn still
    reports whatever changes between this check and the exec."""
    if cwd is not None:
        if not os.path.exists(cwd):
            return f"cwd not found: {cwd}"
        if not os.path.isdir(cwd):
            return f"cwd is not a directory: {cwd}"
    if "/" in command:
        path = command if os.path.isabs(command) else os.path.join(cwd or os.getcwd(), command)
        if not os.path.exists(path):
            return f"executable not found: {command}"
        return None
    search = env.get("PATH") or os.defpath
    for d in search.split(os.pathsep):
        candidate = os.path.join(d or ".", command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return None
    return f"executable not found: {command}"


def kill_group(pgid: int, sig: int, pid: Optional[int] = None) -> bool:
    """Signal process group ``pgid``; True if it existed. ``pid`` is also signalled
    directly when the group is not there yet (the wrapper has not reached setsid)."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        pass
    except PermissionError:
        return True
    if pid is not None:
        try:
            os.kill(pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            pass
    return False


def _stat_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    end = data.rfind(b")")
    if end < 0:
        return None
    return data[end + 2 :].decode("ascii", "replace").split()


def proc_start_ticks(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (unique with boot_id)."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _all_pids() -> List[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [int(n) for n in names if n.isdigit()]


def session_members(sid: int, min_start_ticks: int) -> List[int]:
    """Live processes of session ``sid`` that started no earlier than its leader.

    Linux keeps a PID number allocated while it is in use as a session id, so
    processes that still carry ``sid`` belong to the original session."""
    me = os.getpid()
    found = []
    for pid in _all_pids():
        if pid == me:
            continue
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
            continue
        try:
            if int(fields[3]) == sid and int(fields[19]) >= min_start_ticks:
                found.append(pid)
        except ValueError:
            continue
    return found


def pids_with_env_marker(name: str, value: str) -> List[int]:
    """Live processes whose initial environment holds ``name=value``."""
    needle = (f"{name}={value}").encode()
    me = os.getpid()
    found = []
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found


def signal_pids(pids: Sequence[int], sig: int) -> int:
    """Send ``sig`` to each pid; return how many were still there."""
    hit = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            hit += 1
        except (ProcessLookupError, PermissionError):
            pass
    return hit


def exit_code_from_status(exit_code: Optional[int], sig: Optional[int]) -> Optional[int]:
    """Protocol return code: the exit code, or minus the signal number."""
    if exit_code is not None:
        return exit_code
    if sig is not None:
        return -sig
    return None
