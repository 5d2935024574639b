"""myxd settings: one frozen ``Settings`` built from defaults, a TOML file, then flags.

Every field of ``Settings`` is a TOML key (``heartbeat_min_interval = 20``) and a
command-line flag (``--heartbeat-min-interval 20``); flags win over the file.
Anything wrong -- an unknown key, a wrong type, a non-positive number, a
min above its max -- is a ``ConfigError`` whose message is one line naming the
file (or flag) and the key, so ``twistd`` can print it and exit.

This module only reads the config file; it never creates files, never
imports the reactor, and never logs (the admin token may be in the file).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the daemon targets 3.11, tomli is the backport
    import tomli as tomllib

from myxd.errors import ConfigError
from myxd.netpolicy import parse_networks

# The agent keeps idle HTTP connections for at least this long (docs/protocol.md);
# the daemon's pool must drop its idle connections before the agent does.
AGENT_KEEPALIVE = 180.0
# get_command_log accepts wait in 0-30 s (docs/protocol.md).
MAX_LOG_POLL_WAIT = 30.0
MIN_ADMIN_TOKEN_LEN = 16
DEPENDENCY_MODES = ("wheelhouse", "index")
LOG_LEVELS = ("info", "debug")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Everything the daemon can be told. Defaults follow the architecture."""

    data_dir: str = dataclasses.field(
        default="./myxd-data", metadata=_doc("directory for the SQLite store and secrets")
    )
    api: str = dataclasses.field(
        default="tcp:8470:interface=127.0.0.1",
        metadata=_doc("admin API endpoint (Twisted endpoint string)"),
    )
    admin_token: str | None = dataclasses.field(
        default=None,
        repr=False,
        metadata=_doc(
            "admin API bearer token (default: generated into "
            "<data-dir>/admin-token; prefer the config file to a flag)"
        ),
    )
    deployment_tool_dir: str | None = dataclasses.field(
        default=None,
        metadata=_doc(
            "deployment tool synced to agents: a directory with VERSION and "
            "playbooks/ (default: the copy packaged with MyX)"
        ),
    )
    allowed_target_networks: str = dataclasses.field(
        default="0.0.0.0/0, ::/0",
        metadata=_doc(
            "networks (comma-separated CIDR) the daemon may reach for SSH installs and "
            "agent adoption; default any"
        ),
    )
    artifact_max_bytes: int = dataclasses.field(
        default=512 * 1024 * 1024,
        metadata=_doc("largest artifact (release archive) the API accepts, bytes"),
    )
    deployment_timeout: float = dataclasses.field(
        default=3600.0,
        metadata=_doc("default time limit of one deployment's playbook run per agent, seconds"),
    )
    log_level: str = dataclasses.field(
        default="info",
        metadata=_doc("lowest level logged: info or debug (debug includes SSH protocol details)"),
    )
    heartbeat_min_interval: float = dataclasses.field(
        default=20.0, metadata=_doc("shortest pause between heartbeat cycles, seconds")
    )
    heartbeat_max_interval: float = dataclasses.field(
        default=60.0, metadata=_doc("longest pause between heartbeat cycles, seconds")
    )
    heartbeat_concurrency: int = dataclasses.field(
        default=256, metadata=_doc("agents in flight at once during a heartbeat cycle")
    )
    rpc_retry_max_attempts: int = dataclasses.field(
        default=3,
        metadata=_doc(
            "retries of a failed agent RPC call after the first try "
            "(architecture 3.2: at most 3 retries, 1/2/4 s apart)"
        ),
    )
    rpc_retry_base_delay: float = dataclasses.field(
        default=1.0, metadata=_doc("first retry delay, seconds (then doubled)")
    )
    rpc_timeout: float = dataclasses.field(
        default=30.0, metadata=_doc("timeout of one agent RPC attempt, seconds")
    )
    rpc_pool_idle_timeout: float = dataclasses.field(
        default=120.0,
        metadata=_doc(
            f"idle agent connections are closed after this, seconds "
            f"(< {AGENT_KEEPALIVE:g}, the agent's keep-alive)"
        ),
    )
    rpc_pool_max_per_host: int = dataclasses.field(
        default=2, metadata=_doc("persistent connections kept per agent")
    )
    log_poll_interval: float = dataclasses.field(
        default=1.0, metadata=_doc("pause between command log polls, seconds")
    )
    log_unreachable_limit: float = dataclasses.field(
        default=600.0,
        metadata=_doc(
            "how long a running command's log is retried while its agent is unreachable "
            "before the command is marked failed, seconds (at least its own timeout)"
        ),
    )
    log_poll_wait: float = dataclasses.field(
        default=10.0,
        metadata=_doc(
            f"long-poll wait asked of the agent, seconds (<= {MAX_LOG_POLL_WAIT:g}; "
            "0: plain polling every log_poll_interval)"
        ),
    )
    max_log_pollers: int = dataclasses.field(
        default=1000, metadata=_doc("command log polls in flight at once")
    )
    reinstall_after_cycles: int = dataclasses.field(
        default=3, metadata=_doc("dead heartbeat cycles before an agent goes to reinstall")
    )
    install_concurrency: int = dataclasses.field(
        default=4, metadata=_doc("agent installs over SSH running at once")
    )
    ssh_connect_timeout: float = dataclasses.field(
        default=15.0, metadata=_doc("SSH connect and authentication timeout, seconds")
    )
    ssh_command_timeout: float = dataclasses.field(
        default=600.0, metadata=_doc("timeout of one remote command during install, seconds")
    )
    agent_start_timeout: float = dataclasses.field(
        default=120.0, metadata=_doc("how long an install waits for the agent to answer")
    )
    install_dependency_mode: str = dataclasses.field(
        default="wheelhouse",
        metadata=_doc(
            "how installs get the agent's Python deps: 'wheelhouse' (built here, "
            "uploaded) or 'index' (pip on the target)"
        ),
    )

    def __post_init__(self) -> None:
        _validate(self, "settings")


