"""deploy_xray.yml, deploy_xray_config.yml and rollback_xray.yml on a REAL systemd
host (Debian bookworm under nspawn) through a real agent's execute_ansible.

The Xray release is a TEST FIXTURE built here (tests/deploytool/fixtures.py):
the official zip layout around a Python stand-in that follows xray's CLI,
listens on every inbound and proxies SOCKS5, so traffic really flows through
the deployed service. 1.7.5 accepts the VLESS flow "xtls-rprx-direct"; 1.8.24
and 1.8.25 reject it, as the real 1.8 did. All inbounds listen on 127.0.0.1
ports picked free at test time.
"""

from __future__ import annotations

import os
from typing import Any

from tests.deploytool.fixtures import build_standin_release
from tests.deploytool.helpers import HostTestCase, free_ports, socks5_get

LIB = "/usr/local/lib/myx/xray"
RELEASES = "/root/xray-releases"
UUID1 = "6f1c2a38-4d1e-4a8b-9c3e-2f6a7b8c9d01"
UUID2 = "0b7e5c44-1f2a-4e3b-8d9c-a1b2c3d4e5f6"


class XrayTests(HostTestCase):
    def release(self, version: str) -> tuple[str, str, str]:
        """Build the fixture and place it on the host; returns host paths + sha256."""
        out = os.path.abspath(self.mktemp())
        removed = () if version.startswith("1.7") else ("xtls-rprx-direct",)
        zip_path, dgst, sha = build_standin_release(out, version, removed_flows=removed)
        for path in (zip_path, dgst):
            with open(path, "rb") as f:
                self.put_file(f"{RELEASES}/{os.path.basename(path)}", f.read())
        return (
            f"{RELEASES}/{os.path.basename(zip_path)}",
            f"{RELEASES}/{os.path.basename(dgst)}",
            sha,
        )

    def inbounds(self, ports: list[int], flow: str) -> list[dict[str, Any]]:
        socks, vless, vmess, trojan, reality = ports
        return [
            {"protocol": "socks", "port": socks, "listen": "127.0.0.1",
             "settings": {"auth": "noauth", "udp": False}},
            {"protocol": "vless", "port": vless, "listen": "127.0.0.1",
             "clients": [{"id": UUID1, "flow": flow}]},
            {"protocol": "vmess", "port": vmess, "listen": "127.0.0.1", "network": "ws",
             "path": "/vm", "clients": [{"id": UUID2}]},
            {"protocol": "trojan", "port": trojan, "listen": "127.0.0.1",
             "clients": [{"password": "trojan-test-pw"}]},
            {"protocol": "vless", "port": reality, "listen": "127.0.0.1", "security": "reality",
             "clients": [{"id": UUID2, "flow": "xtls-rprx-vision"}],
             "reality": {"dest": "127.0.0.1:9", "server_names": ["example.test"],
                         "private_key": "aGVsbG8tdGVzdC1maXh0dXJlLWtleS0xMjM0NTY3OA",
                         "short_ids": ["", "0123abcd"]}},
        ]  # fmt: skip

    async def assert_serving(self, socks_port: int, body: bytes) -> None:
        web = self.serve_http(body)
        reply = await self.in_thread(socks5_get, socks_port, web)
        self.assertIn(body, reply, "HTTP through the deployed Xray's SOCKS inbound")

    async def state(self) -> dict[str, Any]:
        info: dict[str, Any] = (await self.check_service("xray"))["xray"]
        return info

    async def test_lifecycle(self) -> None:
        ports = free_ports(5)
        socks = ports[0]
        old_zip, old_dgst, old_sha = self.release("1.7.5")
        new_zip, new_dgst, _ = self.release("1.8.24")
        base = {"xray_block_private": False, "xray_wait_timeout": 20}
        v1 = dict(base, xray_version="1.7.5", xray_archive_path=old_zip, xray_dgst_path=old_dgst,
                  xray_inbounds=self.inbounds(ports, "xtls-rprx-direct"))  # fmt: skip

        # 1. Install: render, validate, unit active, every port listening, traffic flows.
        await self.play("deploy_xray.yml", v1)
        out = await self.host.sh(
            "systemctl is-active xray; readlink /usr/local/bin/xray; readlink "
            f"{LIB}/current; ls /usr/local/share/xray; systemctl show -p User,"
            "RestartPreventExitStatus,NoNewPrivileges,LimitNOFILE,AmbientCapabilities xray; "
            "stat -c '%U:%G %a' /usr/local/etc/xray/config.json"
        )
        lines = out.splitlines()
        self.assertEqual(lines[0], "active")
        self.assertEqual(lines[1], f"{LIB}/current/xray")
        self.assertEqual(lines[2], f"{LIB}/1.7.5")
        self.assertEqual(lines[3:5], ["geoip.dat", "geosite.dat"])
        self.assertIn("User=nobody", lines)
        self.assertIn("NoNewPrivileges=yes", lines)
        self.assertIn("LimitNOFILE=1000000", lines)
        self.assertIn("root:nogroup 640", lines)
        self.assertTrue(any(ln.startswith("RestartPreventExitStatus=23") for ln in lines), out)
        state = await self.state()
        self.assertEqual(state["unit"]["active_state"], "active")
        self.assertEqual(state["active_version"], "1.7.5")
        self.assertEqual(state["installed_versions"], ["1.7.5"])
        self.assertEqual(state["listening_ports"], sorted(ports))
        self.assertEqual(state["config_test"]["ok"], True, state)
        self.assertEqual(state["config_test"]["output"], "Configuration OK.")
        await self.assert_serving(socks, b"served through xray 1")
        first_pid = state["unit"]["main_pid"]
        config_sha = state["config_sha256"]

        # 2. Same variables again: nothing changes, Xray is not restarted.
        again = await self.play("deploy_xray.yml", v1)
        self.assertEqual(again.changed, 0, again.log[-4000:])
        # Check mode with the same variables runs clean and reports no change.
        checked = await self.check_mode("deploy_xray.yml", v1)
        self.assertRegex(checked, r"localhost\s*: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0")
        self.assertEqual((await self.state())["unit"]["main_pid"], first_pid)

        # 3. An invalid config is refused; the old one keeps serving.
        bad = self.inbounds(ports, "xtls-rprx-direct")
        bad[1]["clients"] = [{"id": "not-a-uuid"}]
        refused = await self.play("deploy_xray_config.yml", dict(base, xray_inbounds=bad), ok=False)
        self.assertIn("invalid user id", refused.log)
        state = await self.state()
        self.assertEqual(state["config_sha256"], config_sha)
        self.assertEqual(state["unit"]["main_pid"], first_pid, "never restarted")
        await self.assert_serving(socks, b"still served after a refused config")

        # 4. An upgrade whose binary rejects the current config is refused.
        v2 = dict(base, xray_version="1.8.24", xray_archive_path=new_zip, xray_dgst_path=new_dgst)
        refused = await self.play("deploy_xray.yml", v2, ok=False)
        self.assertIn("Xray 1.8.24 rejects the config", refused.log)
        self.assertIn('doesn\'t support \\"xtls-rprx-direct\\"', refused.log)
        state = await self.state()
        self.assertEqual(state["active_version"], "1.7.5")
        self.assertEqual(state["unit"]["main_pid"], first_pid)
        await self.assert_serving(socks, b"still served after a refused upgrade")

        # 5. A config the new core accepts, then the upgrade, then rollback_xray.yml.
        await self.play(
            "deploy_xray_config.yml", dict(base, xray_inbounds=self.inbounds(ports, ""))
        )
        await self.play("deploy_xray.yml", v2)
        state = await self.state()
        self.assertEqual(state["active_version"], "1.8.24")
        self.assertEqual(state["previous_version"], "1.7.5")
        self.assertEqual(state["installed_versions"], ["1.7.5", "1.8.24"])
        self.assertEqual(state["listening_ports"], sorted(ports))
        self.assertIn("Xray 1.8.24", await self.host.sh("xray version"))
        await self.assert_serving(socks, b"served by the upgrade")
        upgraded_pid = state["unit"]["main_pid"]

        await self.play("rollback_xray.yml")
        state = await self.state()
        self.assertEqual(state["active_version"], "1.7.5")
        self.assertEqual(state["previous_version"], "1.8.24")
        self.assertNotEqual(state["unit"]["main_pid"], upgraded_pid, "restarted")
        self.assertIn("Xray 1.7.5", await self.host.sh("xray version"))
        self.assertEqual(state["listening_ports"], sorted(ports))
        await self.assert_serving(socks, b"served after the rollback")

        # 6. A wrong sha256 is refused before anything is unpacked.
        bad_zip, _, good_sha = self.release("1.8.25")
        wrong = "0" * 64
        refused = await self.play(
            "deploy_xray.yml",
            dict(base, xray_version="1.8.25", xray_archive_path=bad_zip, xray_sha256=wrong),
            ok=False,
        )
        self.assertIn("SHA-256 mismatch", refused.log)
        self.assertIn(good_sha, refused.log)
        listing = await self.host.sh(f"ls -a {LIB}")
        self.assertNotIn("1.8.25", listing)
        self.assertNotIn(".unpack-", listing)
        state = await self.state()
        self.assertEqual(state["active_version"], "1.7.5")
        self.assertEqual(state["unit"]["active_state"], "active")
