"""The wheel carries everything the installer reads, and the check for it can fail.

``missing_files`` compares what the installed package holds with the source
tree: every agent module the installer uploads, ``myx_agent/requirements.txt``,
every file of the web console under ``myxd/api/static/`` (its ES modules under
``views/`` and ``vendor/`` code with its LICENSE and README), and every file of
``deployment-tool/`` (whatever its name or depth, byte for byte, with its
executable bit). The installed daemon's own bundle code must
also build the same agent files and the same deployment-tool archive as the
source tree gives.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from myxd.install.bundle import agent_modules, deployment_tool_archive
from tests.support import installed

SOURCE_TOOL = os.path.join(installed.REPO_ROOT, "deployment-tool")
SOURCE_AGENT = os.path.join(installed.REPO_ROOT, "myx_agent")
# The web console's files, served from the installed package (myxd/api/console.py).
STATIC = "myxd/api/static"
# What the deployment-tool archive leaves out; everything else must be shipped.
SKIPPED_DIRS = ("__pycache__", ".git")
SKIPPED_SUFFIXES = (".pyc", ".retry")

BUNDLE_REPORT = """
import hashlib, json, sys
from myxd.install import bundle
files = bundle.agent_files()
archive, digest, version = bundle.deployment_tool_archive()
json.dump({
    "agent_dir": bundle.agent_package_dir(),
    "tool_dir": bundle.deployment_tool_dir(),
    "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in files.files},
    "tool_sha256": digest,
    "tool_version": version,
}, sys.stdout)
"""


def source_tool_files(tool_dir: str) -> dict[str, bool]:
    """Relative path -> executable, for every file the deployment tool consists of."""
    out: dict[str, bool] = {}
    for dirpath, dirnames, filenames in os.walk(tool_dir):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, tool_dir)] = os.access(full, os.X_OK)
    return out


def source_static_files(source_root: str) -> list[str]:
    """Paths (relative to the source root) of every file of the web console."""
    top = os.path.join(source_root, STATIC)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), source_root))
    return sorted(out)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def missing_files(source_root: str, venv: str) -> list[str]:
    """What the installed package lacks (or holds differently) compared with the source."""
    site = installed.purelib(venv)
    problems: list[str] = []
    agent_src = os.path.join(source_root, "myx_agent")
    wanted = [
        *agent_modules(agent_src),
        "myx_agent/requirements.txt",
        *source_static_files(source_root),
    ]
    for rel in wanted:
        got = os.path.join(site, rel)
        if not os.path.isfile(got):
            problems.append(f"{rel}: missing")
        elif read(got) != read(os.path.join(source_root, rel)):
            problems.append(f"{rel}: differs")
    tool_src = os.path.join(source_root, "deployment-tool")
    for rel, executable in sorted(source_tool_files(tool_src).items()):
        got = os.path.join(site, "myx_deployment_tool", rel)
        name = f"deployment-tool/{rel}"
        if not os.path.isfile(got):
            problems.append(f"{name}: missing")
        elif read(got) != read(os.path.join(tool_src, rel)):
            problems.append(f"{name}: differs")
        elif os.access(got, os.X_OK) != executable:
            problems.append(f"{name}: executable bit differs")
    return problems


class WheelContentsTests(unittest.TestCase):
    timeout = 600

    def test_installed_package_has_everything_the_installer_reads(self) -> None:
        venv = installed.venv()
        self.assertEqual(missing_files(installed.REPO_ROOT, venv), [])
        # The tree is not empty: the check compared real files.
        self.assertIn("playbooks/ping.yml", source_tool_files(SOURCE_TOOL))
        static = source_static_files(installed.REPO_ROOT)
        for rel in ("views/fleet.js", "vendor/README.md", "vendor/ansi_up.LICENSE"):
            self.assertIn(f"{STATIC}/{rel}", static)

    async def test_installed_daemon_bundles_what_the_source_gives(self) -> None:
        cwd = self.mktemp()
        os.mkdir(cwd)
        out, err, code = await getProcessOutputAndValue(
            installed.python(),
            ["-c", BUNDLE_REPORT],
            env=installed.env(),
            path=cwd,
            reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        report: dict[str, Any] = json.loads(out)
        site = installed.purelib(installed.venv())
        # Found in the installed package, never in a checkout.
        self.assertEqual(report["agent_dir"], site + "/myx_agent")
        self.assertEqual(report["tool_dir"], site + "/myx_deployment_tool")
        self.assertEqual(
            sorted(report["files"]), sorted([*agent_modules(SOURCE_AGENT), "requirements.txt"])
        )
        _archive, digest, version = deployment_tool_archive(SOURCE_TOOL)
        self.assertEqual((report["tool_sha256"], report["tool_version"]), (digest, version))

    async def test_the_check_fails_for_a_wheel_that_lacks_a_file(self) -> None:
        root = self.mktemp()
        src = mutated_source(root)
        venv = await deferToThread(installed.build, os.path.dirname(src) + "/build", src)
        self.assertEqual(
            missing_files(src, venv),
            [
                "myx_agent/requirements.txt: missing",
                f"{STATIC}/vendor/README.md: missing",
                f"{STATIC}/vendor/ansi_up.LICENSE: missing",
            ],
        )
        self.assertTrue(shipped(venv, "myx_deployment_tool/" + PROBE))
        self.assertTrue(shipped(venv, VIEW_PROBE))
        # And the daemon built from it fails exactly as the issue reported.
        out, err, code = await getProcessOutputAndValue(
            installed.venv_python(venv),
            ["-c", BUNDLE_REPORT],
            env=installed.clean_env(venv),
            path=os.path.dirname(src),
            reactor=reactor,
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"requirements.txt is missing", err)


PROBE = "roles/probe/files/nested/.hidden-probe.sh"
# A console module in a new folder under views/, with a name "**/*.js" misses.
VIEW_PROBE = f"{STATIC}/views/nested/probe.mjs"
FORGOTTEN = {
    'myx_agent = ["requirements.txt"]': "myx_agent = []",
    '    "api/static/vendor/*",\n': "",
}


def mutated_source(root: str) -> str:
    """A source copy with a new deep, hidden file in the deployment tool and a new
    nested console module, and packaging that forgets the agent's requirements.txt
    and the console's vendor/ files other than .js."""
    root = os.path.abspath(root)
    src = os.path.join(root, "source")
    shutil.copytree(
        installed.REPO_ROOT, src, ignore=shutil.ignore_patterns(*installed.IGNORED_IN_COPY)
    )
    probe = os.path.join(src, "deployment-tool", PROBE)
    os.makedirs(os.path.dirname(probe))
    with open(probe, "w") as f:
        f.write("#!/bin/sh\necho probe\n")
    os.chmod(probe, 0o755)  # noqa: S103 - the executable bit must survive packaging
    view = os.path.join(src, VIEW_PROBE)
    os.makedirs(os.path.dirname(view))
    with open(view, "w") as f:
        f.write("export const probe = 1;\n")
    pyproject = os.path.join(src, "pyproject.toml")
    text = read(pyproject).decode()
    for line, replacement in FORGOTTEN.items():
        if line not in text:
            raise AssertionError(f"{line!r} is no longer in pyproject.toml; update this test")
        text = text.replace(line, replacement)
    with open(pyproject, "w") as f:
        f.write(text)
    return src


def shipped(venv: str, rel: str) -> bool:
    return os.path.isfile(os.path.join(installed.purelib(venv), rel))
