"""Shared pieces of the deployment tests on real hosts: an in-process myxd
(tests/daemon/daemon_harness.py) that adopts real agents on systemd test hosts
(tests/support/agenthost.py), uploads a stand-in Xray release through the API
and deploys it.

At most three hosts (the machine has two cores). Every archive is made unique
per test (a zip comment), so an agent's artifact cache left by an earlier test
never hides a transfer. Only 127.0.0.1 is ever used. No tests live here.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from typing import Any

import treq

from tests.daemon.api_helpers import AUTH
from tests.daemon.daemon_harness import DaemonTestCase, read_bytes
from tests.deploytool.fixtures import build_standin_release
from tests.deploytool.helpers import free_ports
from tests.support.agenthost import AgentHost, agent_host

HOST_KEYS = ("deploy-a", "deploy-b", "deploy-c")
FINAL = ("success", "partial", "failed", "cancelled")
VERSION = "1.8.24"
STATE_DIR = "/var/lib/myx-agent"


def unique_release(out_dir: str, version: str = VERSION) -> tuple[str, str]:
    """The stand-in zip with a unique comment; returns (path, sha256)."""
    import hashlib

    path, _dgst, _sha = build_standin_release(out_dir, version)
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = f"myx deploy test {uuid.uuid4().hex}".encode()
    data = read_bytes(path)
    return path, hashlib.sha256(data).hexdigest()


def socks_inbound(port: int) -> list[dict[str, Any]]:
    return [
        {
            "protocol": "socks",
            "port": port,
            "listen": "127.0.0.1",
            "settings": {"auth": "noauth", "udp": False},
        }
    ]


class DeployTestCase(DaemonTestCase):
    """A fresh daemon per test that has adopted the shared hosts' agents."""

    timeout = 1800

    async def start(self, count: int = 3) -> None:
        self.hosts: list[AgentHost] = []
        for key in HOST_KEYS[:count]:
            self.hosts.append(await agent_host(key, self.reactor))
        await self.daemon.start()
        self.agent_ids: list[int] = []
        for ah in self.hosts:
            ep = ah.endpoint
            code, body = await self.api(
                "POST",
                "/api/agents",
                {
                    "host": ep.host,
                    "rpc_port": ep.port,
                    "rpc_path": ep.path,
                    "token": ep.token,
                    "cert_fingerprint": ep.fingerprint,
                },
            )
            self.assertEqual(code, 201, body)
            self.agent_ids.append(int(body["id"]))

    async def upload(self, path: str, name: str | None = None, **query: str) -> tuple[int, Any]:
        args = "&".join(
            f"{k}={v}" for k, v in {"name": name or os.path.basename(path), **query}.items()
        )
        response = await treq.post(
            f"{self.daemon.base}/api/artifacts?{args}",
            data=read_bytes(path),
            headers={**AUTH, b"Content-Type": [b"application/octet-stream"]},  # type: ignore[arg-type]
            pool=self.pool,
        )
        return response.code, await treq.json_content(response)

    async def release(self) -> str:
        """Upload a unique stand-in release; returns its artifact id."""
        path, sha = unique_release(self.temp_dir())
        code, body = await self.upload(path)
        self.assertEqual(code, 201, body)
        self.assertEqual(body["id"], sha)
        return sha

    def per_host_vars(self, ports: list[int], sha256: str) -> dict[str, Any]:
        """deploy_xray.yml vars with each host's inbound on its own port.

        A deployment has one set of vars, and real hosts would all use the same
        port; these hosts share one loopback, so the inbounds are chosen on the
        host by its host name (``ports`` in the order of ``self.hosts``).
        """
        by_name = {ah.host.name: socks_inbound(p) for ah, p in zip(self.hosts, ports)}
        return {
            "xray_version": VERSION,
            "xray_sha256": sha256,
            "xray_block_private": False,
            "xray_wait_timeout": 10,
            "test_inbounds": by_name,
            "xray_inbounds": "{{ test_inbounds[lookup('ansible.builtin.file', "
            "'/etc/hostname') | trim] }}",
        }

    async def deploy(self, body: dict[str, Any]) -> dict[str, Any]:
        code, rec = await self.api("POST", "/api/deployments", body)
        self.assertEqual(code, 201, rec)
        return dict(rec)

    async def deployment(self, dep_id: int) -> dict[str, Any]:
        code, body = await self.api("GET", f"/api/deployments/{dep_id}")
        self.assertEqual(code, 200, body)
        return dict(body)

    async def wait_deployment(self, dep_id: int) -> dict[str, Any]:
        return await self.until(
            lambda: self.deployment(dep_id),
            lambda d: d["status"] in FINAL,
            f"deployment {dep_id} to finish",
            timeout=900,
            interval=0.5,
        )

    def target(self, dep: dict[str, Any], agent_id: int) -> dict[str, Any]:
        for t in dep["targets"]:
            if t["agent_id"] == agent_id:
                return dict(t)
        raise AssertionError(f"agent {agent_id} is not a target of {dep}")

    def ansible_runs(self, ah: AgentHost) -> set[str]:
        """The agent's command records that ran a playbook (ansible-runner's dir)."""
        root = os.path.join(ah.host.root, STATE_DIR.lstrip("/"), "commands")
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return set()
        return {n for n in names if os.path.isdir(os.path.join(root, n, "ansible"))}

    def runner_idents(self, ah: AgentHost, record: str) -> list[str]:
        """ansible-runner's per-run artifact dirs inside one command record."""
        root = os.path.join(
            ah.host.root, STATE_DIR.lstrip("/"), "commands", record, "ansible", "artifacts"
        )
        return os.listdir(root)

    def free_ports(self, n: int) -> list[int]:
        return free_ports(n)
