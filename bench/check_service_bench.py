"""Benchmark: the cost of deployment-tool/scripts/check_service.py on a real host.

Boots a systemd test host (tests/support/testhost.py), installs the agent and
deploys the stand-in Xray test fixture with deploy_xray.yml through the agent
(tests/support/agenthost.py), then times `check_service.py xray` and
`check_service.py xray caddy` inside the host, with the agent's venv Python and
with the system python3, N runs each. Prints median and max in ms. Run as root:

    .venv/bin/python -m bench.check_service_bench [--runs 30]

The stand-in `xray` is itself a Python script (~the start-up cost of python3);
a real Go xray's `run -test` start-up differs. Not part of the test run; it only
prints. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from myxd.install.remote import TOOL_DIR, VENV_DIR  # noqa: E402
from tests.deploytool.fixtures import build_standin_release  # noqa: E402
from tests.deploytool.helpers import free_ports  # noqa: E402
from tests.support.agenthost import agent_host  # noqa: E402

TIMER = r"""
import json, statistics, subprocess, sys, time
python, runs, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
took = []
for _ in range(runs):
    t0 = time.perf_counter()
    subprocess.run([python, "{tool}/scripts/check_service.py", *names],
                   stdout=subprocess.DEVNULL, check=False)
    took.append((time.perf_counter() - t0) * 1000)
print(json.dumps({{"median": statistics.median(took), "max": max(took)}}))
"""


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


async def main(reactor: object, runs: int) -> None:
    base = tempfile.mkdtemp(prefix="myx-bench-cs-")
    os.chdir(base)
    ah = await agent_host("bench-check-service", reactor)
    rpc = ah.rpc(reactor)
    try:
        zip_path, dgst, _ = build_standin_release(os.path.join(base, "rel"), "1.8.24")
        for path in (zip_path, dgst):
            _copy(path, os.path.join(ah.host.root, "root", os.path.basename(path)))
        port = free_ports(1)[0]
        inbounds = [{"protocol": "vmess", "port": port, "listen": "127.0.0.1",
                     "clients": [{"id": "0b7e5c44-1f2a-4e3b-8d9c-a1b2c3d4e5f6"}]}]  # fmt: skip
        run = await ah.run_playbook(
            rpc,
            reactor,
            "deploy_xray.yml",
            {
                "xray_version": "1.8.24",
                "xray_archive_path": "/root/" + os.path.basename(zip_path),
                "xray_dgst_path": "/root/" + os.path.basename(dgst),
                "xray_inbounds": inbounds,
            },
        )
        if not run.ok:
            raise SystemExit("deploy_xray.yml failed:\n" + run.log[-3000:])
        _write(os.path.join(ah.host.root, "root", "timer.py"), TIMER.format(tool=TOOL_DIR))
        for python in (f"{VENV_DIR}/bin/python", "/usr/bin/python3"):
            for names in ("xray", "xray caddy"):
                out = await ah.host.sh(f"python3 /root/timer.py {python} {runs} {names}")
                fig = json.loads(out)
                print(
                    f"check_service.py {names:<10} python={python:<32} runs={runs} "
                    f"median={fig['median']:.1f} ms max={fig['max']:.1f} ms"
                )
    finally:
        await rpc.close()
        await ah.host.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    opts = parser.parse_args()
    task.react(lambda r: defer.Deferred.fromCoroutine(main(r, opts.runs)))
