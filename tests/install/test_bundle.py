"""The agent bundle: which modules ship, the deployment tool archive, platform tags."""

from __future__ import annotations

import os

from twisted.trial import unittest

from myxd.install.bundle import TargetPlatform, agent_modules, deployment_tool_archive


class BundleTests(unittest.TestCase):
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
