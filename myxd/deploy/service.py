# -*- test-case-name: tests.deploy.test_deployments,tests.daemon.test_deploy_service -*-
"""Deployments: one playbook run across many agents, with artifacts, batches and results.

For each target, in rollout order and ``batch_size`` at a time:

1. push the deployment's artifacts the agent lacks (``ArtifactPusher``), and
   put each one's path on the agent in place of its id in ``vars``;
2. run ``execute_ansible`` through the command queue, with the command id the
   target reserved when the deployment was created, so the live log, the
   stream API and the at-most-once rule are the commands' own;
3. when the run is final, read ansible's stats (and, on failure, the failing
   task and its message from the log) into the target's row; after a success,
   refresh the agent's services (``check_service.py``) for drift.

``max_failures`` stops new targets from starting once that many have failed
(they end ``skipped``). ``cancel`` stops new targets and cancels running ones.

A daemon restart resumes every unfinished deployment: a target whose command
exists (found by its reserved uid) is waited for -- the command queue resumes
its log polling itself -- and a target that had not started starts. Nothing
runs twice: the uid is unique in the store, and the agent de-duplicates it.

Never blocks the reactor; every per-target task logs its own failure and
marks its target failed, so one broken agent cannot stop a deployment.

It runs past 500 lines on purpose: creation, the batch loop, a target's
steps, cancel and resume are one state machine over the same per-deployment
state, and splitting it would pass that state between rooms. What is pure
lives apart: reading ansible logs and service reports (`reports`), drift
(`drift`), pushing files (`transfer`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd.artifacts.store import ArtifactNotFound, ArtifactStore
from myxd.deploy.reports import failing_task, parse_check_service
from myxd.deploy.transfer import ArtifactPusher, TransferError
from myxd.errors import MyxError, NotFoundError
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import AgentRPCError
from myxd.statuses import FINAL_STATUSES
from myxd.store.deployments import (
    DEPLOYMENT_FINAL,
    TARGET_FINAL,
    DeploymentRecord,
    DeploymentStore,
    TargetRecord,
    summarize,
)

# Which service a playbook deploys, for drift.
PLAYBOOK_SERVICES = {
    "deploy_xray.yml": "xray",
    "deploy_xray_config.yml": "xray",
    "deploy_xray_docker.yml": "xray",
    "rollback_xray.yml": "xray",
    "deploy_caddy.yml": "caddy",
}
CHECKED_SERVICES = ("xray", "caddy")
DEFAULT_TOOL_DIR = "/opt/myx-deployment-tool"
_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
# Colour codes, in case a playbook forces colour on (the agent sets ANSIBLE_NOCOLOR).
LOG_TAIL_BYTES = 256 * 1024


def tool_playbooks(tool_dir: str) -> list[str]:
    """The playbooks an operator may deploy: ``playbooks/*.yml`` of the tool
    (task files and templates live in subdirectories and are not playbooks)."""
    try:
        names = os.listdir(os.path.join(tool_dir, "playbooks"))
    except OSError:
        return []
    return sorted(n for n in names if n.endswith((".yml", ".yaml")) and not n.startswith("."))


class DeploymentInputError(MyxError, ValueError):
    """Bad input to ``create``; ``field`` names the offending field (HTTP 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DeploymentConflict(MyxError):
    """The operation does not fit the deployment's state (HTTP 409)."""


class Queue(Protocol):
    async def add_ansible(
        self,
        agent_id: int,
        playbook: str,
        extra_vars: Mapping[str, Any],
        timeout: float | None,
        *,
        actor: str = ...,
        command_uid: str | None = ...,
    ) -> Any: ...

    async def add_command(
        self,
        agent_id: int,
        command: str,
        args: Sequence[str],
        timeout: float | None,
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        actor: str = ...,
    ) -> Any: ...

    async def cancel(self, command_id: int, *, actor: str = ...) -> Any: ...

    def subscribe(self, command_id: int, callback: Callable[[Any], Any]) -> Callable[[], None]: ...


class Store(Protocol):
    deployments: DeploymentStore

    def get_agent(self, agent_id: int) -> Deferred[Any]: ...
    def list_agents(self) -> Deferred[list[Any]]: ...
    def get_command(self, command_id: int) -> Deferred[Any]: ...
    def get_command_by_uid(self, command_uid: str) -> Deferred[Any]: ...
    def read_output(self, command_id: int, offset: int = ..., max_bytes: int = ...) -> Any: ...
    def add_event(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        details: dict[str, Any] | None = None,
    ) -> Deferred[int]: ...


@dataclass(frozen=True)
class AnsibleOutcome:
    status: str  # success | failed | cancelled
    changed: int | None
    ok: int | None
    failed: int | None
    reason: str | None


class DeploymentService(Service):
    """Creates, runs, resumes and cancels deployments; see module docstring."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        queue: Queue,
        artifacts: ArtifactStore,
        pusher: ArtifactPusher,
        playbooks: Callable[[], Sequence[str]],
        *,
        default_timeout: float | None = 3600.0,
        check_timeout: float = 60.0,
    ) -> None:
        self._store = store
        self._deployments = store.deployments
        self._queue = queue
        self._artifacts = artifacts
        self._pusher = pusher
        self._playbooks = playbooks
        self._default_timeout = default_timeout
        self._check_timeout = check_timeout
        self._tasks: dict[int, Deferred[None]] = {}
        self._cancelled: set[int] = set()
        self._stopping = False

    # -- service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        d = Deferred.fromCoroutine(self._resume())
        d.addErrback(lambda f: self.log.failure("could not resume deployments", f))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        done: Deferred[None] = Deferred()
        DeferredList(tasks, consumeErrors=True).addBoth(lambda _: done.callback(None))
        return done

    async def _resume(self) -> None:
        unfinished = await self._deployments.list_unfinished_deployments()
        if unfinished:
            self.log.info("resuming {count} deployment(s)", count=len(unfinished))
        for rec in unfinished:
            self._spawn(rec.id)

    # -- public API ---------------------------------------------------------------

    async def create(
        self,
        *,
        playbook: Any,
        agents: Any,
        vars: Any = None,
        artifacts: Any = None,
        batch_size: Any = None,
        max_failures: Any = None,
        timeout: Any = None,
        actor: str = "api",
    ) -> DeploymentRecord:
        """Check everything, store the deployment and start it; see module docstring.

        DeploymentInputError (naming the field) before anything is stored or run.
        """
        if not isinstance(playbook, str) or playbook not in set(self._playbooks()):
            known = ", ".join(sorted(self._playbooks())) or "none"
            raise DeploymentInputError(
                "playbook", f"unknown playbook {playbook!r} (the deployment tool has: {known})"
            )
        agent_ids = await self._resolve_agents(agents)
        if vars is None:
            vars = {}
        if not isinstance(vars, dict):
            raise DeploymentInputError("vars", "must be an object")
        for k in vars:
            if not _VAR_RE.match(k):
                raise DeploymentInputError("vars", f"{k!r} is not a valid variable name")
        if artifacts is None:
            artifacts = {}
        if not isinstance(artifacts, dict):
            raise DeploymentInputError("artifacts", "must be an object of variable: artifact id")
        for var, art_id in artifacts.items():
            if not _VAR_RE.match(var):
                raise DeploymentInputError("artifacts", f"{var!r} is not a valid variable name")
            if not isinstance(art_id, str):
                raise DeploymentInputError("artifacts", f"{var}: the artifact id must be a string")
            try:
                await self._artifacts.get(art_id)
            except ArtifactNotFound:
                raise DeploymentInputError(
                    "artifacts", f"{var}: unknown artifact {art_id!r}"
                ) from None
        batch = _positive_int("batch_size", batch_size, minimum=1)
        max_fail = _positive_int("max_failures", max_failures, minimum=1)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise DeploymentInputError("timeout", "must be a number of seconds above 0")
        rec = await self._deployments.create_deployment(
            playbook=playbook,
            vars=vars,
            artifacts=artifacts,
            agent_ids=agent_ids,
            batch_size=batch,
            max_failures=max_fail,
            timeout=float(timeout) if timeout is not None else self._default_timeout,
            actor=actor,
        )
        await self._store.add_event(
            actor=actor,
            action="deployment.create",
            target=f"deployment:{rec.id}",
            outcome="pending",
            details={
                "playbook": playbook,
                "agents": agent_ids,
                "var_names": sorted(vars),
                "artifacts": dict(artifacts),
                "batch_size": batch,
                "max_failures": max_fail,
            },
        )
        self._spawn(rec.id)
        return rec

    async def cancel(self, deployment_id: int, *, actor: str = "api") -> DeploymentRecord:
        rec = await self._deployments.get_deployment(deployment_id)
        if rec is None:
            raise NotFoundError(f"there is no deployment {deployment_id}")
        if rec.status in DEPLOYMENT_FINAL:
            return rec
        self._cancelled.add(deployment_id)
        for t in rec.targets:
            if t.status == "pending":
                await self._deployments.update_target(
                    deployment_id,
                    t.agent_id,
                    status="cancelled",
                    reason="cancelled before it started",
                )
            elif t.status == "running" and t.command_id is not None:
                try:
                    await self._queue.cancel(t.command_id, actor=actor)
                except (AgentRPCError, MyxError) as e:
                    self.log.warn(
                        "deployment {id}: could not cancel the run on agent {agent_id}: {reason}",
                        id=deployment_id,
                        agent_id=t.agent_id,
                        reason=str(e),
                    )
        await self._store.add_event(
            actor=actor,
            action="deployment.cancel",
            target=f"deployment:{deployment_id}",
            outcome="requested",
        )
        if deployment_id not in self._tasks:
            # Nothing drives it (e.g. it never started): close it here.
            await self._finish(deployment_id)
        return await self._get(deployment_id)

    def is_running(self, deployment_id: int) -> bool:
        return deployment_id in self._tasks

    async def refresh_services(self, agent_id: int, *, actor: str = "api") -> dict[str, Any]:
        """Run ``check_service.py`` on the agent and store what it prints."""
        agent = await self._store.get_agent(agent_id)
        if agent is None:
            raise NotFoundError(f"there is no agent {agent_id}")
        reported = (agent.details or {}).get("deployment_tool_dir")
        tool_dir = reported if isinstance(reported, str) and reported else DEFAULT_TOOL_DIR
        cmd = await self._queue.add_command(
            agent_id,
            f"{tool_dir}/scripts/check_service.py",
            list(CHECKED_SERVICES),
            self._check_timeout,
            actor=actor,
        )
        final = await self._wait_final(cmd.id)
        # Exit 1 is a report too: "a unit is not active".
        if final.status != "success" and final.exit_code != 1:
            raise DeploymentConflict(
                f"check_service.py failed on agent {agent_id}: {final.reason or final.status}"
            )
        text = await self._output_text(cmd.id, 0)
        services = parse_check_service(text)
        await self._deployments.record_services(agent_id, services)
        return services

    # -- the deployment task --------------------------------------------------------

    def _spawn(self, deployment_id: int) -> None:
        if deployment_id in self._tasks or self._stopping:
            return
        task = Deferred.fromCoroutine(self._run(deployment_id))
        if task.called:
            task.addErrback(self._task_failed, deployment_id)
            return
        self._tasks[deployment_id] = task

        def done(result: object) -> object:
            self._tasks.pop(deployment_id, None)
            return result

        task.addBoth(done)
        task.addErrback(self._task_failed, deployment_id)

    def _task_failed(self, failure: Failure, deployment_id: int) -> None:
        if failure.check(CancelledError):
            return
        self.log.failure("deployment {id}: runner failed", failure, id=deployment_id)

    async def _run(self, deployment_id: int) -> None:
        rec = await self._get(deployment_id)
        if rec.status == "pending":
            await self._deployments.set_deployment_status(deployment_id, "running")
            rec = await self._get(deployment_id)
        size = rec.batch_size or max(1, len(rec.targets))
        targets = list(rec.targets)
        failures = sum(1 for t in targets if t.status == "failed")
        for start in range(0, len(targets), size):
            group = [t for t in targets[start : start + size] if t.status not in TARGET_FINAL]
            if not group:
                continue
            if deployment_id in self._cancelled:
                break
            if rec.max_failures is not None and failures >= rec.max_failures:
                break
            # consumeErrors, and unwrap FirstError: a stop cancels every target of
            # the batch, and that is a CancelledError, not a runner failure.
            outcomes = await gatherResults(
                [Deferred.fromCoroutine(self._target(rec, t)) for t in group],
                consumeErrors=True,
            ).addErrback(_first_error)
            failures += sum(1 for s in outcomes if s == "failed")
        await self._finish(deployment_id)

    async def _finish(self, deployment_id: int) -> None:
        rec = await self._get(deployment_id)
        cancelled = deployment_id in self._cancelled
        for t in rec.targets:
            if t.status not in TARGET_FINAL:
                if cancelled:
                    await self._deployments.update_target(
                        deployment_id, t.agent_id, status="cancelled", reason="deployment cancelled"
                    )
                else:
                    failed = sum(1 for x in rec.targets if x.status == "failed")
                    await self._deployments.update_target(
                        deployment_id,
                        t.agent_id,
                        status="skipped",
                        reason=f"not started: {failed} target(s) failed "
                        f"(max_failures {rec.max_failures})",
                    )
        rec = await self._get(deployment_id)
        status = summarize([t.status for t in rec.targets], cancelled=cancelled)
        await self._deployments.set_deployment_status(deployment_id, status)
        self._cancelled.discard(deployment_id)
        counts: dict[str, int] = {}
        for t in rec.targets:
            counts[t.status] = counts.get(t.status, 0) + 1
        await self._store.add_event(
            actor="myxd",
            action="deployment.finish",
            target=f"deployment:{deployment_id}",
            outcome=status,
            details=counts,
        )
        self.log.info(
            "deployment {id} {status}: {counts}", id=deployment_id, status=status, counts=counts
        )

    async def _target(self, rec: DeploymentRecord, t: TargetRecord) -> str:
        dep, aid = rec.id, t.agent_id
        try:
            cmd = await self._store.get_command_by_uid(t.command_uid)
            if cmd is None:
                if rec.id in self._cancelled:
                    await self._deployments.update_target(
                        dep, aid, status="cancelled", reason="deployment cancelled"
                    )
                    return "cancelled"
                agent = await self._store.get_agent(aid)
                if agent is None:
                    raise _TargetFailed("the agent was deleted")
                await self._deployments.update_target(dep, aid, status="transferring")
                extra_vars = dict(rec.vars)
                sent = 0
                for var, art_id in sorted(rec.artifacts.items()):
                    art = await self._artifacts.get(art_id)
                    res = await self._pusher.push(
                        AgentEndpoint.from_record(agent),
                        self._artifacts.path(art_id),
                        art_id,
                        art.size,
                    )
                    sent += res.bytes_sent
                    extra_vars[var] = res.path
                    await self._deployments.update_target(dep, aid, bytes_sent=t.bytes_sent + sent)
                if rec.id in self._cancelled:
                    # Cancelled during the transfer: the run must not start.
                    await self._deployments.update_target(
                        dep, aid, status="cancelled", reason="deployment cancelled"
                    )
                    return "cancelled"
                cmd = await self._queue.add_ansible(
                    aid,
                    rec.playbook,
                    extra_vars,
                    rec.timeout,
                    actor=f"deployment:{dep}",
                    command_uid=t.command_uid,
                )
            await self._deployments.update_target(dep, aid, status="running", command_id=cmd.id)
            final = await self._wait_final(cmd.id)
            outcome = await self._outcome(final)
            await self._deployments.update_target(
                dep,
                aid,
                status=outcome.status,
                changed=outcome.changed,
                ok=outcome.ok,
                failed=outcome.failed,
                reason=outcome.reason,
            )
            if outcome.status == "success":
                await self._refresh_after(rec, aid)
            return outcome.status
        except CancelledError:
            raise
        except (_TargetFailed, TransferError, AgentRPCError, ArtifactNotFound, NotFoundError) as e:
            reason = e.reason if isinstance(e, AgentRPCError) else str(e)
            await self._deployments.update_target(dep, aid, status="failed", reason=reason)
            return "failed"
        except Exception as e:  # one target's bug must not stop the others
            self.log.failure(
                "deployment {id}: target agent {agent_id} failed", id=dep, agent_id=aid
            )
            await self._deployments.update_target(
                dep, aid, status="failed", reason=f"internal error: {type(e).__name__}"
            )
            return "failed"

    async def _refresh_after(self, rec: DeploymentRecord, agent_id: int) -> None:
        """Check the agent's services; keep the deployed one's state as its baseline."""
        try:
            services = await self.refresh_services(agent_id, actor="myxd")
            service = PLAYBOOK_SERVICES.get(rec.playbook)
            if service is not None and service in services:
                await self._deployments.update_target(
                    rec.id, agent_id, post_check=services[service]
                )
        except Exception as e:
            self.log.warn(
                "agent {agent_id}: services not refreshed after a deployment: {reason}",
                agent_id=agent_id,
                reason=str(e),
            )

    async def _wait_final(self, command_id: int) -> Any:
        """The command's record once it is final (success or failed)."""
        rec = await self._store.get_command(command_id)
        if rec is None:
            raise _TargetFailed(f"command {command_id} disappeared")
        if rec.status in FINAL_STATUSES:
            return rec
        done: Deferred[None] = Deferred()

        def on_update(update: Any) -> None:
            if update.final and not done.called:
                done.callback(None)

        unsubscribe = self._queue.subscribe(command_id, on_update)
        try:
            # It may have ended between the read and the subscription.
            rec = await self._store.get_command(command_id)
            if rec is not None and rec.status not in FINAL_STATUSES:
                await done
        finally:
            unsubscribe()
        rec = await self._store.get_command(command_id)
        if rec is None:
            raise _TargetFailed(f"command {command_id} disappeared")
        return rec

    async def _outcome(self, cmd: Any) -> AnsibleOutcome:
        result = cmd.result or {}
        ansible = result.get("ansible") or {}
        stats = ansible.get("stats") or {}
        changed = _stat(stats, "changed")
        ok = _stat(stats, "ok")
        failed = _stat(stats, "failures") + _stat(stats, "dark")
        if ansible.get("status") == "canceled" or cmd.status == "cancelled":
            return AnsibleOutcome("cancelled", changed, ok, failed, "cancelled")
        if cmd.status == "success":
            return AnsibleOutcome("success", changed, ok, failed, None)
        reason = await self._failing_task(cmd.id, cmd.output_offset)
        return AnsibleOutcome(
            "failed", changed, ok, failed, reason or cmd.reason or "the playbook failed"
        )

    async def _failing_task(self, command_id: int, end: int) -> str | None:
        text = await self._output_text(command_id, max(0, end - LOG_TAIL_BYTES))
        return failing_task(text)

    async def _output_text(self, command_id: int, offset: int) -> str:
        chunks = await self._store.read_output(command_id, offset, LOG_TAIL_BYTES * 4)
        return b"".join(c.data for c in chunks).decode("utf-8", "replace")

    async def _resolve_agents(self, agents: Any) -> list[int]:
        known = await self._store.list_agents()
        by_id = {a.id: a for a in known}
        if agents == "all":
            ids = [a.id for a in known if a.cert_fingerprint]
            if not ids:
                raise DeploymentInputError("agents", "there are no installed agents")
            return ids
        if isinstance(agents, str) and agents.startswith("tag:"):
            # Like POST /api/commands: the agent's own tags or its server's.
            tag = agents[4:].lower()
            ids = [a.id for a in known if a.cert_fingerprint and tag in a.tags]
            if not ids:
                raise DeploymentInputError("agents", f"no installed agent has the tag {tag!r}")
            return ids
        if (
            not isinstance(agents, list)
            or not agents
            or not all(isinstance(a, int) and not isinstance(a, bool) for a in agents)
        ):
            raise DeploymentInputError(
                "agents", 'must be "all", "tag:NAME" or a non-empty list of agent ids'
            )
        if len(set(agents)) != len(agents):
            raise DeploymentInputError("agents", "lists an agent twice")
        for a in agents:
            if a not in by_id:
                raise DeploymentInputError("agents", f"there is no agent {a}")
        return list(agents)

    async def _get(self, deployment_id: int) -> DeploymentRecord:
        rec = await self._deployments.get_deployment(deployment_id)
        if rec is None:
            raise NotFoundError(f"there is no deployment {deployment_id}")
        return rec


class _TargetFailed(Exception):
    pass


def _first_error(failure: Failure) -> Failure:
    if isinstance(failure.value, FirstError):
        sub: Failure = failure.value.subFailure
        return sub
    return failure


def _positive_int(name: str, value: Any, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DeploymentInputError(name, f"must be a whole number of at least {minimum}")
    return value


def _stat(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key) or {}
    if isinstance(value, dict):
        return sum(int(v) for v in value.values() if isinstance(v, int))
    return 0
