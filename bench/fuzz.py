"""Long fuzz run against a real agent: ``python -m bench.fuzz --seed S --count N``.

Starts a real ``myx_agent`` process on 127.0.0.1 (temp dir, empty
deployment-tool dir), draws N structure-aware bodies from
tests/support/rpc_fuzz.py with seed S (in a worker process, chunk by chunk,
while the previous chunk is being sent), POSTs each with the right token over
pinned TLS, judges each answer with ``rpc_fuzz.problems``, and checks a pinned
health_check every 500 requests. Prints figures: requests, answers by HTTP
status, failures (the first few bodies in full), rate, the agent's RSS and open
file descriptors before and after. Exits 1 on any failure.

``--surface agent`` is the only surface: the admin API is being reworked in
parallel and is fuzzed by its own suite (see docs/reliability.md).
Nothing here connects beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any, List, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThread

from bench.agent_bench import Agent, proc_status, wait_ready
from tests.support.pinned_client import AgentClient
from tests.support.rpc_fuzz import generate, problems

CHUNK = 2000
CONCURRENCY = 4
HEALTH_EVERY = 500


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run(reactor: Any, args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="myx-fuzz-")
    agent = Agent(tmp, sys.executable)
    pool = ProcessPoolExecutor(max_workers=1)
    failures: List[str] = []
    statuses: Counter[int] = Counter()
    sent = 0
    try:
        agent.start()
        await wait_ready(reactor, agent)
        client = AgentClient(
            host="127.0.0.1",
            port=agent.port,
            rpc_path=agent.rpc_path,
            token=agent.token,
            fingerprint=agent.fingerprint,
            reactor=reactor,
            timeout=120,
        )
        rss0, fds0 = proc_status(agent.pid)["VmRSS"], open_fds(agent.pid)
        started = time.monotonic()
        gen_seconds = 0.0
        chunks = [(i, min(CHUNK, args.count - i)) for i in range(0, args.count, CHUNK)]

        def draw(index: int, size: int) -> Deferred[Any]:
            # Each chunk has its own seed derived from --seed: same run, same bodies.
            future = pool.submit(generate, size, args.seed * 1000003 + index)
            return deferToThread(future.result)

        pending = draw(*chunks[0]) if chunks else None
        for n in range(len(chunks)):
            t0 = time.monotonic()
            assert pending is not None
            bodies: List[bytes] = await pending
            gen_seconds += time.monotonic() - t0
            pending = draw(*chunks[n + 1]) if n + 1 < len(chunks) else None

            async def worker(part: List[bytes]) -> None:
                nonlocal sent
                for body in part:
                    result = await client.post(body)
                    statuses[result.status] += 1
                    sent += 1
                    found = problems(result.status, result.headers, result.body, body)
                    if found:
                        failures.append(f"{found} for body {body[:300]!r}: {result.body[:300]!r}")

            for start in range(0, len(bodies), HEALTH_EVERY):
                part = bodies[start : start + HEALTH_EVERY]
                await DeferredList(
                    [
                        Deferred.fromCoroutine(worker(part[k::CONCURRENCY]))
                        for k in range(CONCURRENCY)
                    ],
                    fireOnOneErrback=True,
                    consumeErrors=True,
                )
                assert agent.proc is not None
                if agent.proc.poll() is not None:
                    failures.append(f"agent exited with {agent.proc.returncode}")
                    raise SystemExit(1)
                if await client.call("health_check") != {"status": "ok"}:
                    failures.append("health_check failed")
            print(f"  {sent}/{args.count} sent, {len(failures)} failures", flush=True)
        elapsed = time.monotonic() - started
        rss1, fds1 = proc_status(agent.pid)["VmRSS"], open_fds(agent.pid)
        await client.close()
        print(f"surface: agent, seed {args.seed}, generated requests: {sent}")
        print(f"answers by HTTP status: {dict(sorted(statuses.items()))}")
        print(f"failures (5xx, traceback, non-JSON-RPC 200, agent down): {len(failures)}")
        for line in failures[:10]:
            print(f"  {line}")
        print(
            f"elapsed {elapsed:.0f} s ({sent / max(elapsed, 1e-9):.0f} req/s), "
            f"waiting on generation {gen_seconds:.0f} s"
        )
        print(f"agent RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB, open fds {fds0} -> {fds1}")
        log = read_text(os.path.join(tmp, "agent.log"))
        print(f"tracebacks in the agent log: {log.count('Traceback')}")
        if failures or "Traceback" in log:
            raise SystemExit(1)
    finally:
        pool.shutdown(cancel_futures=True)
        agent.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--surface", choices=["agent"], default="agent")
    args = parser.parse_args(argv)
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
