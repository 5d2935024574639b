"""B6: daemon RSS per managed agent, and the idle RSS of one real agent process.

    .venv/bin/python -m bench.b6_memory [--sizes 0,1000,5000] [--runs 3]

Daemon: for each fleet size N, simulator shards serve N agents, they are
bulk-adopted into a fresh store, ``twistd -n myxd`` heartbeats them every
``--interval`` seconds, and its RSS (VmRSS of the daemon process) is read
after ``--cycles`` cycles, i.e. with a keep-alive connection and a cached TLS
context per agent. Per agent: (RSS(N) - RSS(0)) / N, with RSS(0) the same
daemon managing no agent. The peak (VmHWM) is printed too: a cycle briefly
holds every agent's record.

Agent: a real ``python -m myx_agent`` process (temp config, bytecode cache
warmed by a first start, as an installed agent has it) is adopted by a daemon
and heartbeated for a few cycles; then its VmRSS is read.

Targets (issue 5): daemon <= 100 kB per agent; agent <= 45 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from bench.harness import (
    PYTHON,
    REPO,
    Daemon,
    Sim,
    adopt_api,
    adopt_store,
    load,
    median,
    print_header,
    status_field,
    wait_until,
)


def daemon_rss(size: int, interval: float, cycles: int) -> Dict[str, float]:
    sim = Sim(size, shards=1 if size <= 5000 else 2) if size else None
    try:
        if sim is not None:
            sim.start(timeout=1800)
        daemon = Daemon(
            flags={"heartbeat_min_interval": interval, "heartbeat_max_interval": interval}
        )
        try:
            if sim is not None:
                adopt_store(daemon.data_dir, sim.files)
            daemon.start()
            daemon.wait_cycles(cycles, timeout=cycles * (interval + 300))
            time.sleep(interval / 2)  # between cycles: steady state
            return {
                "rss": status_field(daemon.pid, "VmRSS"),
                "hwm": status_field(daemon.pid, "VmHWM"),
            }
        finally:
            daemon.cleanup()
    finally:
        if sim is not None:
            sim.cleanup()


def agent_idle_rss(cycles: int) -> Dict[str, float]:
    base = tempfile.mkdtemp(prefix="myx-b6-agent-")
    proc = None
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = {
            "agent_token": secrets.token_urlsafe(32),
            "secret_key": secrets.token_urlsafe(32),
            "rpc_port": port,
            "rpc_path": secrets.token_urlsafe(18),
            "bind": "127.0.0.1",
            "ssl_dir": os.path.join(base, "ssl"),
            "state_dir": os.path.join(base, "state"),
            "deployment_tool_dir": os.path.join(base, "tool"),
        }
        path = os.path.join(base, "config.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONPYCACHEPREFIX=os.path.join(base, "pycache"))
        argv = [PYTHON, "-m", "myx_agent", "--config", path]
        log = open(os.path.join(base, "agent.log"), "w")
        # A first start fills the bytecode cache, as an installed agent has it.
        warm = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=base)
        cert = os.path.join(base, "ssl", "agent.crt")
        wait_until(lambda: os.path.exists(cert), 60)
        time.sleep(2)
        warm.terminate()
        warm.wait(30)
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=base)
        with open(cert) as f:
            der = ssl.PEM_cert_to_DER_cert(f.read())
        fingerprint = hashlib.sha256(der).hexdigest()
        with Daemon(flags={"heartbeat_min_interval": 1, "heartbeat_max_interval": 1}) as d:
            d.start()

            def adopted() -> bool:
                try:
                    adopt_api(
                        d,
                        [
                            {
                                "host": "127.0.0.1",
                                "rpc_port": port,
                                "rpc_path": config["rpc_path"],
                                "token": config["agent_token"],
                                "cert_fingerprint": fingerprint,
                            }
                        ],
                        1,
                    )
                    return True
                except RuntimeError:
                    return False

            if not wait_until(adopted, 60, 0.5):
                raise RuntimeError("could not adopt the agent")
            n = len(d.cycles)
            d.wait_cycles(n + cycles, cycles * 30 + 60)
            time.sleep(0.5)
            return {
                "rss": status_field(proc.pid, "VmRSS"),
                "hwm": status_field(proc.pid, "VmHWM"),
                "anon": status_field(proc.pid, "RssAnon"),
            }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="B6 memory")
    p.add_argument("--sizes", default="0,1000,5000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--cycles", type=int, default=3)
    args = p.parse_args(argv)
    print_header("B6 memory")
    sizes = [int(s) for s in args.sizes.split(",")]
    if 0 not in sizes:
        sizes = [0] + sizes
    rss: Dict[int, List[float]] = {n: [] for n in sizes}
    hwm: Dict[int, List[float]] = {n: [] for n in sizes}
    agent: List[float] = []
    for run in range(1, args.runs + 1):
        for n in sizes:
            r = daemon_rss(n, args.interval, args.cycles)
            rss[n].append(r["rss"])
            hwm[n].append(r["hwm"])
            print(
                f"run {run}: daemon with {n:5d} agents: RSS {r['rss'] / 2**20:.1f} MiB "
                f"(peak {r['hwm'] / 2**20:.1f} MiB) (load {load()})"
            )
            sys.stdout.flush()
        a = agent_idle_rss(3)
        agent.append(a["rss"])
        print(
            f"run {run}: idle agent RSS {a['rss'] / 2**20:.1f} MiB (peak "
            f"{a['hwm'] / 2**20:.1f} MiB, anonymous {a['anon'] / 2**20:.1f} MiB)"
        )
        sys.stdout.flush()
    print()
    print(f"B6 result (median of {args.runs} runs):")
    base = median(rss[0])
    worst = 0.0
    for n in sizes:
        line = (
            f"  daemon, {n:5d} agents: RSS {median(rss[n]) / 2**20:7.1f} MiB, peak "
            f"{median(hwm[n]) / 2**20:7.1f} MiB"
        )
        if n:
            per = (median(rss[n]) - base) / n
            per_peak = (median(hwm[n]) - median(hwm[0])) / n
            worst = max(worst, per)
            line += f"; per agent {per / 1000:.1f} kB (peak {per_peak / 1000:.1f} kB)"
        print(line)
    print(f"  idle agent: {median(agent) / 2**20:.1f} MiB")
    print(
        f"  targets daemon <= 100 kB per agent: {'MET' if worst <= 100e3 else 'NOT MET'}; "
        f"agent <= 45 MB: {'MET' if median(agent) <= 45e6 else 'NOT MET'}"
    )
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
