# -*- test-case-name: tests.agent.test_config -*-
"""The agent's JSON config file: read it, check every field, freeze it.

The daemon writes the config when it installs the agent. The agent never
invents a required value: a missing token, port or path is an error, not a
default. Any problem is a ConfigError whose message is one line that names the
file and the field or cause, so ``main`` can print it and exit.

This module must never log or print a secret (``agent_token``, ``secret_key``),
not even in an error message.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

DEFAULT_CONFIG_PATH = "/etc/myx-agent/config.json"
DEFAULT_BIND = "0.0.0.0"
DEFAULT_STATE_DIR = "/var/lib/myx-agent"
DEFAULT_DEPLOYMENT_TOOL_DIR = "/opt/myx-deployment-tool"
DEFAULT_MAX_CONCURRENT_COMMANDS = 32
# The artifact cache (<state_dir>/artifacts): least recently used files go first.
DEFAULT_ARTIFACT_CACHE_MAX_BYTES = 2 << 30
MIN_ARTIFACT_CACHE_MAX_BYTES = 1 << 20
MAX_ARTIFACT_CACHE_MAX_BYTES = 1 << 50

# The config is small; anything much larger is not a config file.
_MAX_CONFIG_BYTES = 64 * 1024

_RPC_PATH_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
# The token travels in an HTTP header: visible ASCII only, so that header
# whitespace trimming can never change it, and long enough to resist guessing.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{16,1024}")


class ConfigError(Exception):
    """The config cannot be used. str() is one line naming the file and cause."""


@dataclass(frozen=True)
class AgentConfig:
    """Validated agent settings. Build it with load_config()."""

    path: str
    agent_token: str = field(repr=False)
    secret_key: str = field(repr=False)
    rpc_port: int
    rpc_path: str
    bind: str
    ssl_dir: str
    state_dir: str
    deployment_tool_dir: str
    max_concurrent_commands: int
    artifact_cache_max_bytes: int = DEFAULT_ARTIFACT_CACHE_MAX_BYTES
    # Keys present in the file that this version does not know. They are
    # ignored (a newer daemon may write them) but reported at start.
    unknown_keys: Tuple[str, ...] = ()


def _fail(path: str, where: str, cause: str) -> ConfigError:
    return ConfigError(f"config {path}: {where}: {cause}")


def _read_file(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"config {path}: file not found") from None
    except PermissionError:
        raise ConfigError(f"config {path}: cannot read file: permission denied") from None
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config {path}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            # Like ssh with a private key: the file holds the agent's secrets.
            raise ConfigError(
                f"config {path}: permissions {mode:04o} are too open "
                "(readable or writable by group or others); run chmod 600"
            )
        if st.st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path}: file too large ({st.st_size} bytes)")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > _MAX_CONFIG_BYTES:
                raise ConfigError(f"config {path}: file too large")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read file: {e.strerror}") from None
    finally:
        os.close(fd)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(path: str, raw: bytes) -> Dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: invalid JSON: not UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"config {path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"config {path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: invalid JSON: the top level must be an object")
    return data


def _secret(name: str) -> Callable[[str, Any], str]:
    def check(path: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise _fail(path, f"field '{name}'", "must be a non-empty string")
        if name == "agent_token" and not _TOKEN_RE.fullmatch(value):
            raise _fail(
                path,
                f"field '{name}'",
                "must be 16-1024 visible ASCII characters (no spaces)",
            )
        if "\x00" in value:
            raise _fail(path, f"field '{name}'", "must not contain NUL")
        return value

    return check


def _port(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _fail(path, "field 'rpc_port'", "must be an integer from 1 to 65535")
    return value


def _rpc_path(path: str, value: Any) -> str:
    if not isinstance(value, str) or not _RPC_PATH_RE.fullmatch(value):
        raise _fail(path, "field 'rpc_path'", "must be 16-64 characters of [A-Za-z0-9_-]")
    return value


def _bind(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(path, "field 'bind'", "must be an IP address string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _fail(path, "field 'bind'", "must be an IPv4 or IPv6 address") from None


def _directory(name: str) -> Callable[[str, Any], str]:
    def check(path: str, value: Any) -> str:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise _fail(path, f"field '{name}'", "must be a non-empty path string")
        if not os.path.isabs(value):
            raise _fail(path, f"field '{name}'", "must be an absolute path")
        return os.path.normpath(value)

    return check


def _max_concurrent(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise _fail(path, "field 'max_concurrent_commands'", "must be an integer from 1 to 4096")
    return value


def _artifact_cache_max(path: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not MIN_ARTIFACT_CACHE_MAX_BYTES <= value <= MAX_ARTIFACT_CACHE_MAX_BYTES
    ):
        raise _fail(
            path,
            "field 'artifact_cache_max_bytes'",
            f"must be an integer from {MIN_ARTIFACT_CACHE_MAX_BYTES} "
            f"to {MAX_ARTIFACT_CACHE_MAX_BYTES} (bytes)",
        )
    return value


_REQUIRED: Dict[str, Callable[[str, Any], Any]] = {
    "agent_token": _secret("agent_token"),
    "secret_key": _secret("secret_key"),
    "rpc_port": _port,
    "rpc_path": _rpc_path,
}

_OPTIONAL: Dict[str, Callable[[str, Any], Any]] = {
    "bind": _bind,
    "ssl_dir": _directory("ssl_dir"),
    "state_dir": _directory("state_dir"),
    "deployment_tool_dir": _directory("deployment_tool_dir"),
    "max_concurrent_commands": _max_concurrent,
    "artifact_cache_max_bytes": _artifact_cache_max,
}


def load_config(path: str) -> AgentConfig:
    """Read and validate the config at *path*. Raises ConfigError."""
    path = os.path.abspath(path)
    data = _parse(path, _read_file(path))
    values: Dict[str, Any] = {}
    for name, check in _REQUIRED.items():
        if name not in data:
            raise _fail(path, f"field '{name}'", "is required")
        values[name] = check(path, data[name])
    for name, check in _OPTIONAL.items():
        if name in data:
            values[name] = check(path, data[name])
    unknown = tuple(sorted(k for k in data if k not in _REQUIRED and k not in _OPTIONAL))
    return AgentConfig(
        path=path,
        agent_token=values["agent_token"],
        secret_key=values["secret_key"],
        rpc_port=values["rpc_port"],
        rpc_path=values["rpc_path"],
        bind=values.get("bind", DEFAULT_BIND),
        ssl_dir=values.get("ssl_dir", os.path.join(os.path.dirname(path), "ssl")),
        state_dir=values.get("state_dir", DEFAULT_STATE_DIR),
        deployment_tool_dir=values.get("deployment_tool_dir", DEFAULT_DEPLOYMENT_TOOL_DIR),
        max_concurrent_commands=values.get(
            "max_concurrent_commands", DEFAULT_MAX_CONCURRENT_COMMANDS
        ),
        artifact_cache_max_bytes=values.get(
            "artifact_cache_max_bytes", DEFAULT_ARTIFACT_CACHE_MAX_BYTES
        ),
        unknown_keys=unknown,
    )
