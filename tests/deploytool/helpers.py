"""Shared pieces of the deployment-tool tests: the host, loopback HTTP, SOCKS5."""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from myxd.install.remote import TOOL_DIR, VENV_DIR
from myxd.rpc.client import AgentRPC
from tests.support.agenthost import AgentHost, PlaybookRun, agent_host
from tests.support.sshd import free_port

HOST_KEY = "deploytool"


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def socks5_get(proxy_port: int, target_port: int, path: str = "/") -> bytes:
    """A plain HTTP GET to 127.0.0.1:target_port through a SOCKS5 proxy (blocking)."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        if s.recv(2) != b"\x05\x00":
            raise OSError("socks: no auth method accepted")
        s.sendall(
            b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", target_port)
        )
        reply = s.recv(10)
        if len(reply) < 2 or reply[1] != 0:
            raise OSError(f"socks: connect refused {reply!r}")
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def http_get(port: int, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


class HostTestCase(unittest.TestCase):
    """Runs playbooks on the shared deploytool host through its agent."""

    timeout = 1800
    # Which shared host, and the extra capabilities it boots with (see TestHost).
    host_key = HOST_KEY
    host_capabilities: tuple[str, ...] = ()

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.ah: AgentHost = await agent_host(
            self.host_key, reactor, capabilities=self.host_capabilities
        )
        self.host = self.ah.host
        self.client: AgentRPC = self.ah.rpc(reactor)
        self.addCleanup(self.client.close)
        await self.ah.sync_tool(self.client)

    async def play(
        self, playbook: str, extra_vars: dict[str, Any] | None = None, *, ok: bool = True
    ) -> PlaybookRun:
        run = await self.ah.run_playbook(self.client, reactor, playbook, extra_vars)
        if ok:
            self.assertTrue(run.ok, f"{playbook} failed:\n{run.log[-6000:]}")
            self.assertEqual(run.count("failures"), 0, run.log[-3000:])
        else:
            self.assertFalse(run.ok, f"{playbook} should have failed:\n{run.log[-4000:]}")
        return run

    async def check_mode(self, playbook: str, extra_vars: dict[str, Any]) -> str:
        """The playbook in check mode through the agent (execute_ansible check=true:
        --check --diff). Returns the log; fails the test unless the run succeeded."""
        run = await self.ah.run_playbook(self.client, reactor, playbook, extra_vars, check=True)
        self.assertTrue(run.ok, f"{playbook} --check failed:\n{run.log[-6000:]}")
        return run.log

    async def check_service(self, *names: str) -> dict[str, dict[str, Any]]:
        out = await self.host.sh(
            f"{VENV_DIR}/bin/python {TOOL_DIR}/scripts/check_service.py {' '.join(names)} || true"
        )
        objs = [json.loads(line) for line in out.splitlines() if line.strip()]
        return {o["service"]: o for o in objs}

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file into the host's root (the overlay, seen at once by the host)."""
        full = os.path.join(self.host.root, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        os.chmod(full, mode)

    def serve_http(self, body: bytes) -> int:
        """A loopback HTTP server in this process serving ``body`` at /."""
        root = Resource()
        root.putChild(b"", Data(body, "text/plain"))
        r: Any = reactor
        port = r.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    async def in_thread(self, f: Any, *args: Any) -> Any:
        return await threads.deferToThread(f, *args)
