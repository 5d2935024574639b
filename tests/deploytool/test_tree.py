"""The deployment-tool tree itself: ansible-lint (production profile), syntax
checks with no warning, and the scripts that need no host.

ansible-lint and ansible-playbook run as child processes (never blocking the
reactor), with this checkout's venv, on a copy-free read of deployment-tool/.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile

from twisted.internet import reactor
from twisted.trial import unittest

from tests.support.testhost import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "deployment-tool")
BIN = os.path.dirname(sys.executable)
PLAYBOOKS = sorted(n for n in os.listdir(os.path.join(TOOL, "playbooks")) if n.endswith(".yml"))


class TreeTests(unittest.TestCase):
    timeout = 600

    def test_tree_has_what_the_issue_names(self) -> None:
        self.assertEqual(
            PLAYBOOKS,
            [
                "deploy_caddy.yml",
                "deploy_xray.yml",
                "deploy_xray_config.yml",
                "deploy_xray_docker.yml",
                "ping.yml",
                "rollback_xray.yml",
            ],
        )
        for name in ("deploy_xray.py", "deploy_caddy.py", "check_service.py", "install_ansible.sh"):
            path = os.path.join(TOOL, "scripts", name)
            self.assertTrue(os.access(path, os.X_OK), path)
        for name in ("VERSION", "README.md", "ansible.cfg", "inventory/localhost.ini"):
            self.assertTrue(os.path.isfile(os.path.join(TOOL, name)), name)

    async def test_ansible_lint_production_profile(self) -> None:
        out = await run(
            reactor,
            [
                os.path.join(BIN, "ansible-lint"),
                "--profile",
                "production",
                "--nocolor",
                "playbooks",
            ],
            path=TOOL,
            check=False,
        )
        self.assertIn("Profile 'production' was required, and it passed", out, out[-4000:])
        self.assertIn("0 failure(s), 0 warning(s)", out)

    async def test_syntax_check_without_warnings(self) -> None:
        for name in PLAYBOOKS:
            out = await run(
                reactor,
                [
                    "/usr/bin/env",
                    f"ANSIBLE_CONFIG={TOOL}/ansible.cfg",
                    "ANSIBLE_NOCOLOR=1",
                    os.path.join(BIN, "ansible-playbook"),
                    "--syntax-check",
                    f"playbooks/{name}",
                ],
                path=TOOL,
            )
            self.assertIn(f"playbook: playbooks/{name}", out)
            self.assertNotIn("WARNING", out.replace("PATH altered", ""), out)
            self.assertNotIn("DEFAULT_LOG_PATH", out)

    def make_zips(self) -> tuple[str, str, str]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        good = os.path.join(base, "good.zip")
        with zipfile.ZipFile(good, "w") as zf:
            zf.writestr("xray", "#!/bin/sh\n")
            zf.writestr("geoip.dat", "x")
        bad = os.path.join(base, "bad.zip")
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("geoip.dat", "x")
        return base, good, bad

    async def test_unpack_zip_is_all_or_nothing(self) -> None:
        base, good, bad = self.make_zips()
        script = os.path.join(TOOL, "scripts", "unpack_zip.py")
        await run(reactor, [sys.executable, script, good, os.path.join(base, "v1"), "xray"])
        self.assertTrue(os.access(os.path.join(base, "v1", "xray"), os.X_OK))
        out = await run(
            reactor, [sys.executable, script, bad, os.path.join(base, "v2"), "xray"], check=False
        )
        self.assertIn("has no xray", out)
        self.assertEqual(sorted(os.listdir(base)), ["bad.zip", "good.zip", "v1"])

    async def test_check_service_usage_error_is_one_json_line(self) -> None:
        script = os.path.join(TOOL, "scripts", "check_service.py")
        out = await run(reactor, [sys.executable, script, "bad name;"], check=False)
        self.assertEqual(json.loads(out), {"error": "usage: check_service.py NAME [NAME ...]"})
