# -*- test-case-name: tests.agent.test_commands -*-
"""Low-level process helpers for the agent: start a child in its own session,
and find or kill the processes a command left behind.

What it is for:
- ``session_argv`` builds the argv of a tiny exec wrapper that puts the command
  in a new session (``setsid``), changes to its cwd and execs it. If the chdir
  or the exec fails, the wrapper reports the stage and errno on fd 3 and exits
  127, so the agent can give a clear result instead of guessing from an exit code.
- ``kill_group`` signals a whole process group (a command's session).
- ``proc_start_ticks``/``boot_id``/``session_members`` identify a process from a
  previous agent run safely (PID reuse), so a restarted agent can kill what a
  crashed one left running.
- ``pids_with_env_marker`` finds a process tree by an environment marker; used for
  Ansible, whose workers call ``setsid`` themselves and so leave the process group.

What it must never do: block for long (these are /proc reads and single
syscalls), or signal a process it cannot prove belongs to one of our commands.
Linux only (/proc), like the agent.
"""

import errno
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence

# The wrapper runs as `python -I -S -c WRAPPER LC_CTYPE_MARK CWD FILE ARGS...`.
# Python's start-up would leak into the command in two ways that it undoes:
# - PEP 538 locale coercion sets LC_CTYPE in the environment: restored from argv[1]
#   ("-" = absent, "=VALUE" = that value);
# - Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec.
# fd 3 is a pipe to the agent, closed on a successful exec (FD_CLOEXEC).
_WRAPPER = r"""
import os, signal, sys
a = sys.argv
def fail(stage, e):
    try:
        os.write(3, ("%s %d" % (stage, e.errno or 0)).encode())
    finally:
        os._exit(127)
try:
    os.set_inheritable(3, False)
except OSError:
    pass
if a[1] == "-":
    os.environ.pop("LC_CTYPE", None)
else:
    os.environ["LC_CTYPE"] = a[1][1:]
for name in ("SIGPIPE", "SIGXFSZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
try:
    os.setsid()
except OSError as e:
    fail("setsid", e)
if a[2]:
    try:
        os.chdir(a[2])
    except OSError as e:
        fail("cwd", e)
try:
    os.execvp(a[3], a[3:])
except OSError as e:
    fail("exec", e)
"""

#: childFDs for spawnProcess: stdin pipe (closed at once), stdout, stderr, and the
#: wrapper's status pipe.
CHILD_FDS: Dict[int, str] = {0: "w", 1: "r", 2: "r", 3: "r"}
STATUS_FD = 3


def wrapper_python() -> str:
    return sys.executable or "/usr/bin/python3"


def session_argv(
    command: str, args: Sequence[str], cwd: Optional[str], env: Mapping[str, str]
) -> List[str]:
    """The argv that runs ``command args`` in a new session, in ``cwd``, with ``env``
    (``env`` itself is given to spawnProcess)."""
    lc_mark = "=" + env["LC_CTYPE"] if "LC_CTYPE" in env else "-"
    return [wrapper_python(), "-I", "-S", "-c", _WRAPPER, lc_mark, cwd or "", command, *args]


def describe_wrapper_failure(status: bytes, command: str, cwd: Optional[str]) -> str:
    """Turn the wrapper's ``"stage errno"`` report into a sentence for the result."""
    try:
        stage, num_s = status.decode("ascii", "replace").split()
        num = int(num_s)
    except ValueError:
        return f"cannot start {command}"
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


def preflight(command: str, cwd: Optional[str], env: Mapping[str, str]) -> Optional[str]:
    """The error an exec would meet, found before spawning (so a missing executable
    or cwd is final at once); None when it looks runnable. The wrapper still
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
