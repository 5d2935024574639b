"""What the agent process imports at start (myx_agent.imports, issue 14 §2).

The deferrals themselves are tested on a throw-away package in this process,
and the agent's start in a child interpreter: after ``build_service`` (what
``main.run`` does before it serves), the modules that only a playbook, a
deployment-tool sync, a first start's key generation or nobody at all needs
are not in ``sys.modules``, while what serving needs is.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from myx_agent import imports

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Loaded by the agent's start before these changes, and by nothing that serving needs.
NOT_AT_START = [
    "ssl",
    "_ssl",
    "_hashlib",
    "ansible_runner",
    "myx_agent.ansible_executor",
    "tarfile",
    "werkzeug.serving",
    "werkzeug.test",
    "http.server",
    "socketserver",
    "asyncio.base_events",
    "asyncio.unix_events",
    "klein._form",
    "klein._plating",
    "klein._session",
    "cryptography.hazmat.primitives.serialization.ssh",
    "bcrypt",
    "cryptography.hazmat.backends.openssl.backend",
]
AT_START = [
    "twisted.internet.epollreactor",
    "twisted.web.server",
    "werkzeug.routing",
    "werkzeug.exceptions",
    "klein._app",
    "OpenSSL.SSL",
    "myx_agent.rpc_server",
    "myx_agent.commands",
]

START_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from myx_agent.imports import defer_for_agent
    defer_for_agent()
    from twisted.internet import reactor
    from myx_agent.config import load_config
    from myx_agent.main import build_service
    build_service(load_config(sys.argv[1]), reactor)
    import asyncio, klein, werkzeug
    from cryptography.hazmat.primitives import serialization
    from klein._app import Klein
    from asyncio.futures import Future
    from cryptography.hazmat.primitives import _serialization
    checks = {
        "klein": klein.Klein is Klein,
        "asyncio": asyncio.Future is Future,
        "serialization": serialization.Encoding.PEM is _serialization.Encoding.PEM,
    }
    loaded = sorted(m for m, v in list(sys.modules.items()) if v is not None)
    # A name that only the full __init__ defines: it runs now, in full.
    full = {
        "werkzeug": werkzeug.Request.__module__,
        "asyncio": asyncio.get_running_loop.__name__,
        "klein": klein.Plating.__module__,
        "serialization": serialization.load_ssh_public_key.__name__,
    }
    print(json.dumps({"loaded": loaded, "checks": checks, "full": full}))
    """
)


class AgentStartTests(SynchronousTestCase):
    def start_modules(self) -> Dict[str, Any]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config = os.path.join(base, "config.json")
        data = {
            "agent_token": "t" * 32,
            "secret_key": "s" * 22,
            "rpc_port": 24351,
            "rpc_path": "p" * 24,
            "bind": "127.0.0.1",
            "ssl_dir": os.path.join(base, "ssl"),
            "state_dir": os.path.join(base, "state"),
            "deployment_tool_dir": os.path.join(base, "tool"),
        }
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        out = subprocess.run(
            [sys.executable, "-c", START_SCRIPT, config],
            env=env,
            cwd=base,
            capture_output=True,
            timeout=120,
            check=False,
        )
        self.assertEqual(out.returncode, 0, out.stderr.decode(errors="replace")[-3000:])
        result: Dict[str, Any] = json.loads(out.stdout.decode().splitlines()[-1])
        self.assertTrue(os.path.exists(os.path.join(base, "ssl", "agent.crt")))
        return result

    def test_start_imports_only_what_serving_needs(self) -> None:
        result = self.start_modules()
        loaded = set(result["loaded"])
        self.assertEqual([m for m in NOT_AT_START if m in loaded], [])
        self.assertEqual([m for m in AT_START if m not in loaded], [])
        self.assertEqual(result["checks"], {"klein": True, "asyncio": True, "serialization": True})
        self.assertEqual(
            result["full"],
            {
                "werkzeug": "werkzeug.wrappers.request",
                "asyncio": "get_running_loop",
                "klein": "klein._plating",
                "serialization": "load_ssh_public_key",
            },
        )


class DeferPackageInitTests(SynchronousTestCase):
    """On a package made for the test: ``pkg/__init__.py`` records that it ran."""

    def setUp(self) -> None:
        root = os.path.abspath(self.mktemp())
        self.name = f"myx_lazy_{os.getpid()}_{id(self)}"
        pkg = os.path.join(root, self.name)
        os.makedirs(pkg)
        files = {
            "__init__.py": "import sys\nRAN = True\nfrom .core import Thing\nEXTRA = 1\n",
            "core.py": "class Thing:\n    pass\n",
            "other.py": "VALUE = 2\n",
        }
        for fname, text in files.items():
            with open(os.path.join(pkg, fname), "w") as f:
                f.write(text)
        sys.path.insert(0, root)
        self.addCleanup(sys.path.remove, root)
        self.addCleanup(self.forget)

    def forget(self) -> None:
        for m in [m for m in sys.modules if m == self.name or m.startswith(self.name + ".")]:
            del sys.modules[m]

    def ran(self) -> bool:
        return "RAN" in vars(sys.modules[self.name])

    def test_submodules_and_shortcuts_without_init(self) -> None:
        self.assertTrue(imports.defer_package_init(self.name, {"Thing": "core"}))
        pkg = sys.modules[self.name]
        other = __import__(f"{self.name}.other", fromlist=["VALUE"])
        self.assertEqual(other.VALUE, 2)
        thing = pkg.Thing
        self.assertIs(thing, sys.modules[f"{self.name}.core"].Thing)
        self.assertIs(__import__(self.name, fromlist=["other"]).other, other)
        self.assertFalse(hasattr(pkg, "__wrapped__"))
        self.assertFalse(self.ran())
        # Any other name runs the __init__ in full, in the same module object.
        self.assertEqual(pkg.EXTRA, 1)
        self.assertTrue(self.ran())
        self.assertIs(sys.modules[self.name], pkg)
        self.assertIs(pkg.Thing, thing)
        with self.assertRaises(AttributeError):
            pkg.missing  # noqa: B018

    def test_unknown_name_is_still_an_attribute_error(self) -> None:
        imports.defer_package_init(self.name)
        pkg = sys.modules[self.name]
        with self.assertRaises(AttributeError):
            pkg.missing  # noqa: B018
        self.assertTrue(self.ran())

    def test_already_imported_or_not_a_package_is_left_alone(self) -> None:
        mod = __import__(self.name)
        self.assertFalse(imports.defer_package_init(self.name))
        self.assertIs(sys.modules[self.name], mod)
        self.assertFalse(imports.defer_package_init("myx_no_such_package_at_all"))
        self.assertNotIn("myx_no_such_package_at_all", sys.modules)
        self.assertFalse(imports.defer_package_init("json.tool"))  # a module
        self.assertNotIn("json.tool", sys.modules)


class HashTests(SynchronousTestCase):
    def test_sha256_matches_hashlib(self) -> None:
        data = os.urandom(3 << 20)
        h = imports.sha256(data[:10])
        h.update(data[10:])
        self.assertEqual(h.hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertEqual(imports.sha256().hexdigest(), hashlib.sha256().hexdigest())

    def test_hashlib_already_loaded_is_not_deferred(self) -> None:
        self.assertIn("hashlib", sys.modules)
        self.assertFalse(imports.defer_openssl_hashlib())
        self.assertIsNot(sys.modules.get("_hashlib", False), None)
