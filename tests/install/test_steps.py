"""Each install step alone, against a fake ``RemoteHost`` and a fake agent RPC.

The store is a real SQLite file; the clock is a ``Clock``. What the steps do on
a real target is covered by tests/install/test_install_real.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from myxd.deploy.transfer import ArtifactPusher
from myxd.install import remote, steps
from myxd.install.agents import new_agent
from myxd.install.bundle import AgentFiles, BundleError, TargetPlatform
from myxd.install.host import RemoteHost
from myxd.install.hostkeys import HostKeyPolicy
from myxd.install.session import (
    AgentFilesCache,
    InstallEnv,
    InstallError,
    InstallOptions,
    InstallSession,
)
from myxd.install.ssh import Sudo, SudoError
from myxd.rpc.retry import AgentRPCError, CertificateMismatch, RemoteError
from myxd.store import StoreService
from myxd.store.records import ServerRecord
from tests.install.fakes import FakeHost, FakeRPC, result

FP = "ab" * 32
GOOD_FACTS = "\n".join(
    [
        "os=Debian GNU/Linux 12 (bookworm)",
        "kernel=Linux 6.1.0",
        "machine=x86_64",
        "python=3.11.2",
        "venv=yes",
        "glibc=2.36",
        "systemd=yes",
        "port=free",
        "agent=inactive",
    ]
)
FILES = AgentFiles(
    files=(
        ("myx_agent/__init__.py", b""),
        ("myx_agent/main.py", b"print('hi')\n"),
        ("myx_agent/sub/deep.py", b""),
        ("requirements.txt", b"twisted\n"),
    ),
    requirements=b"twisted\n",
)


def facts(**changes: str) -> str:
    lines = dict(line.split("=", 1) for line in GOOD_FACTS.splitlines())
    lines.update(changes)
    return "\n".join(f"{k}={v}" for k, v in lines.items())


def _new_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path)
    return path


def _touch(directory: str, *names: str) -> None:
    for name in names:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(b"w")


class FakeWheelhouse:
    def __init__(self, path: str) -> None:
        self.path = path
        self.asked: list[TargetPlatform] = []

    async def ensure(self, target: TargetPlatform, requirements: bytes) -> str:
        self.asked.append(target)
        return self.path

    @staticmethod
    def wheels(path: str) -> list[str]:
        return sorted(n for n in os.listdir(path) if n.endswith(".whl"))


class StepTestCase(unittest.TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.base = base = _new_dir(self.mktemp())
        ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
        self.store = ss.store
        self.clock = Clock()
        self.host = FakeHost()
        self.rpc = FakeRPC()
        self.progress: list[tuple[str, str]] = []
        self.stopping = False
        self.policies: list[HostKeyPolicy] = []
        self.wheelhouse = FakeWheelhouse(base)

    def env(self, **options: Any) -> InstallEnv:
        async def connector(server: ServerRecord, policy: HostKeyPolicy) -> RemoteHost:
            self.policies.append(policy)
            return self.host

        async def progress(s: InstallSession, step: str, text: str) -> None:
            self.progress.append((step, text))

        return InstallEnv(
            store=self.store,
            rpc=self.rpc,
            clock=self.clock,
            options=InstallOptions(**{"dependency_mode": "index", **options}),
            connector=connector,
            wheelhouse=self.wheelhouse,
            agent_files=lambda: FILES,
            progress=progress,
            stopping=lambda: self.stopping,
            # The real pusher, reading chunks in the real reactor's threads.
            pusher=ArtifactPusher(self.rpc, reactor),
        )

    async def session(
        self, *, auth: Any = None, sudo: Sudo | None = None, connected: bool = True, **options: Any
    ) -> InstallSession:
        sid = await self.store.add_server(
            name="s",
            host="127.0.0.1",
            ssh_port=22,
            username="u",
            auth={"password": "pw"} if auth is None else auth,
            sudo={"mode": "none"},
        )
        await new_agent(self.store, sid, "127.0.0.1", (8000, 32767))
        server = await self.store.get_server(sid)
        assert server is not None
        s = InstallSession(
            env=self.env(**options),
            install_id=await self.store.start_install(sid, "install"),
            server=server,
            kind="install",
            sudo=sudo or Sudo(),
            agent=await self.store.get_agent_for_server(sid),
            host=self.host if connected else None,
        )
        return s

    async def staged(self, **options: Any) -> InstallSession:
        s = await self.session(**options)
        s.staging = remote.Staging("/tmp/myx-install.x")
        s.files = FILES
        s.facts = dict(line.split("=", 1) for line in GOOD_FACTS.splitlines())
        return s


class ConnectTests(StepTestCase):
    async def test_connects_with_the_servers_trust(self) -> None:
        s = await self.session(connected=False)
        result = await steps.connect(s)
        self.assertIs(s.host, self.host)
        self.assertEqual(result.status, "ok")
        self.assertIn("as u (uid 0)", result.log)
        self.assertIn("SHA256:fakefakefake (pinned)", result.log)

    async def test_first_use_key_is_stored(self) -> None:
        s = await self.session(connected=False)
        await steps.connect(s)
        (policy,) = self.policies
        assert policy.on_first_use is not None
        stored = policy.on_first_use("ssh-ed25519 AAAAfake")
        assert stored is not None
        await stored
        server = await self.store.get_server(s.server.id)
        assert server is not None
        self.assertEqual(server.host_key, "ssh-ed25519 AAAAfake")

    async def test_no_credentials(self) -> None:
        s = await self.session(auth={}, connected=False)
        with self.assertRaises(InstallError) as e:
            await steps.connect(s)
        self.assertIn("no SSH credentials", e.exception.message)
        self.assertEqual(self.policies, [])

    async def test_stopping_daemon(self) -> None:
        s = await self.session(connected=False)
        self.stopping = True
        with self.assertRaises(InstallError) as e:
            await steps.connect(s)
        self.assertIn("stopping", e.exception.message)


class CheckTests(StepTestCase):
    async def check_fails(self, text: str, **options: Any) -> InstallError:
        s = await self.session(**options)
        self.host.reply("PORT=", text)
        with self.assertRaises(InstallError) as e:
            await steps.check(s)
        self.assertEqual(e.exception.step, "check")
        return e.exception

    async def test_good_target(self) -> None:
        s = await self.session()
        self.host.reply("PORT=", GOOD_FACTS)
        result = await steps.check(s)
        self.assertIn("python=3.11.2", result.log)
        self.assertEqual(s.facts["machine"], "x86_64")
        self.assertEqual(self.host.ran("PORT=", privileged=False), [self.host.commands[0][0]])

    async def test_problems_are_named_together(self) -> None:
        e = await self.check_fails(facts(systemd="no", python="3.8.10"))
        self.assertIn("python3 on the target is 3.8.10", e.message)
        self.assertIn("does not run systemd", e.message)

    async def test_missing_python_and_venv(self) -> None:
        self.assertIn(
            "python3 is not installed", (await self.check_fails(facts(python=""))).message
        )
        self.host = FakeHost()
        e = await self.check_fails(facts(venv="no"))
        self.assertIn("python3-venv", e.message)

    async def test_busy_port_of_a_new_agent_is_redrawn(self) -> None:
        s = await self.session()
        assert s.agent is not None
        old = s.agent.rpc_port
        self.host.reply("PORT=", GOOD_FACTS)
        self.host.reply(f"PORT={old}\n", facts(port="busy"))
        result = await steps.check(s)
        assert s.agent is not None
        self.assertNotEqual(s.agent.rpc_port, old)
        self.assertIn(f"port {old} is busy on the target; assigned {s.agent.rpc_port}", result.log)
        self.assertEqual(await self.store.get_agent_for_server(s.server.id), s.agent)

    async def test_busy_port_of_a_deployed_agent_fails(self) -> None:
        s = await self.session()
        assert s.agent is not None
        await self.store.update_agent(s.agent.id, cert_fingerprint=FP)
        s.agent = await self.store.get_agent(s.agent.id)
        self.host.reply("PORT=", facts(port="busy"))
        with self.assertRaises(InstallError) as e:
            await steps.check(s)
        self.assertIn("a reinstall keeps the agent's port", e.exception.message)

    async def test_non_root_needs_sudo(self) -> None:
        self.host.root = False
        s = await self.session()
        self.host.reply("PORT=", GOOD_FACTS)
        with self.assertRaises(SudoError):
            await steps.check(s)
        s.sudo = Sudo(mode="sudo")
        await steps.check(s)
        self.assertEqual(self.host.ran("true", privileged=True), ["true"])

    async def test_wheelhouse_mode_refuses_an_unusable_platform(self) -> None:
        s = await self.session(dependency_mode="wheelhouse")
        self.host.reply("PORT=", facts(machine="sparc64"))
        with self.assertRaises(BundleError):
            await steps.check(s)


class UploadTests(StepTestCase):
    async def test_uploads_the_agent_files(self) -> None:
        s = await self.session()
        self.host.reply("mktemp", "/tmp/myx-install.abc\n")
        result = await steps.upload(s)
        self.assertEqual(s.staging, remote.Staging("/tmp/myx-install.abc"))
        self.assertEqual(
            sorted(self.host.uploads),
            sorted(f"/tmp/myx-install.abc/agent/{rel}" for rel, _ in FILES.files),
        )
        self.assertTrue(all(u.mode == 0o644 for u in self.host.uploads.values()))
        self.assertIn(
            "mkdir -p /tmp/myx-install.abc/agent/myx_agent"
            " /tmp/myx-install.abc/agent/myx_agent/sub",
            [c for c, _ in self.host.commands],
        )
        self.assertEqual(
            self.host.ran("cp -R", privileged=True),
            [remote.install_agent_files(remote.Staging("/tmp/myx-install.abc"))],
        )
        self.assertIn(f"uploaded 4 files (bundle sha256 {FILES.sha256[:16]})", result.log)

    async def test_no_staging_dir(self) -> None:
        s = await self.session()
        self.host.reply("mktemp", stderr="mktemp: No space left", exit_code=1)
        with self.assertRaises(InstallError) as e:
            await steps.upload(s)
        self.assertEqual(e.exception.stderr, "mktemp: No space left")
        self.assertEqual(self.host.uploads, {})

    async def test_a_failing_root_command_names_its_stderr(self) -> None:
        s = await self.session()
        self.host.reply("mktemp", "/tmp/myx-install.abc\n")
        self.host.reply(
            "cp -R", stderr="cp: cannot create\nmkdir: /opt/myx-agent: Not a dir", exit_code=1
        )
        with self.assertRaises(InstallError) as e:
            await steps.upload(s)
        self.assertEqual(
            e.exception.message,
            "remote command failed with exit status 1: mkdir: /opt/myx-agent: Not a dir",
        )
        self.assertIn("cp: cannot create", e.exception.stderr or "")


class DependenciesTests(StepTestCase):
    async def test_index_mode(self) -> None:
        s = await self.staged()
        result = await steps.dependencies(s)
        stamp = f"index:{FILES.requirements_sha256}"
        self.assertEqual(
            self.host.ran("pip install", privileged=True),
            [remote.install_dependencies(stamp, None)],
        )
        self.assertIn("installed from the package index", result.log)
        self.assertEqual(self.wheelhouse.asked, [])

    async def test_same_requirements_are_skipped(self) -> None:
        s = await self.staged()
        self.host.reply("cat " + remote.REQUIREMENTS_STAMP, f"index:{FILES.requirements_sha256}\n")
        result = await steps.dependencies(s)
        self.assertEqual(result.status, "skipped")
        self.assertEqual(self.host.ran("pip install"), [])

    async def test_wheelhouse_mode_uploads_the_wheels(self) -> None:
        _touch(
            self.base, "a-1-py3-none-any.whl", "b-2-cp311-cp311-manylinux_2_17_x86_64.whl", "x.txt"
        )
        s = await self.staged(dependency_mode="wheelhouse")
        result = await steps.dependencies(s)
        self.assertEqual(self.wheelhouse.asked, [s.target()])
        wheels = {
            p: u for p, u in self.host.uploads.items() if p.startswith(s.need_staging().wheels)
        }
        self.assertEqual(len(wheels), 2)
        self.assertTrue(
            all(u.local_path and u.local_path.startswith(self.base) for u in wheels.values())
        )
        (script,) = self.host.ran("pip install", privileged=True)
        self.assertIn("--no-index --find-links /tmp/myx-install.x/wheels", script)
        self.assertIn(s.target().cache_key(), script)
        self.assertIn("installed from 2 uploaded wheels", result.log)


class ConfigAndServiceTests(StepTestCase):
    async def test_config_is_uploaded_mode_600(self) -> None:
        s = await self.staged(agent_bind="127.0.0.1")
        await steps.config(s)
        upload = self.host.uploads["/tmp/myx-install.x/config.json"]
        self.assertEqual(upload.mode, 0o600)
        assert upload.data is not None and s.agent is not None
        cfg = json.loads(upload.data)
        self.assertEqual((cfg["agent_token"], cfg["bind"]), (s.agent.token, "127.0.0.1"))
        # The secret travels by SFTP only, never in a command.
        self.assertFalse(any(s.agent.token in c for c, _ in self.host.commands))
        self.assertEqual(
            self.host.ran(remote.CONFIG_DIR, privileged=True),
            [remote.install_config(s.need_staging())],
        )

    async def test_service_marks_the_unit_touched(self) -> None:
        s = await self.staged()
        self.host.reply("systemctl restart", exit_code=1, stderr="Job failed")
        with self.assertRaises(InstallError):
            await steps.service(s)
        self.assertTrue(s.service_touched)
        self.assertIn(f"/tmp/myx-install.x/{remote.UNIT_NAME}", self.host.uploads)

    async def test_make_harmless_and_cleanup(self) -> None:
        s = await self.staged()
        await steps.make_harmless(s)
        self.assertEqual(self.host.ran("disable --now", privileged=True), [remote.disable_unit()])
        await steps.cleanup(s)
        self.assertEqual(self.host.ran("rm -rf /tmp/myx-install.x"), ["rm -rf /tmp/myx-install.x"])
        self.assertTrue(self.host.closed)


class WaitTests(StepTestCase):
    def drive(self, d: Deferred[Any], interval: float = 3.0, limit: int = 1000) -> None:
        for _ in range(limit):
            if d.called:
                return
            self.clock.advance(interval)
        self.fail("the wait step never finished")

    async def test_waits_for_the_certificate_and_rpc(self) -> None:
        s = await self.staged(wait_timeout=60)
        answers = iter(["", FP])
        self.host.reply_with("sha256", lambda c: result(c, next(answers, FP)))
        self.rpc.answer(
            "health_check", AgentRPCError("retryable", "connection refused"), {"ok": True}
        )
        d = Deferred.fromCoroutine(steps.wait(s))
        self.drive(d)
        done = self.successResultOf(d)
        self.assertEqual(s.fingerprint, FP)
        self.assertIn("(3 checks)", done.log)
        self.assertEqual([m for _, m, _ in self.rpc.calls], ["health_check", "health_check"])
        self.assertEqual(self.rpc.calls[0][0].fingerprint, FP)

    async def test_a_new_certificate_is_read_again(self) -> None:
        s = await self.staged()
        other = "cd" * 32
        answers = iter([other, FP])
        self.host.reply_with("sha256", lambda c: result(c, next(answers, FP)))
        self.rpc.answer("health_check", CertificateMismatch("changed"), {"ok": True})
        d = Deferred.fromCoroutine(steps.wait(s))
        self.drive(d)
        self.successResultOf(d)
        self.assertEqual([ep.fingerprint for ep, _, _ in self.rpc.calls], [other, FP])
        self.assertEqual(s.fingerprint, FP)

    async def test_timeout_carries_the_journal(self) -> None:
        s = await self.staged(wait_timeout=30, progress_interval=10)
        self.host.reply("journalctl", "myx-agent: starting\n")
        d = Deferred.fromCoroutine(steps.wait(s))
        self.drive(d)
        e = self.failureResultOf(d, InstallError).value
        self.assertEqual(e.step, "wait")
        self.assertIn("did not answer within 30 s", e.message)
        self.assertEqual(e.stderr, "myx-agent: starting")
        self.assertEqual([step for step, _ in self.progress], ["wait", "wait"])
        self.assertIn("waiting for the agent: 12 s, 5 checks", self.progress[0][1])

    async def test_a_crash_looping_agent_fails_early(self) -> None:
        s = await self.staged(wait_timeout=120, progress_interval=10)
        self.host.reply("NRestarts", "4 activating\n")
        self.host.reply("journalctl", "x\nmyx-agent: error: cannot bind 192.0.2.1\n")
        d = Deferred.fromCoroutine(steps.wait(s))
        self.drive(d)
        e = self.failureResultOf(d, InstallError).value
        self.assertEqual(
            e.message,
            "the agent keeps exiting (4 restarts): myx-agent: error: cannot bind 192.0.2.1",
        )
        self.assertLess(self.clock.seconds(), 20)

    async def test_stopping_daemon(self) -> None:
        s = await self.staged()
        self.stopping = True
        with self.assertRaises(InstallError) as e:
            await steps.wait(s)
        self.assertIn("stopping", e.exception.message)


class PinAndSyncTests(StepTestCase):
    async def pinned(self) -> InstallSession:
        s = await self.staged()
        s.fingerprint = FP
        self.host.reply("sha256", FP + "\n")
        return s

    async def test_pin(self) -> None:
        s = await self.pinned()
        assert s.agent is not None
        self.rpc.answer(
            "get_status",
            {
                "cert_fingerprint": ":".join(FP[i : i + 2] for i in range(0, 64, 2)),
                "rpc_port": s.agent.rpc_port,
            },
        )
        result = await steps.pin(s)
        self.assertIn(f"pinned certificate sha256 {FP}", result.log)
        stored = await self.store.get_agent(s.agent.id)
        assert stored is not None
        self.assertEqual(stored.cert_fingerprint, FP)
        self.assertEqual(s.agent, stored)

    async def test_pin_refuses_mismatches(self) -> None:
        s = await self.pinned()
        assert s.agent is not None
        for status, why in (
            (
                {"cert_fingerprint": "ef" * 32, "rpc_port": s.agent.rpc_port},
                "different certificate",
            ),
            ({"cert_fingerprint": FP, "rpc_port": 1}, "not the assigned port"),
        ):
            self.rpc.answers.clear()
            self.rpc.answer("get_status", status)
            with self.assertRaises(InstallError) as e:
                await steps.pin(s)
            self.assertIn(why, e.exception.message)
        self.host.reply("sha256", "cd" * 32)
        with self.assertRaises(InstallError) as e:
            await steps.pin(s)
        self.assertIn("changed while installing", e.exception.message)
        stored = await self.store.get_agent(s.agent.id)
        assert stored is not None
        self.assertEqual(stored.cert_fingerprint, "")

    async def test_sync_tool(self) -> None:
        s = await self.pinned()
        self.rpc.answer("artifact_status", {"present": False, "offset": 0})
        self.rpc.answer("put_artifact_chunk", {"offset": 0, "complete": True, "path": "/c/x"})
        self.rpc.answer("sync_deployment_tool", {"changed": True})
        result = await steps.sync_tool(s)
        self.assertEqual(result.status, "ok")
        (status, chunk, sync) = self.rpc.calls
        self.assertEqual([status[1], chunk[1], sync[1]], list(METHODS_PUSHED))
        params = chunk[2]
        assert isinstance(params, dict)
        # The whole (small) archive in one chunk, hashed and sized as declared.
        archive = base64.b64decode(params["data"])
        self.assertEqual(params["offset"], 0)
        self.assertEqual(params["size"], len(archive))
        self.assertEqual(hashlib.sha256(archive).hexdigest(), params["sha256"])
        self.assertEqual(status[2], {"sha256": params["sha256"], "size": len(archive)})
        # The new form: no inline archive, the agent reads its cache.
        self.assertEqual(sorted(sync[2]), ["sha256", "version"])
        self.assertEqual(sync[2]["sha256"], params["sha256"])
        self.assertIn(f"{len(archive)} sent in chunks", result.log)

        self.rpc.calls.clear()
        self.rpc.answers["artifact_status"] = [{"present": True, "path": "/c/x", "offset": 0}]
        self.rpc.answers["sync_deployment_tool"] = [{"changed": False}]
        self.assertEqual((await steps.sync_tool(s)).status, "skipped")
        self.assertEqual(
            [m for _, m, _ in self.rpc.calls], ["artifact_status", "sync_deployment_tool"]
        )

    async def test_sync_tool_pushes_again_when_evicted_meanwhile(self) -> None:
        s = await self.pinned()
        missing = RemoteError(-32602, "invalid params: sha256: no artifact in the agent's cache")
        self.rpc.answer("artifact_status", {"present": True, "path": "/c/x", "offset": 0})
        self.rpc.answer("sync_deployment_tool", missing, {"changed": True})
        self.assertEqual((await steps.sync_tool(s)).status, "ok")
        self.assertEqual(
            [m for _, m, _ in self.rpc.calls],
            ["artifact_status", "sync_deployment_tool"] * 2,
        )
        # Twice missing is an error, not a loop.
        self.rpc.calls.clear()
        self.rpc.answers["sync_deployment_tool"] = [missing]
        with self.assertRaises(RemoteError):
            await steps.sync_tool(s)
        self.assertEqual(len(self.rpc.calls), 4)

    async def test_sync_tool_refused_push_is_an_install_error(self) -> None:
        s = await self.pinned()
        self.rpc.answer("artifact_status", RemoteError(-32011, "artifact too large"))
        with self.assertRaises(InstallError) as e:
            await steps.sync_tool(s)
        self.assertEqual(e.exception.step, "sync_tool")
        self.assertIn("pushing the deployment tool", e.exception.message)
        self.assertNotIn("sync_deployment_tool", [m for _, m, _ in self.rpc.calls])


METHODS_PUSHED = ("artifact_status", "put_artifact_chunk", "sync_deployment_tool")


class UninstallStepTests(StepTestCase):
    async def test_stop_and_remove(self) -> None:
        s = await self.session()
        await steps.stop(s)
        await steps.remove(s)
        self.assertEqual(
            [c for c, _ in self.host.commands], [remote.uninstall_unit(), remote.uninstall_files()]
        )
        self.assertTrue(all(root for _, root in self.host.commands))


class AgentFilesCacheTests(unittest.TestCase):
    def test_read_once_and_failures_not_kept(self) -> None:
        reads: list[int] = []

        def read() -> AgentFiles:
            reads.append(1)
            if len(reads) == 1:
                raise BundleError("requirements.txt is missing")
            return FILES

        cache = AgentFilesCache(read)
        self.assertRaises(BundleError, cache)
        self.assertIs(cache(), FILES)
        self.assertIs(cache(), FILES)
        self.assertEqual(len(reads), 2)
