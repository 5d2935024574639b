"""Every shape of the admin API, declared once: request bodies, query strings, responses.

The handlers validate input with these models (through `myxd.api.validate`), the
OpenAPI document is generated from them (`myxd.api.openapi`), and the response
builders in `myxd.api.serialize` copy exactly their fields from store records, so a
field cannot be documented but not served, or served but not documented.

Request models are strict (no "5" for 5, no true for 1) and refuse unknown fields.
Custom checks raise `ValueError` with a message in operator words; the message is
shown after the field name ("rpc_port: must be at most 65535"). Nothing here does
I/O, and no response model has a field for a token, a key or a password.

It is a little over 500 lines on purpose: it is the API's one catalogue of shapes,
and splitting requests from responses would put each route's two halves apart.
"""

# test-case-name: tests.daemon.test_api_models

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from myxd.api.inputs import valid_host
from myxd.install.hostkeys import InvalidFingerprint, parse_fingerprint
from myxd.rpc.tls import normalize_fingerprint
from myxd.statuses import MAX_TAGS, TAG_PATTERN
from myxd.store.records import (
    AGENT_STATUSES,
    COMMAND_KINDS,
    COMMAND_STATUSES,
    INSTALL_KINDS,
    INSTALL_STATUSES,
    INSTALL_STEP_STATUSES,
    SERVER_STATUSES,
)

MAX_ID = 2**63 - 1
MAX_BULK_AGENTS = 10000
MAX_TIMEOUT = 30 * 86400.0
MAX_SECRET = 16 * 1024
_TEXT = 131072
# Header-safe token characters: visible ASCII, no spaces (it goes into X-Agent-Token).
TOKEN_PATTERN = r"^[\x21-\x7e]{1,1024}$"  # noqa: S105 - a pattern, not a secret
RPC_PATH_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_TAG_RE = re.compile(TAG_PATTERN)
_RPC_PATH_RE = re.compile(RPC_PATH_PATTERN)


def choice(values: Collection[str]) -> Any:
    """A string that must be one of `values` (kept in one place: store/records.py)."""
    allowed = tuple(values)

    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(sorted(allowed))}")
        return value

    return Annotated[
        str, AfterValidator(check), WithJsonSchema({"type": "string", "enum": list(allowed)})
    ]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _host(value: str) -> str:
    if not valid_host(value):
        raise ValueError("must be a host name or an IP address")
    return value


def _rpc_path(value: str) -> str:
    value = value.strip("/")
    if not _RPC_PATH_RE.match(value):
        raise ValueError("must be 1-128 characters of [A-Za-z0-9_-]")
    return value


def _fingerprint(value: str) -> str:
    return normalize_fingerprint(value)  # ValueError names what is wrong


