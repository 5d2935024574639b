# -*- test-case-name: tests.install.test_steps,tests.install.test_install_real -*-
"""The install steps, one ``async def`` each, over an ``InstallSession``:

    connect       SSH with host-key trust (pin / stored key / first use)
    check         OS, python3 >= 3.9 with venv, systemd, the agent port free, sudo
    upload        the agent package (computed from myx_agent) into /opt/myx-agent
    dependencies  venv + pip install, from a wheelhouse myxd builds or the index
    config        /etc/myx-agent/config.json, atomically, root:root 600
    service       myx-agent.service (Restart=always), daemon-reload, enable, restart
    wait          RPC checked every 3 s (progress logged every 10 s) until it answers
    pin           the certificate fingerprint read over SSH is pinned in the store
    sync_tool     deployment-tool tar.gz pushed in chunks to the agent's artifact
                  cache (ArtifactPusher), then installed by sync_deployment_tool

and the uninstall's ``stop`` and ``remove``. Each step talks to the target only
through ``RemoteHost`` and returns a ``StepResult`` or raises ``InstallError``;
recording them is the journal's job, ordering them the installer's.

It is a little over 500 lines because the nine steps read as one sequence,
each beside the checks it makes; the SSH plumbing they share lives in
``session``, ``host`` and ``sshauth``.

A step never logs or records a secret (the agent's config goes by SFTP with mode
600, sudo passwords on stdin) and never blocks the reactor.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Awaitable, Coroutine, cast

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

import myxd.install.remote as remote
from myxd.deploy.transfer import TransferError
from myxd.install.agents import new_agent
from myxd.install.bundle import deployment_tool_archive
from myxd.install.host import RemoteHost
from myxd.install.hostkeys import HostKeyPolicy
from myxd.install.session import (
    HEX64,
    Connector,
    InstallError,
    InstallSession,
    StepResult,
    tail,
)
from myxd.install.ssh import CommandResult, Credentials
from myxd.install.ssh import connect as ssh_connect
from myxd.netpolicy import TargetNotAllowed
from myxd.rpc.retry import AgentRPCError, CertificateMismatch, RemoteError
from myxd.store.records import ServerRecord

log = Logger()


def ssh_connector(reactor: IReactorTime, *, timeout: float, command_timeout: float) -> Connector:
    """The real ``Connector``: conch, with the server's stored credentials."""

    async def connect_over_ssh(server: ServerRecord, policy: HostKeyPolicy) -> RemoteHost:
        return await ssh_connect(
            server.host,
            int(server.ssh_port),
            Credentials.from_auth(server.username, server.auth),
            policy,
            reactor=reactor,
            timeout=timeout,
            command_timeout=command_timeout,
        )

    return connect_over_ssh


async def privileged(
    s: InstallSession, step: str, script: str, *, timeout: float | None = None
) -> CommandResult:
    """Run ``script`` as root; a non-zero exit fails ``step`` with the remote's stderr."""
    res = await s.need_host().run_privileged(script, s.sudo, timeout=timeout)
    if not res.ok:
        detail = tail(res.stderr_text() or res.stdout_text())
        raise InstallError(
            step,
            f"remote command failed with exit status {res.exit_code}"
            + (f" (signal {res.signal})" if res.signal else "")
            + (f": {detail.splitlines()[-1]}" if detail else ""),
            stderr=detail,
        )
    return res


def _python_version(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in text.split(".")[:3])
    except ValueError:
        return None


async def connect(s: InstallSession) -> StepResult:
    server = s.server
    if not server.auth:
        raise InstallError("connect", "no SSH credentials are stored for this server")
    if s.env.target_policy is not None:
        try:
            await s.env.target_policy.check(server.host)
        except TargetNotAllowed as e:
            raise InstallError("connect", str(e)) from None
    store = s.env.store

    def remember(line: str) -> Awaitable[None]:
        log.info("server {server_id}: storing host key on first use", server_id=server.id)
        return store.update_server(server.id, host_key=line)

    policy = HostKeyPolicy(
        pinned=server.host_key_fingerprint,
        known_key=server.host_key,
        on_first_use=remember,
    )
    s.connecting = connecting = ensureDeferred(
        cast("Coroutine[Any, Any, RemoteHost]", s.env.connector(server, policy))
    )
    try:
        s.host = host = await connecting
    except Exception:
        if s.env.stopping():  # cancelled by the installer's stop, or cut by it
            raise InstallError("connect", "the daemon is stopping") from None
        raise
    finally:
        s.connecting = None
    if s.env.stopping():
        raise InstallError("connect", "the daemon is stopping")
    uid = await host.uid()
    return StepResult(
        "ok",
        f"connected to {server.host}:{server.ssh_port} as {server.username} (uid {uid}); "
        f"host key {host.host_key_fingerprint} ({host.host_key_trust})",
    )


