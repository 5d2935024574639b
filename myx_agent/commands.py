# -*- test-case-name: tests.agent.test_commands,tests.agent.test_ansible -*-
"""The command runner: at-most-once commands with a resumable output stream
(docs/protocol.md, "execute_command", "execute_ansible", "get_command_log",
"cancel_command").

``CommandRunner`` is a Twisted service. It claims each command id on disk
before anything runs (``records``), starts an ``execution`` (a process tree or
an Ansible run) once that claim is durable, feeds what the execution reports
into the command's ``outputlog``, answers reads and long-polls from it, writes
the final result, and removes old records on a ``poll.Poller``. At start it
recovers what a previous agent left; at stop it kills the running trees and
records them as interrupted.

Params are checked once, by the method table (``methods.py``): the runner
trusts their types and ranges (a command id is safe as a file name) and checks
only what needs its state (a known id, an offset past the end, capacity).

Size: about 700 lines, over the house ~500, because it is one state machine
(accept, durable, started, finished, persisted, retained) whose transitions
share the command's state; the parts that are not that machine live in
``records``, ``outputlog``, ``execution`` and ``ansible_executor``.

What it must never do: block the reactor on slow work (fsyncs, tree deletions
and Ansible runs go to threads), start a second execution for a known
command_id, hang a reader of a command that can no longer end, or make up a
result.
"""

import base64
import functools
import json
import os
import random
import sys
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from myx_agent import process as proc
from myx_agent.contract import (
    INTERRUPTED_ERROR,
    KIND_ANSIBLE,
    KIND_COMMAND,
    RUNNING,
    status_of,
)
from myx_agent.errors import (
    BUSY,
    COMMAND_ID_CONFLICT,
    INVALID_PARAMS,
    STATE_UNWRITABLE,
    UNKNOWN_COMMAND,
    RPCError,
)
from myx_agent.execution import Execution, ProcessExecution, Timers, kill_leftovers
from myx_agent.outputlog import STDERR, STDOUT, STREAM_NAMES, Followers, OutputLog
from myx_agent.poll import Poller
from myx_agent.records import Records, command_result


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _log_disk_failure(log: Logger, f: Failure, message: str, **fields: Any) -> None:
    """An OSError (a full or unwritable state_dir) is expected: one error line with
    its reason and no traceback. Anything else is a bug and keeps its traceback."""
    if f.check(OSError):
        log.error(message + ": {error}", error=f.value, **fields)
    else:
        log.failure(message, f, **fields)


class _Command:
    """A command that is running, or finished but not yet persisted."""

    #: Its long-polls; set by the runner right after construction.
    followers: Followers[Dict[str, Any]]

    def __init__(self, command_id: str, kind: str, log: OutputLog, created_at: float) -> None:
        self.command_id = command_id
        self.kind = kind
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
        self.log_error: Optional[str] = None
        self.extra: Dict[str, Any] = {}
        self.result: Optional[Dict[str, Any]] = None
        self.tails: Dict[int, bytes] = {}
        self.timeout_call: Optional[IDelayedCall] = None
        self.end_listeners: List[Callable[[], None]] = []

    @property
    def status(self) -> str:
        if not self.finished or self.result is None:
            return RUNNING
        return status_of(self.result)


