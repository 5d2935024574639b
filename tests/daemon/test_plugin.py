"""``twistd myxd`` from the installed wheel, and the service tree.

The daemon runs from the venv of tests/support/installed.py (the wheel built
by ``pip wheel --no-deps .``), with its cwd in a temp dir and no PYTHONPATH,
so it can only use what the wheel ships.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from myxd.tap import EXIT_CONFIG
from tests.support import installed

WAIT = 120.0  # generous: other test runs share this machine


async def run(argv: list[str], cwd: str) -> tuple[str, int]:
    out, err, code = await getProcessOutputAndValue(
        argv[0], argv[1:], env=installed.env(), path=cwd, reactor=reactor
    )
    return (out + err).decode("utf-8", "replace"), int(code)


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class Daemon(ProcessProtocol):
    """A twistd child whose combined output we collect."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    async def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        waited = 0.0
        while True:
            m = re.search(pattern, self.text)
            if m is not None:
                return m
            if self.reason is not None:
                raise AssertionError(f"twistd exited before {pattern!r}:\n{self.text}")
            if waited > timeout:
                raise AssertionError(f"no {pattern!r} after {timeout} s:\n{self.text}")
            await deferLater(reactor, 0.1, lambda: None)
            waited += 0.1


class PluginTests(unittest.TestCase):
    timeout = 600

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.python = installed.python()
        self.twistd = installed.script("twistd")

    def start(self, *args: str) -> Daemon:
        proto = Daemon()
        argv = [self.twistd, "--nodaemon", "--pidfile=", "myxd", *args]
        transport = reactor.spawnProcess(
            proto, self.twistd, argv, env=installed.env(), path=self.root
        )

        async def cleanup() -> None:
            if proto.reason is None:
                transport.signalProcess("KILL")
                await proto.ended

        self.addCleanup(lambda: ensureDeferred(cleanup()))
        return proto

    def test_help_lists_myxd(self) -> Deferred[Any]:
        async def go() -> None:
            out, code = await run(
                [
                    self.python,
                    "-c",
                    "import myxd.store.service, myxd.tap, myxd.rpc.client, "
                    "myxd.fleet.heartbeat, myxd.api.app; print(myxd.__file__)",
                ],
                self.root,
            )
            self.assertEqual(code, 0, out)
            self.assertTrue(out.strip().startswith(installed.venv()), out)
            out, code = await run([self.twistd, "--help"], self.root)
            self.assertEqual(code, 0, out)
            self.assertRegex(out, r"(?m)^\s+myxd\s+MyX")

        return ensureDeferred(go())

    def test_starts_serves_and_stops_on_sigterm(self) -> Deferred[Any]:
        data_dir = os.path.join(self.root, "data")
        flags = [
            "--data-dir",
            data_dir,
            "--api",
            "tcp:0:interface=127.0.0.1",
            "--heartbeat-min-interval",
            "0.2",
            "--heartbeat-max-interval",
            "0.5",
            "--log-poll-interval",
            "0.2",
            "--rpc-timeout",
            "2",
        ]

        async def go() -> None:
            first = self.start(*flags)
            m = await first.wait_for(r"myxd admin API listening on 127\.0\.0\.1:(\d+)")
            port = int(m.group(1))
            await first.wait_for(r"myxd started")
            await first.wait_for(r"store \S+ open at schema v\d+")
            self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
            token_path = os.path.join(data_dir, "admin-token")
            self.assertEqual(stat.S_IMODE(os.stat(token_path).st_mode), 0o600)
            self.assertEqual(
                stat.S_IMODE(os.stat(os.path.join(data_dir, "secret.key")).st_mode), 0o600
            )
            token = read_text(token_path).strip()
            # Never logged (docs/security.md): only where to find it.
            self.assertNotIn(token, first.text)
            self.assertIn(f"admin API token created in {token_path}", first.text)

            base = f"http://127.0.0.1:{port}"
            r = await treq.get(f"{base}/api/health", persistent=False)
            self.assertEqual(r.code, 200)
            await treq.content(r)
            r = await treq.get(f"{base}/api/agents", persistent=False)
            self.assertEqual(r.code, 401)
            await treq.content(r)
            r = await treq.get(
                f"{base}/api/agents",
                persistent=False,
                headers=Headers({"Authorization": [f"Bearer {token}"]}),
            )
            self.assertEqual(r.code, 200)
            await treq.content(r)
            # the servers API is wired in (it needs the installer)
            r = await treq.get(
                f"{base}/api/servers",
                persistent=False,
                headers=Headers({"Authorization": [f"Bearer {token}"]}),
            )
            self.assertEqual((r.code, await treq.json_content(r)), (200, {"servers": []}))

            await self.stop_cleanly(first)

            # A second start reuses the token and the store, and does not log the token.
            second = self.start(*flags)
            await second.wait_for(r"myxd admin API listening on 127\.0\.0\.1:\d+")
            await second.wait_for(r"store \S+ open at schema v\d+")
            self.assertNotIn(token, second.text)
            self.assertNotIn("admin API token created", second.text)
            await self.stop_cleanly(second)

        return ensureDeferred(go())

    async def stop_cleanly(self, daemon: Daemon) -> None:
        assert daemon.reason is None
        # signalProcess needs the transport; find it through the protocol.
        daemon.transport.signalProcess("TERM")  # type: ignore[union-attr]
        await daemon.ended
        reason = daemon.reason
        assert reason is not None
        # twistd re-raises the SIGTERM it handled after a clean shutdown, so the
        # status is "terminated by SIGTERM" (what systemd counts as a clean stop).
        if isinstance(reason.value, ProcessTerminated):
            self.assertEqual(reason.value.signal, signal.SIGTERM, daemon.text)
        else:
            self.assertIsInstance(reason.value, ProcessDone, daemon.text)
        self.assertIn("myxd stopped cleanly", daemon.text)
        self.assertIn("Main loop terminated", daemon.text)
        self.assertNotIn("Traceback", daemon.text)
        self.assertNotIn("Unhandled", daemon.text)

    def test_bad_config_exits_with_message(self) -> Deferred[Any]:
        config = os.path.join(self.root, "bad.toml")
        write_text(config, "heartbeat_min_interval = 9\nheartbeat_max_interval = 3\n")

        async def go() -> None:
            out, code = await run(
                [
                    self.twistd,
                    "--nodaemon",
                    "--pidfile=",
                    "myxd",
                    "--data-dir",
                    os.path.join(self.root, "data"),
                    "--config",
                    config,
                ],
                self.root,
            )
            # One line, no usage text, and the status the unit does not restart on.
            self.assertEqual(code, EXIT_CONFIG, out)
            self.assertEqual(
                out,
                f"myxd: error: {config}: heartbeat_min_interval (9) is greater than "
                "heartbeat_max_interval (3)\n",
            )
            self.assertNotIn("data", os.listdir(self.root))

            out, code = await run(
                [
                    self.twistd,
                    "--nodaemon",
                    "--pidfile=",
                    "myxd",
                    "--rpc-retry-max-attempts",
                    "zero",
                ],
                self.root,
            )
            self.assertEqual(code, EXIT_CONFIG, out)
            self.assertEqual(
                out, "myxd: error: --rpc-retry-max-attempts: expected an integer, got 'zero'\n"
            )

            # A deployment tool of the operator's own that is not one.
            not_a_tool = os.path.join(self.root, "tool")
            os.makedirs(not_a_tool)
            out, code = await run(
                [self.twistd, "-n", "--pidfile=", "myxd", "--deployment-tool-dir", not_a_tool],
                self.root,
            )
            self.assertEqual(code, EXIT_CONFIG, out)
            self.assertEqual(
                out,
                f"myxd: error: deployment_tool_dir: {not_a_tool} has no playbooks/ directory: "
                "not a deployment tool\n",
            )

        return ensureDeferred(go())


