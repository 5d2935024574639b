"""Tests of myx_agent.config (loading and checking the JSON config) and myx_agent.tls."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from myx_agent.config import (
    DEFAULT_BIND,
    DEFAULT_DEPLOYMENT_TOOL_DIR,
    DEFAULT_MAX_CONCURRENT_COMMANDS,
    DEFAULT_STATE_DIR,
    ConfigError,
    load_config,
)
from myx_agent.tls import (
    CERT_FILE,
    KEY_FILE,
    TLSSetupError,
    ensure_identity,
    fingerprint_of_pem,
    server_context,
)

TOKEN = "tok-SECRET-1234567890abcdef"
SECRET = "sec-SECRET-abcdef"


def minimal() -> Dict[str, Any]:
    return {
        "agent_token": TOKEN,
        "secret_key": SECRET,
        "rpc_port": 24351,
        "rpc_path": "a3f8b9c2d1e4a3f8",
    }


class LoadConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "config.json")

    def write(self, data: Any, mode: int = 0o600) -> str:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        with open(self.path, "wb") as f:
            f.write(raw)
        os.chmod(self.path, mode)
        return self.path

    def error(self, data: Any, mode: int = 0o600) -> str:
        self.write(data, mode)
        with self.assertRaises(ConfigError) as ctx:
            load_config(self.path)
        message = str(ctx.exception)
        self.assertNotIn("\n", message)
        self.assertIn(self.path, message)
        self.assertNotIn(TOKEN, message)
        self.assertNotIn(SECRET, message)
        return message

    def test_minimal_with_defaults(self) -> None:
        config = load_config(self.write(minimal()))
        self.assertEqual(config.path, self.path)
        self.assertEqual(config.agent_token, TOKEN)
        self.assertEqual(config.secret_key, SECRET)
        self.assertEqual(config.rpc_port, 24351)
        self.assertEqual(config.rpc_path, "a3f8b9c2d1e4a3f8")
        self.assertEqual(config.bind, DEFAULT_BIND)
        self.assertEqual(config.ssl_dir, os.path.join(self.dir, "ssl"))
        self.assertEqual(config.state_dir, DEFAULT_STATE_DIR)
        self.assertEqual(config.deployment_tool_dir, DEFAULT_DEPLOYMENT_TOOL_DIR)
        self.assertEqual(config.max_concurrent_commands, DEFAULT_MAX_CONCURRENT_COMMANDS)
        self.assertEqual(config.artifact_cache_max_bytes, 2 * 1024**3)
        self.assertEqual(config.unknown_keys, ())

    def test_all_fields(self) -> None:
        data = minimal()
        data.update(
            bind="::1",
            ssl_dir="/x/ssl/",
            state_dir="/x/state",
            deployment_tool_dir="/x/tool",
            max_concurrent_commands=4,
            artifact_cache_max_bytes=5 * 1024**2,
            future_key=1,
        )
        config = load_config(self.write(data, mode=0o400))
        self.assertEqual(
            (config.bind, config.ssl_dir, config.state_dir, config.deployment_tool_dir),
            ("::1", "/x/ssl", "/x/state", "/x/tool"),
        )
        self.assertEqual(config.max_concurrent_commands, 4)
        self.assertEqual(config.artifact_cache_max_bytes, 5 * 1024**2)
        self.assertEqual(config.unknown_keys, ("future_key",))

    def test_frozen_and_secrets_not_in_repr(self) -> None:
        config = load_config(self.write(minimal()))
        with self.assertRaises(AttributeError):
            config.rpc_port = 1  # type: ignore[misc]
        self.assertNotIn(TOKEN, repr(config))
        self.assertNotIn(SECRET, repr(config))

    def test_missing_required_fields(self) -> None:
        for name in ("agent_token", "secret_key", "rpc_port", "rpc_path"):
            data = minimal()
            del data[name]
            message = self.error(data)
            self.assertIn(f"'{name}'", message)
            self.assertIn("required", message)

    def test_invalid_fields(self) -> None:
        cases = [
            ("agent_token", ""),
            ("agent_token", 5),
            ("agent_token", "short"),
            ("agent_token", "has a space in it 123456"),
            ("agent_token", "ü" * 20),
            ("secret_key", ""),
            ("secret_key", None),
            ("rpc_port", "24351"),
            ("rpc_port", 0),
            ("rpc_port", 65536),
            ("rpc_port", True),
            ("rpc_port", 24351.0),
            ("rpc_path", "short"),
            ("rpc_path", "x" * 65),
            ("rpc_path", "a3f8b9c2d1e4a3f8/"),
            ("rpc_path", "a3f8b9c2d1e4a3f8.."),
            ("rpc_path", 1234567890123456),
            ("bind", "localhost"),
            ("bind", "1.2.3"),
            ("bind", 0),
            ("ssl_dir", "relative/ssl"),
            ("ssl_dir", ""),
            ("state_dir", 5),
            ("deployment_tool_dir", "opt/tool"),
            ("max_concurrent_commands", 0),
            ("max_concurrent_commands", "32"),
            ("max_concurrent_commands", False),
            ("artifact_cache_max_bytes", 1024**2 - 1),
            ("artifact_cache_max_bytes", "2G"),
            ("artifact_cache_max_bytes", 2.0 * 1024**3),
            ("artifact_cache_max_bytes", True),
            ("artifact_cache_max_bytes", 2**51),
        ]
        for name, value in cases:
            data = minimal()
            data[name] = value
            message = self.error(data)
            self.assertIn(f"'{name}'", message, (name, value))

    def test_boundaries_accepted(self) -> None:
        for port in (1, 65535):
            data = minimal()
            data.update(rpc_port=port, rpc_path="A" * 64, agent_token="x" * 16)
            self.assertEqual(load_config(self.write(data)).rpc_port, port)
        for limit in (1024**2, 2**50):
            data = minimal()
            data["artifact_cache_max_bytes"] = limit
            self.assertEqual(load_config(self.write(data)).artifact_cache_max_bytes, limit)
        data = minimal()
        data["rpc_path"] = "aZ09_-" + "b" * 10
        self.assertEqual(load_config(self.write(data)).rpc_path, "aZ09_-" + "b" * 10)

    def test_invalid_json(self) -> None:
        self.assertIn("invalid JSON", self.error(b'{"agent_token": '))
        self.assertIn("line 2", self.error(b'{\n  "rpc_port": ,\n}'))
        self.assertIn("object", self.error(b"[1, 2]"))
        self.assertIn("UTF-8", self.error(b'{"a": "\xff"}'))
        self.assertIn("invalid JSON", self.error(b'{"rpc_port": NaN}'))
        self.assertIn("invalid JSON", self.error(b""))

    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as ctx:
            load_config(os.path.join(self.dir, "nope.json"))
        self.assertIn("not found", str(ctx.exception))
        self.assertIn("nope.json", str(ctx.exception))

    def test_not_a_file(self) -> None:
        os.chmod(self.dir, 0o700)
        with self.assertRaises(ConfigError) as ctx:
            load_config(self.dir)
        self.assertIn("not a regular file", str(ctx.exception))

    def test_loose_permissions_refused(self) -> None:
        for mode in (0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o610, 0o601):
            message = self.error(minimal(), mode=mode)
            self.assertIn(f"{mode:04o}", message)
            self.assertIn("too open", message)

    def test_private_permissions_accepted(self) -> None:
        for mode in (0o600, 0o400, 0o700):
            self.assertEqual(load_config(self.write(minimal(), mode=mode)).rpc_port, 24351)

    def test_relative_path_made_absolute(self) -> None:
        self.write(minimal())
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        config = load_config("config.json")
        self.assertEqual(config.path, self.path)
        self.assertEqual(config.ssl_dir, os.path.join(self.dir, "ssl"))


class TLSIdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ssl_dir = os.path.join(os.path.abspath(self.mktemp()), "ssl")

    def test_first_start_creates_ec_p256_identity(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding

        cert_pem, key_pem = ensure_identity(self.ssl_dir)
        self.assertEqual(stat.S_IMODE(os.stat(self.ssl_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.ssl_dir, KEY_FILE)).st_mode), 0o600)
        cert = x509.load_pem_x509_certificate(cert_pem)
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        self.assertEqual(public.curve.name, "secp256r1")
        fp = fingerprint_of_pem(cert_pem)
        self.assertEqual(fp, hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest())
        self.assertRegex(fp, r"^[0-9a-f]{64}$")
        self.assertIn(b"PRIVATE KEY", key_pem)
        server_context(cert_pem, key_pem, self.ssl_dir)  # builds and checks the pair

    def test_reused_on_later_starts_and_perms_repaired(self) -> None:
        first = ensure_identity(self.ssl_dir)
        os.chmod(self.ssl_dir, 0o755)  # noqa: S103 - the agent must repair this
        os.chmod(os.path.join(self.ssl_dir, KEY_FILE), 0o644)
        second = ensure_identity(self.ssl_dir)
        self.assertEqual(first, second)
        self.assertEqual(stat.S_IMODE(os.stat(self.ssl_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.ssl_dir, KEY_FILE)).st_mode), 0o600)

    def test_half_identity_is_an_error_not_a_new_identity(self) -> None:
        ensure_identity(self.ssl_dir)
        for missing in (CERT_FILE, KEY_FILE):
            d = os.path.join(os.path.abspath(self.mktemp()), "ssl")
            ensure_identity(d)
            os.remove(os.path.join(d, missing))
            with self.assertRaises(TLSSetupError) as ctx:
                ensure_identity(d)
            self.assertIn(missing, str(ctx.exception))
            self.assertFalse(os.path.exists(os.path.join(d, missing)))

    def test_mismatched_or_corrupt_pair(self) -> None:
        cert_a, key_a = ensure_identity(self.ssl_dir)
        other = os.path.join(os.path.abspath(self.mktemp()), "ssl")
        cert_b, key_b = ensure_identity(other)
        with self.assertRaises(TLSSetupError) as ctx:
            server_context(cert_a, key_b, self.ssl_dir)
        self.assertIn("does not match", str(ctx.exception))
        with self.assertRaises(TLSSetupError):
            server_context(b"garbage", key_a, self.ssl_dir)
        with self.assertRaises(TLSSetupError):
            fingerprint_of_pem(b"garbage")

    def test_generated_in_a_child_process(self) -> None:
        """The agent's start makes a new identity in a forked child; the same files."""
        cert_pem, key_pem = ensure_identity(self.ssl_dir, generate_in_child=True)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.ssl_dir, KEY_FILE)).st_mode), 0o600)
        self.assertEqual(ensure_identity(self.ssl_dir, generate_in_child=True), (cert_pem, key_pem))
        self.assertEqual(ensure_identity(self.ssl_dir), (cert_pem, key_pem))
        server_context(cert_pem, key_pem, self.ssl_dir)

    def test_child_reaped_elsewhere(self) -> None:
        """With SIGCHLD ignored the kernel reaps the child; the files decide."""
        import signal

        old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGCHLD, old)
        cert_pem, key_pem = ensure_identity(self.ssl_dir, generate_in_child=True)
        server_context(cert_pem, key_pem, self.ssl_dir)

    def test_child_failures_are_one_line_errors(self) -> None:
        import errno

        from myx_agent import tls

        def no_space(key_path: str, cert_path: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def broken(key_path: str, cert_path: str) -> None:
            raise ValueError("bad\ncurve")

        self.patch(tls, "_generate", no_space)
        with self.assertRaises(TLSSetupError) as ctx:
            ensure_identity(self.ssl_dir, generate_in_child=True)
        self.assertEqual(
            str(ctx.exception), f"ssl_dir {self.ssl_dir}: cannot write: No space left on device"
        )
        self.patch(tls, "_generate", broken)
        with self.assertRaises(TLSSetupError) as ctx:
            ensure_identity(self.ssl_dir, generate_in_child=True)
        self.assertIn("cannot create the TLS identity: ValueError: bad", str(ctx.exception))
        self.assertFalse(os.path.exists(os.path.join(self.ssl_dir, KEY_FILE)))

    def test_ssl_dir_is_a_file(self) -> None:
        parent = os.path.dirname(self.ssl_dir)
        os.makedirs(parent)
        with open(self.ssl_dir, "w") as f:
            f.write("x")
        with self.assertRaises(TLSSetupError) as ctx:
            ensure_identity(self.ssl_dir)
        self.assertIn(self.ssl_dir, str(ctx.exception))