class _Sink:
    """The one way an execution reports to the runner, bound to its command."""

    __slots__ = ("_runner", "_command")

    def __init__(self, runner: "CommandRunner", command: _Command) -> None:
        self._runner = runner
        self._command = command

    def output(self, stream: int, data: bytes) -> None:
        self._runner._output(self._command, stream, data)

    def ended(
        self,
        return_code: Optional[int],
        error: Optional[str],
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        self._runner._finish(self._command, return_code=return_code, error=error, extra=extra)


class CommandRunner(Service):
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
        clock: Optional[IReactorTime] = None,
        wall: Optional[Callable[[], float]] = None,
    ) -> None:
        """``wall``: the clock that stamps records (``created_at``, ``finished_at``,
        retention); the agent passes ``time.time`` because its reactor's clock is
        monotonic (myx_agent.clock). Default: the reactor's ``seconds``."""
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor: Any = reactor
        self._wall: Callable[[], float] = wall if wall is not None else lambda: reactor.seconds()
        self._records = Records(state_dir)
        self._state_dir = self._records.state_dir
        self.deployment_tool_dir = os.path.abspath(deployment_tool_dir)
        self.max_concurrent = max_concurrent
        self.retention_seconds = retention_seconds
        self.retention_max_bytes = retention_max_bytes
        self.kill_grace = kill_grace
        self._active: Dict[str, _Command] = {}
        # Command timeouts, kill escalation, pipe grace and log waits run on
        # ``clock`` (default: the reactor; a test may drive them with a Clock).
        self._timers = Timers(clock if clock is not None else reactor)
        self._sweeper = Poller(
            self._sweep_tick,
            reactor,
            lambda: self.SWEEP_INTERVAL * random.uniform(0.8, 1.2),
            name="retention sweep",
        )
        self._stopping = False
        self._boot_id: Optional[str] = None
        self._ansible_pool: Any = None

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        """Recover state from disk (interrupted commands become final) and
        schedule retention sweeps. Raises OSError if state_dir is unusable."""
        if self.running:
            return
        self._records.prepare()
        self._boot_id = proc.boot_id()
        recovered = interrupted = 0
        for command_id in self._records.ids_on_disk():
            try:
                if self._records.recover(command_id, self._now(), self._kill_leftovers):
                    interrupted += 1
                    self._log.info(
                        "command {command_id} was interrupted by the agent restart",
                        command_id=command_id,
                    )
                recovered += 1
            except Exception:
                self._log.failure(
                    "cannot recover command {command_id}; leaving it on disk",
                    command_id=command_id,
                )
        self._stopping = False
        super().startService()
        self._log.info(
            "command runner started: {recovered} commands on disk, "
            "{interrupted} interrupted by the restart",
            recovered=recovered,
            interrupted=interrupted,
            state_dir=self._state_dir,
        )
        self._sweeper.start(self.FIRST_SWEEP)

    def stopService(self) -> "Deferred[None]":
        """Kill running process trees, finish their records, close files."""
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        sweeping = self._sweeper.stop()
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
        self._timers.run_kills_now()
        self._timers.cancel_all()
        if self._ansible_pool is not None:
            pool, self._ansible_pool = self._ansible_pool, None
            pool.stop()
        await sweeping

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

    def _now(self) -> float:
        return float(self._wall())

    def _in_thread(self, func: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """Run blocking file work off the reactor thread; inline with a reactor
        that has no threads (a Clock in tests)."""
        if IReactorThreads.providedBy(self._reactor):
            return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), func, *args)
        try:
            return succeed(func(*args))
        except Exception:
            return fail()

    def _kill_leftovers(self, command_id: str, info: Dict[str, Any]) -> None:
        killed = kill_leftovers(info, self._boot_id)
        if killed:
            self._log.warn(
                "command {command_id}: killed {count} processes left by the previous agent",
                command_id=command_id,
                count=killed,
            )

    # -- public methods (params already checked by the method table) ----------

    def _existing(self, command_id: str, kind: str) -> Optional[Dict[str, Any]]:
        """The duplicate answer for a known id, None for a new one."""
        known_kind: Optional[str]
        active = self._active.get(command_id)
        if active is not None:
            known_kind, status = active.kind, active.status
        elif command_id in self._records.finished:
            info = self._records.finished[command_id]
            known_kind, status = info.kind, info.status
        else:
            marker = self._records.claimed(command_id)
            if marker is None:
                return None
            known_kind, status = marker["kind"], marker["status"]
        if known_kind is not None and known_kind != kind:
            raise RPCError(
                COMMAND_ID_CONFLICT,
                f"command_id {command_id} is already used by a command of kind {known_kind}",
            )
        return {"status": status, "command_id": command_id, "duplicate": True}

    def _admit(self, command_id: str, kind: str) -> Optional[Dict[str, Any]]:
        """The duplicate answer, or None when a new command may start now."""
        if not self.running or self._stopping:
            raise RPCError(BUSY, "busy: the agent is not accepting commands right now")
        existing = self._existing(command_id, kind)
        if existing is not None:
            return existing
        running = self.running_count
        if running >= self.max_concurrent:
            raise RPCError(
                BUSY,
                f"busy: {running} commands are already running "
                f"(max_concurrent_commands={self.max_concurrent}); nothing was started",
            )
        return None

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
        existing = self._admit(command_id, KIND_COMMAND)
        if existing is not None:
            return existing
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
            execution = ProcessExecution(
                self._reactor,
                self._timers,
                _Sink(self, cmd),
                command_id=command_id,
                command=command,
                args=args,
                env=full_env,
                cwd=cwd,
                kill_grace=self.kill_grace,
            )
            self._after_durable(cmd, execution, timeout, f"cannot start {command}")
        return {"status": cmd.status, "command_id": command_id}

    def execute_ansible(
        self,
        command_id: str,
        playbook: str,
        extra_vars: Dict[str, Any],
        timeout: Optional[float],
        check: bool = False,
    ) -> Dict[str, Any]:
        """Run a playbook of the deployment tool with ansible-runner, at most once.

        ``check``: in Ansible's check mode (``--check --diff``), changing nothing.
        """
        # Lazily: only Ansible runs need it (and it imports no ansible_runner itself).
        from myx_agent import ansible_executor

        existing = self._admit(command_id, KIND_ANSIBLE)
        if existing is not None:
            return existing
        playbook_path = ansible_executor.resolve_playbook(self.deployment_tool_dir, playbook)
        meta = {
            "kind": KIND_ANSIBLE,
            "playbook": playbook,
            "playbook_path": playbook_path,
            "timeout": timeout,
            "extra_vars_keys": sorted(extra_vars),
            "check": check,
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
            return {"status": cmd.status, "command_id": command_id}
        if self._ansible_pool is None:
            from twisted.python.threadpool import ThreadPool

            self._ansible_pool = ThreadPool(
                minthreads=0, maxthreads=max(1, self.max_concurrent), name="myx-ansible"
            )
            self._ansible_pool.start()
        run = ansible_executor.AnsibleRun(
            self._reactor,
            self._ansible_pool,
            command_id=command_id,
            playbook_path=playbook_path,
            deployment_tool_dir=self.deployment_tool_dir,
            extra_vars_json=json.dumps(extra_vars),
            check=check,
            private_data_dir=os.path.join(self._records.command_dir(command_id), "ansible"),
            ansible_playbook=binary,
            kill_grace=self.kill_grace,
            sink=_Sink(self, cmd),
            timers=self._timers,
        )
        self._after_durable(cmd, run, timeout, "cannot start ansible-runner")
        return {"status": cmd.status, "command_id": command_id}

    def get_command_log(
        self, command_id: str, offset: int, wait: float, max_bytes: int
    ) -> "Deferred[Dict[str, Any]]":
        """Bytes of the combined stream from ``offset`` (see docs/protocol.md)."""
        try:
            cmd = self._active.get(command_id)
            if cmd is None:
                return succeed(self._read_finished(command_id, offset, max_bytes))
            if offset > cmd.log.size:
                raise self._past_end(offset, cmd.log.size)
            if offset == cmd.log.size and not cmd.persisted and wait > 0:
                return cmd.followers.wait(offset, max_bytes, wait)
            return succeed(self._read_active(cmd, offset, max_bytes))
        except RPCError:
            return fail()

    def cancel_command(self, command_id: str) -> Dict[str, Any]:
        """SIGTERM the command's tree, SIGKILL after the grace period."""
        cmd = self._active.get(command_id)
        if cmd is not None and not cmd.finished:
            cmd.cancelled = True
            self._log.info("command {command_id} cancelled", command_id=command_id)
            self._terminate(cmd)
            return {"command_id": command_id, "cancelled": True, "status": RUNNING}
        if cmd is not None:
            return {"command_id": command_id, "cancelled": False, "status": cmd.status}
        info = self._records.finished.get(command_id)
        if info is None:
            raise self._unknown(command_id)
        return {"command_id": command_id, "cancelled": False, "status": info.status}

    # -- starting --------------------------------------------------------------

    def _create(self, command_id: str, kind: str, meta: Dict[str, Any]) -> _Command:
        """Claim the id on disk and open the record; nothing runs yet."""
        now = self._now()
        try:
            log = self._records.create(
                command_id, kind, dict(meta, command_id=command_id, created_at=now)
            )
        except FileExistsError:
            raise
        except OSError as e:
            # A full (or read-only) state_dir is an expected condition: one line, no stack.
            self._log.error(
                "command {command_id}: cannot record it in {state_dir}: {error}; not started",
                command_id=command_id,
                state_dir=self._state_dir,
                error=e,
            )
            raise RPCError(
                STATE_UNWRITABLE,
                f"cannot record the command in the agent's state_dir: {e.strerror or e}; "
                "nothing was started",
            ) from None
        cmd = _Command(command_id, kind, log, now)
        cmd.followers = Followers(
            functools.partial(self._read_active, cmd), self._timers.call_later
        )
        self._active[command_id] = cmd
        return cmd

    def _after_durable(
        self, cmd: _Command, execution: Execution, timeout: Optional[float], what: str
    ) -> None:
        """Start ``execution`` once the claim on ``cmd``'s id is on disk."""
        d = self._in_thread(self._records.make_durable, cmd.command_id)

        def durable(_: Any) -> None:
            if cmd.finished:
                return
            cmd.started_at = self._now()
            if cmd.cancelled or cmd.interrupted:
                # Cancelled (or the agent stopping) before it ever started.
                self._finish(cmd, return_code=None, error=None)
                return
            self._launch(cmd, execution, timeout, what)

        def not_durable(f: Failure) -> None:
            _log_disk_failure(
                self._log,
                f,
                "command {command_id}: cannot make its record durable; not started",
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

    def _launch(
        self, cmd: _Command, execution: Execution, timeout: Optional[float], what: str
    ) -> None:
        try:
            info = execution.start()
        except proc.StartError as e:
            self._finish(cmd, return_code=None, error=str(e))
            return
        except Exception as e:
            self._log.failure("command {command_id}: start failed", command_id=cmd.command_id)
            self._finish(cmd, return_code=None, error=f"{what}: {e}")
            return
        cmd.execution = execution
        try:
            self._records.write_proc_info(
                cmd.command_id,
                dict(info, boot_id=self._boot_id, started_at=cmd.started_at),
            )
        except OSError as e:
            self._log.error(
                "command {command_id}: cannot write proc.json: {error}",
                command_id=cmd.command_id,
                error=e,
            )
        self._log.info("command {command_id} started: {info}", command_id=cmd.command_id, info=info)
        if timeout is not None and not cmd.finished:
            cmd.timeout_call = self._timers.call_later(timeout, self._on_timeout, cmd)
        if cmd.cancelled or cmd.interrupted:
            self._terminate(cmd)

    # -- running ---------------------------------------------------------------

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
        if cmd.followers.waiting:
            cmd.followers.wake()

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
        result = command_result(
            kind=cmd.kind,
            return_code=return_code,
            error=error,
            timed_out=cmd.timed_out,
            cancelled=cmd.cancelled,
            interrupted=cmd.interrupted,
            truncated={s: cmd.log.tails[s].truncated for s in (STDOUT, STDERR)},
            started_at=cmd.started_at,
            finished_at=cmd.finished_at,
            extra=cmd.extra,
        )
        success = result["success"]
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
            self._records.persist, cmd.command_id, cmd.kind, result, dict(cmd.tails)
        )
        d.addCallbacks(lambda _: self._persisted(cmd), lambda f: self._persist_failed(cmd, f))
        d.addErrback(lambda f: self._log.failure("persisting a result", f))

    def _persisted(self, cmd: _Command) -> None:
        cmd.persisted = True
        assert cmd.result is not None
        cmd.followers.wake()
        size = cmd.log.size
        cmd.log.close()
        if self._active.get(cmd.command_id) is cmd:
            del self._active[cmd.command_id]
        self._records.add_finished(
            cmd.command_id, cmd.kind, status_of(cmd.result), float(cmd.finished_at or 0), size
        )
        self._end(cmd)

    def _persist_failed(self, cmd: _Command, f: Failure) -> None:
        # Keep serving it from memory; after a restart it reads as interrupted.
        _log_disk_failure(
            self._log,
            f,
            "command {command_id}: cannot write its result (served from memory until a restart)",
            command_id=cmd.command_id,
        )
        cmd.persisted = True
        cmd.followers.wake()
        self._end(cmd)

    def _end(self, cmd: _Command) -> None:
        listeners, cmd.end_listeners = cmd.end_listeners, []
        for listener in listeners:
            try:
                listener()
            except Exception:
                self._log.failure("end listener failed")

    # -- reading ---------------------------------------------------------------

    @staticmethod
    def _past_end(offset: int, size: int) -> RPCError:
        return RPCError(
            INVALID_PARAMS,
            f"invalid params: offset {offset} is past the end of the log ({size} bytes)",
        )

    def _unknown(self, command_id: str) -> RPCError:
        if self._records.was_removed(command_id):
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
        result: Optional[Dict[str, Any]],
        tails: Dict[int, bytes],
    ) -> Dict[str, Any]:
        if result is not None:
            result = dict(result, stdout=_b64(tails.get(STDOUT, b"")))
            result["stderr"] = _b64(tails.get(STDERR, b""))
        return {
            "log_data": _b64(data),
            "log_type": STREAM_NAMES[stream] if (stream is not None and data) else None,
            "new_offset": new_offset,
            "is_final": result is not None,
            "result": result,
        }

    def _read_active(self, cmd: _Command, offset: int, max_bytes: int) -> Dict[str, Any]:
        if offset > cmd.log.size:
            raise self._past_end(offset, cmd.log.size)
        stream, data = cmd.log.read(offset, max_bytes)
        new_offset = offset + len(data)
        # Final only once the result is durable, so what a reader saw as final
        # is what it reads after an agent crash too.
        final = cmd.persisted and new_offset == cmd.log.size
        return self._response(stream, data, new_offset, cmd.result if final else None, cmd.tails)

    def _read_finished(self, command_id: str, offset: int, max_bytes: int) -> Dict[str, Any]:
        if command_id not in self._records.finished:
            raise self._unknown(command_id)
        try:
            log = self._records.open_log(command_id)
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
        if new_offset < size:
            return self._response(stream, data, new_offset, None, {})
        stored = self._records.read_result(command_id)
        if stored is None:
            raise self._unknown(command_id)
        return self._response(stream, data, new_offset, *stored)

    # -- retention -------------------------------------------------------------

    def _sweep_tick(self) -> Optional[float]:
        # More due than one batch removes: the next batch in a second.
        return 1.0 if self.sweep() else None

    def sweep(self) -> bool:
        """Remove finished commands past the retention window or the size cap
        (oldest first). Returns True when more are due than one batch removes."""
        doomed, more = self._records.select_expired(
            self._now(), self.retention_seconds, self.retention_max_bytes, self.SWEEP_BATCH
        )
        if not doomed:
            return False
        self._log.info("retention: removing {count} finished commands", count=len(doomed))

        def cannot(cid: str) -> None:
            self._log.failure("retention: cannot remove {command_id}", command_id=cid)

        d = self._in_thread(self._records.remove, doomed, cannot)
        d.addErrback(lambda f: self._log.failure("retention removal failed", f))
        return more
