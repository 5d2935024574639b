"""deploy_xray_docker.yml on a REAL systemd host through a real agent.

docker.io (with containerd and runc) comes from Debian's packages, cached on
this machine and installed in the host without a network. Images cannot be
pulled here, so the test builds one in the host with `docker import`: the
host's own python3 plus the stand-in xray (TEST FIXTURE, tests/deploytool/
fixtures.py) as the entrypoint.

Docker runs in the host as it would on a server: the test host is one of its
own, booted with CAP_NET_ADMIN (dockerd sets up its network sandbox even for
--network=host; nspawn drops the capability by default) and with the keyring
system calls that runc uses allowed (tests/support/testhost.py). nspawn mounts
the cgroup v1 controllers read-only, so the host mounts each again, writable,
over the read-only one; containers go under a parent cgroup of their own, which
the cleanup removes. dockerd keeps its hands off this machine's network:
iptables off, no bridge, containers on the host network only. A docker that
cannot start a container fails the test.
"""

from __future__ import annotations

import os
import zipfile

from tests.deploytool.fixtures import build_standin_release
from tests.deploytool.helpers import HostTestCase, free_ports, socks5_get
from tests.support.debcache import install_debs

IMAGE = "myx-test-fixture/xray-standin:1.8.24"
# What the stand-in needs from the host: python3 and its shared libraries.
IMAGE_PATHS = (
    "bin lib lib64 usr/lib64 usr/bin/python3 usr/bin/python3.11 usr/lib/python3.11 "
    "usr/lib/x86_64-linux-gnu"
)


class XrayDockerTests(HostTestCase):
    host_key = "deploytool-docker"
    host_capabilities = ("CAP_NET_ADMIN",)

    def standin_script(self) -> bytes:
        out = os.path.abspath(self.mktemp())
        zip_path, _, _ = build_standin_release(out, "1.8.24", removed_flows=("xtls-rprx-direct",))
        with zipfile.ZipFile(zip_path) as zf:
            return zf.read("xray")

    async def start_docker(self) -> None:
        # The host shares this machine's network namespace without CAP_NET_ADMIN:
        # dockerd must not build its bridge and NAT chains (it could not, and
        # must not touch this machine's firewall). --network=host needs neither.
        await self.host.sh(
            "for d in /sys/fs/cgroup/*; do "
            'if grep -q " $d cgroup ro," /proc/mounts; then '
            'c=$(basename "$d"); mkdir -p "/run/myx-cgroup/$c" && '
            'mount -t cgroup -o "$c" cgroup "/run/myx-cgroup/$c" && '
            'mount --bind "/run/myx-cgroup/$c" "$d"; fi; done'
        )
        self.addCleanup(self.remove_containers)
        self.put_file(
            "/etc/docker/daemon.json",
            b'{"iptables": false, "ip6tables": false, "bridge": "none",'
            b' "cgroup-parent": "/myx-test-docker"}\n',
        )
        await install_debs(self.host, ["docker.io"])
        out = await self.host.sh(
            "systemctl start docker >/dev/null 2>&1; "
            "for i in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done; "
            "docker info >/dev/null 2>&1 && echo DOCKER-OK || "
            "journalctl -u docker -u containerd --no-pager -o cat | tail -n 15",
            timeout=120,
        )
        self.assertIn("DOCKER-OK", out, f"dockerd cannot run inside the test host: {out[-1500:]}")

    async def remove_containers(self) -> None:
        await self.host.sh(
            "docker rm -f xray-test >/dev/null 2>&1; "
            "rmdir /sys/fs/cgroup/*/myx-test-docker 2>/dev/null; true",
            timeout=120,
        )

    async def test_deploy_in_docker(self) -> None:
        await self.start_docker()
        self.put_file("/root/image/usr/local/bin/xray", self.standin_script(), 0o755)
        await self.host.sh(
            f"cd / && tar -c {IMAGE_PATHS} -C /root/image usr/local/bin/xray 2>/dev/null | "
            f"docker import --change 'ENTRYPOINT [\"/usr/local/bin/xray\"]' - {IMAGE}",
            timeout=600,
        )
        probe = await self.host.sh(
            f"docker run --rm --network=host {IMAGE} version 2>&1 || true", timeout=300
        )
        self.assertIn("Xray 1.8.24", probe, f"docker cannot start a container: {probe[-800:]}")
        socks, other = free_ports(2)
        inbounds = [
            {"protocol": "socks", "port": socks, "listen": "127.0.0.1",
             "settings": {"auth": "noauth"}},
            {"protocol": "vmess", "port": other, "listen": "127.0.0.1",
             "clients": [{"id": "0b7e5c44-1f2a-4e3b-8d9c-a1b2c3d4e5f6"}]},
        ]  # fmt: skip
        good = {
            "xray_docker_image": IMAGE,
            "xray_docker_container": "xray-test",
            "xray_inbounds": inbounds,
            "xray_block_private": False,
            "xray_docker_apt_update_cache": False,
        }
        await self.play("deploy_xray_docker.yml", good)
        web = self.serve_http(b"through the container")
        self.assertIn(b"through the container", await self.in_thread(socks5_get, socks, web))
        ps = await self.host.sh(
            "docker inspect -f '{{.HostConfig.NetworkMode}} {{.Config.Image}}' xray-test"
        )
        self.assertEqual(ps.split(), ["host", IMAGE])

        again = await self.play("deploy_xray_docker.yml", good)
        self.assertEqual(again.changed, 0, again.log[-4000:])
        started = await self.host.sh("docker inspect -f '{{.State.StartedAt}}' xray-test")

        bad = dict(good, xray_inbounds=[dict(inbounds[1], clients=[{"id": "nope"}])])
        refused = await self.play("deploy_xray_docker.yml", bad, ok=False)
        self.assertIn("invalid user id", refused.log)
        self.assertEqual(
            await self.host.sh("docker inspect -f '{{.State.StartedAt}}' xray-test"), started
        )
        self.assertIn(b"through the container", await self.in_thread(socks5_get, socks, web))
