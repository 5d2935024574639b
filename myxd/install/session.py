# -*- test-case-name: tests.install.test_steps -*-
"""The typed state one install carries from step to step, and what the steps may use.

``InstallSession`` is one install's state (server, agent, connection, staging
dir, facts, fingerprint); ``InstallEnv`` is what every install of one daemon
shares (store, RPC client, the artifact pusher built on it, clock, options,
wheelhouse, the cached agent files, the journal). ``InstallStore`` and
``AgentCaller`` name the slice of the store and of the RPC client that installs
use, so tests can pass fakes.

This module holds data and seams only: it performs no I/O and never holds a
secret beyond the records it was given (whose reprs hide them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

import myxd.install.remote as remote
from myxd.deploy.transfer import ArtifactPusher
from myxd.errors import MyxError
from myxd.identity import AgentIdentity
from myxd.install.bundle import AgentFiles, TargetPlatform, agent_files
from myxd.install.host import RemoteHost
from myxd.install.hostkeys import HostKeyPolicy
from myxd.install.ssh import Sudo
from myxd.netpolicy import TargetPolicy
from myxd.rpc.client import AgentEndpoint
from myxd.store.records import AgentRecord, ServerRecord

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
HEX64 = re.compile(r"^[0-9a-f]{64}$")
STDERR_TAIL = 4000


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
class StepResult:
    status: str = "ok"  # ok | skipped
    log: str = ""


def tail(text: str, limit: int = STDERR_TAIL) -> str:
    """The end of a remote output, where errors are, bounded for the store."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class InstallStore(Protocol):
    """The store methods installs use (``myxd.store.Store`` implements them)."""

    def get_server(self, server_id: int) -> Awaitable[ServerRecord | None]: ...
    def list_servers(self) -> Awaitable[list[ServerRecord]]: ...
    def add_server(
        self,
        *,
        name: str,
        host: str,
        ssh_port: int,
        username: str,
        auth: dict[str, Any] | None,
        sudo: dict[str, Any],
        host_key_fingerprint: str | None = ...,
    ) -> Awaitable[int]: ...
    def update_server(
        self,
        server_id: int,
        *,
        host_key: str | None = ...,
        status: str = ...,
        status_reason: str | None = ...,
    ) -> Awaitable[None]: ...
    def delete_server(self, server_id: int) -> Awaitable[bool]: ...
    def new_agent_identity(self) -> Awaitable[AgentIdentity]: ...
    def add_agent(
        self,
        *,
        host: str,
        rpc_port: int,
        rpc_path: str,
        token: str,
        secret_key: str,
        cert_fingerprint: str,
        status: str = ...,
        server_id: int | None = ...,
    ) -> Awaitable[int]: ...
    def get_agent(self, agent_id: int) -> Awaitable[AgentRecord | None]: ...
    def get_agent_for_server(self, server_id: int) -> Awaitable[AgentRecord | None]: ...
    def update_agent(
        self,
        agent_id: int,
        *,
        host: str = ...,
        cert_fingerprint: str = ...,
        status: str = ...,
        status_reason: str | None = ...,
    ) -> Awaitable[None]: ...
    def delete_agent(self, agent_id: int) -> Awaitable[bool]: ...
    def start_install(self, server_id: int, kind: str) -> Awaitable[int]: ...
    def record_install_step(
        self,
        install_id: int,
        step: str,
        status: str,
        log: str | None = ...,
        error: str | None = ...,
    ) -> Awaitable[None]: ...
    def finish_install(
        self, install_id: int, status: str, error: str | None = ...
    ) -> Awaitable[None]: ...
    def get_latest_install(self, server_id: int) -> Awaitable[dict[str, Any] | None]: ...
    def add_event(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        details: dict[str, Any] | None = ...,
    ) -> Awaitable[int]: ...


class AgentCaller(Protocol):
    """The RPC client's one call installs make (``myxd.rpc.client.AgentRPC``)."""

    def call(
        self,
        ep: AgentEndpoint,
        method: str,
        params: dict[str, Any] | list[Any] | None = ...,
        *,
        retry: bool | None = ...,
        timeout: float | None = ...,
    ) -> Awaitable[Any]: ...


class WheelSource(Protocol):
    """Where ``dependencies`` gets wheels for a target (``bundle.Wheelhouse``)."""

    async def ensure(self, target: TargetPlatform, requirements: bytes) -> str: ...
    @staticmethod
    def wheels(path: str) -> list[str]: ...


# (server, host-key policy) -> an authenticated connection to it.
Connector = Callable[[ServerRecord, HostKeyPolicy], Awaitable[RemoteHost]]


