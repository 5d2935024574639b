"""Schemathesis against the admin API's own OpenAPI document (issue #12 §3).

The real AdminAPI (with the real servers routes, a real SQLite store and the real
Installer's record keeping) listens on 127.0.0.1; the schemathesis CLI reads
/api/openapi.json from it and sends generated requests, positive and negative, with
deterministic generation and a bounded example count. The run passes only with no 5xx answer and
every response matching its documented status, content type and schema.

Generated input never leaves this machine and never runs a program: the agent RPC
client here refuses every call without connecting (so adoption of any generated
host fails cleanly with 422), commands are only recorded (the queue never sends
them), and installs are only recorded (the installer never opens SSH). The SSE
stream is left out: a pending command's stream stays open by design.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

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

MAX_EXAMPLES = int(os.environ.get("MYX_SCHEMATHESIS_EXAMPLES", "25"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
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


def _st() -> str:
    import sys

    path = os.path.join(os.path.dirname(sys.executable), "st")
    return path if os.path.exists(path) else (shutil.which("st") or "st")


class SchemathesisTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    async def _serve(self) -> str:
        base = self.base
        settings = Settings(data_dir=base)
        ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
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
            # No playbooks: a generated deployment is always refused before it
            # starts anything. Artifacts are real files under the test's dir.
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
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(api.site())
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def test_every_operation_matches_its_document(self) -> None:
        url = await self._serve()
        args = [
            "run",
            f"{url}/api/openapi.json",
            "--checks",
            ",".join(CHECKS),
            "--max-examples",
            str(MAX_EXAMPLES),
            # deterministic generation: the same cases on every run (no seed needed)
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--no-color",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--exclude-path",
            "/api/commands/{command_id}/stream",
            # It runs check_service.py on the agent: a command, never generated.
            "--exclude-path",
            "/api/agents/{agent_id}/services/refresh",
        ]
        out, err, code = await getProcessOutputAndValue(
            _st(), args, env={**os.environ, "NO_COLOR": "1"}, path=self.base
        )
        text = (out + err).decode("utf-8", "replace")
        if os.environ.get("MYX_SCHEMATHESIS_SHOW"):
            print(text)
        self.assertEqual(code, 0, text[-6000:])
        # Not a vacuous pass: operations were really exercised.
        m = re.search(r"Tested: (\d+)", text)
        self.assertIsNotNone(m, text[-3000:])
        assert m is not None
        self.assertGreaterEqual(int(m.group(1)), 20, text[-3000:])
        m = re.search(r"(\d+) generated, (\d+) passed", text)
        self.assertIsNotNone(m, text[-3000:])
        assert m is not None
        self.assertEqual(m.group(1), m.group(2), text[-3000:])
        self.assertGreaterEqual(int(m.group(1)), 200, text[-3000:])
