"""B3: soak, 10,000 simulated agents on the real 20-60 s schedule for 10 minutes.

    .venv/bin/python -m bench.b3_soak [--agents 10000] [--minutes 10] [--shards 2]
                                      [--fail-rate 0] [--fail-mode reset]

Simulator shards serve the agents and record when each heartbeat reaches each
agent; the agents are bulk-adopted; ``twistd -n myxd`` runs with its default
schedule (a random 20-60 s pause between cycles) and default limits. Figures:

- false offlines: agents seen with a status other than ``online`` (the store is
  read every 5 s, read-only, beside the daemon), and failed heartbeats from the
  daemon's cycle log. No fault is injected unless ``--fail-rate`` asks for
  transient ones (which the retries must then absorb).
- heartbeat lateness: for each heartbeat that reached an agent, the time since
  its cycle began (the daemon logs each cycle's end and duration); p50/p99/max.
  Also the gap between two heartbeats of the same agent, whose bound is the
  longest pause (60 s) plus one sweep.
- daemon CPU %: of one core, over the whole soak and the worst 10 s window.
- daemon RSS: peak and at the end.

Targets (issue 5): 0 false offlines; daemon CPU <= 50 % of one core;
RSS <= 1 GB.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sqlite3
import sys
import time
from typing import Any, Dict, List, Set

from bench.harness import (
    Daemon,
    Sampler,
    Sim,
    adopt_store,
    load,
    metric_value,
    percentile,
    print_header,
)


def offline_ids(db_path: str) -> Set[int]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM agents WHERE status != 'online'")}
    finally:
        conn.close()


def store_totals(db_path: str) -> Dict[str, Any]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(
            "SELECT COUNT(*), SUM(total_failures), MIN(last_heartbeat),"
            " MAX(last_heartbeat) FROM agents"
        ).fetchone()
        return {"agents": row[0], "total_failures": row[1] or 0}
    finally:
        conn.close()


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="B3 soak")
    p.add_argument("--agents", type=int, default=10000)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--base-port", type=int, default=20000)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--fail-mode", default="reset")
    p.add_argument("--min-interval", type=float, default=20.0)
    p.add_argument("--max-interval", type=float, default=60.0)
    args = p.parse_args(argv)
    print_header("B3 soak")
    extra: List[str] = []
    if args.fail_rate > 0:
        extra += ["--fail-rate", str(args.fail_rate), "--fail-mode", args.fail_mode]
    duration = args.minutes * 60.0
    with Sim(
        args.agents, shards=args.shards, base_port=args.base_port, extra=extra, record=True
    ) as sim:
        t = time.time()
        sim.start(timeout=1800)
        print(
            f"simulator: {len(sim.entries)} endpoints in {args.shards} processes, "
            f"ready in {time.time() - t:.0f}s"
        )
        daemon = Daemon(
            flags={
                "heartbeat_min_interval": args.min_interval,
                "heartbeat_max_interval": args.max_interval,
            }
        )
        try:
            print(adopt_store(daemon.data_dir, sim.files))
            db = os.path.join(daemon.data_dir, "myxd.sqlite")
            daemon.start()
            sampler = Sampler(daemon.pid, 0.5)
            t0 = time.time()
            ever_offline: Set[int] = set()
            max_offline = 0
            next_report = t0 + 60
            while time.time() - t0 < duration:
                time.sleep(5)
                try:
                    ids = offline_ids(db)
                except sqlite3.Error as e:
                    print(f"  (store read failed: {e})")
                    continue
                ever_offline |= ids
                max_offline = max(max_offline, len(ids))
                if time.time() >= next_report:
                    next_report += 60
                    s = sampler.samples[-1]
                    print(
                        f"  t={time.time() - t0:4.0f}s cycles={len(daemon.cycles)} "
                        f"offline now={len(ids)} ever={len(ever_offline)} "
                        f"cpu={s[1]:.1f}s rss={s[2] / 2**20:.0f}MiB load={load()}"
                    )
                    sys.stdout.flush()
            t1 = time.time()
            sampler.stop()
            metrics = daemon.metrics()
            totals = store_totals(db)
            cycles = list(daemon.cycles)
        finally:
            daemon.cleanup()
        sim.stop()
        recorded = sim.recorded()

    # -- figures -----------------------------------------------------------------
    print()
    print("cycles:")
    for c in cycles:
        print(
            f"  #{c['number']}: {c['agents']} agents, {c['ok']} ok, {c['failed']} failed, "
            f"{c['duration']:.2f}s"
        )
    starts = [c["started_at"] for c in cycles]
    ends = [c["seen_at"] for c in cycles]
    lateness: List[float] = []
    warm_lateness: List[float] = []
    gaps: List[float] = []
    for times in recorded.values():
        times = [x for x in times if t0 <= x <= t1]
        for x in times:
            i = bisect.bisect_right(starts, x) - 1
            if i >= 0 and x <= ends[i] + 1.0:
                lateness.append(max(0.0, x - starts[i]))
                if i >= 1:  # cycle 1 is the cold start: a TLS handshake per agent
                    warm_lateness.append(max(0.0, x - starts[i]))
        gaps += [b - a for a, b in zip(times, times[1:])]
    cpu_total = sampler.cpu_between(t0, t1)
    worst = 0.0
    samples = sampler.samples
    j = 0
    for i in range(len(samples)):
        while samples[i][0] - samples[j][0] > 10.0:
            j += 1
        if samples[i][0] - samples[j][0] >= 5.0:
            worst = max(worst, (samples[i][1] - samples[j][1]) / (samples[i][0] - samples[j][0]))
    peak_rss = sampler.max_rss(t0, t1)
    end_rss = samples[-1][2] if samples else 0
    failed_hb = sum(c["failed"] for c in cycles)
    rpc_errors = metric_value(metrics, "myxd_rpc_errors_total", '{kind="retryable"}')
    retries = metric_value(metrics, "myxd_rpc_retries_total")
    cpu_pct = 100.0 * cpu_total / (t1 - t0)
    print()
    print(
        f"B3 result: {args.agents} agents, {(t1 - t0) / 60:.1f} min, "
        f"{args.min_interval:g}-{args.max_interval:g} s schedule, {len(cycles)} cycles, "
        f"{len(lateness)} heartbeats recorded by the agents"
    )
    print(
        f"  false offlines: {len(ever_offline)} agents ever not online "
        f"(max at once {max_offline}); failed heartbeats {failed_hb}; "
        f"store total_failures {totals['total_failures']}; rpc errors "
        f"{rpc_errors:g} retryable; retries {retries:g}"
    )
    if lateness:
        print(
            f"  lateness after cycle start: p50 {percentile(lateness, 50):.2f}s  "
            f"p99 {percentile(lateness, 99):.2f}s  max {max(lateness):.2f}s"
        )
    if warm_lateness:
        print(
            f"  same, cycles 2+ (keep-alive): p50 {percentile(warm_lateness, 50):.2f}s  "
            f"p99 {percentile(warm_lateness, 99):.2f}s  max {max(warm_lateness):.2f}s"
        )
    if gaps:
        print(
            f"  gap between heartbeats of one agent: p50 {percentile(gaps, 50):.1f}s  "
            f"p99 {percentile(gaps, 99):.1f}s  max {max(gaps):.1f}s"
        )
    print(
        f"  daemon CPU: {cpu_pct:.1f} % of one core on average "
        f"({cpu_total:.1f} CPU-s), worst 10 s window {100 * worst:.0f} %"
    )
    print(f"  daemon RSS: peak {peak_rss / 2**20:.0f} MiB, end {end_rss / 2**20:.0f} MiB")
    ok = not ever_offline and cpu_pct <= 50.0 and peak_rss <= 10**9
    print(f"  targets (0 false offlines, CPU <= 50 %, RSS <= 1 GB): {'MET' if ok else 'NOT MET'}")
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
