"""The admin API on loopback for schemathesis: real routes and store, no network, no programs.

``serve(base_dir, reactor)`` starts the real AdminAPI (with the real servers and
deployments routes, a real SQLite store and the real Installer's record
keeping) on 127.0.0.1 and returns a ``FuzzAPI`` with its URL, a count of the
answers it gave by HTTP status, and ``close()``. Used by
tests/daemon/test_api_schema.py (a bounded run in CI) and ``bench/fuzz.py
--surface api`` (the long run).

Generated input never leaves this machine and never runs a program: the agent
RPC client refuses every call without connecting (so adoption of any generated
host fails cleanly with 422), commands are only recorded (the queue never sends
them), installs are only recorded (the installer never opens SSH), and no
playbook exists (a generated deployment is refused before it starts anything).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorThreads

from myxd.api import AdminAPI
from myxd.api.deployments import DeploymentsAPI
from myxd.api.servers import ServersAPI
from myxd.artifacts.store import ArtifactStore
from myxd.config import Settings
from myxd.deploy.service import DeploymentService
from myxd.deploy.transfer import ArtifactPusher
from myxd.install import Installer
from myxd.metrics import Metrics
from myxd.rpc.retry import AgentRPCError
from myxd.store import StoreService
from tests.daemon.api_helpers import TOKEN
from tests.daemon.test_api import FakeQueue

# Never generated: the SSE stream stays open by design, and refreshing services
# runs check_service.py on the agent (a command).
EXCLUDED_PATHS = (
    "/api/commands/{command_id}/stream",
    "/api/agents/{agent_id}/services/refresh",
)


class RefusingRPC:
    """Never connects: every agent call fails as if the agent were unreachable."""

    def __init__(self) -> None:
        self.calls = 0

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise AgentRPCError("retryable", "connection refused (test: no network)")


class RecordingInstaller(Installer):
    """Keeps the real server and agent records, but never starts an install."""

    def start(self, server_id: int, kind: str, *, actor: str = "api") -> Deferred[int]:
        return succeed(None)  # type: ignore[arg-type]


def st_path() -> str:
    """The schemathesis CLI next to this interpreter, else on PATH."""
    path = os.path.join(os.path.dirname(sys.executable), "st")
    return path if os.path.exists(path) else (shutil.which("st") or "st")


@dataclass
class FuzzAPI:
    url: str
    statuses: Counter[int] = field(default_factory=Counter)
    closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    async def close(self) -> None:
        for close in reversed(self.closers):
            result = close()
            if isinstance(result, Deferred):
                await result


async def serve(base: str, reactor: Any, *, access_log: bool = True) -> FuzzAPI:
    settings = Settings(data_dir=base)
    ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
    ss.startService()
    await ss.when_ready()
    closers: list[Callable[[], Any]] = [ss.stopService]
    rpc = RefusingRPC()
    artifacts = ArtifactStore(os.path.join(base, "artifacts"), 1 << 20, reactor)
    installer = RecordingInstaller(ss.store, rpc, settings, reactor)
    api = AdminAPI(
        ss.store,
        FakeQueue(ss.store),  # type: ignore[arg-type]
        rpc,  # type: ignore[arg-type]
        settings,
        reactor,
        metrics=Metrics(),
        admin_token=TOKEN,
        servers_api=ServersAPI(ss.store, installer, reactor=IReactorThreads(reactor)),
        deployments_api=DeploymentsAPI(
            ss.store,
            DeploymentService(
                ss.store,
                FakeQueue(ss.store),  # type: ignore[arg-type]
                artifacts,
                ArtifactPusher(rpc, reactor),
                lambda: [],
            ),
            artifacts,
            lambda: [],
        ),
        artifact_max_bytes=1 << 20,
    )
    # A few records so that generated ids sometimes hit something real.
    agent = await ss.store.add_agent(
        host="127.0.0.1",
        rpc_port=1,
        rpc_path="p" * 16,
        token="t" * 20,
        secret_key="k" * 20,
        cert_fingerprint="ab" * 32,
        status="online",
    )
    await ss.store.create_command(
        agent_id=agent, kind="command", command="true", args=[], timeout=None
    )
    await ss.store.add_event(actor="test", action="seed", target=None, outcome="ok")
    site = api.site()
    statuses: Counter[int] = Counter()
    log_request = site.log

    def count(request: Any) -> None:
        statuses[int(getattr(request, "code", 0))] += 1
        if access_log:
            log_request(request)

    site.log = count  # type: ignore[method-assign]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    closers.append(port.stopListening)
    return FuzzAPI(f"http://127.0.0.1:{port.getHost().port}", statuses, closers)


def st_args(url: str, checks: tuple[str, ...]) -> list[str]:
    """The ``st run`` arguments both runs share (add the generation options)."""
    args = [
        "run",
        f"{url}/api/openapi.json",
        "--checks",
        ",".join(checks),
        "--request-timeout",
        "60",
        "--no-color",
        "--header",
        f"Authorization: Bearer {TOKEN}",
    ]
    for path in EXCLUDED_PATHS:
        args += ["--exclude-path", path]
    return args
