# -*- test-case-name: tests.install.test_install_real,tests.install.test_servers_api -*-
"""The agent installer: runs install, reinstall and uninstall jobs (architecture 3.1).

``Installer`` starts a job per server in the background (``start``), gives its
outcome to whoever asks (``wait``) and, as a Service, stops in-flight jobs when
the daemon stops. Each job is one SSH connection running the steps of
``steps.py`` in order, each recorded by the journal (store + event stream), so
the API, console and CLI show live progress. The server-record operations the
API needs (create, delete, forget the host key) are thin and live here too.

A reinstall keeps the agent's port, path and token. A failure names the step and
carries the remote stderr; a unit that was started is stopped and disabled so a
broken agent does not restart-loop, and the next attempt redoes every step.
Installs of one server never overlap; at most ``install_concurrency`` run at
once. Automatic reinstalls (the heartbeat's hook) are ``reinstall.AutoReinstall``.

Never logs or records a password, key, passphrase, token or secret; never blocks
the reactor (SSH, pip and RPC are all asynchronous; the agent files are read once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

import myxd.install.steps as steps
from myxd._reactor import default_reactor
from myxd.config import Settings
from myxd.install.agents import agent_for, new_agent
from myxd.install.bundle import AgentFiles, Wheelhouse, agent_files
from myxd.install.journal import InstallJournal
from myxd.install.reinstall import AutoReinstall, ReinstallPolicy
from myxd.install.session import (
    DEPENDENCY_MODES,
    INSTALL_STEPS,
    UNINSTALL_STEPS,
    AgentCaller,
    AgentFilesCache,
    Connector,
    InstallEnv,
    InstallError,
    InstallInProgress,
    InstallOptions,
    InstallOutcome,
    InstallSession,
    InstallStore,
    ServerNotFound,
    WheelSource,
)
from myxd.install.ssh import Sudo
from myxd.netpolicy import TargetPolicy
from myxd.store.records import AgentRecord

KINDS = ("install", "reinstall", "uninstall")


@dataclass
class _Job:
    kind: str
    started: Deferred[int] = field(default_factory=Deferred)
    waiters: list[Deferred[InstallOutcome]] = field(default_factory=list)
    session: InstallSession | None = None


class Installer(Service):
    """Installs agents over SSH. A Service so the daemon can stop in-flight installs."""

    log = Logger()

    def __init__(
        self,
        store: InstallStore,
        rpc: AgentCaller,
        settings: Settings,
        reactor: Any = None,
        *,
        data_dir: str | None = None,
        metrics: Any = None,
        wheelhouse_dir: str | None = None,
        dependency_mode: str | None = None,
        agent_bind: str | None = None,
        agent_port_range: tuple[int, int] = (1, 65535),
        wait_timeout: float | None = None,
        check_interval: float = 3.0,
        progress_interval: float = 10.0,
        auto_backoff_base: float = 300.0,
        auto_backoff_max: float = 6 * 3600.0,
        auto_max_attempts: int = 5,
        auto_reset_after: float = 24 * 3600.0,
        connector: Connector | None = None,
        wheelhouse: WheelSource | None = None,
        read_agent_files: Callable[[], AgentFiles] = agent_files,
    ) -> None:
        # Any: the SSH client and the wheelhouse need threads, TCP, processes
        # and time from it, more than Twisted's type of the global reactor says.
        reactor = default_reactor(reactor)
        self._store = store
        self._reactor = reactor
        self._metrics = metrics
        # Ports for NEW agents (reinstalls keep theirs): callers keep them below
        # the usual Linux ephemeral range (32768-60999) to avoid clashing with
        # the target's own outgoing connections.
        self.options = InstallOptions(
            dependency_mode=dependency_mode or settings.install_dependency_mode,
            agent_bind=agent_bind,
            agent_port_range=agent_port_range,
            wait_timeout=float(
                wait_timeout if wait_timeout is not None else settings.agent_start_timeout
            ),
            command_timeout=float(settings.ssh_command_timeout),
            check_interval=check_interval,
            progress_interval=progress_interval,
            deployment_tool_dir=settings.deployment_tool_dir,
        )
        if wheelhouse is None:
            wheelhouse = Wheelhouse(
                wheelhouse_dir or os.path.join(data_dir or settings.data_dir, "wheelhouse"),
                reactor,
            )
        self.wheelhouse = wheelhouse
        self.journal = InstallJournal(store)
        self.target_policy = TargetPolicy(settings.allowed_target_networks, reactor)
        self.env = InstallEnv(
            store=store,
            rpc=rpc,
            clock=reactor,
            options=self.options,
            connector=connector
            or steps.ssh_connector(
                reactor,
                timeout=float(settings.ssh_connect_timeout),
                command_timeout=self.options.command_timeout,
            ),
            wheelhouse=wheelhouse,
            agent_files=AgentFilesCache(read_agent_files),
            progress=self.journal.progress,
            stopping=lambda: self._stopping,
            target_policy=self.target_policy,
        )
        self.reinstaller = AutoReinstall(
            store,
            self.journal,
            ReinstallPolicy(
                reactor,
                base=auto_backoff_base,
                max_delay=auto_backoff_max,
                max_attempts=auto_max_attempts,
                reset_after=auto_reset_after,
            ),
            self,
        )
        self._sem = DeferredSemaphore(max(1, settings.install_concurrency))
        self._running: dict[int, _Job] = {}
        self._stopping = False

    @property
    def dependency_mode(self) -> str:
        return self.options.dependency_mode

    # -- service -------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._stopping = False
        d = Deferred.fromCoroutine(self._recover_interrupted())
        d.addErrback(lambda f: self.log.failure("could not mark interrupted installs", f))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        return Deferred.fromCoroutine(self._stop_jobs())

    async def _stop_jobs(self) -> None:
        # Cancelling SSH connects and closing the SSH connections makes in-flight
        # steps fail quickly; the install records them as failed ("daemon stopping").
        jobs = list(self._running.values())
        for job in jobs:
            if job.session is not None and job.session.connecting is not None:
                job.session.connecting.cancel()
            host = job.session.host if job.session is not None else None
            if host is not None:
                try:
                    await host.close()
                except Exception:
                    self.log.failure("closing an install's SSH connection failed")
        for job in jobs:
            d: Deferred[InstallOutcome] = Deferred()
            job.waiters.append(d)
            await d

    async def _recover_interrupted(self) -> None:
        """Installs that were running when myxd stopped can never finish: close them.

        The server reads ``failed`` with the reason. Its agent row, when the install
        never finished (no certificate pinned), is removed like after any failed
        install: it was never an agent, so it is never counted or shown offline
        (issue #9). An installed agent whose reinstall was cut short keeps its
        identity and reads ``error`` with the reason until the heartbeat checks it
        again (an ``installing`` agent is never visited).
        """
        for server in await self._store.list_servers():
            if server.status != "installing" or server.id in self._running:
                continue
            latest = await self._store.get_latest_install(server.id)
            kind = latest["kind"] if latest is not None else "install"
            if latest is not None and latest["status"] == "running":
                await self._store.finish_install(
                    latest["id"], "failed", "interrupted by a daemon restart"
                )
            reason = f"{kind} interrupted by a daemon restart"
            await self._store.update_server(server.id, status="failed", status_reason=reason)
            agent = await self._store.get_agent_for_server(server.id)
            if agent is not None and not agent.cert_fingerprint:
                await self._store.delete_agent(agent.id)
            elif agent is not None and agent.status == "installing":
                await self._store.update_agent(agent.id, status="error", status_reason=reason)
            self.log.warn(
                "server {server_id}: {reason}; it reads failed", server_id=server.id, reason=reason
            )
            await self.journal.event(
                f"server.{kind}",
                server.id,
                "failed",
                {"install_id": latest["id"] if latest else None, "error": reason},
            )

    # -- jobs ------------------------------------------------------------------
    def is_running(self, server_id: int) -> bool:
        return server_id in self._running

    def start(self, server_id: int, kind: str, *, actor: str = "api") -> Deferred[int]:
        """Begin an install/reinstall/uninstall in the background.

        Fires with the install id once it is recorded; errbacks with
        InstallInProgress or ServerNotFound. ``wait(server_id)`` gives the outcome.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown install kind {kind!r}")
        if self._stopping:
            return fail(InstallInProgress("the daemon is stopping"))
        if server_id in self._running:
            running = self._running[server_id].kind
            return fail(InstallInProgress(f"a {running} of server {server_id} is already running"))
        job = _Job(kind)
        self._running[server_id] = job
        d = Deferred.fromCoroutine(self._run(server_id, job, actor))
        d.addBoth(self._job_done, server_id, job)
        return job.started

    def wait(self, server_id: int) -> Deferred[InstallOutcome] | None:
        """The outcome of the running job of this server, or None when none runs."""
        job = self._running.get(server_id)
        if job is None:
            return None
        d: Deferred[InstallOutcome] = Deferred()
        job.waiters.append(d)
        return d

    async def _start_and_wait(self, server_id: int, kind: str, actor: str) -> InstallOutcome:
        started = self.start(server_id, kind, actor=actor)
        if started.called:
            # Refused at once (already running, or the daemon is stopping).
            await started
        waiter: Deferred[InstallOutcome] = Deferred()
        # start() registered the job before returning; nothing ran in between.
        self._running[server_id].waiters.append(waiter)
        await started  # ServerNotFound surfaces here
        return await waiter

    async def install(self, server_id: int, *, actor: str = "api") -> InstallOutcome:
        """Run a first install to the end."""
        return await self._start_and_wait(server_id, "install", actor)

    async def reinstall(self, server_id: int, *, actor: str = "api") -> InstallOutcome:
        """Reinstall, keeping the agent's port, path and token."""
        return await self._start_and_wait(server_id, "reinstall", actor)

    async def uninstall(self, server_id: int, *, actor: str = "api") -> InstallOutcome:
        """Remove the agent's unit and files from the server; forget the agent record."""
        return await self._start_and_wait(server_id, "uninstall", actor)

    def auto_reinstall(self, agent: AgentRecord, reason: str) -> Deferred[None]:
        """The heartbeat's reinstall hook; see ``reinstall.AutoReinstall``."""
        return self.reinstaller.hook(agent, reason)

    # -- server records ----------------------------------------------------------
    async def create_server(
        self,
        *,
        name: str,
        host: str,
        ssh_port: int,
        username: str,
        auth: dict[str, Any] | None,
        sudo: dict[str, Any],
        host_key_fingerprint: str | None = None,
        actor: str = "installer",
    ) -> tuple[int, int]:
        """Save a server and its agent identity (port, path, token). Returns (server, agent) ids.

        TargetNotAllowed (nothing saved) when the host is outside allowed_target_networks.
        """
        await self.target_policy.check(host)
        server_id = await self._store.add_server(
            name=name,
            host=host,
            ssh_port=ssh_port,
            username=username,
            auth=auth,
            sudo=sudo,
            host_key_fingerprint=host_key_fingerprint,
        )
        try:
            agent_id = await new_agent(self._store, server_id, host, self.options.agent_port_range)
        except BaseException:
            await self._store.delete_server(server_id)
            raise
        await self.journal.event(
            "server.create",
            server_id,
            "ok",
            {"name": name, "host": host, "ssh_port": ssh_port, "agent_id": agent_id},
            actor=actor,
        )
        return server_id, agent_id

    async def delete_server(self, server_id: int, *, actor: str = "installer") -> bool:
        """Delete a server's records (not its remote files: uninstall first for that)."""
        if server_id in self._running:
            raise InstallInProgress(f"an install of server {server_id} is running")
        deleted = bool(await self._store.delete_server(server_id))
        if deleted:
            self.reinstaller.policy.forget(server_id)
            await self.journal.event("server.delete", server_id, "ok", None, actor=actor)
        return deleted

    async def forget_host_key(self, server_id: int, *, actor: str = "installer") -> None:
        """Drop the stored (first-use) host key so the next connection trusts anew."""
        await self._store.update_server(server_id, host_key=None)
        await self.journal.event("server.host_key_forgotten", server_id, "ok", None, actor=actor)

    # -- running a job -------------------------------------------------------
    def _job_done(self, result: InstallOutcome | Failure, server_id: int, job: _Job) -> None:
        if self._running.get(server_id) is job:
            del self._running[server_id]
        if isinstance(result, Failure):
            self.log.failure(
                "install job of server {server_id} crashed", result, server_id=server_id
            )
            if not job.started.called:
                job.started.errback(result)
            outcome = InstallOutcome(None, server_id, job.kind, False, "internal error")
        else:
            outcome = result
        waiters, job.waiters = job.waiters, []
        for w in waiters:
            w.callback(outcome)

    async def _run(self, server_id: int, job: _Job, actor: str) -> InstallOutcome:
        server = await self._store.get_server(server_id)
        if server is None:
            job.started.errback(ServerNotFound(f"server {server_id} not found"))
            return InstallOutcome(None, server_id, job.kind, False, "server not found")
        install_id = await self._store.start_install(server_id, job.kind)
        job.started.callback(install_id)
        await self._store.update_server(server_id, status="installing", status_reason=None)
        # Who asked for it (the admin API, or "auto" for the heartbeat's reinstall);
        # the steps and the outcome are the installer's own events.
        await self.journal.event(
            f"server.{job.kind}",
            server_id,
            "started",
            {"install_id": install_id, "actor": actor},
            actor=actor,
        )
        self.log.info(
            "{kind} of server {server_id} ({host}) started (install {install_id})",
            kind=job.kind,
            server_id=server_id,
            host=server.host,
            install_id=install_id,
        )
        s = InstallSession(
            env=self.env,
            install_id=install_id,
            server=server,
            kind=job.kind,
            sudo=Sudo.from_record(server.sudo),
        )
        job.session = s
        await self._sem.acquire()
        try:
            if self._stopping:
                raise InstallError("connect", "the daemon is stopping")
            if job.kind == "uninstall":
                await self._uninstall(s)
            else:
                await self._install(s)
        except InstallError as e:
            return await self._failed(s, e)
        except Exception as e:
            self.log.failure(
                "{kind} of server {server_id} crashed", kind=job.kind, server_id=server_id
            )
            return await self._failed(s, InstallError("internal", f"internal error: {e!r}"))
        finally:
            self._sem.release()
            await steps.cleanup(s)
        await self._store.finish_install(install_id, "ok")
        agent_id = s.agent.id if s.agent is not None else None
        await self.journal.event(
            f"server.{job.kind}", server_id, "ok", {"install_id": install_id, "agent_id": agent_id}
        )
        self.log.info(
            "{kind} of server {server_id} done (install {install_id})",
            kind=job.kind,
            server_id=server_id,
            install_id=install_id,
        )
        return InstallOutcome(install_id, server_id, job.kind, True, agent_id=agent_id)

    async def _failed(self, s: InstallSession, e: InstallError) -> InstallOutcome:
        message = f"{e.step}: {e.message}"
        if self._stopping and "the daemon is stopping" not in message:
            message += " (the daemon is stopping)"
        self.log.warn(
            "{kind} of server {server_id} failed at {step}: {message}",
            kind=s.kind,
            server_id=s.server.id,
            step=e.step,
            message=e.message,
        )
        await self._store.finish_install(s.install_id, "failed", message)
        await self._store.update_server(s.server.id, status="failed", status_reason=message)
        if s.agent is not None and s.kind != "uninstall":
            current = await self._store.get_agent(s.agent.id)
            if current is not None and not current.cert_fingerprint:
                # Its install never finished: it was never an agent (issue #9, no
                # phantom agents). The server shows the install's error.
                await self._store.delete_agent(s.agent.id)
                s.agent = None
            else:
                await self._store.update_agent(s.agent.id, status="error", status_reason=message)
        await self.journal.event(
            f"server.{s.kind}",
            s.server.id,
            "failed",
            {"install_id": s.install_id, "step": e.step, "error": e.message},
        )
        agent_id = s.agent.id if s.agent is not None else None
        return InstallOutcome(s.install_id, s.server.id, s.kind, False, message, e.step, agent_id)

    async def _install(self, s: InstallSession) -> None:
        s.agent = await agent_for(self._store, s.server, self.options.agent_port_range)
        try:
            for name, body in steps.INSTALL_PLAN:
                await self.journal.step(s, name, body)
        except InstallError:
            if s.service_touched:
                await steps.make_harmless(s)
            raise
        agent = s.need_agent()
        await self._store.update_agent(agent.id, status="online", status_reason=None)
        await self._store.update_server(s.server.id, status="installed", status_reason=None)
        # A fresh success clears the automatic-reinstall cap (not the count).
        self.reinstaller.policy.succeeded(s.server.id)

    async def _uninstall(self, s: InstallSession) -> None:
        s.agent = await self._store.get_agent_for_server(s.server.id)
        for name, body in steps.UNINSTALL_PLAN:
            await self.journal.step(s, name, body)
        if s.agent is not None:
            await self._store.delete_agent(s.agent.id)
        await self._store.update_server(s.server.id, status="uninstalled", status_reason=None)


__all__ = [
    "DEPENDENCY_MODES",
    "INSTALL_STEPS",
    "UNINSTALL_STEPS",
    "InstallError",
    "InstallInProgress",
    "InstallOutcome",
    "Installer",
    "ServerNotFound",
]