def _playbook(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("must be a relative path inside playbooks/")
    return value


def _env_name(value: str) -> str:
    if not value or "=" in value or "\x00" in value:
        raise ValueError("is not a valid variable name")
    return value


def _ssh_pin(value: str) -> str:
    try:
        parse_fingerprint(value)
    except InvalidFingerprint as e:
        raise ValueError(str(e)) from None
    return value


def _username(value: str) -> str:
    if any(c.isspace() for c in value) or ":" in value:
        raise ValueError("must not contain spaces or ':'")
    return value


Text = Annotated[str, Field(max_length=_TEXT), AfterValidator(_no_nul)]
NonEmpty = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Timeout = Optional[Annotated[float, Field(gt=0, le=MAX_TIMEOUT, allow_inf_nan=False, strict=True)]]
Secret = Annotated[str, Field(min_length=1, max_length=MAX_SECRET), AfterValidator(_no_nul)]
EnvName = Annotated[str, Field(max_length=4096), AfterValidator(_env_name)]


class Request(BaseModel):
    """A JSON request body: strict types, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid")

    #: Operator words for a field whose value does not fit its form (regex, union).
    field_messages: ClassVar[dict[str, str]] = {}


class QueryArgs(BaseModel):
    """Query-string arguments: text converted to numbers, unknown names refused."""

    model_config = ConfigDict(extra="forbid")
    field_messages: ClassVar[dict[str, str]] = {}


class Response(BaseModel):
    """A response shape (documentation and the serializers' allowlist)."""

    model_config = ConfigDict(extra="forbid")


# -- requests ---------------------------------------------------------------------------


class AdoptAgent(Request):
    host: Annotated[
        str, Field(max_length=253, description="Host name or IP address."), AfterValidator(_host)
    ]
    rpc_port: Annotated[int, Field(ge=1, le=65535)]
    rpc_path: Annotated[
        str,
        Field(max_length=130, description="1-128 of [A-Za-z0-9_-]; surrounding / ignored."),
        AfterValidator(_rpc_path),
    ]
    token: Annotated[str, Field(pattern=TOKEN_PATTERN, description="The agent's X-Agent-Token.")]
    cert_fingerprint: Annotated[
        str,
        Field(
            max_length=200,
            description="SHA-256 of the certificate's DER bytes in hex; colons and case "
            "are ignored.",
        ),
        AfterValidator(_fingerprint),
    ]

    name: Optional[Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]] = (
        None
    )
    tags: Optional[Tags] = None

    field_messages: ClassVar[dict[str, str]] = {
        "token": "must be visible ASCII characters without spaces",
    }


class NewCommand(Request):
    command: NonEmpty
    args: Annotated[list[Text], Field(max_length=4096)] = []
    timeout: Timeout = None
    env: Optional[Annotated[dict[EnvName, Text], Field(max_length=1024)]] = None
    cwd: Optional[Annotated[str, Field(max_length=4096), AfterValidator(_no_nul)]] = None


class NewAnsibleRun(Request):
    playbook: Annotated[
        str,
        Field(min_length=1, max_length=1024, description="Relative to playbooks/."),
        AfterValidator(_playbook),
    ]
    extra_vars: dict[str, Any] = {}
    timeout: Timeout = None
    check: bool = Field(
        False, description="Ansible's check mode (--check --diff): report, change nothing."
    )


def _tag(value: str) -> str:
    if not _TAG_RE.match(value):
        raise ValueError("must be 1-32 characters of letters, digits, '.', '_' or '-'")
    return value.lower()


Tag_ = Annotated[str, Field(max_length=32), AfterValidator(_tag)]
Tags = Annotated[list[Tag_], Field(max_length=MAX_TAGS)]


def _targets_tag(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return "=all"
    if isinstance(value, list):
        return "=ids"
    return None


AgentTargets = Annotated[
    Union[
        Annotated[
            str,
            Field(pattern=r"^(all|tag:[A-Za-z0-9._-]{1,32})$"),
            Tag("=all"),
        ],
        Annotated[list[Id], Field(min_length=1, max_length=MAX_BULK_AGENTS), Tag("=ids")],
    ],
    Discriminator(_targets_tag),
]


class BulkCommand(Request):
    """Either `command` (+ `args`) or `shell` (run as `sh -c`)."""

    agents: AgentTargets
    command: Optional[NonEmpty] = None
    shell: Optional[
        Annotated[str, Field(min_length=1, max_length=_TEXT), AfterValidator(_no_nul)]
    ] = Field(None, description="A shell command line, run as sh -c.")
    args: Annotated[list[Text], Field(max_length=4096)] = []
    timeout: Timeout = None
    env: Optional[Annotated[dict[EnvName, Text], Field(max_length=1024)]] = None
    cwd: Optional[Annotated[str, Field(max_length=4096), AfterValidator(_no_nul)]] = None

    field_messages: ClassVar[dict[str, str]] = {
        "agents": 'must be a non-empty array of agent ids, "all" or "tag:NAME"',
    }


class BulkAnsible(Request):
    agents: AgentTargets
    playbook: Annotated[
        str,
        Field(min_length=1, max_length=1024, description="Relative to playbooks/."),
        AfterValidator(_playbook),
    ]
    extra_vars: dict[str, Any] = {}
    timeout: Timeout = None
    check: bool = Field(
        False, description="Ansible's check mode (--check --diff): report, change nothing."
    )

    field_messages: ClassVar[dict[str, str]] = BulkCommand.field_messages


class AgentEdit(Request):
    name: Optional[Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]] = (
        None
    )
    tags: Optional[Tags] = None


class ServerEdit(Request):
    name: Optional[Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]] = (
        None
    )
    host: Optional[Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_host)]] = (
        None
    )
    ssh_port: Optional[Annotated[int, Field(ge=1, le=65535)]] = None
    username: Optional[
        Annotated[
            str,
            Field(min_length=1, max_length=64),
            AfterValidator(_no_nul),
            AfterValidator(_username),
        ]
    ] = None
    auth: Optional[
        Annotated[
            Union[Annotated[PasswordAuth, Tag("=password")], Annotated[KeyAuth, Tag("=key")]],
            Discriminator(_auth_tag),
        ]
    ] = None
    sudo: Optional[
        Annotated[
            Union[
                Annotated[Optional[Literal["none", "sudo"]], Tag("=word")],
                Annotated[SudoSettings, Tag("=object")],
            ],
            Discriminator(_sudo_tag),
        ]
    ] = None
    host_key_fingerprint: Optional[
        Annotated[str, Field(max_length=200), AfterValidator(_ssh_pin)]
    ] = None
    tags: Optional[Tags] = None

    field_messages: ClassVar[dict[str, str]] = {
        "auth": "must be an object with exactly one of password or private_key",
        "sudo": "must be 'none', 'sudo' or {mode, password}",
    }


