# -*- test-case-name: tests.daemon.test_store_contract -*-
"""What each part of the daemon needs from the store, as ``typing.Protocol``s.

The fleet, the installer and the API take the narrow protocol they use, not the
SQLite ``Store``: a test can hand them an in-memory fake, and mypy checks that
both the store and the fake (``tests/daemon/fleet_fakes.FakeStore``) provide
it. ``tests/daemon/test_store_contract`` runs the same behaviour tests against
both, so the fake cannot drift from the store.

Declarations only: this module never does I/O and never imports the reactor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from myxd.identity import AgentIdentity
from myxd.store.records import (
    AgentRecord,
    CommandRecord,
    EventRecord,
    HeartbeatResult,
    OutputChunk,
    ServerRecord,
)

__all__ = [
    "AdminStore",
    "AgentLookup",
    "CommandRecords",
    "EventLog",
    "FleetStore",
    "HeartbeatStore",
    "InstallerStore",
    "QueueStore",
    "ServerLookup",
    "WallTime",
]


class AgentLookup(Protocol):
    def get_agent(self, agent_id: int) -> Deferred[AgentRecord | None]: ...


class EventLog(Protocol):
    def add_event(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        details: dict[str, Any] | None = None,
    ) -> Deferred[int]: ...


class WallTime(Protocol):
    def now(self) -> float:
        """The wall-clock time rows are stamped with: for timestamps that are stored."""
        ...


class HeartbeatStore(EventLog, WallTime, Protocol):
    """What the heartbeat scheduler uses (``myxd.fleet.heartbeat``)."""

    def list_agents(self) -> Deferred[list[AgentRecord]]: ...

    def record_heartbeat_results(self, results: Sequence[HeartbeatResult]) -> Deferred[None]: ...


class CommandRecords(Protocol):
    """Command rows and their output, as the command queue drives them."""

    def create_command(
        self,
        *,
        agent_id: int,
        kind: str,
        command: str,
        args: Sequence[Any],
        timeout: float | None,
        extra: dict[str, Any] | None = None,
        status: str = "running",
        command_uid: str | None = None,
    ) -> Deferred[CommandRecord]: ...

    def get_command_by_uid(self, command_uid: str) -> Deferred[CommandRecord | None]: ...

    def get_command(self, command_id: int) -> Deferred[CommandRecord | None]: ...

    def list_unfinished_commands(self) -> Deferred[list[CommandRecord]]: ...

    def update_command(
        self,
        command_id: int,
        *,
        status: str | None = None,
        exit_code: int | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
        attempts: int | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> Deferred[None]: ...

    def append_output(
        self, command_id: int, offset: int, stream: str, data: bytes
    ) -> Deferred[int]: ...

    def read_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[list[OutputChunk]]: ...


class QueueStore(AgentLookup, CommandRecords, EventLog, WallTime, Protocol):
    """What the command queue uses (``myxd.fleet.commands``)."""

    def record_heartbeat_results(self, results: Sequence[HeartbeatResult]) -> Deferred[None]: ...


class FleetStore(HeartbeatStore, QueueStore, Protocol):
    """The fleet's whole use of the store: what the fake store provides."""


class ServerLookup(EventLog, Protocol):
    """What the server routes read (``myxd.api.servers``), and their audit events."""

    def get_server(self, server_id: int) -> Deferred[ServerRecord | None]: ...

    def list_servers(self) -> Deferred[list[ServerRecord]]: ...

    def get_agent_for_server(self, server_id: int) -> Deferred[AgentRecord | None]: ...

    def get_latest_install(self, server_id: int) -> Deferred[dict[str, Any] | None]: ...

    def list_servers_filtered(
        self, *, tag: str | None = None, q: str | None = None
    ) -> Deferred[list[ServerRecord]]: ...

    def update_server(
        self,
        server_id: int,
        *,
        host_key: str | None = ...,
        status: str = ...,
        status_reason: str | None = ...,
        auth: dict[str, Any] | None = ...,
        host_key_fingerprint: str | None = ...,
        name: str = ...,
        host: str = ...,
        ssh_port: int = ...,
        username: str = ...,
        sudo: dict[str, Any] = ...,
        tags: list[str] = ...,
    ) -> Deferred[None]: ...


