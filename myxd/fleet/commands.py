# -*- test-case-name: tests.daemon.test_command_queue,tests.daemon.test_fleet_integration -*-
"""`CommandQueue`: run commands and ansible playbooks on agents, and stream their logs.

A command is recorded `running`, then `execute_command` / `execute_ansible` is
called at once (with retries: the agent runs a `command_id` at most once). A log
poller per running command then reads `get_command_log` from the stored offset
with the agent's long-poll `wait`, appends each slice to the store (idempotently,
keyed by offset) and wakes subscribers (the API's long-poll and SSE readers).
On `is_final` the status, exit code and result are stored.

Resume: `startService` restarts a poller for every unfinished command from its
stored offset, so a restart of myxd loses and duplicates no byte.

It is about 700 lines, over the house ~500, because dispatch, the per-command
log poller (with its unreachable-agent backoff) and resume on start share one
state per command (its offset, its subscribers, its final status).

This module never blocks the reactor, never logs tokens or a command's
environment values, and never lets one command's failure stop the others.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd._reactor import default_reactor
from myxd.errors import NotFoundError
from myxd.metrics import NO_METRICS, CommandMetrics
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import AgentRPCError, ProtocolError, RemoteError
from myxd.statuses import FINAL_STATUSES, OUTPUT_STREAMS, RETRYABLE, UNKNOWN_COMMAND
from myxd.store.records import AgentRecord, CommandRecord, HeartbeatResult

if TYPE_CHECKING:
    from myxd.config import Settings
    from myxd.rpc.client import AgentRPC
    from myxd.store.protocols import QueueStore

__all__ = ["LOG_CHUNK_BYTES", "CommandQueue", "CommandUpdate"]

LOG_CHUNK_BYTES = 256 * 1024  # max_bytes per get_command_log (agent cap: 1 MiB)
MAX_AGENT_WAIT = 30.0  # the agent's upper bound for `wait`


@dataclass(frozen=True)
class CommandUpdate:
    """Passed to subscribers: new output was stored, or the command ended."""

    command_id: int
    output_offset: int
    status: str
    final: bool


@dataclass(frozen=True)
class _LogSlice:
    data: bytes
    stream: str | None
    new_offset: int
    is_final: bool
    result: dict[str, Any] | None


class _Stop(Exception):
    """The poller has put the command in a final state; end its task."""


def _parse_log(res: Any, offset: int) -> _LogSlice:
    if not isinstance(res, dict):
        raise ProtocolError("get_command_log: result is not an object")
    raw = res.get("log_data") or ""
    if not isinstance(raw, str):
        raise ProtocolError("get_command_log: log_data is not a string")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("get_command_log: log_data is not base64") from None
    new_offset = res.get("new_offset")
    if not isinstance(new_offset, int) or isinstance(new_offset, bool):
        raise ProtocolError("get_command_log: new_offset is not an integer")
    if new_offset != offset + len(data):
        raise ProtocolError(
            f"get_command_log: new_offset {new_offset} != offset {offset} + {len(data)} bytes"
        )
    stream = res.get("log_type")
    if data and stream not in OUTPUT_STREAMS:
        raise ProtocolError("get_command_log: log_type is not stdout or stderr")
    result = res.get("result")
    return _LogSlice(
        data=data,
        stream=stream if data else None,
        new_offset=new_offset,
        is_final=res.get("is_final") is True,
        result=result if isinstance(result, dict) else None,
    )


def _final_status(result: Mapping[str, Any]) -> str:
    """The stored status of a final result: the agent reports a cancel or a
    timeout with ``cancelled`` / ``timed_out`` flags (docs/protocol.md)."""
    if result.get("success") is True:
        return "success"
    if result.get("timed_out"):
        return "timed_out"
    if result.get("cancelled"):
        return "cancelled"
    ansible = result.get("ansible")
    if isinstance(ansible, dict) and ansible.get("status") == "canceled":
        return "cancelled"
    if isinstance(ansible, dict) and ansible.get("status") == "timeout":
        return "timed_out"
    return "failed"


def _failure_reason(result: Mapping[str, Any]) -> str:
    if result.get("timed_out"):
        return "timed out (reported by the agent)"
    if result.get("cancelled"):
        return "cancelled"
    error = result.get("error")
    if result.get("interrupted"):
        return str(error or "interrupted by agent restart")
    if error:
        return str(error)
    ansible = result.get("ansible")
    if isinstance(ansible, dict) and ansible.get("status") not in (None, "successful"):
        return f"ansible run {ansible.get('status')}"
    rc = result.get("return_code")
    if isinstance(rc, int) and not isinstance(rc, bool):
        return f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    return "failed"


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError("timeout must be a number > 0 or null")
    return float(timeout)


class CommandQueue(Service):
    """Commands and ansible runs on agents, with live log polling; see module docstring."""

    log = Logger()

    def __init__(
        self,
        store: QueueStore,
        rpc: AgentRPC,
        settings: Settings,
        reactor: IReactorTime | None = None,
        *,
        metrics: CommandMetrics | None = None,
    ) -> None:
        self._reactor: IReactorTime = default_reactor(reactor)
        self._store = store
        self._rpc = rpc
        self._settings = settings
        self._metrics: CommandMetrics = NO_METRICS if metrics is None else metrics
        self._slots = DeferredSemaphore(max(1, int(settings.max_log_pollers)))
        self._tasks: dict[int, Deferred[None]] = {}
        self._subscribers: dict[int, list[Callable[[CommandUpdate], Any]]] = {}
        self._resume: Deferred[None] | None = None
        self._stopping = False
        self.polls_in_flight = 0
        self.max_polls_in_flight = 0

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        resume = Deferred.fromCoroutine(self._resume_unfinished())
        resume.addErrback(self._log_failure, "could not resume unfinished commands")
        self._resume = None if resume.called else resume
        if self._resume is not None:
            resume.addBoth(self._resumed)

    def _resumed(self, _: object) -> None:
        self._resume = None

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        waits: list[Deferred[Any]] = []
        if self._resume is not None:
            self._resume.cancel()
        # Pollers stop where they are; the stored offset is where they resume.
        for task in list(self._tasks.values()):
            task.cancel()
            waits.append(task)
        if not waits:
            return succeed(None)
        done: Deferred[None] = Deferred()
        DeferredList(waits, consumeErrors=True).addBoth(lambda _: done.callback(None))
        return done

    async def _resume_unfinished(self) -> None:
        unfinished = await self._store.list_unfinished_commands()
        if unfinished:
            self.log.info("resuming {count} unfinished command(s)", count=len(unfinished))
        for rec in unfinished:
            self._spawn(rec)

    # -- public API -------------------------------------------------------------

    async def add_command(
        self,
        agent_id: int,
        command: str,
        args: Sequence[str],
        timeout: float | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        actor: str = "api",
    ) -> CommandRecord:
        """Record a command `running` and start it on the agent (execute + log polling).

        Raises ValueError (naming the field) for bad input, NotFoundError for an
        unknown agent. Returns the record as created; the outcome of the execute
        call and the output arrive in the store (and via `subscribe`).
        """
        if not isinstance(command, str) or not command:
            raise ValueError("command must be a non-empty string")
        if isinstance(args, (str, bytes)) or not all(isinstance(a, str) for a in args):
            raise ValueError("args must be a list of strings")
        timeout = _check_timeout(timeout)
        if env is not None and not (
            isinstance(env, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ValueError("env must be an object of string values")
        if cwd is not None and not isinstance(cwd, str):
            raise ValueError("cwd must be a string")
        extra: dict[str, Any] = {}
        if env:
            extra["env"] = dict(env)
        if cwd is not None:
            extra["cwd"] = cwd
        return await self._create(
            agent_id,
            "command",
            command,
            list(args),
            timeout,
            extra or None,
            actor,
            {"command": command, "args": list(args), "env_keys": sorted(env or {}), "cwd": cwd},
        )

    async def add_ansible(
        self,
        agent_id: int,
        playbook: str,
        extra_vars: Mapping[str, Any],
        timeout: float | None,
        *,
        actor: str = "api",
        command_uid: str | None = None,
        check: bool = False,
    ) -> CommandRecord:
        """Like `add_command`, for `execute_ansible(playbook, extra_vars, timeout)`.

        `command_uid`: the agent-side id to use (a deployment target reserved it).
        `check`: Ansible's check mode (the agent runs ``--check --diff``).
        """
        if not isinstance(playbook, str) or not playbook:
            raise ValueError("playbook must be a non-empty string")
        if extra_vars is None:
            extra_vars = {}
        if not isinstance(extra_vars, Mapping):
            raise ValueError("extra_vars must be an object")
        timeout = _check_timeout(timeout)
        extra: dict[str, Any] = {"extra_vars": dict(extra_vars)}
        details: dict[str, Any] = {"playbook": playbook, "extra_var_keys": sorted(extra_vars)}
        if check:
            extra["check"] = details["check"] = True
        return await self._create(
            agent_id,
            "ansible",
            playbook,
            [],
            timeout,
            extra,
            actor,
            details,
            command_uid=command_uid,
        )

    async def cancel(self, command_id: int, *, actor: str = "api") -> CommandRecord:
        """Ask the agent to cancel; the poller then stores the final (cancelled) result.

        NotFoundError for an unknown command; a finished command is returned as
        is. Raises AgentRPCError when the agent cannot be asked.
        """
        rec = await self._store.get_command(command_id)
        if rec is None:
            raise NotFoundError(f"command {command_id} not found")
        if rec.status in FINAL_STATUSES:
            return rec
        agent = await self._store.get_agent(rec.agent_id)
        if agent is None:
            await self._fail(rec, "agent was deleted")
            return await self._current(rec)
        try:
            reply = await self._rpc.call(
                AgentEndpoint.from_record(agent), "cancel_command", {"command_id": rec.command_uid}
            )
        except RemoteError as e:
            if e.code != UNKNOWN_COMMAND or rec.attempts:
                await self._event(actor, "command.cancel", rec, "failed", {"reason": e.reason})
                raise
            # The agent never got it: stop the pending execute and close the record.
            task = self._tasks.get(rec.id)
            if task is not None:
                task.cancel()
            await self._event(actor, "command.cancel", rec, "cancelled_before_start")
            await self._fail(rec, "cancelled before it started", status="cancelled")
            return await self._current(rec)
        except AgentRPCError as e:
            await self._event(actor, "command.cancel", rec, "failed", {"reason": e.reason})
            raise
        outcome = (
            "requested"
            if isinstance(reply, dict) and reply.get("cancelled")
            else ("already_finished")
        )
        await self._event(actor, "command.cancel", rec, outcome)
        return await self._current(rec)

    def subscribe(
        self, command_id: int, callback: Callable[[CommandUpdate], Any]
    ) -> Callable[[], None]:
        """Call `callback(CommandUpdate)` after new output or the final status is
        stored. Returns a function that unsubscribes (safe to call twice)."""
        self._subscribers.setdefault(command_id, []).append(callback)

        def unsubscribe() -> None:
            callbacks = self._subscribers.get(command_id)
            if callbacks is None:
                return
            try:
                callbacks.remove(callback)
            except ValueError:
                return
            if not callbacks:
                del self._subscribers[command_id]

        return unsubscribe

    def is_polling(self, command_id: int) -> bool:
        """True while a task (execute and/or log poller) runs for the command."""
        return command_id in self._tasks

    # -- creation ---------------------------------------------------------------

    async def _create(
        self,
        agent_id: int,
        kind: str,
        command: str,
        args: list[str],
        timeout: float | None,
        extra: dict[str, Any] | None,
        actor: str,
        audit: dict[str, Any],
        command_uid: str | None = None,
    ) -> CommandRecord:
        if self._stopping:
            raise RuntimeError("the command queue is stopping")
        agent = await self._store.get_agent(agent_id)
        if agent is None:
            raise NotFoundError(f"agent {agent_id} not found")
        rec = await self._store.create_command(
            agent_id=agent_id,
            kind=kind,
            command=command,
            args=args,
            timeout=timeout,
            extra=extra,
            status="running",
            command_uid=command_uid,
        )
        self._hook(self._metrics.command_created, kind)
        await self._event(actor, f"{kind}.create", rec, "running", {"agent_id": agent_id, **audit})
        self._spawn(rec, agent)
        return rec

    def _spawn(self, rec: CommandRecord, agent: AgentRecord | None = None) -> None:
        if rec.id in self._tasks or self._stopping:
            return
        task = Deferred.fromCoroutine(self._drive(rec, agent))
        if task.called:
            task.addErrback(self._task_failed, rec.id)
            return
        self._tasks[rec.id] = task

        def finished(result: object) -> object:
            if self._tasks.get(rec.id) is task:
                del self._tasks[rec.id]
            return result

        task.addBoth(finished)
        task.addErrback(self._task_failed, rec.id)

    def _task_failed(self, failure: Failure, command_id: int) -> None:
        if failure.check(CancelledError, _Stop):
            return
        self.log.failure(
            "command {command_id}: poller failed; it resumes at the next start",
            failure,
            command_id=command_id,
        )

    # -- the per-command task: execute (if not yet accepted), then poll ----------

    async def _drive(self, rec: CommandRecord, agent: AgentRecord | None) -> None:
        if agent is None:
            agent = await self._store.get_agent(rec.agent_id)
            if agent is None:
                await self._fail(rec, "agent was deleted")
                return
        try:
            ep = AgentEndpoint.from_record(agent)
        except ValueError as e:
            await self._fail(rec, f"bad agent record: {e}")
            return
        try:
            if rec.attempts == 0 or rec.status == "pending":
                await self._execute(rec, ep)
            await self._poll(rec, ep)
        except _Stop:
            return

    def _execute_call(self, rec: CommandRecord) -> tuple[str, dict[str, Any]]:
        extra = rec.extra or {}
        if rec.kind == "ansible":
            params: dict[str, Any] = {
                "playbook": rec.command,
                "extra_vars": extra.get("extra_vars") or {},
                "timeout": rec.timeout,
                "command_id": rec.command_uid,
            }
            if extra.get("check") is True:
                # Only when asked: an agent older than the parameter refuses it.
                params["check"] = True
            return "execute_ansible", params
        return "execute_command", {
            "command": rec.command,
            "args": list(rec.args),
            "timeout": rec.timeout,
            "command_id": rec.command_uid,
            "env": extra.get("env"),
            "cwd": extra.get("cwd"),
        }

    async def _execute(self, rec: CommandRecord, ep: AgentEndpoint) -> None:
        method, params = self._execute_call(rec)
        try:
            reply, attempts = await self._rpc.call_with_attempts(ep, method, params, retry=True)
        except AgentRPCError as e:
            await self._fail(
                rec,
                f"{method} failed: {e.reason}",
                attempts=e.attempts,
                unreachable=e.kind == RETRYABLE,
            )
            raise _Stop() from e
        self.log.info(
            "command {command_id} started on agent {agent_id} ({method}, "
            "{attempts} attempt(s){dup})",
            command_id=rec.id,
            agent_id=rec.agent_id,
            method=method,
            attempts=attempts,
            dup=", duplicate" if isinstance(reply, dict) and reply.get("duplicate") else "",
        )
        await self._store.update_command(rec.id, status="running", attempts=attempts)

    async def _poll(self, rec: CommandRecord, ep: AgentEndpoint) -> None:
        clock = self._reactor
        offset = rec.output_offset
        wait = min(MAX_AGENT_WAIT, max(0.0, float(self._settings.log_poll_wait)))
        interval = max(0.0, float(self._settings.log_poll_interval))
        call_timeout = float(self._settings.rpc_timeout) + wait
        # While the agent is unreachable the command may well still run and
        # write output there: keep asking (backing off) for this long before
        # giving up on it, never less than the command's own time limit.
        patience = max(float(self._settings.log_unreachable_limit), float(rec.timeout or 0) + 60.0)
        unreachable_since: float | None = None
        misses = 0
        due = clock.seconds()
        while True:
            await self._slots.acquire()
            started = clock.seconds()
            self._hook(self._metrics.poll_lag, max(0.0, started - due))
            self.polls_in_flight += 1
            self.max_polls_in_flight = max(self.max_polls_in_flight, self.polls_in_flight)
            retry_in: float | None = None
            try:
                reply = await self._rpc.call(
                    ep,
                    "get_command_log",
                    {
                        "command_id": rec.command_uid,
                        "offset": offset,
                        "wait": wait,
                        "max_bytes": LOG_CHUNK_BYTES,
                    },
                    retry=True,
                    timeout=call_timeout,
                )
            except RemoteError as e:
                await self._fail(rec, f"get_command_log failed: {e.reason}")
                return
            except AgentRPCError as e:
                now = clock.seconds()
                if unreachable_since is None:
                    unreachable_since = now
                if e.kind != RETRYABLE or now - unreachable_since >= patience:
                    await self._fail(
                        rec,
                        f"agent unreachable while reading the log: {e.reason}"
                        + (
                            f" (for {now - unreachable_since:.0f} s)" if e.kind == RETRYABLE else ""
                        ),
                        unreachable=e.kind == RETRYABLE,
                    )
                    return
                misses += 1
                self.log.info(
                    "command {command_id}: agent unreachable while reading the log "
                    "({reason}); trying again",
                    command_id=rec.id,
                    reason=e.reason,
                )
                retry_in = min(30.0, max(interval, 1.0) * 2 ** min(misses - 1, 5))
            finally:
                self.polls_in_flight -= 1
                self._slots.release()
            if retry_in is not None:
                # Outside the slot: a waiting poller holds no poll slot.
                due = clock.seconds() + retry_in
                await deferLater(clock, retry_in, lambda: None)
                continue
            unreachable_since = None
            misses = 0
            try:
                piece = _parse_log(reply, offset)
            except ProtocolError as e:
                await self._fail(rec, str(e))
                return
            try:
                if piece.data:
                    assert piece.stream is not None
                    offset = await self._store.append_output(
                        rec.id, offset, piece.stream, piece.data
                    )
                    self._notify(CommandUpdate(rec.id, offset, "running", False))
                if piece.is_final and offset == piece.new_offset:
                    await self._finish(rec, piece.result or {})
                    return
            except CancelledError:
                raise
            except NotFoundError:
                # The command (or its agent) was deleted meanwhile: nothing to keep.
                self.log.info(
                    "command {command_id} was deleted; its poller stops", command_id=rec.id
                )
                return
            except Exception:
                # The store hiccuped: nothing was lost, the agent keeps the log, so
                # the same range is simply read again after a pause.
                self.log.failure(
                    "command {command_id}: could not store output at offset {offset}; retrying",
                    command_id=rec.id,
                    offset=offset,
                )
                await deferLater(clock, max(interval, 0.1), lambda: None)
                offset = await self._stored_offset(rec, offset)
                due = clock.seconds()
                continue
            if piece.data:
                due = clock.seconds()
                continue
            # Nothing new: the long-poll already waited; if the agent answered at
            # once anyway, keep quiet commands to one request per interval.
            pause = interval - (clock.seconds() - started)
            due = clock.seconds() + max(0.0, pause)
            if pause > 0:
                await deferLater(clock, pause, lambda: None)

    async def _stored_offset(self, rec: CommandRecord, fallback: int) -> int:
        try:
            current = await self._store.get_command(rec.id)
        except CancelledError:
            raise
        except Exception:
            return fallback
        return fallback if current is None else current.output_offset

    async def _finish(self, rec: CommandRecord, result: Mapping[str, Any]) -> None:
        success = result.get("success") is True
        status = _final_status(result)
        rc = result.get("return_code")
        exit_code = rc if isinstance(rc, int) and not isinstance(rc, bool) else None
        reason = None if success else _failure_reason(result)
        # The log holds the whole output; the result's stdout/stderr tails would
        # only duplicate up to 128 KiB of it in every record.
        slim = {k: v for k, v in result.items() if k not in ("stdout", "stderr")}
        finished = result.get("finished_at")
        finished_at = (
            float(finished)
            if isinstance(finished, (int, float)) and not isinstance(finished, bool)
            else self._store.now()
        )
        await self._store.update_command(
            rec.id,
            status=status,
            exit_code=exit_code,
            reason=reason,
            result=slim,
            finished_at=finished_at,
        )
        self.log.info(
            "command {command_id} finished: {status} (exit code {exit_code})",
            command_id=rec.id,
            status=status,
            exit_code=exit_code,
        )
        await self._event(
            "queue", f"{rec.kind}.finish", rec, status, {"exit_code": exit_code, "reason": reason}
        )
        current = await self._current(rec)
        self._notify(CommandUpdate(rec.id, current.output_offset, status, True))

    async def _fail(
        self,
        rec: CommandRecord,
        reason: str,
        *,
        attempts: int | None = None,
        unreachable: bool = False,
        status: str = "failed",
    ) -> None:
        now = self._store.now()
        self.log.warn(
            "command {command_id} {status}: {reason}",
            command_id=rec.id,
            status=status,
            reason=reason,
        )
        try:
            await self._store.update_command(
                rec.id, status=status, reason=reason, attempts=attempts, finished_at=now
            )
        except NotFoundError:
            return
        await self._event("queue", f"{rec.kind}.finish", rec, status, {"reason": reason})
        if unreachable:
            await self._count_unreachable(rec, reason, now)
        current = await self._current(rec)
        self._notify(CommandUpdate(rec.id, current.output_offset, status, True))

    async def _count_unreachable(self, rec: CommandRecord, reason: str, now: float) -> None:
        # An agent that cannot be reached after retries is as dead as a failed
        # heartbeat: it is marked offline and the failure counts towards reinstall.
        try:
            await self._store.record_heartbeat_results(
                [
                    HeartbeatResult(
                        agent_id=rec.agent_id, at=now, ok=False, reason=reason, error_kind=RETRYABLE
                    )
                ]
            )
            await self._store.add_event(
                actor="queue",
                action="agent.unreachable",
                target=f"agent:{rec.agent_id}",
                outcome="failed",
                details={"command_id": rec.id, "reason": reason},
            )
        except CancelledError:
            raise
        except Exception:
            self.log.failure(
                "could not record that agent {agent_id} is unreachable", agent_id=rec.agent_id
            )

    # -- helpers -----------------------------------------------------------------

    async def _current(self, rec: CommandRecord) -> CommandRecord:
        current = await self._store.get_command(rec.id)
        return rec if current is None else current

    async def _event(
        self,
        actor: str,
        action: str,
        rec: CommandRecord,
        outcome: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        try:
            await self._store.add_event(
                actor=actor,
                action=action,
                target=f"command:{rec.id}",
                outcome=outcome,
                details={
                    "agent_id": rec.agent_id,
                    "command_uid": rec.command_uid,
                    **(details or {}),
                },
            )
        except CancelledError:
            raise
        except Exception:
            self.log.failure(
                "could not record event {action} for command {command_id}",
                action=action,
                command_id=rec.id,
            )

    def _notify(self, update: CommandUpdate) -> None:
        for callback in list(self._subscribers.get(update.command_id, ())):
            try:
                callback(update)
            except Exception:
                self.log.failure(
                    "subscriber of command {command_id} failed", command_id=update.command_id
                )

    def _hook(self, hook: Callable[..., None], *args: float | str) -> None:
        # A metrics hook must never break the work it measures.
        try:
            hook(*args)
        except Exception:
            self.log.failure("metrics hook {name} failed", name=hook.__name__)

    def _log_failure(self, failure: Failure, message: str) -> None:
        if not failure.check(CancelledError):
            self.log.failure(message, failure)