class ServerBulk(Request):
    action: Literal["reinstall", "uninstall", "delete", "tag", "untag"]
    ids: Annotated[list[Id], Field(min_length=1, max_length=1000)]
    tag: Optional[Tag_] = None


class CancelCommand(Request):
    """Cancel takes no fields; an empty body or {} is fine."""


class PasswordAuth(Request):
    password: Secret


class KeyAuth(Request):
    private_key: Secret
    passphrase: Optional[Secret] = None


def _auth_tag(value: Any) -> Optional[str]:
    if not isinstance(value, dict):
        return None
    has_pw, has_key = "password" in value, "private_key" in value
    if has_pw == has_key:
        return None
    return "=password" if has_pw else "=key"


class SudoSettings(Request):
    mode: Literal["none", "sudo"] = "sudo"
    password: Optional[Secret] = None

    @field_validator("password")
    @classmethod
    def _password_needs_sudo(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is not None and info.data.get("mode") == "none":
            raise ValueError("needs sudo.mode 'sudo'")
        return value


def _sudo_tag(value: Any) -> Optional[str]:
    if value is None or value in ("none", "sudo"):
        return "=word"
    if isinstance(value, dict):
        return "=object"
    return None


class NewServer(Request):
    name: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_nul)]
    host: Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_host)]
    ssh_port: Annotated[int, Field(ge=1, le=65535)] = 22
    username: Annotated[
        str, Field(min_length=1, max_length=64), AfterValidator(_no_nul), AfterValidator(_username)
    ]
    auth: Annotated[
        Union[Annotated[PasswordAuth, Tag("=password")], Annotated[KeyAuth, Tag("=key")]],
        Discriminator(_auth_tag),
    ]
    sudo: Annotated[
        Union[
            Annotated[Optional[Literal["none", "sudo"]], Tag("=word")],
            Annotated[SudoSettings, Tag("=object")],
        ],
        Discriminator(_sudo_tag),
    ] = None
    host_key_fingerprint: Optional[
        Annotated[str, Field(max_length=200), AfterValidator(_ssh_pin)]
    ] = None
    start: bool = True

    field_messages: ClassVar[dict[str, str]] = {
        "auth": "must be an object with exactly one of password or private_key",
        "sudo": "must be 'none', 'sudo' or {mode, password}",
    }


class StartInstall(Request):
    """Body of reinstall (optional)."""

    forget_host_key: bool = False


class NoFields(Request):
    """A body that may be absent, or an empty object."""


