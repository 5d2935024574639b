# -*- test-case-name: tests.agent.test_commands,tests.agent.test_ansible -*-
"""What runs a command: the ``Execution`` interface, and its process implementation.

An execution is started by the command runner and reports through a narrow
``ExecutionSink``: bytes of output (``output``) and, exactly once, the end
(``ended``). The runner asks it to ``terminate`` (timeout, cancel, agent stop:
the whole tree, SIGTERM then SIGKILL after the grace) and, as a last resort at
agent stop, to ``force_close``. ``start`` returns what the record's
``proc.json`` keeps, so that a restarted agent can kill what a crashed one left
running (``kill_leftovers``). Two implementations: ``ProcessExecution`` here
(one child in its own session) and ``ansible_executor.AnsibleRun``.

``Timers`` holds the delayed calls of executions: plain timers are cancelled
at agent stop, escalation kills are run at once.

What it must never do: block the reactor (spawning is a fork/exec, the rest
are /proc reads and single syscalls), signal a process it cannot prove is one
of ours, or report an end twice.
"""

import signal
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from myx_agent import process as proc
from myx_agent.outputlog import STDERR, STDOUT

#: Environment variable that marks every process of an Ansible run (its workers
#: call setsid, so they leave the process group; the marker is inherited).
MARKER_ENV = "MYX_AGENT_RUN"

_log = Logger(namespace="myx_agent.execution")


class ExecutionSink(Protocol):
    """Where an execution reports (one per command)."""

    def output(self, stream: int, data: bytes) -> None:
        """Bytes the command wrote to ``stream`` (STDOUT or STDERR), in order."""

    def ended(
        self,
        return_code: Optional[int],
        error: Optional[str],
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        """The command is over: exit code (or minus the signal), or an error
        saying why there is none; ``extra`` adds keys to the result."""


class Execution(Protocol):
    """A running thing: a process tree or an Ansible run."""

    def start(self) -> Dict[str, Any]:
        """Start it; return what proc.json must keep to kill leftovers later.
        Raises if nothing could be started (then nothing is reported):
        ``proc.StartError`` with the sentence for the result, or anything else
        for an unexpected failure."""

    def terminate(self) -> None:
        """Start killing the whole tree: SIGTERM now, SIGKILL after the grace."""

    def force_close(self) -> None:
        """Last resort at agent stop: stop waiting for the child's pipes."""


class Timers:
    """Delayed calls on one clock that the runner's stop must deal with."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._calls: List[IDelayedCall] = []
        self._kills: List[Tuple[IDelayedCall, Callable[[], None]]] = []

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any) -> IDelayedCall:
        """A timer that agent stop cancels."""
        self._calls = [t for t in self._calls if t.active()]
        call = self._clock.callLater(delay, func, *args)
        self._calls.append(call)
        return call

    def kill_later(self, delay: float, func: Callable[[], None]) -> IDelayedCall:
        """An escalation kill; agent stop runs it at once instead."""
        call = self._clock.callLater(delay, func)
        self._kills = [(c, f) for c, f in self._kills if c.active()]
        self._kills.append((call, func))
        return call

    def run_kills_now(self) -> None:
        kills, self._kills = self._kills, []
        for call, func in kills:
            if call.active():
                call.cancel()
                try:
                    func()
                except Exception:
                    _log.failure("kill at stop failed")

    def cancel_all(self) -> None:
        calls, self._calls = self._calls, []
        for call in calls:
            if call.active():
                call.cancel()


def kill_leftovers(info: Dict[str, Any], boot_id: Optional[str]) -> int:
    """SIGKILL what a crashed agent left running, if provably ours (same boot,
    session leader's start time, or the run's environment marker); the count."""
    if not info or boot_id is None or info.get("boot_id") != boot_id:
        return 0
    pids: List[int] = []
    sid = info.get("pid")
    start = info.get("start_ticks")
    if isinstance(sid, int) and isinstance(start, int):
        pids.extend(proc.session_members(sid, start))
    marker = info.get("env_marker")
    if isinstance(marker, str) and marker:
        pids.extend(proc.pids_with_env_marker(MARKER_ENV, marker))
    if not pids:
        return 0
    return proc.signal_pids(sorted(set(pids)), signal.SIGKILL)


class ProcessExecution(ProcessProtocol):
    """One child in its own session; its stdout/stderr go to the sink."""

    #: After the child exits, how long to keep reading pipes that a background
    #: grandchild still holds open before giving up on them (the grandchild is
    #: left alone: a normal exit does not kill the session).
    PIPE_GRACE = 2.0

    def __init__(
        self,
        reactor: IReactorProcess,
        timers: Timers,
        sink: ExecutionSink,
        *,
        command_id: str,
        command: str,
        args: Sequence[str],
        env: Dict[str, str],
        cwd: Optional[str],
        kill_grace: float,
    ) -> None:
        self._reactor = reactor
        self._timers = timers
        self._sink = sink
        self.command_id = command_id
        self._command = command
        self._args = list(args)
        self._env = env
        self._cwd = cwd
        self._kill_grace = kill_grace
        self.pid: Optional[int] = None
        self._status = b""
        self._ended = False
        self._reaped = False
        self._pipe_call: Optional[IDelayedCall] = None
        self._kill_call: Optional[IDelayedCall] = None

    def start(self) -> Dict[str, Any]:
        """Spawn the child; raises proc.StartError if it cannot be executed."""
        proc.spawn_in_session(self._reactor, self, self._command, self._args, self._env, self._cwd)
        pid = self.pid
        return {"pid": pid, "start_ticks": proc.proc_start_ticks(pid) if pid else None}

    # -- ProcessProtocol -----------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        # Commands get no input: EOF on stdin at once.
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == proc.STATUS_FD:
            self._status = (self._status + data)[:256]
        elif childFD in (STDOUT, STDERR):
            self._sink.output(childFD, data)

    def processExited(self, reason: Failure) -> None:
        self._reaped = True
        if not self._ended:
            self._pipe_call = self._timers.call_later(self.PIPE_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        self._pipe_call = None
        if not self._ended and self.transport is not None:
            _log.info(
                "command {command_id}: exited but its pipes are still open "
                "(a background process holds them); closing them",
                command_id=self.command_id,
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
            error = proc.describe_status(self._status, self._command, self._cwd)
            rc = None
        self._sink.ended(rc, error)

    # -- Execution -------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM the session now, SIGKILL it after the grace period."""
        if self._ended or self.pid is None or self._kill_call is not None:
            return
        # Until the child is reaped its pid cannot be reused, so it is safe to
        # signal it directly in case it has not reached setsid yet (fork path).
        proc.kill_group(self.pid, signal.SIGTERM, pid=self.pid)
        self._kill_call = self._timers.kill_later(self._kill_grace, self._kill)

    def _kill(self) -> None:
        if self.pid is not None:
            proc.kill_group(self.pid, signal.SIGKILL, pid=None if self._reaped else self.pid)

    def force_close(self) -> None:
        if not self._ended and self.transport is not None:
            self.transport.loseConnection()
