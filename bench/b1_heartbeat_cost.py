"""B1: daemon CPU per heartbeat (one ``heartbeat`` + ``get_status`` batch), keep-alive
vs reconnect.

    .venv/bin/python -m bench.b1_heartbeat_cost [--agents 1000] [--cycles 4] [--runs 3]

A simulator process serves ``--agents`` endpoints; they are bulk-adopted into a
fresh store, and ``twistd -n myxd`` runs with a fixed ``--interval`` between
cycles. The daemon's CPU (utime+stime from /proc/PID/stat, sampled every 50 ms)
is read over each heartbeat cycle, which the daemon logs with its duration, and
divided by the number of agents visited. The whole cycle is counted: listing
the agents, the RPCs, the batched store writes.

- keep-alive: the pool's idle timeout (120 s) outlives the pause, so every
  cycle after the first reuses its TLS connections; cycle 1 (cold) is reported
  apart.
- reconnect: ``--rpc-pool-idle-timeout`` is set below the pause, so every cycle
  opens a new TLS connection to every agent (full handshake: session resumption
  is off by design, it would skip the pin check).

Target (issue 5): <= 1.0 ms of daemon CPU per heartbeat with keep-alive.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List

from bench.harness import (
    Daemon,
    Sampler,
    Sim,
    adopt_store,
    load,
    median,
    print_header,
)


def run_mode(
    sim: Sim, agents: int, cycles: int, interval: float, idle_timeout: float, concurrency: int
) -> List[Dict[str, Any]]:
    daemon = Daemon(
        flags={
            "heartbeat_min_interval": interval,
            "heartbeat_max_interval": interval,
            "rpc_pool_idle_timeout": idle_timeout,
            "heartbeat_concurrency": concurrency,
        }
    )
    try:
        adopt_store(daemon.data_dir, sim.files)
        daemon.start()
        sampler = Sampler(daemon.pid, 0.05)
        try:
            seen = daemon.wait_cycles(cycles, timeout=cycles * (interval + 120))
            time.sleep(0.2)
        finally:
            sampler.stop()
        out = []
        for c in seen:
            cpu = sampler.cpu_between(c["started_at"], c["seen_at"])
            out.append({**c, "cpu": cpu, "cpu_ms_per_hb": 1000 * cpu / max(1, c["agents"])})
        return out
    finally:
        daemon.cleanup()


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="B1 per-heartbeat daemon CPU")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--cycles", type=int, default=4, help="cycles per run (first is cold)")
    p.add_argument("--interval", type=float, default=4.0, help="pause between cycles, s")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--shards", type=int, default=1)
    args = p.parse_args(argv)
    print_header("B1 per-heartbeat cost")
    results: Dict[str, List[float]] = {"cold": [], "keepalive": [], "reconnect": []}
    with Sim(args.agents, shards=args.shards) as sim:
        sim.start()
        for run in range(1, args.runs + 1):
            for mode, idle in (("keepalive", 120.0), ("reconnect", args.interval / 4)):
                cycles = run_mode(
                    sim, args.agents, args.cycles, args.interval, idle, args.concurrency
                )
                for c in cycles:
                    print(
                        f"run {run} {mode:9s} cycle {c['number']}: {c['agents']} agents "
                        f"{c['ok']} ok {c['failed']} failed, {c['duration']:.3f}s wall, "
                        f"{c['cpu']:.3f} CPU-s, {c['cpu_ms_per_hb']:.3f} ms/heartbeat "
                        f"(load {load()})"
                    )
                warm = [c["cpu_ms_per_hb"] for c in cycles[1:]]
                if mode == "keepalive":
                    results["cold"].append(cycles[0]["cpu_ms_per_hb"])
                    results["keepalive"].append(median(warm))
                else:
                    results["reconnect"].append(median(warm))
                sys.stdout.flush()
    print()
    print(
        f"B1 result over {args.runs} runs, {args.agents} agents "
        "(median of per-run medians, daemon CPU ms per heartbeat):"
    )
    for key in ("keepalive", "reconnect", "cold"):
        vals = results[key]
        print(
            f"  {key:9s}: {median(vals):.3f} ms  (runs: "
            + ", ".join(f"{v:.3f}" for v in vals)
            + ")"
        )
    ka = median(results["keepalive"])
    print(f"  target keep-alive <= 1.0 ms: {'MET' if ka <= 1.0 else 'NOT MET'}")
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