# -- query strings ----------------------------------------------------------------------

Limit = Annotated[int, Field(ge=1, le=1000, description="Page size.")]
Offset = Annotated[int, Field(ge=0, le=MAX_ID, description="Rows to skip.")]


Search = Annotated[str, Field(max_length=200), AfterValidator(_no_nul)]


class AgentListQuery(QueryArgs):
    limit: Limit = 50
    offset: Offset = 0
    status: Optional[choice(AGENT_STATUSES)] = Field(  # type: ignore[valid-type]
        None, description="Only agents with this status."
    )
    q: Optional[Search] = Field(None, description="Part of the name or host (any case).")
    tag: Optional[Tag_] = Field(None, description="Only agents with this tag.")


class CommandListQuery(QueryArgs):
    limit: Limit = 50
    offset: Offset = 0
    agent_id: Optional[Id] = Field(None, description="Only this agent's commands.")
    status: Optional[choice(COMMAND_STATUSES)] = Field(  # type: ignore[valid-type]
        None, description="Only commands with this status."
    )
    kind: Optional[choice(COMMAND_KINDS)] = Field(  # type: ignore[valid-type]
        None, description="command or ansible."
    )
    q: Optional[Search] = Field(None, description="Part of the command line.")
    since: Optional[Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]] = Field(
        None, description="Created at or after (unix seconds)."
    )
    until: Optional[Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]] = Field(
        None, description="Created at or before (unix seconds)."
    )


class ServerListQuery(QueryArgs):
    q: Optional[Search] = Field(None, description="Part of the name or host (any case).")
    tag: Optional[Tag_] = Field(None, description="Only servers with this tag.")


class PageQuery(QueryArgs):
    limit: Limit = 50
    offset: Offset = 0


class CommandReadQuery(QueryArgs):
    offset: Annotated[
        int, Field(ge=0, le=MAX_ID, description="Byte offset in the combined output.")
    ] = 0
    wait: Annotated[
        float,
        Field(ge=0, le=30, allow_inf_nan=False, description="Long-poll up to this many seconds."),
    ] = 0.0
    max_bytes: Annotated[
        int, Field(ge=1, le=1048576, description="Cap on output bytes returned.")
    ] = 1048576


class StreamQuery(QueryArgs):
    offset: Annotated[int, Field(ge=0, le=MAX_ID, description="Start offset.")] = 0


class EventListQuery(QueryArgs):
    limit: Limit = 50
    kind: Optional[Annotated[str, Field(max_length=200)]] = Field(
        None, description="Only events with this action (exact)."
    )
    target: Optional[Annotated[str, Field(max_length=200)]] = Field(
        None, description="Only events on this target, e.g. agent:3 (exact)."
    )
    actor: Optional[Annotated[str, Field(max_length=200)]] = Field(
        None, description="Only events by this actor (exact)."
    )
    before_id: Optional[
        Annotated[int, Field(ge=1, le=MAX_ID, description="Only events older than this id.")]
    ] = None


class NoQuery(QueryArgs):
    pass


# -- responses --------------------------------------------------------------------------


class FieldError(Response):
    field: str
    error: str


class Error(Response):
    model_config = ConfigDict(extra="allow")

    error: str
    field: Optional[str] = Field(None, description="The input field at fault (the first).")
    errors: Optional[list[FieldError]] = Field(
        None, description="Every field error of the input, in order."
    )
    reason: Optional[str] = None
    request_id: Optional[str] = None


class Health(Response):
    status: Literal["ok"]


class Agent(Response):
    id: int
    name: str = Field(description="The linked server's name; an adopted agent's own, or its host.")
    tags: list[str] = Field(description="The agent's tags and its server's.")
    server_id: Optional[int]
    host: str
    rpc_port: int
    rpc_path: str
    cert_fingerprint: str
    status: choice(AGENT_STATUSES)  # type: ignore[valid-type]
    status_reason: Optional[str]
    rpc_supported: bool
    rpc_last_check: Optional[float]
    rpc_last_success: Optional[float]
    last_heartbeat: Optional[float]
    version: Optional[str]
    details: Optional[dict[str, Any]] = Field(description="The agent's last get_status result.")
    failed_cycles: int
    total_failures: int
    last_error_kind: Optional[str]
    last_latency: Optional[float]
    created_at: float
    updated_at: Optional[float]