async def check(s: InstallSession) -> StepResult:
    host = s.need_host()
    agent = s.need_agent()
    options = s.env.options
    notes: list[str] = []
    for _ in range(5):
        res = await host.run(remote.check_script(agent.rpc_port), timeout=60)
        facts = remote.parse_facts(res.stdout_text())
        busy = facts.get("port") == "busy" and facts.get("agent") != "active"
        if not busy or agent.cert_fingerprint:
            break
        # Never deployed yet, so its port can still change: draw another.
        old_port = agent.rpc_port
        await s.env.store.delete_agent(agent.id)
        await new_agent(s.env.store, s.server.id, s.server.host, options.agent_port_range)
        s.agent = await s.env.store.get_agent_for_server(s.server.id)
        agent = s.need_agent()
        notes.append(f"port {old_port} is busy on the target; assigned {agent.rpc_port}")
    s.facts = facts
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
            f"port {agent.rpc_port} is already in use on the target by another program"
            + (
                ""
                if not agent.cert_fingerprint
                else " (a reinstall keeps the agent's port; free it, or uninstall and install)"
            )
        )
    if problems:
        raise InstallError("check", "; ".join(problems), stderr=tail(res.stderr_text()))
    if not await host.is_root():
        # Fails with a clear SudoError (wrong password, not in sudoers, ...).
        await privileged(s, "check", "true", timeout=60)
    if options.dependency_mode == "wheelhouse":
        s.target().platform_tags()  # raises BundleError for unusable targets
    lines = [
        f"{k}={facts.get(k, '')}"
        for k in ("os", "kernel", "machine", "python", "glibc", "systemd", "port")
    ]
    return StepResult("ok", "\n".join(notes + lines))


async def upload(s: InstallSession) -> StepResult:
    host = s.need_host()
    res = await host.run(remote.MAKE_STAGING, timeout=60)
    path = res.stdout_text().strip()
    if not res.ok or not path:
        raise InstallError(
            "upload", "cannot create a temp dir on the target", stderr=tail(res.stderr_text())
        )
    s.staging = staging = remote.Staging(path)
    s.files = files = s.env.agent_files()
    subdirs = sorted({os.path.dirname(rel) for rel, _ in files.files if os.path.dirname(rel)})
    if subdirs:
        mk = "mkdir -p " + " ".join(remote.q(f"{staging.agent}/{d}") for d in subdirs)
        await host.run(mk, timeout=60)
    for rel, data in files.files:
        await host.upload(f"{staging.agent}/{rel}", data, mode=0o644)
    await privileged(s, "upload", remote.install_agent_files(staging))
    return StepResult(
        "ok",
        f"uploaded {len(files.files)} files (bundle sha256 {files.sha256[:16]}) "
        f"to {remote.AGENT_DIR}",
    )


async def dependencies(s: InstallSession) -> StepResult:
    host = s.need_host()
    staging = s.need_staging()
    files = s.files
    if files is None:  # pragma: no cover - upload always runs first
        raise InstallError("dependencies", "the agent files were not uploaded")
    mode = s.env.options.dependency_mode
    wheelhouse = s.env.wheelhouse
    wheels_dir: str | None = None
    wheels: list[str] = []
    local = ""
    stamp = f"{mode}:{files.requirements_sha256}"
    if mode == "wheelhouse":
        target = s.target()
        local = await wheelhouse.ensure(target, files.requirements)
        wheels = wheelhouse.wheels(local)
        stamp += f":{target.cache_key()}"
    current = await privileged(s, "dependencies", remote.read_requirements_stamp())
    if current.stdout_text().strip() == stamp:
        return StepResult("skipped", "the agent's venv already has these requirements")
    if mode == "wheelhouse":
        for name in wheels:
            await host.upload(
                f"{staging.wheels}/{name}", local_path=os.path.join(local, name), mode=0o644
            )
        wheels_dir = staging.wheels
    res = await privileged(
        s,
        "dependencies",
        remote.install_dependencies(stamp, wheels_dir),
        timeout=s.env.options.command_timeout,
    )
    installed = [ln for ln in res.stdout_text().splitlines() if "Successfully" in ln]
    source = f"{len(wheels)} uploaded wheels" if wheels_dir else "the package index"
    return StepResult("ok", f"installed from {source}\n" + tail("\n".join(installed), 2000))


