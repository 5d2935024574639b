"""deploy_caddy.yml on a REAL systemd host through a real agent's execute_ansible.

Caddy comes from Debian's package, installed by the playbook's apt task inside
the host; the .deb files (caddy, and python3-apt for ansible's apt module, which
the test installs first) are downloaded once on this machine and cached
(tests/support/debcache.py), so the host's apt installs without a network.
Sites and the admin endpoint listen on 127.0.0.1 ports picked free at test
time; pages are checked with real HTTP.

The release-archive path (``caddy_archive_path``) runs on a host of its own, so
that it never meets the package the first test installs: its archive is made
in the host from the Debian package's own binary, packed like an official
release (caddy, LICENSE, README.md in a tar.gz).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from tests.deploytool.helpers import HostTestCase, free_ports, http_get
from tests.support.debcache import install_debs, preload_debs

PAGE = b"<h1>myx caddy test page</h1>\n"


class CaddyTests(HostTestCase):
    async def test_deploy_redeploy_refuse(self) -> None:
        # ansible's apt module needs python3-apt; without it the module runs
        # `apt-get update` to fetch it. Give the host what every apt-managed server
        # has, then let the playbook install caddy from the host's apt cache.
        await install_debs(self.host, ["python3-apt"])
        await preload_debs(self.host, ["caddy"])
        site, admin, busy = free_ports(3)
        self.put_file("/var/www/myx-test/index.html", PAGE)
        sites: list[dict[str, Any]] = [
            {
                "address": f"http://127.0.0.1:{site}",
                "root": "/var/www/myx-test",
                "headers": {"X-Myx-Test": "yes"},
            }
        ]
        good: dict[str, Any] = {
            "caddy_sites": sites,
            "caddy_admin": f"localhost:{admin}",
            "caddy_apt_update_cache": False,
        }

        # 1. Install from the package, serve the page through the generated Caddyfile.
        await self.play("deploy_caddy.yml", good)
        reply = await self.in_thread(http_get, site)
        self.assertIn(b"200 OK", reply.split(b"\r\n")[0])
        self.assertIn(PAGE, reply)
        self.assertIn(b"X-Myx-Test: yes", reply)
        state = (await self.check_service("caddy"))["caddy"]
        self.assertEqual(state["unit"]["active_state"], "active")
        self.assertEqual(state["active_version"], "2.6.2", state)
        self.assertIn(site, state["listening_ports"])
        self.assertIn(admin, state["listening_ports"])
        caddyfile_sha = state["config_sha256"]
        pid = state["unit"]["main_pid"]
        dpkg = await self.host.sh("dpkg-query -W -f '${Status} ${Version}' caddy")
        self.assertEqual(dpkg, "install ok installed 2.6.2-5")

        # 2. Same variables: changed=0, not restarted.
        again = await self.play("deploy_caddy.yml", good)
        self.assertEqual(again.changed, 0, again.log[-4000:])
        checked = await self.check_mode("deploy_caddy.yml", good)
        self.assertRegex(checked, r"localhost\s*: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0")
        self.assertEqual((await self.check_service("caddy"))["caddy"]["unit"]["main_pid"], pid)

        # 3. A broken Caddyfile is refused by caddy validate; the old site serves.
        broken = dict(
            good, caddy_sites=[], caddy_caddyfile="http://127.0.0.1:1 {\n\tnot_a_directive\n}\n"
        )
        refused = await self.play("deploy_caddy.yml", broken, ok=False)
        self.assertIn("not_a_directive", refused.log)
        state = (await self.check_service("caddy"))["caddy"]
        self.assertEqual(state["config_sha256"], caddyfile_sha)
        self.assertIn(PAGE, await self.in_thread(http_get, site))

        # 4. A valid Caddyfile whose reload fails (its port is taken): the reload is
        # reported as a failure, the previous Caddyfile is put back, the site serves.
        r: Any = reactor
        listener = r.listenTCP(busy, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        taken = dict(
            good,
            caddy_sites=sites
            + [{"address": f"http://127.0.0.1:{busy}", "root": "/var/www/myx-test"}],
        )
        refused = await self.play("deploy_caddy.yml", taken, ok=False)
        self.assertIn("Reload Caddy on the new Caddyfile", refused.log)
        self.assertIn("previous Caddyfile stays", refused.log)
        state = (await self.check_service("caddy"))["caddy"]
        self.assertEqual(state["config_sha256"], caddyfile_sha)
        self.assertEqual(state["unit"]["active_state"], "active")
        self.assertIn(PAGE, await self.in_thread(http_get, site))


class CaddyArchiveTests(HostTestCase):
    host_key = "deploytool-caddy-archive"

    async def release_archive(self) -> tuple[str, str]:
        """A caddy release tar.gz on the host, and its SHA-256."""
        files = await preload_debs(self.host, ["caddy"])
        (deb,) = [f for f in files if f.startswith("caddy_")]
        path = "/var/lib/myx/caddy_2.6.2_linux_amd64.tar.gz"
        sha = await self.host.sh(
            "set -e; rm -rf /root/rel && mkdir -p /root/rel /var/lib/myx && cd /root/rel && "
            f"dpkg-deb --fsys-tarfile /var/cache/apt/archives/{deb} | "
            "tar -x -O ./usr/bin/caddy > caddy && chmod 755 caddy && "
            "echo 'Apache License 2.0' > LICENSE && echo 'Caddy' > README.md && "
            f"tar -czf {path} caddy LICENSE README.md && sha256sum {path} | cut -d' ' -f1"
        )
        return path, sha.strip()

    async def test_release_archive_verified_installed_and_serving(self) -> None:
        path, sha = await self.release_archive()
        site, admin = free_ports(2)
        self.put_file("/var/www/myx-test/index.html", PAGE)
        good: dict[str, Any] = {
            "caddy_archive_path": path,
            "caddy_sha256": sha,
            "caddy_sites": [{"address": f"http://127.0.0.1:{site}", "root": "/var/www/myx-test"}],
            "caddy_admin": f"localhost:{admin}",
        }

        # 1. A wrong SHA-256 is refused before anything is unpacked or installed.
        wrong = dict(good, caddy_sha256="0" * 64)
        refused = await self.play("deploy_caddy.yml", wrong, ok=False)
        self.assertIn("SHA-256 mismatch", refused.log)
        left = await self.host.sh(
            "ls /usr/local/lib/myx/caddy 2>/dev/null; ls /usr/bin/caddy 2>/dev/null; "
            "ls /etc/systemd/system/caddy.service 2>/dev/null; true"
        )
        self.assertEqual(left.strip(), "")

        # 2. The right one: unpacked by hash, binary and unit installed, the site served.
        await self.play("deploy_caddy.yml", good)
        self.assertIn(PAGE, await self.in_thread(http_get, site))
        state = (await self.check_service("caddy"))["caddy"]
        self.assertEqual(state["unit"]["active_state"], "active", state)
        self.assertEqual(state["active_version"], "2.6.2", state)
        self.assertIn(site, state["listening_ports"])
        installed = await self.host.sh(
            f"cmp /usr/bin/caddy /usr/local/lib/myx/caddy/{sha}/caddy && echo SAME; "
            "systemctl show -p FragmentPath --value caddy; "
            "dpkg-query -W -f '${Status}' caddy 2>/dev/null || echo no-package"
        )
        self.assertEqual(
            installed.split(),
            ["SAME", "/etc/systemd/system/caddy.service", "no-package"],
        )
        pid = state["unit"]["main_pid"]

        # 3. Same variables: changed=0, not restarted.
        again = await self.play("deploy_caddy.yml", good)
        self.assertEqual(again.changed, 0, again.log[-4000:])
        self.assertEqual((await self.check_service("caddy"))["caddy"]["unit"]["main_pid"], pid)