class AgentPage(Response):
    agents: list[Agent]
    limit: int
    offset: int
    total: int


class Deleted(Response):
    id: int
    deleted: Literal[True]


class Command(Response):
    id: int
    agent_id: int
    agent_name: Optional[str]
    command_uid: str
    kind: choice(COMMAND_KINDS)  # type: ignore[valid-type]
    command: str
    args: list[Any]
    timeout: Optional[float]
    status: choice(COMMAND_STATUSES)  # type: ignore[valid-type]
    exit_code: Optional[int]
    reason: Optional[str]
    attempts: int
    output_offset: int = Field(description="Bytes of output stored so far.")
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    extra: Optional[dict[str, Any]] = Field(
        description="cwd, env names (never values), playbook/extra_vars."
    )
    result: Optional[dict[str, Any]]
    final: bool


class CommandPage(Response):
    commands: list[Command]
    limit: int
    offset: int
    next_offset: Optional[int]


class CommandList(Response):
    """A page of commands, newest first, and the filtered total."""

    commands: list[Command]
    limit: int
    offset: int
    total: int


class OutputChunk(Response):
    offset: int
    stream: Literal["stdout", "stderr"]
    data: str = Field(json_schema_extra={"contentEncoding": "base64"})


class CommandWithOutput(Command):
    offset: int
    output: list[OutputChunk]
    next_offset: int
    complete: bool = Field(description="Final, and every stored byte was returned.")


class BulkItem(Response):
    agent_id: int
    id: Optional[int] = None
    status: Optional[str] = None
    error: Optional[str] = Field(None, description="Set instead of id when not created.")


class BulkResult(Response):
    commands: list[BulkItem]


class Event(Response):
    id: int
    at: float
    actor: str
    action: str
    target: Optional[str]
    outcome: str
    details: Optional[dict[str, Any]]


class EventPage(Response):
    events: list[Event]
    limit: int
    next_before_id: Optional[int]


class SudoView(Response):
    mode: Literal["none", "sudo"]
    password_set: bool


class Server(Response):
    id: int
    name: str
    tags: list[str]
    host: str
    ssh_port: int
    username: str
    auth_method: Optional[Literal["private_key", "password"]]
    sudo: SudoView
    host_key_fingerprint: Optional[str]
    host_key: Optional[str]
    status: choice(SERVER_STATUSES)  # type: ignore[valid-type]
    status_reason: Optional[str]
    created_at: float
    updated_at: Optional[float]
    install_running: bool
    agent_id: Optional[int]
    agent_status: Optional[str]
    agent: Optional[Agent]


class ServerList(Response):
    servers: list[Server]


class ServerCreated(Response):
    server: Server
    install_id: Optional[int]


class InstallStep(Response):
    model_config = ConfigDict(extra="allow")

    step: str
    status: choice(INSTALL_STEP_STATUSES)  # type: ignore[valid-type]
    log: Optional[str]
    error: Optional[str]
    started_at: Optional[float]
    finished_at: Optional[float]


class Install(Response):
    server_id: int
    id: int
    kind: choice(INSTALL_KINDS)  # type: ignore[valid-type]
    status: choice(INSTALL_STATUSES)  # type: ignore[valid-type]
    error: Optional[str]
    started_at: Optional[float]
    finished_at: Optional[float]
    steps: list[InstallStep]
    running: bool


class InstallStarted(Response):
    server_id: int
    install_id: Optional[int]
    kind: choice(INSTALL_KINDS)  # type: ignore[valid-type]


class BulkServerResult(Response):
    id: int
    ok: bool
    error: Optional[str]


class ServerBulkResult(Response):
    """One result per id."""

    results: list[BulkServerResult]


class ServerDeleted(Response):
    deleted: Literal[True]
    id: int