@dataclass(frozen=True)
class InstallOptions:
    """How installs behave; the Installer fills these from ``Settings`` and its arguments."""

    dependency_mode: str = "wheelhouse"
    agent_bind: str | None = None
    # Ports for NEW agents (reinstalls keep theirs).
    agent_port_range: tuple[int, int] = (1, 65535)
    wait_timeout: float = 120.0
    command_timeout: float = 600.0
    check_interval: float = 3.0
    progress_interval: float = 10.0
    # None: the deployment tool packaged with MyX (myx_deployment_tool).
    deployment_tool_dir: str | None = None

    def __post_init__(self) -> None:
        if self.dependency_mode not in DEPENDENCY_MODES:
            raise ValueError(
                f"dependency_mode must be one of {DEPENDENCY_MODES}, not {self.dependency_mode!r}"
            )


class AgentFilesCache:
    """The agent's files, read once per daemon.

    Reading them parses every agent module (``ast``, ~50 ms) on the reactor;
    doing that in a thread instead is unsafe (``ast.parse`` is not thread-safe
    on 3.11 and parallel installs broke), so it is done once and kept. A
    failed read is not kept: the next install tries again.
    """

    def __init__(self, read: Callable[[], AgentFiles] = agent_files) -> None:
        self._read = read
        self._files: AgentFiles | None = None

    def __call__(self) -> AgentFiles:
        if self._files is None:
            self._files = self._read()
        return self._files


@dataclass
class InstallEnv:
    """What every install of one daemon shares. Built once by the Installer."""

    store: InstallStore
    rpc: AgentCaller
    clock: IReactorTime
    options: InstallOptions
    connector: Connector
    wheelhouse: WheelSource
    agent_files: Callable[[], AgentFiles]
    # The journal's ``progress``: record a running step's log line and event.
    progress: Callable[[InstallSession, str, str], Awaitable[None]]
    stopping: Callable[[], bool]
    # Sends files to agents in chunks (sync_tool); built from ``rpc`` by default.
    pusher: ArtifactPusher | None = None
    # allowed_target_networks; None: any.
    target_policy: TargetPolicy | None = None

    def __post_init__(self) -> None:
        if self.pusher is None:
            # The clock is the reactor in a daemon: the pusher reads files in its threads.
            self.pusher = ArtifactPusher(cast(Any, self.rpc), self.clock)

    def need_pusher(self) -> ArtifactPusher:
        assert self.pusher is not None  # set by __post_init__
        return self.pusher


@dataclass
class InstallSession:
    """One install's state, filled in step by step. Created by the Installer per job."""

    env: InstallEnv
    install_id: int
    server: ServerRecord
    kind: str  # install | reinstall | uninstall
    sudo: Sudo = field(default_factory=Sudo)
    agent: AgentRecord | None = None
    host: RemoteHost | None = None
    # The SSH connect in flight: the installer cancels it when the daemon stops,
    # rather than waiting out the connect timeout on an unreachable host.
    connecting: Deferred[RemoteHost] | None = None
    staging: remote.Staging | None = None
    facts: dict[str, str] = field(default_factory=dict)
    files: AgentFiles | None = None
    fingerprint: str | None = None
    service_touched: bool = False

    def need_host(self) -> RemoteHost:
        if self.host is None:  # pragma: no cover - connect always runs first
            raise InstallError("", "not connected")
        return self.host

    def need_agent(self) -> AgentRecord:
        if self.agent is None:  # pragma: no cover - the installer sets it before steps
            raise InstallError("", "the server has no agent record")
        return self.agent

    def need_staging(self) -> remote.Staging:
        if self.staging is None:  # pragma: no cover - upload always runs first
            raise InstallError("", "no staging directory on the target")
        return self.staging

    def need_fingerprint(self) -> str:
        if self.fingerprint is None:  # pragma: no cover - wait always runs first
            raise InstallError("", "the agent's certificate is not known yet")
        return self.fingerprint

    def target(self) -> TargetPlatform:
        return TargetPlatform(
            python=self.facts.get("python", ""),
            machine=self.facts.get("machine", ""),
            glibc=self.facts.get("glibc") or None,
        )

    def endpoint(self, fingerprint: str) -> AgentEndpoint:
        agent = self.need_agent()
        return AgentEndpoint(
            host=self.server.host,
            port=agent.rpc_port,
            path=agent.rpc_path,
            token=agent.token,
            fingerprint=fingerprint,
        )


__all__ = [
    "DEPENDENCY_MODES",
    "INSTALL_STEPS",
    "UNINSTALL_STEPS",
    "AgentCaller",
    "AgentFilesCache",
    "Connector",
    "InstallEnv",
    "InstallError",
    "InstallInProgress",
    "InstallOutcome",
    "InstallOptions",
    "InstallSession",
    "InstallStore",
    "ServerNotFound",
    "StepResult",
    "WheelSource",
    "tail",
]