# Every number must be above 0, except these, which have their own minimum:
_INT_MINIMUM = {"rpc_retry_max_attempts": 0, "log_poll_wait": 0}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)]


def field_doc(name: str) -> str:
    for f in dataclasses.fields(Settings):
        if f.name == name:
            return str(f.metadata.get("doc", ""))
    raise KeyError(name)


def flag_name(name: str) -> str:
    """``heartbeat_min_interval`` -> ``heartbeat-min-interval``."""
    return name.replace("_", "-")


def _types() -> dict[str, Any]:
    return get_type_hints(Settings)


def _type_label(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    return "a string"


def _coerce(value: object, tp: Any, *, from_text: bool) -> object:
    """Convert one value to the field type or raise ValueError with what was expected."""
    base = tp
    optional = False
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:
        optional = True
        base = next(a for a in args if a is not type(None))
    if value is None and optional:
        return None
    if base is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected {_type_label(base)}, got {_show(value)}")
    if base is int:
        if from_text and isinstance(value, str):
            try:
                return int(value.strip(), 10)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected {_type_label(base)}, got {_show(value)}")
    if base is float:
        if from_text and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
        raise ValueError(f"expected {_type_label(base)}, got {_show(value)}")
    raise TypeError(f"unsupported settings type {tp!r}")  # a bug in Settings itself


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a table" if isinstance(value, dict) else "an array"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _validate(s: Settings, source: str) -> None:
    """Check ranges and relations; ``source`` names where the values came from."""

    def bad(key: str, problem: str) -> ConfigError:
        return _Invalid(source, key, problem)

    for name, tp in _types().items():
        value = getattr(s, name)
        if tp in (int, float):
            minimum = _INT_MINIMUM.get(name)
            if minimum is not None:
                if value < minimum:
                    raise bad(name, f"must be at least {minimum}, got {value}")
            elif value <= 0:
                raise bad(name, f"must be greater than 0, got {value}")
    if not s.data_dir.strip():
        raise bad("data_dir", "must not be empty")
    if not s.api.strip():
        raise bad("api", "must not be empty")
    if s.admin_token is not None:
        if len(s.admin_token) < MIN_ADMIN_TOKEN_LEN:
            raise bad("admin_token", f"must be at least {MIN_ADMIN_TOKEN_LEN} characters")
        if (
            not s.admin_token.isascii()
            or not s.admin_token.isprintable()
            or any(c.isspace() for c in s.admin_token)
        ):
            raise bad("admin_token", "must be printable ASCII without spaces")
    if s.deployment_tool_dir is not None and not s.deployment_tool_dir.strip():
        raise bad("deployment_tool_dir", "must not be empty")
    try:
        parse_networks(s.allowed_target_networks)
    except ValueError as e:
        raise bad("allowed_target_networks", str(e)) from None
    if s.log_level not in LOG_LEVELS:
        raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {s.log_level!r}")
    if s.install_dependency_mode not in DEPENDENCY_MODES:
        raise bad(
            "install_dependency_mode",
            f"must be one of {', '.join(DEPENDENCY_MODES)}, got {s.install_dependency_mode!r}",
        )
    if s.heartbeat_min_interval > s.heartbeat_max_interval:
        raise _Invalid(
            source,
            "heartbeat_min_interval",
            f"heartbeat_min_interval ({s.heartbeat_min_interval:g}) is greater than "
            f"heartbeat_max_interval ({s.heartbeat_max_interval:g})",
            related=("heartbeat_min_interval", "heartbeat_max_interval"),
        )
    if s.rpc_pool_idle_timeout >= AGENT_KEEPALIVE:
        raise bad(
            "rpc_pool_idle_timeout",
            f"must be below the agent's keep-alive of {AGENT_KEEPALIVE:g} s, "
            f"got {s.rpc_pool_idle_timeout:g}",
        )
    if s.log_poll_wait > MAX_LOG_POLL_WAIT:
        raise bad(
            "log_poll_wait",
            f"must be at most {MAX_LOG_POLL_WAIT:g} (the agent's limit), got {s.log_poll_wait:g}",
        )


class _Invalid(ConfigError):
    """A bad value; ``related`` lists the keys of a broken relation between keys."""

    def __init__(self, source: str, key: str, problem: str, related: tuple[str, ...] = ()) -> None:
        self.key = key
        self.problem = problem
        self.related = related
        super().__init__(self.where(source))

    def where(self, source: str, flag: str | None = None) -> str:
        """The message as seen from ``source`` (a file), or from ``flag`` (a flag)."""
        if self.related:
            return f"{flag or source}: {self.problem}"
        if flag is not None:
            return f"{flag}: {self.problem}"
        return f"{source}: {self.key}: {self.problem}"


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, field_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def read_config_file(path: str) -> dict[str, object]:
    """The typed values of a TOML file, checked key by key."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    types = _types()
    values: dict[str, object] = {}
    for key, raw in doc.items():
        if key not in types:
            raise _unknown(key, path)
        try:
            values[key] = _coerce(raw, types[key], from_text=False)
        except ValueError as e:
            raise ConfigError(f"{path}: {key}: {e}") from e
    return values


def load_settings(config_path: str | None, overrides: Mapping[str, object]) -> Settings:
    """Defaults, then the TOML file at ``config_path``, then ``overrides``.

    ``overrides`` maps field names to values; strings (as flags give them) are
    parsed to the field's type. ``None`` values are ignored (flag not given).
    Raises ConfigError with a one-line message.
    """
    types = _types()
    values: dict[str, object] = {}
    if config_path is not None:
        values.update(read_config_file(config_path))
    flag_values: dict[str, object] = {}
    for key, raw in overrides.items():
        if raw is None:
            continue
        if key not in types:
            raise _unknown(key, "command line")
        try:
            flag_values[key] = _coerce(raw, types[key], from_text=True)
        except ValueError as e:
            raise ConfigError(f"--{flag_name(key)}: {e}") from e
    values.update(flag_values)
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except _Invalid as e:
        # __post_init__ validated with a generic source; name the real one: the
        # flag that set (one of) the offending keys, else the file.
        flagged = [k for k in (e.related or (e.key,)) if k in flag_values]
        if flagged:
            raise ConfigError(e.where("", f"--{flag_name(flagged[-1])}")) from None
        raise ConfigError(e.where(config_path or "defaults")) from None