class InstallerStore(ServerLookup, AgentLookup, EventLog, Protocol):
    """What the installer uses (``myxd.install.installer``)."""

    def add_server(
        self,
        *,
        name: str,
        host: str,
        ssh_port: int,
        username: str,
        auth: dict[str, Any] | None,
        sudo: dict[str, Any],
        host_key_fingerprint: str | None = None,
    ) -> Deferred[int]: ...

    def delete_server(self, server_id: int) -> Deferred[bool]: ...

    def start_install(self, server_id: int, kind: str) -> Deferred[int]: ...

    def record_install_step(
        self,
        install_id: int,
        step: str,
        status: str,
        log: str | None = None,
        error: str | None = None,
    ) -> Deferred[None]: ...

    def finish_install(
        self, install_id: int, status: str, error: str | None = None
    ) -> Deferred[None]: ...

    def new_agent_identity(self) -> Deferred[AgentIdentity]: ...

    def add_agent(
        self,
        *,
        host: str,
        rpc_port: int,
        rpc_path: str,
        token: str,
        secret_key: str,
        cert_fingerprint: str,
        status: str = "online",
        server_id: int | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> Deferred[int]: ...

    def update_agent(
        self,
        agent_id: int,
        *,
        host: str = ...,
        cert_fingerprint: str = ...,
        status: str = ...,
        status_reason: str | None = ...,
        server_id: int | None = ...,
        failed_cycles: int = ...,
    ) -> Deferred[None]: ...

    def delete_agent(self, agent_id: int) -> Deferred[bool]: ...


class AdminStore(AgentLookup, EventLog, WallTime, Protocol):
    """What the admin API reads and writes (``myxd.api.app``)."""

    def list_agents(
        self, *, limit: int | None = None, offset: int = 0, status: str | None = None
    ) -> Deferred[list[AgentRecord]]: ...

    def agent_counts_by_status(self) -> Deferred[dict[str, int]]: ...

    def command_counts_by_status(self) -> Deferred[dict[str, int]]: ...

    def add_agent(
        self,
        *,
        host: str,
        rpc_port: int,
        rpc_path: str,
        token: str,
        secret_key: str,
        cert_fingerprint: str,
        status: str = "online",
        server_id: int | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> Deferred[int]: ...

    def delete_agent(self, agent_id: int) -> Deferred[bool]: ...

    def record_heartbeat_results(self, results: Sequence[HeartbeatResult]) -> Deferred[None]: ...

    def get_command(self, command_id: int) -> Deferred[CommandRecord | None]: ...

    def list_commands(
        self, *, agent_id: int | None = None, limit: int = 50, offset: int = 0
    ) -> Deferred[list[CommandRecord]]: ...

    def read_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[list[OutputChunk]]: ...

    def read_command_output(
        self, command_id: int, offset: int = 0, max_bytes: int = 1048576
    ) -> Deferred[tuple[CommandRecord | None, list[OutputChunk]]]: ...

    def list_events(
        self,
        *,
        limit: int = 50,
        before_id: int | None = None,
        kind: str | None = None,
        target: str | None = None,
        actor: str | None = None,
    ) -> Deferred[list[EventRecord]]: ...

    def search_agents(
        self,
        *,
        q: str | None = None,
        status: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Deferred[tuple[list[AgentRecord], int]]: ...

    def search_commands(
        self,
        *,
        agent_id: int | None = None,
        limit: int = 50,
        offset: int = 0,
        status: str | None = None,
        kind: str | None = None,
        q: str | None = None,
        since: float | None = None,
        until: float | None = None,
        with_total: bool = True,
    ) -> Deferred[tuple[list[CommandRecord], int]]: ...

    def update_agent(
        self,
        agent_id: int,
        *,
        host: str = ...,
        cert_fingerprint: str = ...,
        status: str = ...,
        status_reason: str | None = ...,
        server_id: int | None = ...,
        failed_cycles: int = ...,
        name: str | None = ...,
        tags: Sequence[str] = ...,
    ) -> Deferred[None]: ...