class ServiceTreeTests(unittest.TestCase):
    """makeService wiring, in process (no HTTP, so no lingering connections)."""

    def test_tree_starts_and_stops(self) -> Deferred[Any]:
        from myxd.deploy.service import DeploymentService
        from myxd.install import Installer
        from myxd.rpc.client import AgentRPC
        from myxd.store import StoreService
        from myxd.tap import APIService, Options, makeService

        data_dir = os.path.abspath(self.mktemp())
        options = Options()
        options.parseOptions(
            [
                "--data-dir",
                data_dir,
                "--api",
                "tcp:0:interface=127.0.0.1",
                "--heartbeat-min-interval",
                "0.2",
                "--heartbeat-max-interval",
                "0.3",
                "--admin-token",
                "test-admin-token-0123456789",
            ]
        )
        root = makeService(options)
        names = [s.name for s in root]
        # The installer is part of every daemon: without it there is no
        # /api/servers and no auto-reinstall, so its absence must fail here.
        self.assertEqual(
            names, ["store", "rpc", "installer", "heartbeat", "commands", "deployments", "api"]
        )
        store_service = root.getServiceNamed("store")
        listener = root.getServiceNamed("api")
        rpc = root.getServiceNamed("rpc")
        installer = root.getServiceNamed("installer")
        heartbeat = root.getServiceNamed("heartbeat")
        assert isinstance(store_service, StoreService)
        assert isinstance(listener, APIService)
        assert isinstance(rpc, AgentRPC)
        assert isinstance(installer, Installer)
        assert isinstance(root.getServiceNamed("deployments"), DeploymentService)
        # auto-reinstall is wired to this installer
        self.assertEqual(heartbeat.reinstall_hook, installer.auto_reinstall)
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
        # An admin token from the settings means no token file is written.
        self.assertFalse(os.path.exists(os.path.join(data_dir, "admin-token")))

        async def go() -> None:
            root.privilegedStartService()
            root.startService()
            await store_service.when_ready()
            bound: Deferred[Any] = Deferred()
            assert listener._waitingForPort is not None

            def seen(port: Any) -> Any:
                bound.callback(port)
                return port  # the service keeps it, to stop listening later

            listener._waitingForPort.addCallback(seen)
            port = await bound
            self.assertGreater(port.getHost().port, 0)
            self.assertTrue(port.connected)
            self.assertIs(listener.port, port)
            await root.stopService()
            self.assertFalse(port.connected)
            self.assertIsNone(listener.port)
            self.assertFalse(rpc.running)
            assert store_service.pool is not None
            self.assertFalse(store_service.pool.running)

        return ensureDeferred(go())