async def config(s: InstallSession) -> StepResult:
    staging = s.need_staging()
    agent = s.need_agent()
    data = remote.agent_config(
        token=agent.token,
        secret_key=agent.secret_key,
        rpc_port=agent.rpc_port,
        rpc_path=agent.rpc_path,
        bind=s.env.options.agent_bind,
    )
    await s.need_host().upload(f"{staging.path}/config.json", data, mode=0o600)
    await privileged(s, "config", remote.install_config(staging))
    return StepResult(
        "ok", f"wrote {remote.CONFIG_PATH} (root:root 600), rpc_port {agent.rpc_port}"
    )


async def service(s: InstallSession) -> StepResult:
    staging = s.need_staging()
    await s.need_host().upload(
        f"{staging.path}/{remote.UNIT_NAME}", remote.unit_file().encode(), mode=0o644
    )
    s.service_touched = True
    res = await privileged(s, "service", remote.install_unit(staging), timeout=180)
    return StepResult(
        "ok",
        f"installed {remote.UNIT_PATH}; enabled and restarted\n" + tail(res.stdout_text(), 500),
    )


async def read_fingerprint(s: InstallSession) -> str | None:
    """The agent certificate's SHA-256 as read on disk over SSH, or None while absent."""
    res = await s.need_host().run_privileged(remote.cert_fingerprint_script(), s.sudo, timeout=60)
    out = res.stdout_text().strip().lower()
    return out if HEX64.match(out) else None


