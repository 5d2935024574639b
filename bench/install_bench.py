"""Benchmark: agent install time on real systemd test hosts (1 host, then 5 in parallel).

Boots Debian bookworm hosts with systemd-nspawn (tests/support/testhost.py; the
rootfs tarball is built once and cached), installs the agent with the real
Installer (wheelhouse mode, wheels cached in $MYX_TEST_CACHE/wheelhouse), and
prints wall-clock figures and the per-step breakdown. Run as root:

    .venv/bin/python -m bench.install_bench [--parallel 5]

Not part of the test run; it only prints. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from myxd.config import Settings  # noqa: E402
from myxd.install import Installer  # noqa: E402
from myxd.rpc.client import AgentRPC  # noqa: E402
from myxd.store import StoreService  # noqa: E402
from tests.support.testhost import CACHE_DIR, TestHost, ensure_rootfs  # noqa: E402


async def _steps(store: Any, server_id: int) -> str:
    latest = await store.get_latest_install(server_id)
    parts = []
    for s in latest["steps"]:
        took = (s["finished_at"] or s["started_at"]) - s["started_at"]
        mark = "" if s["status"] == "ok" else f"({s['status']})"
        parts.append(f"{s['step']}={took:.2f}s{mark}")
    return " ".join(parts)


async def main(reactor: Any, parallel: int) -> None:
    base = tempfile.mkdtemp(prefix="myx-install-bench-")
    hosts: list[TestHost] = []
    store_service = None
    rpc = None
    try:
        t0 = time.monotonic()
        await ensure_rootfs(reactor)
        print(f"rootfs ready (cached or built): {time.monotonic() - t0:.1f} s")
        settings = Settings(
            data_dir=base,
            install_concurrency=max(parallel, 1),
            agent_start_timeout=120,
            ssh_connect_timeout=60,
        )
        store_service = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        store_service.startService()
        await store_service.when_ready()
        store = store_service.store
        rpc = AgentRPC(reactor, settings)
        installer = Installer(
            store,
            rpc,
            settings,
            reactor,
            wheelhouse_dir=os.path.join(CACHE_DIR, "wheelhouse"),
            agent_bind="127.0.0.1",
            agent_port_range=(8000, 32767),
        )

        async def boot(i: int) -> tuple[TestHost, int]:
            host = TestHost(os.path.join(base, f"h{i}"), reactor)
            hosts.append(host)
            t = time.monotonic()
            await host.start()
            print(f"  host {i}: extract+boot to sshd {time.monotonic() - t:.2f} s")
            sid, _ = await installer.create_server(
                name=host.name,
                host="127.0.0.1",
                ssh_port=host.port,
                username="root",
                auth={"private_key": host.private_key},
                sudo={"mode": "none"},
            )
            return host, sid

        print("1 host:")
        _h, sid = await boot(0)
        t = time.monotonic()
        out = await installer.install(sid)
        took = time.monotonic() - t
        print(f"  install: {took:.2f} s ok={out.ok} {out.error or ''}")
        print(f"  steps: {await _steps(store, sid)}")
        t = time.monotonic()
        out = await installer.reinstall(sid)
        print(f"  reinstall (same host): {time.monotonic() - t:.2f} s ok={out.ok}")
        print(f"  steps: {await _steps(store, sid)}")

        print(f"{parallel} hosts in parallel:")
        booted = [await boot(i + 1) for i in range(parallel)]
        t = time.monotonic()
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(installer.install(s)) for _, s in booted]
        )
        wall = time.monotonic() - t
        ok = sum(1 for r in results if r.ok)
        print(f"  install of {parallel} hosts: {wall:.2f} s wall, {ok}/{parallel} ok")
        for (_, s), r in zip(booted, results):
            print(f"  server {s}: {await _steps(store, s)} {r.error or ''}")
    finally:
        for h in hosts:
            await h.stop()
        if rpc is not None:
            await rpc.close()
        if store_service is not None:
            await store_service.stopService()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=5)
    args = parser.parse_args()
    task.react(lambda r: defer.Deferred.fromCoroutine(main(r, args.parallel)))
