"""B2: one full heartbeat cycle over 1,000 and 5,000 simulated agents.

    .venv/bin/python -m bench.b2_sweep [--sizes 1000,5000] [--runs 3]

For each fleet size: simulator shard processes serve the endpoints, the agents
are bulk-adopted into a fresh store, ``twistd -n myxd`` starts, and its first
two heartbeat cycles are timed from its log: cycle 1 is cold (a TLS handshake
per agent), cycle 2 warm (keep-alive connections). Per cycle: wall time, daemon
CPU-seconds (/proc/PID/stat of the daemon alone), failures.

Target (issue 5): 1,000 agents <= 3 s wall, 0 failures.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

from bench.b1_heartbeat_cost import run_mode
from bench.harness import Sim, load, median, print_header


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="B2 heartbeat sweep")
    p.add_argument("--sizes", default="1000,5000")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=256)
    args = p.parse_args(argv)
    print_header("B2 sweep")
    summary: Dict[int, Dict[str, List[float]]] = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        shards = 1 if size <= 2000 else 2
        figures: Dict[str, List[float]] = {
            k: []
            for k in (
                "cold_wall",
                "cold_cpu",
                "cold_failed",
                "warm_wall",
                "warm_cpu",
                "warm_failed",
            )
        }
        with Sim(size, shards=shards) as sim:
            sim.start()
            for run in range(1, args.runs + 1):
                cycles = run_mode(sim, size, 2, args.interval, 120.0, args.concurrency)
                for label, c in zip(("cold", "warm"), cycles):
                    print(
                        f"{size} agents run {run} {label}: {c['duration']:.3f}s wall, "
                        f"{c['cpu']:.2f} CPU-s, {c['ok']} ok, {c['failed']} failed "
                        f"(load {load()})"
                    )
                    figures[f"{label}_wall"].append(c["duration"])
                    figures[f"{label}_cpu"].append(c["cpu"])
                    figures[f"{label}_failed"].append(c["failed"])
                sys.stdout.flush()
        summary[size] = figures
    print()
    print(f"B2 result (median of {args.runs} runs):")
    print("  agents | cold wall | cold CPU-s | warm wall | warm CPU-s | failures (max)")
    for size, f in summary.items():
        failures = int(max(f["cold_failed"] + f["warm_failed"]))
        print(
            f"  {size:6d} | {median(f['cold_wall']):8.2f}s | {median(f['cold_cpu']):9.2f}  | "
            f"{median(f['warm_wall']):8.2f}s | {median(f['warm_cpu']):9.2f}  | {failures}"
        )
    if 1000 in summary:
        f = summary[1000]
        worst_wall = max(median(f["cold_wall"]), median(f["warm_wall"]))
        failures = int(max(f["cold_failed"] + f["warm_failed"]))
        ok = worst_wall <= 3.0 and failures == 0
        print(
            f"  target 1,000 agents <= 3 s wall, 0 failures (cold and warm): "
            f"{'MET' if ok else 'NOT MET'}"
        )
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
