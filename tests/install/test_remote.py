"""The remote side of an install: the agent's config file, its unit, the staging dir."""

from __future__ import annotations

from twisted.trial import unittest

from myxd.install import remote


class RemoteTests(unittest.TestCase):
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
