# -*- test-case-name: tests.agent.test_rpc_server -*-
"""The agent's JSON-RPC method table: names, param specs, handlers.

This is the explicit allowlist from docs/protocol.md. Each entry checks the
presence, type and simple range of every param (the dispatcher turns a bad one
into -32602 naming it); this is the ONE place where params are checked. Then
it calls the command runner or the deployment-tool sync, which check only what
needs their state (a known id, an offset past the end, a playbook path) and
raise RPCError themselves.

Nothing here blocks the reactor: host facts come from cheap /proc reads and
system calls (see sysinfo), and all command work is delegated.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol

from myx_agent import __version__
from myx_agent.contract import (
    COMMAND_ID_DESCRIPTION,
    COMMAND_ID_RE,
    MAX_CHUNK_BYTES,
    MAX_READ_BYTES,
    MAX_WAIT,
)
from myx_agent.errors import INTERNAL_ERROR, RPCError
from myx_agent.jsonrpc import (
    Method,
    Param,
    boolean,
    env_map,
    integer,
    invalid_param,
    json_object,
    nullable,
    number,
    string,
    string_list,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

    from myx_agent.sysinfo import SystemInfo

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_VERSION_RE = re.compile(r"[\x21-\x7e]{1,128}")


class Runner(Protocol):
    """The part of myx_agent.commands.CommandRunner that the methods use."""

    def execute_command(
        self,
        command_id: str,
        command: str,
        args: List[str],
        timeout: Optional[float],
        env: Optional[Dict[str, str]],
        cwd: Optional[str],
    ) -> Dict[str, Any]: ...

    def execute_ansible(
        self,
        command_id: str,
        playbook: str,
        extra_vars: Dict[str, Any],
        timeout: Optional[float],
        check: bool = False,
    ) -> Dict[str, Any]: ...

    def get_command_log(
        self, command_id: str, offset: int, wait: float, max_bytes: int
    ) -> Deferred[Dict[str, Any]]: ...

    def cancel_command(self, command_id: str) -> Dict[str, Any]: ...

    @property
    def running_count(self) -> int: ...


class Artifacts(Protocol):
    """The part of myx_agent.artifacts.ArtifactCache that the methods use."""

    def status(self, sha256: str, size: int) -> Deferred[Dict[str, Any]]: ...

    def put_chunk(
        self, sha256: str, size: int, offset: int, data: bytes
    ) -> Deferred[Dict[str, Any]]: ...


# (deployment_tool_dir, archive or None for "from the artifact cache", sha256, version)
SyncTool = Callable[[str, Optional[bytes], str, str], "Deferred[Dict[str, Any]]"]
ReadToolVersion = Callable[[str], Optional[str]]


def _command_id() -> Param:
    return Param(
        "command_id",
        string(pattern=COMMAND_ID_RE, describe=COMMAND_ID_DESCRIPTION),
    )


def _timeout() -> Param:
    return Param("timeout", nullable(number(minimum=0, exclusive_minimum=True)), lambda: None)


def _base64(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise invalid_param(name, "must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise invalid_param(name, "is not valid base64") from None


# The longest base64 text of MAX_CHUNK_BYTES bytes (with padding).
_MAX_CHUNK_B64 = 4 * -(-MAX_CHUNK_BYTES // 3)


def _chunk(name: str, value: Any) -> bytes:
    # Length first: a longer text is refused before it is decoded.
    if isinstance(value, str) and len(value) > _MAX_CHUNK_B64:
        raise invalid_param(name, f"must decode to at most {MAX_CHUNK_BYTES} bytes")
    data = _base64(name, value)
    if len(data) > MAX_CHUNK_BYTES:
        raise invalid_param(name, f"must decode to at most {MAX_CHUNK_BYTES} bytes")
    return data


def _sha256(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise invalid_param(name, "must be 64 hex digits")
    return value.lower()


def _version(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _VERSION_RE.fullmatch(value):
        raise invalid_param(name, "must be 1-128 visible ASCII characters")
    return value


class AgentMethods:
    """Handlers for every method, bound to one agent's settings and runner."""

    def __init__(
        self,
        *,
        runner: Runner,
        rpc_port: int,
        cert_fingerprint: str,
        deployment_tool_dir: str,
        sync_tool: SyncTool,
        read_tool_version: ReadToolVersion,
        system: SystemInfo,
        artifacts: Optional[Artifacts] = None,
        reactor: Optional[IReactorTime] = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Optional[Callable[[], float]] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        # heartbeat's "time": the wall clock (the agent's reactor counts monotonic).
        self._wall: Callable[[], float] = wall if wall is not None else lambda: reactor.seconds()
        self._runner = runner
        self._rpc_port = rpc_port
        self._fingerprint = cert_fingerprint
        self._tool_dir = deployment_tool_dir
        self._sync_tool = sync_tool
        self._read_tool_version = read_tool_version
        self._system = system
        self._artifacts = artifacts
        self._monotonic = monotonic
        self._started = monotonic()

    def uptime(self) -> float:
        return round(self._monotonic() - self._started, 3)

    def health_check(self) -> Dict[str, Any]:
        return {"status": "ok"}

    def heartbeat(self) -> Dict[str, Any]:
        return {"time": self._wall(), "version": __version__, "uptime": self.uptime()}

    def get_status(self) -> Dict[str, Any]:
        system = self._system
        return {
            "version": __version__,
            "hostname": system.hostname(),
            "os": system.os_description,
            "python": system.python_version,
            "uptime": self.uptime(),
            "load_avg": system.load_avg(),
            "memory": system.memory(),
            "disk": system.disk(),
            "running_commands": self._runner.running_count,
            "deployment_tool_version": self._read_tool_version(self._tool_dir),
            "deployment_tool_dir": self._tool_dir,
            "rpc_port": self._rpc_port,
            "cert_fingerprint": self._fingerprint,
        }

    def get_port(self) -> int:
        return self._rpc_port

    def execute_command(
        self,
        command: str,
        args: List[str],
        timeout: Optional[float],
        command_id: str,
        env: Optional[Dict[str, str]],
        cwd: Optional[str],
    ) -> Dict[str, Any]:
        return self._runner.execute_command(command_id, command, args, timeout, env, cwd)

    def get_command_log(
        self, command_id: str, offset: int, wait: float, max_bytes: int
    ) -> Deferred[Dict[str, Any]]:
        return self._runner.get_command_log(command_id, offset, wait, max_bytes)

    def cancel_command(self, command_id: str) -> Dict[str, Any]:
        return self._runner.cancel_command(command_id)

    def execute_ansible(
        self,
        playbook: str,
        extra_vars: Dict[str, Any],
        timeout: Optional[float],
        command_id: str,
        check: bool,
    ) -> Dict[str, Any]:
        return self._runner.execute_ansible(command_id, playbook, extra_vars, timeout, check)

    def sync_deployment_tool(
        self, archive: Optional[bytes], sha256: str, version: str
    ) -> Deferred[Dict[str, Any]]:
        # archive None: the archive was pushed to the artifact cache first.
        return self._sync_tool(self._tool_dir, archive, sha256, version)

    def _need_artifacts(self) -> Artifacts:
        if self._artifacts is None:
            raise RPCError(INTERNAL_ERROR, "internal error")
        return self._artifacts

    def artifact_status(self, sha256: str, size: int) -> Deferred[Dict[str, Any]]:
        return self._need_artifacts().status(sha256, size)

    def put_artifact_chunk(
        self, sha256: str, size: int, offset: int, data: bytes
    ) -> Deferred[Dict[str, Any]]:
        return self._need_artifacts().put_chunk(sha256, size, offset, data)

    def table(self) -> List[Method]:
        """The allowlist, params in the positional order of docs/protocol.md."""
        return [
            Method("health_check", (), self.health_check),
            Method("heartbeat", (), self.heartbeat),
            Method("get_status", (), self.get_status),
            Method("get_port", (), self.get_port),
            Method(
                "execute_command",
                (
                    Param("command", string(min_len=1, max_len=4096)),
                    Param("args", string_list(), list),
                    _timeout(),
                    _command_id(),
                    Param("env", nullable(env_map), lambda: None),
                    Param("cwd", nullable(string(min_len=1, max_len=4096)), lambda: None),
                ),
                self.execute_command,
            ),
            Method(
                "get_command_log",
                (
                    _command_id(),
                    Param("offset", integer(minimum=0), lambda: 0),
                    Param("wait", number(minimum=0, maximum=MAX_WAIT), lambda: 0),
                    Param(
                        "max_bytes",
                        integer(minimum=1, maximum=MAX_READ_BYTES),
                        lambda: MAX_READ_BYTES,
                    ),
                ),
                self.get_command_log,
            ),
            Method("cancel_command", (_command_id(),), self.cancel_command),
            Method(
                "execute_ansible",
                (
                    Param("playbook", string(min_len=1, max_len=4096)),
                    Param("extra_vars", json_object, dict),
                    _timeout(),
                    _command_id(),
                    # Ansible's check mode (--check --diff): reports what would
                    # change, changes nothing.
                    Param("check", boolean, lambda: False),
                ),
                self.execute_ansible,
            ),
            Method(
                "sync_deployment_tool",
                (
                    # Optional since the artifact cache: by name, or null by position.
                    Param("archive", nullable(_base64), lambda: None),
                    Param("sha256", _sha256),
                    Param("version", _version),
                ),
                self.sync_deployment_tool,
            ),
            Method(
                "artifact_status",
                (Param("sha256", _sha256), Param("size", integer(minimum=0))),
                self.artifact_status,
            ),
            Method(
                "put_artifact_chunk",
                (
                    Param("sha256", _sha256),
                    Param("size", integer(minimum=0)),
                    Param("offset", integer(minimum=0)),
                    Param("data", _chunk),
                ),
                self.put_artifact_chunk,
            ),
        ]
