"""A systemd test host with a real MyX agent on it, for tests that drive the agent.

``agent_host(key)`` boots a shared TestHost (tests/support/testhost.py) and
installs the agent on it exactly as tests/install/test_install_real.py does: the
real Installer over SSH with a throwaway SQLite store, from the cached
wheelhouse, bound to 127.0.0.1. The Installer also syncs this checkout's
deployment-tool/ to the agent. ``run_playbook`` runs a playbook through the
agent's ``execute_ansible`` (ansible-runner on the host) and reads the whole log
with ``get_command_log``. ``sync_tool`` pushes the tree again when a test
changed nothing but wants to be sure it is current.

Never talks to anything but 127.0.0.1; the host is stopped at interpreter exit
with the other shared hosts.
"""

from __future__ import annotations

import base64
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import deferLater

from myxd.config import Settings
from myxd.install import Installer
from myxd.install.bundle import deployment_tool_archive
from myxd.rpc.client import AgentEndpoint, AgentRPC
from myxd.store import StoreService
from tests.support.testhost import CACHE_DIR, TestHost, shared_host

WHEELHOUSE = os.path.join(CACHE_DIR, "wheelhouse")


@dataclass
class PlaybookRun:
    """The outcome of one execute_ansible run."""

    result: dict[str, Any]
    log: str

    @property
    def ok(self) -> bool:
        return bool(self.result.get("success"))

    @property
    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = (self.result.get("ansible") or {}).get("stats") or {}
        return stats

    def count(self, key: str) -> int:
        return int(sum((self.stats.get(key) or {}).values()))

    @property
    def changed(self) -> int:
        return self.count("changed")


@dataclass
class AgentHost:
    host: TestHost
    endpoint: AgentEndpoint
    settings: Settings
    tool_sha256: str = ""
    runs: list[str] = field(default_factory=list)

    def rpc(self, reactor: Any) -> AgentRPC:
        """A fresh client; the caller closes it (Trial wants no pool left between tests)."""
        return AgentRPC(reactor, self.settings)

    async def sync_tool(self, rpc: AgentRPC) -> None:
        archive, digest, version = deployment_tool_archive()
        if digest == self.tool_sha256:
            return
        await rpc.call(
            self.endpoint,
            "sync_deployment_tool",
            {"archive": base64.b64encode(archive).decode(), "sha256": digest, "version": version},
            timeout=120,
        )
        self.tool_sha256 = digest

    async def run_playbook(
        self,
        rpc: AgentRPC,
        reactor: Any,
        playbook: str,
        extra_vars: dict[str, Any] | None = None,
        *,
        timeout: float = 600,
        check: bool = False,
    ) -> PlaybookRun:
        command_id = f"pb-{uuid.uuid4().hex[:12]}"
        params: dict[str, Any] = {
            "playbook": playbook,
            "extra_vars": extra_vars or {},
            "command_id": command_id,
            "timeout": timeout,
        }
        if check:
            params["check"] = True
        await rpc.call(self.endpoint, "execute_ansible", params)
        offset, log = 0, b""
        deadline = reactor.seconds() + timeout + 60
        while reactor.seconds() < deadline:
            chunk = await rpc.call(
                self.endpoint,
                "get_command_log",
                {"command_id": command_id, "offset": offset, "wait": 10},
                timeout=30,
            )
            log += base64.b64decode(chunk["log_data"])
            offset = chunk["new_offset"]
            if chunk["is_final"]:
                text = log.decode(errors="replace")
                self.runs.append(text)
                return PlaybookRun(chunk["result"], text)
        raise AssertionError(f"{playbook} did not finish in {timeout} s:\n{log[-5000:]!r}")


def _make_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    return path


_AGENT_HOSTS: dict[str, AgentHost] = {}


async def agent_host(key: str, reactor: Any, **host_options: Any) -> AgentHost:
    """A booted shared host with an installed agent (installed once per run).

    ``host_options`` go to TestHost when the host is first made.
    """
    found = _AGENT_HOSTS.get(key)
    if found is not None and found.host.running:
        return found
    host = await shared_host(key, reactor, **host_options)
    data = _make_dir(os.path.join("shared-test-hosts", key + "-daemon"))
    settings = Settings(
        data_dir=data, agent_start_timeout=120, ssh_connect_timeout=60, rpc_timeout=30
    )
    store_service = StoreService(os.path.join(data, "myxd.sqlite"), reactor)
    store_service.startService()
    rpc = AgentRPC(reactor, settings)
    installer = Installer(
        store_service.store,
        rpc,
        settings,
        reactor,
        wheelhouse_dir=WHEELHOUSE,
        agent_bind="127.0.0.1",
        agent_port_range=(8000, 32767),
    )
    try:
        await store_service.when_ready()
        installer.startService()
        server_id, _ = await installer.create_server(
            name=host.name,
            host="127.0.0.1",
            ssh_port=host.port,
            username="root",
            auth={"private_key": host.private_key},
            sudo={"mode": "none"},
        )
        outcome = await installer.install(server_id)
        if not outcome.ok:
            raise RuntimeError(f"agent install on {host.name} failed: {outcome.error}")
        agent = await store_service.store.get_agent_for_server(server_id)
        assert agent is not None
        endpoint = AgentEndpoint.from_record(agent)
    finally:
        await installer.stopService()
        await rpc.close()
        await store_service.stopService()
        # Let the pool's threads and connections wind down before the test ends.
        await deferLater(reactor, 0.1, lambda: None)
    found = AgentHost(host, endpoint, settings, tool_sha256=deployment_tool_archive()[1])
    _AGENT_HOSTS[key] = found
    return found
