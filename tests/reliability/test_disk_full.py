"""Full disk (issue #12 §2): the daemon's data dir on a small tmpfs, filled up.

A real ``twistd -n myxd`` from the wheel's venv keeps its SQLite store on a
4 MiB tmpfs mounted for the test (needs root, as the systemd test hosts do).
With the tmpfs filled to the last byte, a write through the admin API fails
with 507 and a message that says the disk is full; reads keep answering 200,
the daemon stays up through heartbeats that cannot be stored, ``PRAGMA
integrity_check`` is ``ok``, and once the filler is removed writes succeed
again without a restart.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from twisted.logger import Logger

from myxd.tap import DB_FILE_NAME
from tests.reliability.test_process_faults import TwistdTestCase, integrity
from tests.support.agent_process import start_agent

log = Logger()


def fill(path: str) -> int:
    """Write zeros to ``path`` until the filesystem refuses; the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk) or 0
            except OSError:
                break
        # The last few hundred bytes: a smaller block may still fit.
        for size in (4096, 512, 1):
            while True:
                try:
                    written += f.write(b"\0" * size) or 0
                except OSError:
                    break
    return written


def mount_tmpfs(test: Any, size: str) -> str:
    """A tmpfs of ``size`` on a new temp dir of ``test``, unmounted in its cleanup."""
    mount: str = test.temp_dir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs", mount], check=True
    )
    test.addCleanup(subprocess.run, ["umount", "-l", mount], check=True)
    return mount


class DaemonDiskFullTests(TwistdTestCase):
    async def test_full_data_dir(self) -> None:
        self.root = self.temp_dir()
        self.addCleanup(self.pool.closeCachedConnections)
        self.data_dir = os.path.join(mount_tmpfs(self, "4m"), "data")
        os.makedirs(self.data_dir)
        proto, _ = await self.start()
        agent = await start_agent(self)
        agent_id = await self.adopt(agent)
        code, body = await self.api(
            "POST", f"/api/agents/{agent_id}/commands", {"command": "echo", "args": ["before"]}
        )
        self.assertEqual(code, 201, body)
        before_id = int(body["id"])
        self.assertEqual((await self.wait_final(before_id))["status"], "success")

        filler = os.path.join(self.data_dir, "filler")
        filled = fill(filler)
        self.assertGreater(filled, 0)

        async def write() -> tuple[int, Any]:
            return await self.api(
                "POST",
                f"/api/agents/{agent_id}/commands",
                {"command": "echo", "args": ["while full"]},
            )

        # SQLite may still place a page or two in free space of its own files:
        # write until it cannot (a bounded number of tries), then every write
        # must be a 507.
        refused = None
        for _ in range(50):
            code, body = await write()
            if code != 201:
                refused = (code, body)
                break
        self.assertIsNotNone(refused, "50 writes fitted on a full disk")
        assert refused is not None
        self.assertEqual(refused[0], 507, refused[1])
        self.assertIn("full", refused[1]["error"])
        self.assertNotIn("Traceback", str(refused[1]))
        # The answer is the one the API document declares for this operation.
        code, doc = await self.api("GET", "/api/openapi.json")
        self.assertEqual(code, 200)
        declared = doc["paths"]["/api/agents/{agent_id}/commands"]["post"]["responses"]
        self.assertIn("507", declared)
        for path in ("/api/agents", f"/api/agents/{agent_id}", f"/api/commands/{before_id}"):
            code, body = await self.api("GET", path)
            self.assertEqual(code, 200, (path, body))
        self.assertEqual(await self.read_all(before_id), b"before\n")
        # Heartbeat cycles run (and fail to store) while the disk is full.
        mark = len(proto.text)
        await self.until(
            lambda: self.api("GET", "/api/health"),
            lambda r: "full" in proto.text[mark:],
            "a heartbeat cycle on the full disk",
        )
        code, body = await write()
        self.assertEqual(code, 507, body)
        self.assertIsNone(proto.reason, "myxd exited on a full disk")
        self.assertEqual(integrity(os.path.join(self.data_dir, DB_FILE_NAME)), "ok")

        os.unlink(filler)
        code, body = await write()
        self.assertEqual(code, 201, body)
        final = await self.wait_final(int(body["id"]))
        self.assertEqual(final["status"], "success", final)
        self.assertEqual(await self.read_all(int(body["id"])), b"while full\n")
        self.assertIsNone(proto.reason)
        self.assertEqual(integrity(os.path.join(self.data_dir, DB_FILE_NAME)), "ok")
        log.info(
            "fault figures: full disk, {filled} filler bytes, writes 507, reads 200", filled=filled
        )
