"""DeploymentService on a real SQLite store with a scripted command queue and
pusher: batches, max_failures, cancel, resume after a restart, and outcomes
read from ansible's stats and log. The real-agent path is in tests/deploy."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from myxd.artifacts.store import ArtifactStore
from myxd.deploy.reports import failing_task
from myxd.deploy.service import DeploymentInputError, DeploymentService
from myxd.deploy.transfer import PushResult
from myxd.fleet.commands import CommandUpdate
from tests.daemon.test_store import StoreTestBase, d

FAIL_LOG = (
    "PLAY [Deploy Xray] ***\n\n"
    "TASK [Write the config] ****************************************************\n"
    "ok: [localhost]\n\n"
    "TASK [Wait for the inbound ports] *******************************************\n"
    'fatal: [localhost]: FAILED! => {"changed": false, "elapsed": 10, '
    '"msg": "Timeout when waiting for 127.0.0.1:4444"}\n\n'
    "PLAY RECAP *******\n"
)


def stats(ok: int, changed: int, failures: int) -> dict[str, Any]:
    return {
        "ok": {"localhost": ok},
        "changed": {"localhost": changed},
        "failures": {"localhost": failures} if failures else {},
        "dark": {},
    }


class ScriptedQueue:
    """Creates real command records; the test decides when and how each ends."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.ansible: list[tuple[int, str, dict[str, Any], str | None]] = []
        self.commands: list[tuple[int, str, list[str]]] = []
        self.cancelled: list[int] = []
        self.subs: dict[int, list[Callable[[Any], Any]]] = {}
        self.started: dict[int, int] = {}  # agent id -> command id of its run
        self.check_output: Callable[[int], str] = lambda agent_id: ""

    async def add_ansible(
        self,
        agent_id: int,
        playbook: str,
        extra_vars: Mapping[str, Any],
        timeout: float | None,
        *,
        actor: str = "api",
        command_uid: str | None = None,
    ) -> Any:
        rec = await self.store.create_command(
            agent_id=agent_id,
            kind="ansible",
            command=playbook,
            args=[],
            timeout=timeout,
            command_uid=command_uid,
        )
        self.ansible.append((agent_id, playbook, dict(extra_vars), command_uid))
        self.started[agent_id] = rec.id
        return rec

    async def add_command(
        self,
        agent_id: int,
        command: str,
        args: Sequence[str],
        timeout: float | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        actor: str = "api",
    ) -> Any:
        rec = await self.store.create_command(
            agent_id=agent_id, kind="command", command=command, args=list(args), timeout=timeout
        )
        self.commands.append((agent_id, command, list(args)))
        await self.end(rec.id, "success", {"success": True}, self.check_output(agent_id))
        return rec

    async def cancel(self, command_id: int, *, actor: str = "api") -> Any:
        self.cancelled.append(command_id)
        await self.end(
            command_id,
            "failed",
            {"success": False, "ansible": {"status": "canceled", "stats": stats(1, 0, 0)}},
            "cancelled\n",
        )
        return await self.store.get_command(command_id)

    def subscribe(self, command_id: int, callback: Callable[[Any], Any]) -> Callable[[], None]:
        self.subs.setdefault(command_id, []).append(callback)
        return lambda: self.subs[command_id].remove(callback)

    async def end(self, command_id: int, status: str, result: dict[str, Any], log: str) -> None:
        data = log.encode()
        if data:
            await self.store.append_output(command_id, 0, "stdout", data)
        await self.store.update_command(
            command_id, status=status, result=result, reason=None if status == "success" else "x"
        )
        for cb in list(self.subs.get(command_id, [])):
            cb(CommandUpdate(command_id, len(data), status, True))

    async def succeed(self, agent_id: int) -> None:
        await self.end(
            self.started[agent_id],
            "success",
            {"success": True, "ansible": {"status": "successful", "stats": stats(9, 3, 0)}},
            "PLAY RECAP\n",
        )

    async def fail(self, agent_id: int) -> None:
        await self.end(
            self.started[agent_id],
            "failed",
            {"success": False, "ansible": {"status": "failed", "stats": stats(4, 1, 1)}},
            FAIL_LOG,
        )


