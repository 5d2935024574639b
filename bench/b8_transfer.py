"""B8: artifact transfer to agents through ArtifactPusher (issue #8 §2, §5).

    .venv/bin/python -m bench.b8_transfer [--mb 100] [--runs 3] [--fleet-mb 30,90]
        [--agents 10] [--window 4] [--pool 2]

Starts real ``python -m myx_agent`` processes on 127.0.0.1 (temp config, state
and ssl dirs; removed at the end) and pushes files of random bytes to them from
THIS process, the way the daemon does: the real ``AgentRPC`` client (pinned
TLS; ``rpc_pool_max_per_host`` from ``--pool``, default 2 as in the daemon's
settings) and the real ``ArtifactPusher`` (512 KiB chunks, ``--window`` in
flight per agent, default 4 as in the daemon), on the reactor.

1. One artifact of ``--mb`` MB to one agent, ``--runs`` times (a new random
   file each time): wall time from the first ``artifact_status`` to the
   agent's verified, renamed file; MB/s (10^6 bytes), and their median. Then
   the same push again (the agent has it: 0 bytes sent).
2. One artifact of each ``--fleet-mb`` size to ``--agents`` agents at once:
   wall time, and this process's peak RSS during the push (``VmHWM``, reset
   through ``/proc/self/clear_refs`` before each phase) next to its RSS before.
   Peak RSS must not grow with the artifact's size: the pusher holds at most a
   window of chunks per push, whatever the file's size.

Every file is checked byte-for-byte on the agent's side (its hash is its name,
and the agent verified it). It prints figures and asserts nothing else.
Target (issue 8): >= 30 MB/s to one agent on loopback.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any, List, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from bench.agent_bench import Agent, wait_ready
from bench.harness import load, median, print_header
from myxd.config import Settings
from myxd.deploy.transfer import ArtifactPusher, PushResult
from myxd.rpc.client import AgentEndpoint, AgentRPC

MB = 1_000_000


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def random_file(path: str, size: int) -> str:
    """``size`` random bytes written 1 MiB at a time; returns the SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def endpoint(agent: Agent) -> AgentEndpoint:
    return AgentEndpoint(
        host="127.0.0.1",
        port=agent.port,
        path=agent.rpc_path,
        token=agent.token,
        fingerprint=agent.fingerprint,
    )


def check_landed(agent: Agent, result: PushResult, sha: str, size: int) -> None:
    expected = os.path.join(agent.tmp, "state", "artifacts", sha)
    if result.path != expected or os.path.getsize(expected) != size:
        raise RuntimeError(f"artifact not where expected on agent {agent.port}: {result}")


async def run(reactor: Any, args: argparse.Namespace) -> None:
    print_header("B8 artifact transfer")
    tmp = tempfile.mkdtemp(prefix="myx-b8-")
    agents: List[Agent] = []
    rpc: Optional[AgentRPC] = None
    try:
        for i in range(max(1, args.agents)):
            base = os.path.join(tmp, f"agent{i}")
            os.makedirs(base)
            agents.append(Agent(base, sys.executable))
        for a in agents:
            a.start()
        await gatherResults([Deferred.fromCoroutine(wait_ready(reactor, a)) for a in agents])
        print(f"{len(agents)} agents ready; load {load()}")
        rpc = AgentRPC(reactor, Settings(rpc_pool_max_per_host=args.pool))
        pusher = ArtifactPusher(rpc, reactor, window=args.window)
        peak_ok = reset_peak()
        if not peak_ok:
            print("note: cannot reset VmHWM here; peaks below are since process start")

        # 1. One artifact to one agent, ``--runs`` times (a new file each time).
        size = int(args.mb * MB)
        rates: List[float] = []
        for run_no in range(max(1, args.runs)):
            path = os.path.join(tmp, f"one-{run_no}.bin")
            sha = random_file(path, size)
            reset_peak()
            rss_before = status_kib("VmRSS")
            started = time.monotonic()
            result = await pusher.push(endpoint(agents[0]), path, sha, size)
            elapsed = time.monotonic() - started
            check_landed(agents[0], result, sha, size)
            rates.append(size / MB / elapsed)
            print(
                f"one agent: {size / MB:.0f} MB in {elapsed:.2f} s = {rates[-1]:.1f} MB/s; "
                f"sent {result.bytes_sent} bytes; pusher RSS {rss_before / 1024:.1f} MiB "
                f"before, peak {status_kib('VmHWM') / 1024:.1f} MiB; load {load()}"
            )
            started = time.monotonic()
            again = await pusher.push(endpoint(agents[0]), path, sha, size)
            print(
                f"one agent, again: {again.bytes_sent} bytes sent, already_present="
                f"{again.already_present}, {1000 * (time.monotonic() - started):.1f} ms"
            )
            os.unlink(path)
        print(
            f"one agent: median {median(rates):.1f} MB/s over {len(rates)} runs "
            f"(min {min(rates):.1f}, max {max(rates):.1f}; target >= 30)"
        )

        # 2. One artifact to every agent at once, for each size.
        for fleet_mb in args.fleet_mb:
            size = int(fleet_mb * MB)
            path = os.path.join(tmp, f"fleet-{fleet_mb}.bin")
            sha = random_file(path, size)
            reset_peak()
            rss_before = status_kib("VmRSS")
            started = time.monotonic()
            results = await gatherResults(
                [Deferred.fromCoroutine(pusher.push(endpoint(a), path, sha, size)) for a in agents]
            )
            elapsed = time.monotonic() - started
            for a, r in zip(agents, results):
                check_landed(a, r, sha, size)
            total = sum(r.bytes_sent for r in results)
            print(
                f"{len(agents)} agents x {size / MB:.0f} MB: wall {elapsed:.2f} s "
                f"({total / MB / elapsed:.1f} MB/s in total); pusher RSS "
                f"{rss_before / 1024:.1f} MiB before, peak {status_kib('VmHWM') / 1024:.1f} MiB "
                f"(+{(status_kib('VmHWM') - rss_before) / 1024:.1f}); load {load()}"
            )
            os.unlink(path)
    finally:
        if rpc is not None:
            await rpc.close()
        for a in agents:
            a.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="size to one agent, MB")
    parser.add_argument(
        "--fleet-mb",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[30.0, 90.0],
        help="sizes to every agent at once, MB, comma-separated",
    )
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3, help="runs of the one-agent push")
    parser.add_argument("--pool", type=int, default=2, help="rpc_pool_max_per_host")
    parser.add_argument("--window", type=int, default=4, help="chunks in flight per push")
    args = parser.parse_args(argv)
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
