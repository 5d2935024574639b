"""The deployment and artifact routes on a real in-process myxd with a real agent
process: validation (400 naming the field, nothing created), uploads (422, 413,
401 before the body), and DELETE of an artifact a running deployment uses (409).
Deployments on real hosts are in tests/deploy."""

from __future__ import annotations

import functools
import hashlib
import os
import signal
from typing import Any

import treq
from twisted.web import http

from myxd.config import Settings
from tests.daemon import daemon_harness
from tests.daemon.api_helpers import AUTH
from tests.daemon.daemon_harness import DaemonTestCase
from tests.support.agent_process import start_agent

LIMIT = 64 * 1024


class DeploymentAPITests(DaemonTestCase):
    async def upload(self, data: bytes, query: str, auth: bool = True) -> tuple[int, Any]:
        headers = {b"Content-Type": [b"application/octet-stream"]}
        if auth:
            headers.update(AUTH)
        response = await treq.post(
            f"{self.daemon.base}/api/artifacts?{query}",
            data=data,
            headers=headers,  # type: ignore[arg-type]
            pool=self.pool,
        )
        return response.code, await treq.json_content(response)

    def artifact_files(self) -> list[str]:
        root = os.path.join(self.data_dir, "artifacts")
        out = []
        for dirpath, _dirs, files in os.walk(root):
            out += [os.path.join(dirpath, f) for f in files]
        return sorted(out)

    async def test_validation_names_the_field_and_creates_nothing(self) -> None:
        await self.daemon.start()
        agent = await start_agent(self)
        aid = await self.adopt(agent)
        code, art = await self.upload(b"release", "name=x.zip")
        self.assertEqual(code, 201, art)
        good: dict[str, Any] = {"playbook": "ping.yml", "agents": [aid]}
        cases: list[tuple[str, dict[str, Any]]] = [
            ("playbook", {"playbook": "nope.yml"}),
            ("agents", {"agents": [aid + 100]}),
            ("agents", {"agents": "some"}),
            ("vars", {"vars": ["not", "an", "object"]}),
            ("vars", {"vars": "x=1"}),
            ("artifacts", {"artifacts": {"xray_archive_path": "0" * 64}}),
            ("artifacts", {"artifacts": {"xray_archive_path": "not-an-id"}}),
            ("batch_size", {"batch_size": 0}),
            ("max_failures", {"max_failures": 0}),
        ]
        for field, change in cases:
            code, body = await self.api("POST", "/api/deployments", {**good, **change})
            self.assertEqual(code, 400, (change, body))
            # The field, or a part of it ("artifacts.xray_archive_path").
            self.assertIn(
                body.get("field"),
                (
                    field,
                    *(
                        f"{field}.{k}"
                        for k in (change[field] if isinstance(change[field], dict) else ())
                    ),
                ),
                (change, body),
            )
            self.assertIn(field, body["error"], body)
        code, page = await self.api("GET", "/api/deployments")
        self.assertEqual((code, page["deployments"]), (200, []), page)
        code, cmds = await self.api("GET", f"/api/agents/{aid}/commands")
        self.assertEqual(cmds["commands"], [], cmds)

    async def test_delete_of_an_artifact_in_use_is_refused(self) -> None:
        await self.daemon.start()
        agent = await start_agent(self)
        aid = await self.adopt(agent)
        code, art = await self.upload(b"release bytes", "name=r.zip")
        self.assertEqual(code, 201, art)
        # The agent is stopped (SIGSTOP): the transfer cannot finish, so the
        # deployment stays unfinished while the DELETE comes in.
        os.kill(agent.pid, signal.SIGSTOP)
        self.addCleanup(_cont, agent.pid)
        code, dep = await self.api(
            "POST",
            "/api/deployments",
            {"playbook": "ping.yml", "agents": [aid], "artifacts": {"archive": art["id"]}},
        )
        self.assertEqual(code, 201, dep)
        code, body = await self.api("DELETE", f"/api/artifacts/{art['id']}")
        self.assertEqual(code, 409, body)
        self.assertIn(str(dep["id"]), body["error"])
        code, _ = await self.api("GET", f"/api/artifacts/{art['id']}")
        self.assertEqual(code, 200)
        # Once it is over (cancelled), the artifact can go.
        code, body = await self.api("POST", f"/api/deployments/{dep['id']}/cancel")
        self.assertEqual(code, 200, body)
        _cont(agent.pid)
        await self.until(
            lambda: self.api("GET", f"/api/deployments/{dep['id']}"),
            lambda r: r[1]["status"] in ("cancelled", "failed"),
            "the deployment to end",
            interval=0.2,
        )
        code, body = await self.api("DELETE", f"/api/artifacts/{art['id']}")
        self.assertEqual((code, body), (200, {"deleted": True, "id": art["id"]}))

    async def test_uploads_refused_keep_nothing(self) -> None:
        await self.daemon.start()
        data = os.urandom(4096)
        sha = hashlib.sha256(data).hexdigest()
        # Wrong sha256: 422, nothing kept.
        code, body = await self.upload(data, f"name=a.zip&sha256={'0' * 64}")
        self.assertEqual(code, 422, body)
        self.assertEqual([f for f in self.artifact_files() if sha in f], [])
        code, page = await self.api("GET", "/api/artifacts")
        self.assertEqual(page["artifacts"], [])
        # The right one is kept.
        code, body = await self.upload(data, f"name=a.zip&sha256={sha}")
        self.assertEqual((code, body["id"], body["size"]), (201, sha, 4096), body)
        # Unauthenticated and large: 401, and the body is never spooled to a file
        # (Twisted spools large bodies with tempfile.TemporaryFile: count them).
        spooled: list[int] = []
        real = http.tempfile.TemporaryFile

        def counting(*a: Any, **kw: Any) -> Any:
            spooled.append(1)
            return real(*a, **kw)

        self.patch(http.tempfile, "TemporaryFile", counting)
        big = os.urandom(4 << 20)
        code, body = await self.upload(big, "name=big.zip", auth=False)
        self.assertEqual(code, 401, body)
        self.assertEqual(spooled, [])
        # The same body with the token is spooled (the count sees it) and kept.
        code, body = await self.upload(big, "name=big.zip")
        self.assertEqual((code, body["size"]), (201, 4 << 20), body)
        self.assertEqual(spooled, [1])

    async def in_thread(self, f: Any, *args: Any) -> Any:
        from twisted.internet import threads

        return await threads.deferToThread(f, *args)


class ArtifactLimitTests(DaemonTestCase):
    async def test_over_artifact_max_bytes_is_413_and_keeps_nothing(self) -> None:
        # The harness builds its Settings by name: give them a small artifact limit.
        self.patch(
            daemon_harness, "Settings", functools.partial(Settings, artifact_max_bytes=LIMIT)
        )
        await self.daemon.start()
        response = await treq.post(
            f"{self.daemon.base}/api/artifacts?name=big.zip",
            data=os.urandom(LIMIT + 1),
            headers={**AUTH, b"Content-Type": [b"application/octet-stream"]},  # type: ignore[arg-type]
            pool=self.pool,
        )
        body = await treq.json_content(response)
        self.assertEqual(response.code, 413, body)
        code, page = await self.api("GET", "/api/artifacts")
        self.assertEqual(page["artifacts"], [])
        root = os.path.join(self.data_dir, "artifacts")
        left = [f for _d, _s, fs in os.walk(root) for f in fs]
        self.assertEqual(left, [])


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
