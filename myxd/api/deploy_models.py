"""The admin API's shapes for artifacts, deployments and service drift (issue #8).

Declared once like the rest (`myxd.api.models`): the routes in
`myxd.api.deployments` validate with them and the OpenAPI document is built
from them. Nothing here does I/O; no response carries a deployment's var values
(they may hold keys), only their names.
"""

# test-case-name: tests.daemon.test_api_deployments

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Optional, Union

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from myxd.api.models import MAX_ID, MAX_TIMEOUT, QueryArgs, Request, Response, choice
from myxd.store.deployments import DEPLOYMENT_STATUSES, TARGET_STATUSES

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256, lower-case hex.")]
VarName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
AgentId = Annotated[int, Field(ge=1, le=MAX_ID)]


# -- requests -------------------------------------------------------------------------


class UploadQuery(QueryArgs):
    name: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            description="File name, e.g. Xray-linux-64.zip (a .dgst beside it is checked).",
        ),
    ]
    sha256: Optional[
        Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="Expected SHA-256.")]
    ] = None

    field_messages: ClassVar[dict[str, str]] = {"sha256": "must be 64 hexadecimal characters"}


class NewDeployment(Request):
    playbook: Annotated[
        str, Field(min_length=1, max_length=200, description="A playbook of the tool.")
    ]
    agents: Union[
        Annotated[
            str,
            Field(
                pattern=r"^(all|tag:[A-Za-z0-9._-]{1,32})$",
                description='"all", or "tag:NAME": every installed agent with the tag '
                "(its own or its server's).",
            ),
        ],
        Annotated[list[AgentId], Field(min_length=1, max_length=10000)],
    ]

    @field_validator("agents", mode="wrap")
    @classmethod
    def _agents_one_field(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Errors of the union's members would be named after them
        # ("agents.literal['all']"); report them on the field itself.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('must be "all", "tag:NAME" or a non-empty list of agent ids') from None

    vars: Annotated[dict[VarName, Any], Field(max_length=1000)] = {}
    artifacts: Annotated[
        dict[VarName, Sha256],
        Field(
            max_length=100,
            description="Variable name -> artifact id; the agent's path "
            "to the file replaces the id in vars.",
        ),
    ] = {}
    batch_size: Optional[Annotated[int, Field(ge=1, le=10000)]] = None
    max_failures: Optional[
        Annotated[
            int, Field(ge=1, le=10000, description="Start no new target after this many failed.")
        ]
    ] = None
    timeout: Optional[Annotated[float, Field(gt=0, le=MAX_TIMEOUT)]] = None

    field_messages: ClassVar[dict[str, str]] = {
        "agents": 'must be "all", "tag:NAME" or a list of agent ids',
        "artifacts": "must map variable names to artifact ids (64 hex characters)",
        "vars": "must be an object whose keys are variable names",
    }


class DeploymentListQuery(QueryArgs):
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    before_id: Optional[Annotated[int, Field(ge=1, le=MAX_ID)]] = None
    status: Optional[choice(DEPLOYMENT_STATUSES)] = None  # type: ignore[valid-type]


# -- responses ------------------------------------------------------------------------


class Artifact(Response):
    """One stored artifact."""

    id: str = Field(description="SHA-256 of the bytes.")
    name: str
    size: int
    created_at: float


class ArtifactList(Response):
    """Every stored artifact, oldest first."""

    artifacts: list[Artifact]


class ArtifactDeleted(Response):
    """The artifact was removed."""

    deleted: bool
    id: str


class Target(Response):
    """One agent of a deployment."""

    agent_id: int
    agent_name: Optional[str]
    command_id: Optional[int] = Field(description="Its playbook run, once started.")
    status: choice(TARGET_STATUSES)  # type: ignore[valid-type]
    changed: Optional[int]
    ok: Optional[int]
    failed: Optional[int]
    reason: Optional[str] = Field(description="The failing task and its message.")
    bytes_sent: int = Field(description="Artifact bytes sent to this agent.")
    started_at: Optional[float]
    finished_at: Optional[float]


class Deployment(Response):
    """A deployment with its per-agent rows."""

    id: int
    playbook: str
    status: choice(DEPLOYMENT_STATUSES)  # type: ignore[valid-type]
    var_names: list[str]
    artifacts: dict[str, str]
    batch_size: Optional[int]
    max_failures: Optional[int]
    timeout: Optional[float]
    actor: str
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    counts: dict[str, int] = Field(description="Targets by status.")
    targets: list[Target]


class DeploymentList(Response):
    """Deployments, newest first."""

    deployments: list[Deployment]
    next_before_id: Optional[int]


class PlaybookList(Response):
    """The deployment tool's playbooks."""

    playbooks: list[str]


class AgentServices(Response):
    """What check_service.py reported on the agent, by service."""

    agent_id: int
    services: dict[str, dict[str, Any]]


class DriftRow(Response):
    agent_id: int
    name: Optional[str]
    active: Optional[bool]
    active_version: Optional[str]
    config_sha256: Optional[str]
    checked_at: Optional[float]
    deployment_id: Optional[int] = Field(description="Its last successful deployment.")
    drift: list[str] = Field(description="Why it differs; empty when it does not.")


class ServiceDrift(Response):
    service: str
    expected_version: Optional[str]
    deployment_id: Optional[int]
    agents: list[DriftRow]
    drifted: int


class FleetServices(Response):
    """Per service: which agents differ from the last successful deployment, or are down."""

    services: dict[str, ServiceDrift]
