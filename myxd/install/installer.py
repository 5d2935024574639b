"""The agent installer: from SSH credentials to an online, pinned agent (architecture 3.1).

``Installer`` runs installs, reinstalls and uninstalls of servers over ONE SSH
connection each, recording every step in the store (``record_install_step``)
and in the event stream, so the API, console and CLI can show live progress:

    connect       SSH with host-key trust (pin / stored key / first use)
    check         OS, python3 >= 3.9 with venv, systemd, the agent port free, sudo
    upload        the agent package (computed from myx_agent) into /opt/myx-agent
    dependencies  venv + pip install, from a wheelhouse myxd builds or the index
    config        /etc/myx-agent/config.json, atomically, root:root 600
    service       myx-agent.service (Restart=always), daemon-reload, enable, restart
    wait          RPC checked every 3 s (progress logged every 10 s) until it answers
    pin           the certificate fingerprint read over SSH is pinned in the store
    sync_tool     deployment-tool tar.gz through the agent's sync_deployment_tool

A reinstall keeps the agent's port, path and token. A failure names the step and
carries the remote stderr; a unit that was started is stopped and disabled so a
broken agent does not restart-loop, and the next attempt redoes every step.
Installs of one server never overlap; at most ``install_concurrency`` run at
once. ``auto_reinstall`` is the heartbeat's reinstall hook: rate-limited with
exponential backoff, capped, logged as events; a server without stored
credentials is marked ``needs_attention`` instead.

Never logs or records a password, key, passphrase, token or secret; never blocks
the reactor (SSH, pip and RPC are all asynchronous).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd.errors import MyxError
from myxd.install import remote
from myxd.install.bundle import (
    AgentFiles,
    BundleError,
    TargetPlatform,
    Wheelhouse,
    agent_files,
    deployment_tool_archive,
)
from myxd.install.hostkeys import HostKeyError, HostKeyPolicy
from myxd.install.ssh import (
    CommandResult,
    Credentials,
    SSHClient,
    SSHError,
    Sudo,
    connect,
)

INSTALL_STEPS = (
    "connect",
    "check",
    "upload",
    "dependencies",
    "config",
    "service",
    "wait",
    "pin",
    "sync_tool",
)
UNINSTALL_STEPS = ("connect", "stop", "remove")
DEPENDENCY_MODES = ("wheelhouse", "index")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STDERR_TAIL = 4000


class InstallError(MyxError):
    """One step failed. ``str()`` is safe to show; ``stderr`` is the remote's, if any."""

    def __init__(self, step: str, message: str, stderr: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.stderr = stderr


class InstallInProgress(MyxError):
    """An install, reinstall or uninstall of this server is already running."""


class ServerNotFound(MyxError):
    pass


@dataclass(frozen=True)
class InstallOutcome:
    install_id: int | None
    server_id: int
    kind: str
    ok: bool
    error: str | None = None
    failed_step: str | None = None
    agent_id: int | None = None


@dataclass
class _StepResult:
    status: str = "ok"  # ok | skipped
    log: str = ""


@dataclass
class _Job:
    kind: str
    started: Deferred[int] = field(default_factory=Deferred)
    waiters: list[Deferred[InstallOutcome]] = field(default_factory=list)
    client: SSHClient | None = None


@dataclass
class _AutoState:
    attempts: int = 0
    last_attempt: float | None = None
    capped: bool = False


@dataclass
class _Ctx:
    install_id: int
    server: Any  # ServerRecord
    kind: str
    agent: Any = None  # AgentRecord
    client: SSHClient | None = None
    sudo: Sudo = field(default_factory=Sudo)
    staging: remote.Staging | None = None
    facts: dict[str, str] = field(default_factory=dict)
    files: AgentFiles | None = None
    fingerprint: str | None = None
    service_touched: bool = False


def _tail(text: str, limit: int = _STDERR_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _python_version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in text.split(".")[:3])
    except ValueError:
        return None


class Installer(Service):
    """Installs agents over SSH. A Service so the daemon can stop in-flight installs."""

    log = Logger()

    def __init__(
        self,
        store: Any,
        rpc: Any,
        settings: Any,
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
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._store = store
        self._rpc = rpc
        self._settings = settings
        self._reactor = reactor
        self._metrics = metrics
        data_dir = data_dir or getattr(settings, "data_dir", "./myxd-data")
        self.wheelhouse = Wheelhouse(
            wheelhouse_dir or os.path.join(str(data_dir), "wheelhouse"), reactor
        )
        mode = dependency_mode or getattr(settings, "install_dependency_mode", "wheelhouse")
        if mode not in DEPENDENCY_MODES:
            raise ValueError(f"dependency_mode must be one of {DEPENDENCY_MODES}, not {mode!r}")
        self.dependency_mode = mode
        self.agent_bind = agent_bind
        # Ports for NEW agents (reinstalls keep theirs). Keeping them below the
        # usual Linux ephemeral range (32768-60999) avoids clashing with the
        # target's own outgoing connections.
        self.agent_port_range = agent_port_range
        self.wait_timeout = float(
            wait_timeout
            if wait_timeout is not None
            else getattr(settings, "agent_start_timeout", 120.0)
        )
        self.connect_timeout = float(getattr(settings, "ssh_connect_timeout", 15.0))
        self.command_timeout = float(getattr(settings, "ssh_command_timeout", 600.0))
        self.check_interval = check_interval
        self.progress_interval = progress_interval
        self.auto_backoff_base = auto_backoff_base
        self.auto_backoff_max = auto_backoff_max
        self.auto_max_attempts = auto_max_attempts
        self.auto_reset_after = auto_reset_after
        self._sem = DeferredSemaphore(max(1, int(getattr(settings, "install_concurrency", 4))))
        self._running: dict[int, _Job] = {}
        self._auto: dict[int, _AutoState] = {}
        self._stopping = False

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
        # Closing the SSH connections makes in-flight steps fail quickly; the
        # install records them as failed ("daemon stopping").
        jobs = list(self._running.values())
        for job in jobs:
            if job.client is not None:
                try:
                    await job.client.close()
                except Exception:
                    self.log.failure("closing an install's SSH connection failed")
        for job in jobs:
            d: Deferred[InstallOutcome] = Deferred()
            job.waiters.append(d)
            await d

    async def _recover_interrupted(self) -> None:
        """Installs that were running when myxd stopped can never finish: close them."""
        for server in await self._store.list_servers():
            if server.status != "installing" or server.id in self._running:
                continue
            latest = await self._store.get_latest_install(server.id)
            if latest is not None and latest["status"] == "running":
                await self._store.finish_install(
                    latest["id"], "failed", "interrupted by a daemon restart"
                )
            await self._store.update_server(
                server.id, status="failed", status_reason="install interrupted by a daemon restart"
            )

    # -- public API ----------------------------------------------------------
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
    ) -> tuple[int, int]:
        """Save a server and its agent identity (port, path, token). Returns (server, agent) ids."""
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
            agent_id = await self._new_agent(server_id, host)
        except BaseException:
            await self._store.delete_server(server_id)
            raise
        await self._event("server.create", server_id, "ok", {"name": name, "agent_id": agent_id})
        return server_id, agent_id

    def is_running(self, server_id: int) -> bool:
        return server_id in self._running

    def start(self, server_id: int, kind: str, *, actor: str = "api") -> Deferred[int]:
        """Begin an install/reinstall/uninstall in the background.

        Fires with the install id once it is recorded; errbacks with
        InstallInProgress or ServerNotFound. ``wait(server_id)`` gives the outcome.
        """
        if kind not in ("install", "reinstall", "uninstall"):
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

    async def delete_server(self, server_id: int) -> bool:
        """Delete a server's records (not its remote files: uninstall first for that)."""
        if server_id in self._running:
            raise InstallInProgress(f"an install of server {server_id} is running")
        deleted = bool(await self._store.delete_server(server_id))
        if deleted:
            self._auto.pop(server_id, None)
            await self._event("server.delete", server_id, "ok", None)
        return deleted

    async def forget_host_key(self, server_id: int) -> None:
        """Drop the stored (first-use) host key so the next connection trusts anew."""
        await self._store.update_server(server_id, host_key=None)
        await self._event("server.host_key_forgotten", server_id, "ok", None)

    def auto_reinstall(self, agent: Any, reason: str) -> Deferred[None]:
        """Reinstall hook for the heartbeat: rate-limited, capped, never overlapping.

        Returns once the decision is made and logged; the reinstall itself runs
        in the background.
        """
        d = Deferred.fromCoroutine(self._auto_reinstall(agent, reason))
        d.addErrback(self._log_auto_failure, agent)
        return d

    def _log_auto_failure(self, f: Failure, agent: Any) -> None:
        self.log.failure("automatic reinstall of agent {agent_id} failed", f, agent_id=agent.id)

    async def _auto_reinstall(self, agent: Any, reason: str) -> None:
        server_id = agent.server_id
        details: dict[str, Any] = {"agent_id": agent.id, "reason": reason}
        if server_id is None:
            await self._event(
                "agent.auto_reinstall",
                None,
                "skipped",
                {**details, "why": "adopted agent without a server"},
                target=f"agent:{agent.id}",
            )
            return
        server = await self._store.get_server(server_id)
        if server is None:
            return
        if server_id in self._running:
            await self._event(
                "server.auto_reinstall",
                server_id,
                "skipped",
                {**details, "why": "an install is already running"},
            )
            return
        if not server.auth:
            await self._store.update_server(
                server_id,
                status="needs_attention",
                status_reason=f"agent unreachable ({reason}); no SSH credentials stored",
            )
            await self._event(
                "server.auto_reinstall",
                server_id,
                "needs_attention",
                {**details, "why": "no stored credentials"},
            )
            return
        now = self._reactor.seconds()
        state = self._auto.setdefault(server_id, _AutoState())
        if state.last_attempt is not None and now - state.last_attempt > self.auto_reset_after:
            state.attempts, state.capped = 0, False
        if state.attempts >= self.auto_max_attempts:
            if not state.capped:
                state.capped = True
                await self._store.update_server(
                    server_id,
                    status="needs_attention",
                    status_reason=f"{state.attempts} automatic reinstalls did not bring the "
                    f"agent back; last reason: {reason}",
                )
                await self._event(
                    "server.auto_reinstall",
                    server_id,
                    "capped",
                    {**details, "attempts": state.attempts},
                )
            return
        if state.last_attempt is not None:
            delay = min(self.auto_backoff_max, self.auto_backoff_base * 2 ** (state.attempts - 1))
            if now - state.last_attempt < delay:
                self.log.debug(
                    "auto reinstall of server {server_id} deferred: backoff {delay}s",
                    server_id=server_id,
                    delay=delay,
                )
                return
        state.attempts += 1
        state.last_attempt = now
        await self._event(
            "server.auto_reinstall", server_id, "started", {**details, "attempt": state.attempts}
        )
        try:
            await self.start(server_id, "reinstall", actor="auto")
        except InstallInProgress:
            return
        waiter = self.wait(server_id)
        if waiter is not None:
            waiter.addCallback(self._auto_done, server_id)
            waiter.addErrback(lambda f: self.log.failure("auto reinstall outcome", f))

    def _auto_done(self, outcome: InstallOutcome, server_id: int) -> None:
        if outcome.ok:
            state = self._auto.get(server_id)
            if state is not None:
                # Success does not reset the count at once: an agent that dies again
                # right away must still reach the cap. Only the quiet period does.
                state.capped = False

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
        await self._event(
            f"server.{job.kind}", server_id, "started", {"install_id": install_id, "actor": actor}
        )
        self.log.info(
            "{kind} of server {server_id} ({host}) started (install {install_id})",
            kind=job.kind,
            server_id=server_id,
            host=server.host,
            install_id=install_id,
        )
        ctx = _Ctx(install_id=install_id, server=server, kind=job.kind)
        ctx.sudo = Sudo.from_record(server.sudo)
        await self._sem.acquire()
        try:
            if self._stopping:
                raise InstallError("connect", "the daemon is stopping")
            if job.kind == "uninstall":
                await self._uninstall(ctx, job)
            else:
                await self._install(ctx, job)
        except InstallError as e:
            return await self._failed(ctx, e)
        except Exception as e:
            self.log.failure(
                "{kind} of server {server_id} crashed", kind=job.kind, server_id=server_id
            )
            return await self._failed(ctx, InstallError("internal", f"internal error: {e!r}"))
        finally:
            self._sem.release()
            await self._cleanup(ctx)
        await self._store.finish_install(install_id, "ok")
        agent_id = ctx.agent.id if ctx.agent is not None else None
        await self._event(
            f"server.{job.kind}", server_id, "ok", {"install_id": install_id, "agent_id": agent_id}
        )
        self.log.info(
            "{kind} of server {server_id} done (install {install_id})",
            kind=job.kind,
            server_id=server_id,
            install_id=install_id,
        )
        return InstallOutcome(install_id, server_id, job.kind, True, agent_id=agent_id)

    async def _failed(self, ctx: _Ctx, e: InstallError) -> InstallOutcome:
        message = f"{e.step}: {e.message}"
        if self._stopping:
            message += " (the daemon is stopping)"
        self.log.warn(
            "{kind} of server {server_id} failed at {step}: {message}",
            kind=ctx.kind,
            server_id=ctx.server.id,
            step=e.step,
            message=e.message,
        )
        await self._store.finish_install(ctx.install_id, "failed", message)
        await self._store.update_server(ctx.server.id, status="failed", status_reason=message)
        if ctx.agent is not None and ctx.kind != "uninstall":
            await self._store.update_agent(ctx.agent.id, status="error", status_reason=message)
        await self._event(
            f"server.{ctx.kind}",
            ctx.server.id,
            "failed",
            {"install_id": ctx.install_id, "step": e.step, "error": e.message},
        )
        agent_id = ctx.agent.id if ctx.agent is not None else None
        return InstallOutcome(
            ctx.install_id, ctx.server.id, ctx.kind, False, message, e.step, agent_id
        )

    async def _cleanup(self, ctx: _Ctx) -> None:
        client = ctx.client
        if client is None:
            return
        try:
            if client.connected and ctx.staging is not None:
                await client.run(remote.remove_staging(ctx.staging), timeout=60)
        except Exception:
            self.log.failure(
                "could not remove the staging dir on server {server_id}", server_id=ctx.server.id
            )
        try:
            await client.close()
        except Exception:
            self.log.failure("closing SSH to server {server_id} failed", server_id=ctx.server.id)

    async def _step(
        self, ctx: _Ctx, name: str, body: Callable[[], Awaitable[_StepResult]]
    ) -> _StepResult:
        await self._store.record_install_step(ctx.install_id, name, "running")
        await self._event(
            "install.step", ctx.server.id, "running", {"install_id": ctx.install_id, "step": name}
        )
        try:
            result = await body()
        except InstallError as e:
            err = e
        except (SSHError, HostKeyError, BundleError) as e:
            err = InstallError(name, str(e))
        except Exception as e:
            self.log.failure("install step {step} crashed", step=name)
            err = InstallError(name, f"internal error: {type(e).__name__}: {e}")
        else:
            await self._store.record_install_step(
                ctx.install_id, name, result.status, log=result.log
            )
            await self._event(
                "install.step",
                ctx.server.id,
                result.status,
                {"install_id": ctx.install_id, "step": name, "log": result.log[-500:]},
            )
            return result
        err.step = name if err.step in ("", "internal") else err.step
        await self._store.record_install_step(
            ctx.install_id, name, "failed", log=err.stderr, error=err.message
        )
        await self._event(
            "install.step",
            ctx.server.id,
            "failed",
            {"install_id": ctx.install_id, "step": name, "error": err.message},
        )
        raise err

    async def _progress(self, ctx: _Ctx, step: str, text: str) -> None:
        await self._store.record_install_step(ctx.install_id, step, "running", log=text)
        await self._event(
            "install.step",
            ctx.server.id,
            "running",
            {"install_id": ctx.install_id, "step": step, "log": text},
        )

    async def _event(
        self,
        action: str,
        server_id: int | None,
        outcome: str,
        details: dict[str, Any] | None,
        *,
        target: str | None = None,
    ) -> None:
        try:
            await self._store.add_event(
                actor="installer",
                action=action,
                target=target or (f"server:{server_id}" if server_id is not None else None),
                outcome=outcome,
                details=details,
            )
        except Exception:
            self.log.failure("could not record event {action}", action=action)

    # -- agent record ----------------------------------------------------------
    async def _new_agent(self, server_id: int, host: str) -> int:
        ident = await self._store.new_agent_identity()
        low, high = self.agent_port_range
        for _ in range(100):
            if low <= ident.rpc_port <= high:
                break
            # Redraw: the store picks from its whole range (the reservation of a
            # discarded draw is released when the daemon restarts).
            ident = await self._store.new_agent_identity()
        else:
            raise InstallError("connect", f"no free agent port in {low}-{high}")
        return int(
            await self._store.add_agent(
                host=host,
                rpc_port=ident.rpc_port,
                rpc_path=ident.rpc_path,
                token=ident.token,
                secret_key=ident.secret_key,
                cert_fingerprint="",
                status="installing",
                server_id=server_id,
            )
        )

    async def _agent_for(self, ctx: _Ctx) -> Any:
        agent = await self._store.get_agent_for_server(ctx.server.id)
        if agent is None:
            await self._new_agent(ctx.server.id, ctx.server.host)
            agent = await self._store.get_agent_for_server(ctx.server.id)
        else:
            await self._store.update_agent(agent.id, status="installing", status_reason=None)
        return agent

    # -- install ----------------------------------------------------------------
    async def _install(self, ctx: _Ctx, job: _Job) -> None:
        ctx.agent = await self._agent_for(ctx)
        try:
            await self._step(ctx, "connect", lambda: self._connect(ctx, job))
            await self._step(ctx, "check", lambda: self._check(ctx))
            await self._step(ctx, "upload", lambda: self._upload(ctx))
            await self._step(ctx, "dependencies", lambda: self._dependencies(ctx))
            await self._step(ctx, "config", lambda: self._config(ctx))
            await self._step(ctx, "service", lambda: self._service(ctx))
            await self._step(ctx, "wait", lambda: self._wait(ctx))
            await self._step(ctx, "pin", lambda: self._pin(ctx))
            await self._step(ctx, "sync_tool", lambda: self._sync_tool(ctx))
        except InstallError:
            if ctx.service_touched:
                await self._make_harmless(ctx)
            raise
        await self._store.update_agent(ctx.agent.id, status="online", status_reason=None)
        await self._store.update_server(ctx.server.id, status="installed", status_reason=None)
        # A fresh success clears the automatic-reinstall cap (not the count).
        state = self._auto.get(ctx.server.id)
        if state is not None:
            state.capped = False

    async def _make_harmless(self, ctx: _Ctx) -> None:
        client = ctx.client
        if client is None or not client.connected:
            return
        try:
            await client.run_privileged(remote.disable_unit(), ctx.sudo, timeout=120)
        except Exception:
            self.log.failure("could not stop the agent unit after a failed install")

    async def _connect(self, ctx: _Ctx, job: _Job) -> _StepResult:
        server = ctx.server
        if not server.auth:
            raise InstallError("connect", "no SSH credentials are stored for this server")
        server_id = server.id

        def remember(line: str) -> Deferred[None]:
            self.log.info("server {server_id}: storing host key on first use", server_id=server_id)
            d: Deferred[None] = self._store.update_server(server_id, host_key=line)
            return d

        policy = HostKeyPolicy(
            pinned=server.host_key_fingerprint,
            known_key=server.host_key,
            on_first_use=remember,
        )
        client = await connect(
            server.host,
            int(server.ssh_port),
            Credentials.from_auth(server.username, server.auth),
            policy,
            reactor=self._reactor,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
        )
        ctx.client = client
        job.client = client
        if self._stopping:
            raise InstallError("connect", "the daemon is stopping")
        uid = await client.uid()
        return _StepResult(
            "ok",
            f"connected to {server.host}:{server.ssh_port} as {server.username} (uid {uid}); "
            f"host key {client.host_key_fingerprint} ({client.host_key_trust})",
        )

    def _need_client(self, ctx: _Ctx) -> SSHClient:
        if ctx.client is None:  # pragma: no cover - connect always runs first
            raise InstallError("", "not connected")
        return ctx.client

    async def _privileged(
        self, ctx: _Ctx, step: str, script: str, *, timeout: float | None = None
    ) -> CommandResult:
        res = await self._need_client(ctx).run_privileged(script, ctx.sudo, timeout=timeout)
        if not res.ok:
            detail = _tail(res.stderr_text() or res.stdout_text())
            raise InstallError(
                step,
                f"remote command failed with exit status {res.exit_code}"
                + (f" (signal {res.signal})" if res.signal else "")
                + (f": {detail.splitlines()[-1]}" if detail else ""),
                stderr=detail,
            )
        return res

    async def _check(self, ctx: _Ctx) -> _StepResult:
        client = self._need_client(ctx)
        notes: list[str] = []
        for _ in range(5):
            res = await client.run(remote.check_script(ctx.agent.rpc_port), timeout=60)
            facts = remote.parse_facts(res.stdout_text())
            busy = facts.get("port") == "busy" and facts.get("agent") != "active"
            if not busy or ctx.agent.cert_fingerprint:
                break
            # Never deployed yet, so its port can still change: draw another.
            old_port = ctx.agent.rpc_port
            await self._store.delete_agent(ctx.agent.id)
            await self._new_agent(ctx.server.id, ctx.server.host)
            ctx.agent = await self._store.get_agent_for_server(ctx.server.id)
            notes.append(f"port {old_port} is busy on the target; assigned {ctx.agent.rpc_port}")
        ctx.facts = facts
        problems = []
        py = facts.get("python", "")
        if not py:
            problems.append(
                "python3 is not installed on the target (the agent needs Python >= 3.9; "
                "install it, e.g. apt-get install python3 python3-venv)"
            )
        else:
            version = _python_version(py)
            if version is None or version < remote.MIN_PYTHON:
                problems.append(f"python3 on the target is {py}; the agent needs Python >= 3.9")
            elif facts.get("venv") != "yes":
                problems.append(
                    "python3 on the target lacks the venv/ensurepip modules (install python3-venv)"
                )
        if facts.get("systemd") != "yes":
            problems.append("the target does not run systemd (no /run/systemd/system)")
        if facts.get("port") == "busy" and facts.get("agent") != "active":
            problems.append(
                f"port {ctx.agent.rpc_port} is already in use on the target by another program"
                + (
                    ""
                    if not ctx.agent.cert_fingerprint
                    else " (a reinstall keeps the agent's port; free it, or uninstall and install)"
                )
            )
        if problems:
            raise InstallError("check", "; ".join(problems), stderr=_tail(res.stderr_text()))
        if not await client.is_root():
            # Fails with a clear SudoError (wrong password, not in sudoers, ...).
            await self._privileged(ctx, "check", "true", timeout=60)
        if self.dependency_mode == "wheelhouse":
            self._target(ctx).platform_tags()  # raises BundleError for unusable targets
        lines = [
            f"{k}={facts.get(k, '')}"
            for k in ("os", "kernel", "machine", "python", "glibc", "systemd", "port")
        ]
        return _StepResult("ok", "\n".join(notes + lines))

    def _target(self, ctx: _Ctx) -> TargetPlatform:
        return TargetPlatform(
            python=ctx.facts.get("python", ""),
            machine=ctx.facts.get("machine", ""),
            glibc=ctx.facts.get("glibc") or None,
        )

    async def _upload(self, ctx: _Ctx) -> _StepResult:
        client = self._need_client(ctx)
        res = await client.run(remote.MAKE_STAGING, timeout=60)
        path = res.stdout_text().strip()
        if not res.ok or not path:
            raise InstallError(
                "upload", "cannot create a temp dir on the target", stderr=_tail(res.stderr_text())
            )
        ctx.staging = staging = remote.Staging(path)
        files = agent_files()
        ctx.files = files
        subdirs = sorted({os.path.dirname(rel) for rel, _ in files.files if os.path.dirname(rel)})
        if subdirs:
            mk = "mkdir -p " + " ".join(remote.q(f"{staging.agent}/{d}") for d in subdirs)
            await client.run(mk, timeout=60)
        for rel, data in files.files:
            await client.upload(f"{staging.agent}/{rel}", data, mode=0o644)
        await self._privileged(ctx, "upload", remote.install_agent_files(staging))
        return _StepResult(
            "ok",
            f"uploaded {len(files.files)} files (bundle sha256 {files.sha256[:16]}) "
            f"to {remote.AGENT_DIR}",
        )

    async def _dependencies(self, ctx: _Ctx) -> _StepResult:
        client = self._need_client(ctx)
        files = ctx.files
        staging = ctx.staging
        assert files is not None and staging is not None
        wheels_dir: str | None = None
        wheels: list[str] = []
        stamp = f"{self.dependency_mode}:{files.requirements_sha256}"
        if self.dependency_mode == "wheelhouse":
            target = self._target(ctx)
            local = await self.wheelhouse.ensure(target, files.requirements)
            wheels = Wheelhouse.wheels(local)
            stamp += f":{target.cache_key()}"
        current = await self._privileged(ctx, "dependencies", remote.read_requirements_stamp())
        if current.stdout_text().strip() == stamp:
            return _StepResult("skipped", "the agent's venv already has these requirements")
        if self.dependency_mode == "wheelhouse":
            for name in wheels:
                await client.upload(
                    f"{staging.wheels}/{name}", local_path=os.path.join(local, name), mode=0o644
                )
            wheels_dir = staging.wheels
        res = await self._privileged(
            ctx,
            "dependencies",
            remote.install_dependencies(stamp, wheels_dir),
            timeout=self.command_timeout,
        )
        installed = [ln for ln in res.stdout_text().splitlines() if "Successfully" in ln]
        source = f"{len(wheels)} uploaded wheels" if wheels_dir else "the package index"
        return _StepResult("ok", f"installed from {source}\n" + _tail("\n".join(installed), 2000))

    async def _config(self, ctx: _Ctx) -> _StepResult:
        client = self._need_client(ctx)
        staging = ctx.staging
        assert staging is not None
        agent = ctx.agent
        data = remote.agent_config(
            token=agent.token,
            secret_key=agent.secret_key,
            rpc_port=agent.rpc_port,
            rpc_path=agent.rpc_path,
            bind=self.agent_bind,
        )
        await client.upload(f"{staging.path}/config.json", data, mode=0o600)
        await self._privileged(ctx, "config", remote.install_config(staging))
        return _StepResult(
            "ok", f"wrote {remote.CONFIG_PATH} (root:root 600), rpc_port {agent.rpc_port}"
        )

    async def _service(self, ctx: _Ctx) -> _StepResult:
        client = self._need_client(ctx)
        staging = ctx.staging
        assert staging is not None
        await client.upload(
            f"{staging.path}/{remote.UNIT_NAME}", remote.unit_file().encode(), mode=0o644
        )
        ctx.service_touched = True
        res = await self._privileged(ctx, "service", remote.install_unit(staging), timeout=180)
        return _StepResult(
            "ok",
            f"installed {remote.UNIT_PATH}; enabled and restarted\n"
            + _tail(res.stdout_text(), 500),
        )

    def _endpoint(self, ctx: _Ctx, fingerprint: str) -> Any:
        from myxd.rpc.client import AgentEndpoint

        agent = ctx.agent
        return AgentEndpoint(
            host=ctx.server.host,
            port=agent.rpc_port,
            path=agent.rpc_path,
            token=agent.token,
            fingerprint=fingerprint,
        )

    async def _read_fingerprint(self, ctx: _Ctx) -> str | None:
        res = await self._need_client(ctx).run_privileged(
            remote.cert_fingerprint_script(), ctx.sudo, timeout=60
        )
        out = res.stdout_text().strip().lower()
        return out if _HEX64.match(out) else None

    async def _wait(self, ctx: _Ctx) -> _StepResult:
        from myxd.rpc.retry import AgentRPCError, CertificateMismatch

        clock = self._reactor
        started = clock.seconds()
        deadline = started + self.wait_timeout
        next_progress = started + self.progress_interval
        fingerprint: str | None = None
        last = "the agent has not written its certificate yet"
        checks = 0
        while True:
            if self._stopping:
                raise InstallError("wait", "the daemon is stopping")
            checks += 1
            if fingerprint is None:
                fingerprint = await self._read_fingerprint(ctx)
            if fingerprint is not None:
                try:
                    await self._rpc.call(
                        self._endpoint(ctx, fingerprint),
                        "health_check",
                        retry=False,
                        timeout=max(1.0, min(10.0, deadline - clock.seconds())),
                    )
                except CertificateMismatch as e:
                    # The agent made a new certificate since we read it: read again.
                    fingerprint, last = None, e.reason
                except AgentRPCError as e:
                    last = e.reason
                else:
                    ctx.fingerprint = fingerprint
                    elapsed = clock.seconds() - started
                    return _StepResult(
                        "ok", f"the agent answered RPC after {elapsed:.1f} s ({checks} checks)"
                    )
            now = clock.seconds()
            if now >= deadline:
                journal = await self._need_client(ctx).run_privileged(
                    remote.journal_tail(), ctx.sudo, timeout=60
                )
                tail = _tail(journal.stdout_text(), 3000)
                raise InstallError(
                    "wait",
                    f"the agent did not answer within {self.wait_timeout:g} s: {last}",
                    stderr=tail or None,
                )
            if now >= next_progress:
                await self._fail_if_crash_looping(ctx)
                text = f"waiting for the agent: {now - started:.0f} s, {checks} checks; {last}"
                self.log.info("server {server_id}: {text}", server_id=ctx.server.id, text=text)
                await self._progress(ctx, "wait", text)
                next_progress += self.progress_interval
            await deferLater(clock, self.check_interval, lambda: None)

    async def _fail_if_crash_looping(self, ctx: _Ctx) -> None:
        """An agent that keeps exiting will not answer: say why now, not at the timeout."""
        res = await self._need_client(ctx).run_privileged(
            remote.restarts_script(), ctx.sudo, timeout=60
        )
        fields = res.stdout_text().split()
        try:
            restarts = int(fields[0])
        except (ValueError, IndexError):
            return
        if restarts < 3 or fields[1:2] == ["active"]:
            return
        journal = await self._need_client(ctx).run_privileged(
            remote.journal_tail(), ctx.sudo, timeout=60
        )
        text = journal.stdout_text()
        errors = [ln for ln in text.splitlines() if ln.startswith("myx-agent: error:")]
        reason = errors[-1] if errors else "see the log"
        raise InstallError(
            "wait",
            f"the agent keeps exiting ({restarts} restarts): {reason}",
            stderr=_tail(text, 3000) or None,
        )

    async def _pin(self, ctx: _Ctx) -> _StepResult:
        fingerprint = ctx.fingerprint
        assert fingerprint is not None
        # Read again over SSH (host-key verified) right before pinning.
        again = await self._read_fingerprint(ctx)
        if again != fingerprint:
            raise InstallError("pin", "the agent's certificate changed while installing")
        status = await self._rpc.call(self._endpoint(ctx, fingerprint), "get_status")
        reported = str(status.get("cert_fingerprint", "")).replace(":", "").lower()
        if reported != fingerprint:
            raise InstallError(
                "pin", "the agent reports a different certificate than the one on disk"
            )
        if int(status.get("rpc_port", -1)) != int(ctx.agent.rpc_port):
            raise InstallError(
                "pin",
                f"the agent listens on {status.get('rpc_port')}, "
                f"not the assigned port {ctx.agent.rpc_port}",
            )
        await self._store.update_agent(
            ctx.agent.id, cert_fingerprint=fingerprint, host=ctx.server.host
        )
        ctx.agent = await self._store.get_agent(ctx.agent.id)
        return _StepResult(
            "ok",
            f"pinned certificate sha256 {fingerprint}; agent {status.get('version')} on "
            f"{status.get('hostname')} ({status.get('os')})",
        )

    async def _sync_tool(self, ctx: _Ctx) -> _StepResult:
        import base64

        fingerprint = ctx.fingerprint
        assert fingerprint is not None
        archive, digest, version = deployment_tool_archive()
        result = await self._rpc.call(
            self._endpoint(ctx, fingerprint),
            "sync_deployment_tool",
            {
                "archive": base64.b64encode(archive).decode("ascii"),
                "sha256": digest,
                "version": version,
            },
            retry=True,
            timeout=120,
        )
        if isinstance(result, dict) and result.get("changed") is False:
            return _StepResult(
                "skipped", f"deployment tool {version} (sha256 {digest[:16]}) already in place"
            )
        return _StepResult(
            "ok", f"synced deployment tool {version} ({len(archive)} bytes, sha256 {digest})"
        )

    # -- uninstall -------------------------------------------------------------
    async def _uninstall(self, ctx: _Ctx, job: _Job) -> None:
        ctx.agent = await self._store.get_agent_for_server(ctx.server.id)
        await self._step(ctx, "connect", lambda: self._connect(ctx, job))
        await self._step(ctx, "stop", lambda: self._remove_unit(ctx))
        await self._step(ctx, "remove", lambda: self._remove_files(ctx))
        if ctx.agent is not None:
            await self._store.delete_agent(ctx.agent.id)
        await self._store.update_server(ctx.server.id, status="uninstalled", status_reason=None)

    async def _remove_unit(self, ctx: _Ctx) -> _StepResult:
        await self._privileged(ctx, "stop", remote.uninstall_unit(), timeout=180)
        return _StepResult("ok", f"stopped, disabled and removed {remote.UNIT_NAME}")

    async def _remove_files(self, ctx: _Ctx) -> _StepResult:
        await self._privileged(ctx, "remove", remote.uninstall_files(), timeout=300)
        return _StepResult(
            "ok",
            "removed "
            + ", ".join((remote.AGENT_DIR, remote.CONFIG_DIR, remote.STATE_DIR, remote.TOOL_DIR)),
        )


__all__ = [
    "INSTALL_STEPS",
    "UNINSTALL_STEPS",
    "InstallError",
    "InstallInProgress",
    "InstallOutcome",
    "Installer",
    "ServerNotFound",
]
