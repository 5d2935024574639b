# -*- test-case-name: tests.daemon.test_store -*-
"""Immutable records the store hands out. Plain data: no I/O, no secrets in repr."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The vocabularies live in myxd.statuses; re-exported for the store's users.
from myxd.statuses import (  # noqa: F401
    AGENT_STATUSES,
    COMMAND_KINDS,
    COMMAND_STATUSES,
    ERROR_KINDS,
    FINAL_STATUSES,
    INSTALL_KINDS,
    INSTALL_STATUSES,
    INSTALL_STEP_STATUSES,
    OUTPUT_STREAMS,
    SERVER_STATUSES,
    UNFINISHED_STATUSES,
)


@dataclass(frozen=True)
class AgentRecord:
    id: int
    server_id: int | None
    host: str
    rpc_port: int
    rpc_path: str = field(repr=False)
    token: str = field(repr=False)  # decrypted
    secret_key: str = field(repr=False)  # decrypted
    cert_fingerprint: str
    status: str
    status_reason: str | None
    rpc_supported: bool
    rpc_last_check: float | None
    rpc_last_success: float | None
    last_heartbeat: float | None
    version: str | None
    details: dict[str, Any] | None = field(repr=False)  # last get_status result
    failed_cycles: int  # consecutive failed heartbeat cycles
    created_at: float
    total_failures: int = 0  # failed heartbeat cycles ever
    last_error_kind: str | None = None  # retryable | auth | final
    last_latency: float | None = None  # seconds, last successful heartbeat
    updated_at: float | None = None
    # The linked server's name; for an adopted agent its own name, else its host.
    name: str = field(default="", compare=False)
    tags: tuple[str, ...] = field(default=(), compare=False)  # its own and its server's
    own_tags: tuple[str, ...] = ()  # the tags set on the agent itself


@dataclass(frozen=True)
class HeartbeatResult:
    agent_id: int
    at: float
    ok: bool
    version: str | None = None
    details: dict[str, Any] | None = None
    latency: float | None = None
    reason: str | None = None  # failure reason when not ok
    error_kind: str | None = None  # 'retryable' | 'auth' | 'final'


@dataclass(frozen=True)
class CommandRecord:
    id: int
    agent_id: int
    command_uid: str  # the agent-side command_id
    kind: str  # command | ansible
    command: str
    args: list[Any]
    timeout: float | None
    extra: dict[str, Any] | None  # env/cwd, or extra_vars
    status: str  # pending | running | success | failed | cancelled | timed_out
    exit_code: int | None
    reason: str | None
    result: dict[str, Any] | None  # final result from the agent
    attempts: int
    output_offset: int  # bytes of the combined stream stored
    created_at: float
    started_at: float | None
    finished_at: float | None
    agent_name: str | None = field(
        default=None, compare=False
    )  # the agent's name when read with it


@dataclass(frozen=True)
class OutputChunk:
    offset: int
    stream: str
    data: bytes


@dataclass(frozen=True)
class EventRecord:
    id: int
    created_at: float
    actor: str
    action: str
    target: str | None
    outcome: str
    details: dict[str, Any] | None

    @property
    def at(self) -> float:
        return self.created_at


@dataclass(frozen=True)
class ServerRecord:
    id: int
    name: str
    host: str
    ssh_port: int
    username: str
    auth: dict[str, Any] | None = field(repr=False)  # {"password"} | {"private_key", "passphrase"}
    sudo: dict[str, Any] = field(repr=False)  # {"mode": "none"|"sudo", "password": str|None}
    host_key_fingerprint: str | None
    host_key: str | None
    status: str
    status_reason: str | None
    created_at: float
    updated_at: float | None = None
    tags: tuple[str, ...] = ()