class ScriptedPusher:
    def __init__(self) -> None:
        self.pushes: list[tuple[int, str]] = []
        self.gate: Deferred[None] | None = None  # set: pushes wait for it

    async def push(self, ep: Any, path: str, sha256: str, size: int, progress: Any = None) -> Any:
        self.pushes.append((ep.port, sha256))
        if self.gate is not None:
            await self.gate
        return PushResult(f"/var/lib/myx-agent/artifacts/{sha256}", size, 0, False)


class DeploymentServiceTests(StoreTestBase):
    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        return d(self._setUp())

    async def _setUp(self) -> None:
        await super().setUp()
        self.artifacts = ArtifactStore(os.path.join(self.dir, "artifacts"), 1 << 20, reactor)
        self.art = await self.artifacts.ingest(io.BytesIO(b"release bytes"), "Xray.zip")
        self.agents = [await self.agent(21000 + i) for i in range(4)]
        self.deployer = self.make()

    def make(self) -> DeploymentService:
        self.queue = ScriptedQueue(self.store)
        self.pusher = ScriptedPusher()
        svc = DeploymentService(
            self.store,
            self.queue,
            self.artifacts,
            self.pusher,  # type: ignore[arg-type]
            lambda: ["deploy_xray.yml", "ping.yml"],
        )
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    async def wait(self, what: str, probe: Callable[[], Any]) -> Any:
        for _ in range(2000):
            value = await probe()
            if value:
                return value
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")

    async def running(self, agent_id: int) -> None:
        await self.wait(f"agent {agent_id} to run", lambda: _now(agent_id in self.queue.started))

    async def final(self, dep_id: int) -> Any:
        async def probe() -> Any:
            rec = await self.store.deployments.get_deployment(dep_id)
            return rec if rec.status in ("success", "partial", "failed", "cancelled") else None

        return await self.wait(f"deployment {dep_id} to finish", probe)

    def by_agent(self, rec: Any) -> dict[int, Any]:
        return {t.agent_id: t for t in rec.targets}

    def test_all_at_once_partial_with_reason_and_artifact_paths(self) -> Deferred[Any]:
        async def go() -> None:
            a, b, c = self.agents[:3]
            rec = await self.deployer.create(
                playbook="deploy_xray.yml",
                agents=[a, b, c],
                vars={"xray_version": "1.8.24"},
                artifacts={"xray_archive_path": self.art.id},
            )
            for aid in (a, b, c):
                await self.running(aid)
            await self.queue.succeed(a)
            await self.queue.fail(b)
            await self.queue.succeed(c)
            done = await self.final(rec.id)
            self.assertEqual(done.status, "partial")
            t = self.by_agent(done)
            self.assertEqual([t[x].status for x in (a, b, c)], ["success", "failed", "success"])
            self.assertEqual((t[a].ok, t[a].changed, t[a].failed), (9, 3, 0))
            self.assertEqual(t[b].failed, 1)
            self.assertEqual(
                t[b].reason, "Wait for the inbound ports: Timeout when waiting for 127.0.0.1:4444"
            )
            self.assertEqual(t[a].bytes_sent, self.art.size)
            # The artifact's path on the agent replaced its id in vars.
            for _aid, playbook, extra, uid in self.queue.ansible:
                self.assertEqual(playbook, "deploy_xray.yml")
                self.assertEqual(
                    extra["xray_archive_path"], f"/var/lib/myx-agent/artifacts/{self.art.id}"
                )
                self.assertEqual(extra["xray_version"], "1.8.24")
                self.assertIn(uid, {x.command_uid for x in done.targets})
            # A success refreshes the services (check_service.py), a failure does not.
            self.assertEqual(sorted(x[0] for x in self.queue.commands), sorted([a, c]))

        return d(go())

    def test_batches_and_max_failures_skip_the_rest(self) -> Deferred[Any]:
        async def go() -> None:
            a, b, c, e = self.agents
            rec = await self.deployer.create(
                playbook="ping.yml", agents=[a, b, c, e], batch_size=2, max_failures=1
            )
            await self.running(a)
            await self.running(b)
            # The second batch waits for the first.
            self.assertEqual(sorted(self.queue.started), sorted([a, b]))
            await self.queue.succeed(a)
            await self.queue.fail(b)
            done = await self.final(rec.id)
            self.assertEqual(done.status, "partial")
            t = self.by_agent(done)
            self.assertEqual([t[x].status for x in (c, e)], ["skipped", "skipped"])
            self.assertIn("max_failures 1", t[c].reason)
            self.assertNotIn(c, self.queue.started)

        return d(go())

    def test_rolling_one_at_a_time_in_order(self) -> Deferred[Any]:
        async def go() -> None:
            a, b, c = self.agents[:3]
            rec = await self.deployer.create(playbook="ping.yml", agents=[c, a, b], batch_size=1)
            for aid in (c, a, b):
                await self.running(aid)
                self.assertEqual(
                    list(self.queue.started), [x for x in (c, a, b)][: len(self.queue.started)]
                )
                await self.queue.succeed(aid)
            done = await self.final(rec.id)
            self.assertEqual(done.status, "success")
            self.assertEqual([t.agent_id for t in done.targets], [c, a, b])

        return d(go())

    def test_cancel_stops_new_targets_and_cancels_running_ones(self) -> Deferred[Any]:
        async def go() -> None:
            a, b, c = self.agents[:3]
            rec = await self.deployer.create(playbook="ping.yml", agents=[a, b, c], batch_size=2)
            await self.running(a)
            await self.running(b)
            await self.queue.succeed(a)
            await self.wait(
                "a to succeed", lambda: _target_status(self.store, rec.id, a, "success")
            )
            got = await self.deployer.cancel(rec.id)
            self.assertEqual(self.queue.cancelled, [self.queue.started[b]])
            done = await self.final(rec.id)
            self.assertEqual(done.status, "cancelled")
            t = self.by_agent(done)
            self.assertEqual(
                [t[x].status for x in (a, b, c)], ["success", "cancelled", "cancelled"]
            )
            self.assertNotIn(c, self.queue.started)
            self.assertIn(got.status, ("running", "cancelled"))

        return d(go())

    def test_cancel_during_the_transfer_starts_no_run(self) -> Deferred[Any]:
        async def go() -> None:
            a = self.agents[0]
            self.pusher.gate = Deferred()
            rec = await self.deployer.create(
                playbook="ping.yml", agents=[a], artifacts={"archive": self.art.id}
            )
            await self.wait("the push", lambda: _now(self.pusher.pushes))
            await self.deployer.cancel(rec.id)
            self.pusher.gate.callback(None)
            done = await self.final(rec.id)
            self.assertEqual(done.status, "cancelled")
            self.assertEqual(done.targets[0].status, "cancelled")
            self.assertEqual(self.queue.ansible, [])

        return d(go())

    def test_resume_waits_for_an_existing_command_and_starts_the_rest(self) -> Deferred[Any]:
        async def go() -> None:
            a, b = self.agents[:2]
            rec = await self.deployer.create(playbook="ping.yml", agents=[a, b], batch_size=1)
            await self.running(a)
            first_cmd = self.queue.started[a]
            # The daemon stops while a's run is going on.
            await self.deployer.stopService()
            mid = await self.store.deployments.get_deployment(rec.id)
            self.assertEqual(mid.status, "running")
            self.assertEqual([t.status for t in mid.targets], ["running", "pending"])
            old_queue = self.queue
            # A new daemon: a's command exists by its uid, so it is waited for.
            self.deployer = self.make()
            self.queue.started[a] = first_cmd
            await deferLater(reactor, 0.2, lambda: None)
            self.assertEqual(self.queue.ansible, [], "a's run must not be created again")
            await self.queue.succeed(a)
            await self.running(b)
            await self.queue.succeed(b)
            done = await self.final(rec.id)
            self.assertEqual(done.status, "success")
            self.assertEqual([x[0] for x in old_queue.ansible + self.queue.ansible], [a, b])
            self.assertEqual(self.by_agent(done)[a].command_id, first_cmd)

        return d(go())

    def test_resume_after_a_crash_between_command_and_target_update(self) -> Deferred[Any]:
        """The command was created (by its reserved uid) but the target still reads
        ``pending``: the resumed deployment adopts the command, it does not run twice."""

        async def go() -> None:
            a = self.agents[0]
            await self.deployer.stopService()
            rec = await self.store.deployments.create_deployment(
                playbook="ping.yml",
                vars={},
                artifacts={},
                agent_ids=[a],
                batch_size=None,
                max_failures=None,
                timeout=60.0,
                actor="test",
            )
            uid = rec.targets[0].command_uid
            cmd = await self.store.create_command(
                agent_id=a, kind="ansible", command="ping.yml", args=[], timeout=60.0,
                command_uid=uid,
            )  # fmt: skip
            self.deployer = self.make()
            self.queue.started[a] = cmd.id
            await self.wait(
                "the target to adopt its command",
                lambda: _target_command(self.store, rec.id, a),
            )
            await self.queue.succeed(a)
            done = await self.final(rec.id)
            self.assertEqual(done.status, "success")
            self.assertEqual(self.queue.ansible, [])
            self.assertEqual(done.targets[0].command_id, cmd.id)

        return d(go())

    def test_validation_names_the_field_and_stores_nothing(self) -> Deferred[Any]:
        async def go() -> None:
            a = self.agents[0]
            cases: list[tuple[str, dict[str, Any]]] = [
                ("playbook", dict(playbook="nope.yml", agents=[a])),
                ("agents", dict(playbook="ping.yml", agents=[99999])),
                ("agents", dict(playbook="ping.yml", agents=[])),
                ("agents", dict(playbook="ping.yml", agents=[a, a])),
                ("vars", dict(playbook="ping.yml", agents=[a], vars=["x"])),
                ("vars", dict(playbook="ping.yml", agents=[a], vars={"bad-name": 1})),
                ("artifacts", dict(playbook="ping.yml", agents=[a], artifacts={"v": "0" * 64})),
                ("batch_size", dict(playbook="ping.yml", agents=[a], batch_size=0)),
                ("max_failures", dict(playbook="ping.yml", agents=[a], max_failures=0)),
                ("timeout", dict(playbook="ping.yml", agents=[a], timeout=-1)),
            ]
            for field, kw in cases:
                with self.assertRaises(DeploymentInputError) as cm:
                    await self.deployer.create(**kw)
                self.assertEqual(cm.exception.field, field, kw)
            self.assertEqual(await self.store.deployments.list_deployments(), [])
            self.assertEqual(self.queue.ansible, [])

        return d(go())

    def test_refresh_services_stores_check_service_output(self) -> Deferred[Any]:
        async def go() -> None:
            a = self.agents[0]
            self.queue.check_output = lambda agent_id: (
                json.dumps(
                    {
                        "service": "xray",
                        "installed_versions": ["1.8.24"],
                        "active_version": "1.8.24",
                        "unit": {"active_state": "active", "sub_state": "running"},
                        "config_sha256": "c" * 64,
                    }
                )
                + "\n"
                + json.dumps({"service": "caddy", "unit": {"active_state": "inactive"}})
                + "\n"
            )
            services = await self.deployer.refresh_services(a)
            self.assertEqual(services["xray"]["active_version"], "1.8.24")
            rows = {r.service: r for r in await self.store.deployments.list_services(a)}
            self.assertTrue(rows["xray"].active)
            self.assertEqual(rows["xray"].config_sha256, "c" * 64)
            self.assertEqual(rows["xray"].unit_state, "active/running")
            self.assertFalse(rows["caddy"].active)

        return d(go())


class FailingTaskTests(TestCase):
    def test_last_fatal_with_its_task(self) -> None:
        self.assertEqual(
            failing_task(FAIL_LOG),
            "Wait for the inbound ports: Timeout when waiting for 127.0.0.1:4444",
        )
        self.assertIsNone(failing_task("TASK [x] ***\nok: [localhost]\n"))

    def test_colours_are_ignored(self) -> None:
        coloured = "\x1b[0;31m" + FAIL_LOG.replace("\n", "\x1b[0m\n\x1b[0;31m") + "\x1b[0m"
        self.assertEqual(
            failing_task(coloured),
            "Wait for the inbound ports: Timeout when waiting for 127.0.0.1:4444",
        )


async def _now(value: Any) -> Any:
    return value


async def _target_command(store: Any, dep_id: int, agent_id: int) -> Any:
    rec = await store.deployments.get_deployment(dep_id)
    return {t.agent_id: t for t in rec.targets}[agent_id].command_id


async def _target_status(store: Any, dep_id: int, agent_id: int, status: str) -> bool:
    rec = await store.deployments.get_deployment(dep_id)
    return bool({t.agent_id: t for t in rec.targets}[agent_id].status == status)
