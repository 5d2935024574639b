"""Installer logic without SSH: automatic-reinstall policy (Clock-driven) and remote scripts.

The store is a real SQLite file; the installer's clock is a ``Clock``; ``start``
is replaced by a recorder so no connection is attempted.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from myxd.config import Settings
from myxd.install import Installer, remote
from myxd.install.bundle import TargetPlatform, agent_modules, deployment_tool_archive
from myxd.store import StoreService


def _new_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path)
    return path


class AutoReinstallTests(unittest.TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        base = _new_dir(self.mktemp())
        ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
        self.store = ss.store
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.installer = Installer(
            self.store,
            None,
            Settings(data_dir=base),
            self.clock,
            auto_backoff_base=100,
            auto_backoff_max=1000,
            auto_max_attempts=3,
            auto_reset_after=10_000,
        )
        self.started: list[tuple[int, str, str]] = []

        def start(server_id: int, kind: str, *, actor: str = "api") -> Deferred[int]:
            self.started.append((server_id, kind, actor))
            return succeed(len(self.started))

        self.installer.start = start  # type: ignore[method-assign]

    async def server(self, *, auth: Any = None) -> tuple[int, Any]:
        sid, aid = await self.installer.create_server(
            name="s",
            host="127.0.0.1",
            ssh_port=22,
            username="root",
            auth=auth if auth is not None else {"password": "pw"},
            sudo={"mode": "none"},
        )
        # As the heartbeat hands it over: an agent that was installed and pinned.
        return sid, SimpleNamespace(id=aid, server_id=sid, cert_fingerprint="ab" * 32)

    async def actions(self) -> list[tuple[str, str]]:
        events = await self.store.list_events(limit=100)
        return [
            (e.action, e.outcome) for e in reversed(events) if e.action.endswith("auto_reinstall")
        ]

    async def test_backoff_then_cap(self) -> None:
        sid, agent = await self.server()
        await self.installer.auto_reinstall(agent, "connection refused")
        self.assertEqual(self.started, [(sid, "reinstall", "auto")])
        # Within the backoff: nothing new starts.
        await self.installer.auto_reinstall(agent, "connection refused")
        self.clock.advance(99)
        await self.installer.auto_reinstall(agent, "connection refused")
        self.assertEqual(len(self.started), 1)
        self.clock.advance(2)  # > 100 s after the first
        await self.installer.auto_reinstall(agent, "connection refused")
        self.assertEqual(len(self.started), 2)
        self.clock.advance(150)  # the second wait is 200 s
        await self.installer.auto_reinstall(agent, "connection refused")
        self.assertEqual(len(self.started), 2)
        self.clock.advance(60)
        await self.installer.auto_reinstall(agent, "connection refused")
        self.assertEqual(len(self.started), 3)
        # Capped at 3 attempts: the server needs a person now, said once.
        self.clock.advance(5000)
        await self.installer.auto_reinstall(agent, "connection refused")
        await self.installer.auto_reinstall(agent, "connection refused")
        self.assertEqual(len(self.started), 3)
        server = await self.store.get_server(sid)
        assert server is not None
        self.assertEqual(server.status, "needs_attention")
        self.assertIn("3 automatic reinstalls", server.status_reason or "")
        acts = await self.actions()
        self.assertEqual(acts.count(("server.auto_reinstall", "started")), 3)
        self.assertEqual(acts.count(("server.auto_reinstall", "capped")), 1)
        # After a long quiet period the count starts again.
        self.clock.advance(20_000)
        await self.installer.auto_reinstall(agent, "connection refused")
        self.assertEqual(len(self.started), 4)

    async def test_no_credentials_needs_attention(self) -> None:
        sid, agent = await self.server(auth={})
        await self.store.update_server(sid, auth=None)
        await self.installer.auto_reinstall(agent, "timed out")
        self.assertEqual(self.started, [])
        server = await self.store.get_server(sid)
        assert server is not None
        self.assertEqual(server.status, "needs_attention")
        self.assertIn("no SSH credentials", server.status_reason or "")
        self.assertIn(("server.auto_reinstall", "needs_attention"), await self.actions())

    async def test_adopted_agent_and_running_install_are_skipped(self) -> None:
        await self.installer.auto_reinstall(
            SimpleNamespace(id=77, server_id=None, cert_fingerprint="ab" * 32), "x"
        )
        sid, agent = await self.server()
        self.installer._running[sid] = object()  # type: ignore[assignment]
        await self.installer.auto_reinstall(agent, "x")
        del self.installer._running[sid]
        self.assertEqual(self.started, [])
        self.assertEqual(
            await self.actions(),
            [("agent.auto_reinstall", "skipped"), ("server.auto_reinstall", "skipped")],
        )

    async def test_never_pinned_agent_is_not_reinstalled(self) -> None:
        # An agent whose install never reached the pin step is installing (or
        # failed), not dead: it must not feed automatic reinstalls.
        sid, agent = await self.server()
        stored = await self.store.get_agent_for_server(sid)
        assert stored is not None
        self.assertEqual(stored.cert_fingerprint, "")
        for _ in range(5):
            await self.installer.auto_reinstall(stored, "bad agent record")
            self.clock.advance(10_000)
        self.assertEqual(self.started, [])
        server = await self.store.get_server(sid)
        assert server is not None
        self.assertNotEqual(server.status, "needs_attention")
        self.assertEqual(await self.actions(), [("server.auto_reinstall", "skipped")] * 5)


class BundleAndScriptTests(unittest.TestCase):
    def test_agent_modules_follow_imports(self) -> None:
        mods = agent_modules()
        for needed in ("myx_agent/__init__.py", "myx_agent/__main__.py", "myx_agent/main.py"):
            self.assertIn(needed, mods)
        self.assertTrue(all(m.startswith("myx_agent/") and m.endswith(".py") for m in mods))

    def test_agent_modules_of_a_package_tree(self) -> None:
        pkg = os.path.abspath(os.path.join(self.mktemp(), "myx_agent"))
        os.makedirs(os.path.join(pkg, "sub"))
        files = {
            "__init__.py": "",
            "__main__.py": "from myx_agent.main import main\n",
            "main.py": "import os\nfrom . import used\n\ndef f():\n    from .sub import deep\n",
            "used.py": "from myx_agent import errors\n",
            "errors.py": "",
            "unused.py": "import myx_agent.never\n",
            "sub/__init__.py": "",
            "sub/deep.py": "",
        }
        for name, text in files.items():
            with open(os.path.join(pkg, name), "w") as f:
                f.write(text)
        self.assertEqual(
            agent_modules(pkg),
            sorted(f"myx_agent/{n}" for n in files if n != "unused.py"),
        )

    def test_deployment_tool_archive_is_reproducible(self) -> None:
        a1, h1, v1 = deployment_tool_archive()
        a2, h2, _ = deployment_tool_archive()
        self.assertEqual((a1, h1), (a2, h2))
        self.assertEqual(v1, "0.1.0")
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(a1), mode="r:gz") as tar:
            names = tar.getnames()
        for needed in (
            "VERSION",
            "ansible.cfg",
            "inventory/localhost.ini",
            "playbooks/ping.yml",
            "scripts/check_service.py",
            "scripts/install_ansible.sh",
        ):
            self.assertIn(needed, names)
        self.assertFalse(any(n.startswith(("/", "..")) for n in names))

    def test_platform_tags(self) -> None:
        t = TargetPlatform(python="3.11.2", machine="x86_64", glibc="2.36")
        tags = t.platform_tags()
        self.assertIn("manylinux_2_36_x86_64", tags)
        self.assertIn("manylinux2014_x86_64", tags)
        self.assertNotIn("manylinux_2_37_x86_64", tags)
        self.assertEqual((t.python_tag, t.python_short), ("cp311", "3.11"))

    def test_config_and_unit(self) -> None:
        import json

        cfg = json.loads(
            remote.agent_config(
                token="t" * 20,
                secret_key="s" * 20,
                rpc_port=20000,
                rpc_path="p" * 20,
                bind="127.0.0.1",
            )
        )
        self.assertEqual(cfg["rpc_port"], 20000)
        self.assertEqual(cfg["bind"], "127.0.0.1")
        unit = remote.unit_file()
        self.assertIn("Restart=always", unit)
        self.assertIn("StartLimitIntervalSec=0", unit)
        # Hardening must not break admin commands the agent runs.
        for breaking in ("NoNewPrivileges=yes", "ProtectSystem=", "PrivateTmp=yes"):
            self.assertNotIn(breaking, unit)
        with self.assertRaises(ValueError):
            remote.Staging("/tmp/x'; rm -rf /")