async def wait(s: InstallSession) -> StepResult:
    env = s.env
    options = env.options
    clock = env.clock
    started = clock.seconds()
    deadline = started + options.wait_timeout
    next_progress = started + options.progress_interval
    fingerprint: str | None = None
    last = "the agent has not written its certificate yet"
    checks = 0
    while True:
        if env.stopping():
            raise InstallError("wait", "the daemon is stopping")
        checks += 1
        if fingerprint is None:
            fingerprint = await read_fingerprint(s)
        if fingerprint is not None:
            try:
                await env.rpc.call(
                    s.endpoint(fingerprint),
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
                s.fingerprint = fingerprint
                elapsed = clock.seconds() - started
                return StepResult(
                    "ok", f"the agent answered RPC after {elapsed:.1f} s ({checks} checks)"
                )
        now = clock.seconds()
        if now >= deadline:
            journal = await s.need_host().run_privileged(remote.journal_tail(), s.sudo, timeout=60)
            text = tail(journal.stdout_text(), 3000)
            raise InstallError(
                "wait",
                f"the agent did not answer within {options.wait_timeout:g} s: {last}",
                stderr=text or None,
            )
        if now >= next_progress:
            await fail_if_crash_looping(s)
            text = f"waiting for the agent: {now - started:.0f} s, {checks} checks; {last}"
            log.info("server {server_id}: {text}", server_id=s.server.id, text=text)
            await env.progress(s, "wait", text)
            next_progress += options.progress_interval
        await deferLater(clock, options.check_interval, lambda: None)


async def fail_if_crash_looping(s: InstallSession) -> None:
    """An agent that keeps exiting will not answer: say why now, not at the timeout."""
    host = s.need_host()
    res = await host.run_privileged(remote.restarts_script(), s.sudo, timeout=60)
    fields = res.stdout_text().split()
    try:
        restarts = int(fields[0])
    except (ValueError, IndexError):
        return
    if restarts < 3 or fields[1:2] == ["active"]:
        return
    journal = await host.run_privileged(remote.journal_tail(), s.sudo, timeout=60)
    text = journal.stdout_text()
    errors = [ln for ln in text.splitlines() if ln.startswith("myx-agent: error:")]
    reason = errors[-1] if errors else "see the log"
    raise InstallError(
        "wait",
        f"the agent keeps exiting ({restarts} restarts): {reason}",
        stderr=tail(text, 3000) or None,
    )


async def pin(s: InstallSession) -> StepResult:
    fingerprint = s.need_fingerprint()
    agent = s.need_agent()
    # Read again over SSH (host-key verified) right before pinning.
    again = await read_fingerprint(s)
    if again != fingerprint:
        raise InstallError("pin", "the agent's certificate changed while installing")
    status = await s.env.rpc.call(s.endpoint(fingerprint), "get_status")
    reported = str(status.get("cert_fingerprint", "")).replace(":", "").lower()
    if reported != fingerprint:
        raise InstallError("pin", "the agent reports a different certificate than the one on disk")
    if int(status.get("rpc_port", -1)) != int(agent.rpc_port):
        raise InstallError(
            "pin",
            f"the agent listens on {status.get('rpc_port')}, "
            f"not the assigned port {agent.rpc_port}",
        )
    store = s.env.store
    await store.update_agent(agent.id, cert_fingerprint=fingerprint, host=s.server.host)
    s.agent = await store.get_agent(agent.id)
    return StepResult(
        "ok",
        f"pinned certificate sha256 {fingerprint}; agent {status.get('version')} on "
        f"{status.get('hostname')} ({status.get('os')})",
    )


INVALID_PARAMS = -32602


async def sync_tool(s: InstallSession) -> StepResult:
    fingerprint = s.need_fingerprint()
    archive, digest, version = deployment_tool_archive(s.env.options.deployment_tool_dir)
    ep = s.endpoint(fingerprint)
    # The pusher reads from a file; the archive is small (it was just built in
    # memory on the reactor too), and the file lives only for this step.
    fd, path = tempfile.mkstemp(prefix="myx-deployment-tool-", suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(archive)
        sent = 0
        # A second round only if the agent evicted the archive between the push
        # and the sync (its cache is shared with deployments' artifacts).
        for attempt in (1, 2):
            try:
                pushed = await s.env.need_pusher().push(ep, path, digest, len(archive))
            except TransferError as e:
                raise InstallError("sync_tool", f"pushing the deployment tool: {e}") from None
            sent += pushed.bytes_sent
            try:
                result = await s.env.rpc.call(
                    ep,
                    "sync_deployment_tool",
                    {"sha256": digest, "version": version},
                    retry=True,
                    timeout=120,
                )
                break
            except RemoteError as e:
                if e.code != INVALID_PARAMS or attempt == 2:
                    raise
    finally:
        os.unlink(path)
    if isinstance(result, dict) and result.get("changed") is False:
        return StepResult(
            "skipped", f"deployment tool {version} (sha256 {digest[:16]}) already in place"
        )
    return StepResult(
        "ok",
        f"synced deployment tool {version} ({len(archive)} bytes, {sent} sent in chunks, "
        f"sha256 {digest})",
    )


async def stop(s: InstallSession) -> StepResult:
    """Uninstall: stop, disable and remove the unit."""
    await privileged(s, "stop", remote.uninstall_unit(), timeout=180)
    return StepResult("ok", f"stopped, disabled and removed {remote.UNIT_NAME}")


async def remove(s: InstallSession) -> StepResult:
    """Uninstall: remove the agent's files, config, state and deployment tool."""
    await privileged(s, "remove", remote.uninstall_files(), timeout=300)
    return StepResult(
        "ok",
        "removed "
        + ", ".join((remote.AGENT_DIR, remote.CONFIG_DIR, remote.STATE_DIR, remote.TOOL_DIR)),
    )


async def make_harmless(s: InstallSession) -> None:
    """After a failed install that touched the unit: stop it so it cannot restart-loop."""
    host = s.host
    if host is None or not host.connected:
        return
    try:
        await host.run_privileged(remote.disable_unit(), s.sudo, timeout=120)
    except Exception:
        log.failure("could not stop the agent unit after a failed install")


async def cleanup(s: InstallSession) -> None:
    """Remove the staging dir and close the connection; never raises."""
    host = s.host
    if host is None:
        return
    try:
        if host.connected and s.staging is not None:
            await host.run(remote.remove_staging(s.staging), timeout=60)
    except Exception:
        log.failure("could not remove the staging dir on server {server_id}", server_id=s.server.id)
    try:
        await host.close()
    except Exception:
        log.failure("closing SSH to server {server_id} failed", server_id=s.server.id)


INSTALL_PLAN = (
    ("connect", connect),
    ("check", check),
    ("upload", upload),
    ("dependencies", dependencies),
    ("config", config),
    ("service", service),
    ("wait", wait),
    ("pin", pin),
    ("sync_tool", sync_tool),
)
UNINSTALL_PLAN = (("connect", connect), ("stop", stop), ("remove", remove))


__all__ = [
    "INSTALL_PLAN",
    "UNINSTALL_PLAN",
    "check",
    "cleanup",
    "config",
    "connect",
    "dependencies",
    "make_harmless",
    "pin",
    "privileged",
    "remove",
    "service",
    "ssh_connector",
    "stop",
    "sync_tool",
    "upload",
    "wait",
]
