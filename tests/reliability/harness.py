"""A real myxd (tap.makeService) with chosen settings, and agents behind a FaultProxy.

Builds on tests/daemon/daemon_harness.py: same API helpers, but the daemon's
settings are the test's (short heartbeats and timeouts, so faults resolve in
seconds), and every agent is adopted at the proxy's address, so all the
daemon's traffic to it crosses the faults. The agent's certificate is still
pinned end to end: the proxy only sees TLS bytes. No tests live here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from myxd.config import Settings
from myxd.store.records import HeartbeatResult
from myxd.tap import makeService
from tests.daemon.api_helpers import TOKEN
from tests.daemon.daemon_harness import Daemon, DaemonTestCase, now_value
from tests.support.agent_process import RunningAgent, start_agent
from tests.support.faultproxy import FaultProxy

FAST: dict[str, Any] = dict(
    heartbeat_min_interval=0.3,
    heartbeat_max_interval=0.6,
    rpc_retry_max_attempts=3,
    rpc_retry_base_delay=0.2,
    rpc_timeout=5,
    rpc_pool_idle_timeout=30,
    log_poll_interval=0.2,
    log_poll_wait=1,
    reinstall_after_cycles=100000,
)

# The command every scenario runs: it appends one line to a marker file (so a
# second run shows), then writes `count` deterministic binary records, pausing
# every 64 records so that the output spans many log polls.
SCRIPT = (
    "import sys, time\n"
    "with open(sys.argv[1], 'a') as f:\n"
    "    f.write('run\\n')\n"
    "n, pause = int(sys.argv[2]), float(sys.argv[3])\n"
    "out = sys.stdout.buffer\n"
    "for i in range(n):\n"
    "    out.write(b'%08d:' % i + bytes(range(256)))\n"
    "    if i % 64 == 63:\n"
    "        out.flush(); time.sleep(pause)\n"
    "out.flush()\n"
)


def expected_output(count: int) -> bytes:
    return b"".join(b"%08d:" % i + bytes(range(256)) for i in range(count))


def marker_runs(path: str) -> int:
    try:
        with open(path) as f:
            return f.read().count("run\n")
    except FileNotFoundError:
        return 0


class ConfiguredDaemon(Daemon):
    """`Daemon` with the test's settings."""

    def __init__(self, test: DaemonTestCase, data_dir: str, **settings: Any) -> None:
        super().__init__(test, data_dir)
        self.settings = dict(FAST)
        self.settings.update(settings)

    async def start(self) -> None:
        settings = Settings(
            data_dir=self.data_dir,
            api="tcp:0:interface=127.0.0.1",
            admin_token=TOKEN,
            **self.settings,
        )
        root = makeService({"settings": settings})
        self.root = root
        root.startService()
        self.test.addCleanup(self.stop)
        self.test.addCleanup(self.test.pool.closeCachedConnections)
        await root.getServiceNamed("store").when_ready()
        listener: Any = root.getServiceNamed("api")
        port = await self.test.until(
            lambda: now_value(listener.port), lambda p: p is not None, "the API to listen"
        )
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def service(self, name: str) -> Any:
        assert self.root is not None
        return self.root.getServiceNamed(name)


@dataclass
class StatusLog:
    """Every status the heartbeat and the queue write for each agent, in order."""

    statuses: dict[int, list[str]] = field(default_factory=dict)

    def changes(self, agent_id: int) -> int:
        seen = self.statuses.get(agent_id, [])
        return sum(1 for a, b in zip(seen, seen[1:]) if a != b)

    def watch(self, store: Any) -> None:
        # Test-side instrumentation of the one write path for agent status.
        original = store.record_heartbeat_results

        def record(results: Any) -> Any:
            results = list(results)
            for r in results:
                assert isinstance(r, HeartbeatResult)
                self.statuses.setdefault(r.agent_id, []).append("online" if r.ok else "offline")
            return original(results)

        store.record_heartbeat_results = record


class FaultTestCase(DaemonTestCase):
    """A daemon, agents behind fault proxies, and the scenario helpers."""

    async def start_daemon(self, **settings: Any) -> ConfiguredDaemon:
        daemon = ConfiguredDaemon(self, self.data_dir, **settings)
        self.daemon = daemon
        await daemon.start()
        self.status_log = StatusLog()
        self.status_log.watch(daemon.service("store").store)
        return daemon

    async def proxied_agent(self) -> tuple[RunningAgent, FaultProxy, int]:
        """A real agent, a proxy in front of it, and its id in the daemon (adopted
        at the proxy's address)."""
        agent = await start_agent(self)
        proxy = FaultProxy(self.reactor, agent.host, agent.port)
        proxy.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        fp = ":".join(agent.fingerprint[i : i + 2] for i in range(0, 64, 2))
        code, body = await self.api(
            "POST",
            "/api/agents",
            {
                "host": agent.host,
                "rpc_port": proxy.port,
                "rpc_path": agent.rpc_path,
                "token": agent.token,
                "cert_fingerprint": fp,
            },
        )
        self.assertEqual(code, 201, body)
        return agent, proxy, int(body["id"])

    async def agent_status(self, agent_id: int) -> dict[str, Any]:
        code, body = await self.api("GET", f"/api/agents/{agent_id}")
        self.assertEqual(code, 200, body)
        return dict(body)

    async def run_script(self, agent_id: int, count: int, pause: float) -> tuple[int, str]:
        """Start SCRIPT on the agent through the API; (command id, marker path)."""
        marker = os.path.join(self.temp_dir(), "runs")
        code, body = await self.api(
            "POST",
            f"/api/agents/{agent_id}/commands",
            {
                "command": sys.executable,
                "args": ["-c", SCRIPT, marker, str(count), str(pause)],
                "timeout": 300,
            },
        )
        self.assertEqual(code, 201, body)
        return int(body["id"]), marker
