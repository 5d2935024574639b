"""A real myxd service tree for end-to-end tests: tap.makeService on a temp data dir
with its admin API on 127.0.0.1:0, plus a TestCase base with HTTP helpers.
No tests live here."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import treq
from twisted.application.service import MultiService
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from myxd.config import Settings
from myxd.tap import makeService
from tests.daemon.api_helpers import AUTH, TOKEN
from tests.support.agent_process import RunningAgent

T = TypeVar("T")
WAIT = 120.0


def request_lines(agent: RunningAgent) -> list[str]:
    """The agent logs one line per HTTP request that reached it (any outcome)."""
    return [
        line for line in agent.log_text().splitlines() if " rpc " in line and " ms from " in line
    ]


class Daemon:
    """One myxd service tree on a data dir, its API on an ephemeral loopback port."""

    def __init__(self, test: DaemonTestCase, data_dir: str) -> None:
        self.test = test
        self.data_dir = data_dir
        self.root: MultiService | None = None
        self.base = ""

    async def start(self) -> None:
        settings = Settings(
            data_dir=self.data_dir,
            api="tcp:0:interface=127.0.0.1",
            admin_token=TOKEN,
            heartbeat_min_interval=0.3,
            heartbeat_max_interval=0.8,
            rpc_retry_max_attempts=3,
            rpc_retry_base_delay=0.05,
            rpc_timeout=20,
            rpc_pool_idle_timeout=30,
            log_poll_interval=0.2,
            log_poll_wait=2,
            reinstall_after_cycles=100000,
        )
        root = makeService({"settings": settings})
        self.root = root
        root.startService()
        self.test.addCleanup(self.stop)
        # Cleanups run last-in first-out: client connections close before the daemon stops.
        self.test.addCleanup(self.test.pool.closeCachedConnections)
        await root.getServiceNamed("store").when_ready()
        listener: Any = root.getServiceNamed("api")
        port = await self.test.until(
            lambda: now_value(listener.port), lambda p: p is not None, "the API to listen"
        )
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    async def stop(self) -> None:
        root, self.root = self.root, None
        if root is not None and root.running:
            await root.stopService()


async def now_value(value: T) -> T:
    return value


# Small synchronous file helpers: the tests' own file I/O is tiny and local.
def touch(path: str) -> None:
    with open(path, "w"):
        pass


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_size(path: str) -> int:
    return os.path.getsize(path)


class DaemonTestCase(TestCase):
    timeout = 400

    def temp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.daemon = Daemon(self, self.data_dir)

    async def until(
        self,
        probe: Callable[[], Awaitable[T]],
        check: Callable[[T], bool],
        what: str,
        timeout: float = WAIT,
        interval: float = 0.05,
    ) -> T:
        deadline = self.reactor.seconds() + timeout
        while True:
            value = await probe()
            if check(value):
                return value
            if self.reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}; last value: {value!r}")
            await deferLater(self.reactor, interval, lambda: None)

    async def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        daemon: Daemon | None = None,
    ) -> tuple[int, Any]:
        headers: dict[bytes, list[bytes]] = dict(AUTH) if auth else {}
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode()
        url = (daemon or self.daemon).base + path
        response = await treq.request(
            method,
            url,
            headers=headers,  # type: ignore[arg-type]
            data=data,
            pool=self.pool,
        )
        raw = await treq.content(response)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        return response.code, json.loads(raw) if ctype.startswith(b"application/json") else raw

    async def adopt(self, agent: RunningAgent, fingerprint: str | None = None) -> int:
        fp = (
            fingerprint
            if fingerprint is not None
            else ":".join(agent.fingerprint[i : i + 2].upper() for i in range(0, 64, 2))
        )
        code, body = await self.api(
            "POST",
            "/api/agents",
            {
                "host": agent.host,
                "rpc_port": agent.port,
                "rpc_path": agent.rpc_path,
                "token": agent.token,
                "cert_fingerprint": fp,
            },
        )
        self.assertEqual(code, 201, body)
        return int(body["id"])

    async def command(self, command_id: int, daemon: Daemon | None = None) -> dict[str, Any]:
        code, body = await self.api("GET", f"/api/commands/{command_id}", daemon=daemon)
        self.assertEqual(code, 200, body)
        return dict(body)

    async def wait_final(self, command_id: int, daemon: Daemon | None = None) -> dict[str, Any]:
        return await self.until(
            lambda: self.command(command_id, daemon),
            lambda c: c["final"],
            f"command {command_id} to finish",
            interval=0.2,
        )

    async def read_all(self, command_id: int, daemon: Daemon | None = None) -> bytes:
        """The whole stored output, page by page, checking offsets are contiguous."""
        out = b""
        while True:
            code, body = await self.api(
                "GET",
                f"/api/commands/{command_id}?offset={len(out)}&max_bytes=65536",
                daemon=daemon,
            )
            self.assertEqual(code, 200, body)
            if not body["output"]:
                return out
            for chunk in body["output"]:
                self.assertEqual(chunk["offset"], len(out))
                out += base64.b64decode(chunk["data"])
            self.assertEqual(body["next_offset"], len(out))
