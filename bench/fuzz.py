"""Long fuzz run against a real agent: ``python -m bench.fuzz --seed S --count N``.

Starts a real ``myx_agent`` process on 127.0.0.1 (temp dir, empty
deployment-tool dir), draws N structure-aware bodies from
tests/support/rpc_fuzz.py with seed S (in a worker process, chunk by chunk,
while the previous chunk is being sent), POSTs each with the right token over
pinned TLS, judges each answer with ``rpc_fuzz.problems``, and checks a pinned
health_check every 500 requests. Prints figures: requests, answers by HTTP
status, failures (the first few bodies in full), rate, the agent's RSS and open
file descriptors before and after. Exits 1 on any failure.

``--surface api`` fuzzes the admin API instead: the real AdminAPI of
tests/support/fuzz_api.py (real routes and store; no agent is ever reached, no
command runs, no install starts) on 127.0.0.1, and the schemathesis CLI with
seed S against its own /api/openapi.json, every operation, positive and
negative data, checking for 5xx answers and responses that do not match the
document (status, content type, schema). It runs until the server has answered
N requests (then schemathesis is interrupted) or ``--max-time`` seconds; the
server counts its answers by status itself. Exits 1 on any failure.
Nothing here connects beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any, List, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from bench.agent_bench import Agent, proc_status, wait_ready
from tests.support.pinned_client import AgentClient
from tests.support.rpc_fuzz import generate, problems

API_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)

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


class _St(ProcessProtocol):
    """The schemathesis CLI: its output, and when it ended."""

    def __init__(self, copy_to: Optional[str] = None) -> None:
        self.output = bytearray()
        self.ended: Deferred[int] = Deferred()
        self.copy = open(copy_to, "ab") if copy_to else None  # noqa: SIM115 - closed at the end

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if self.copy is not None:
            self.copy.write(data)
            self.copy.flush()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if self.copy is not None:
            self.copy.close()
        self.ended.callback(-1 if code is None else int(code))


async def run_api(reactor: Any, args: argparse.Namespace) -> None:
    from tests.support.fuzz_api import serve, st_args, st_path

    tmp = tempfile.mkdtemp(prefix="myx-fuzz-api-")
    api = await serve(tmp, reactor, access_log=False)
    try:
        argv = [
            st_path(),
            *st_args(api.url, API_CHECKS),
            "--seed",
            str(args.seed),
            "--max-examples",
            str(args.max_examples),
            "--max-time",
            str(args.max_time),
            "--workers",
            str(args.workers),
            "--no-shrink",
            "--continue-on-failure",
            "--generation-database",
            "none",
        ]
        proto = _St(args.st_log)
        started = time.monotonic()
        env = {**os.environ, "NO_COLOR": "1"}
        transport = reactor.spawnProcess(proto, argv[0], argv, env=env, path=tmp)
        interrupted = False
        last_report = 0.0
        while not proto.ended.called:
            await task.deferLater(reactor, 1.0, lambda: None)
            if not interrupted and api.answered >= args.count:
                interrupted = True
                transport.signalProcess("INT")
            if time.monotonic() - last_report >= 60:
                last_report = time.monotonic()
                errors = sum(n for status, n in api.statuses.items() if status >= 500)
                print(f"  {api.answered}/{args.count} answered, {errors} 5xx", flush=True)
        code = await proto.ended
        elapsed = time.monotonic() - started
        text = proto.output.decode("utf-8", "replace")
        tail = text[text.rfind("SUMMARY") :] if "SUMMARY" in text else text[-4000:]
        server_errors = sum(n for status, n in api.statuses.items() if status >= 500)
        # "N generated, N passed", or "N generated, K found M unique failures".
        m = re.search(r"(\d+) generated, (?:(\d+) passed|\d+ found (\d+) unique failures?)", text)
        failed = (0 if m.group(2) is not None else int(m.group(3))) if m else None
        print(tail.rstrip())
        print(f"surface: api, seed {args.seed}, requests answered: {api.answered}")
        print(f"answers by HTTP status: {dict(sorted(api.statuses.items()))}")
        print(
            f"schemathesis exit {code}{' (interrupted at the count)' if interrupted else ''};"
            f" failed cases: {failed}; 5xx answers: {server_errors}"
        )
        print(f"elapsed {elapsed:.0f} s ({api.answered / max(elapsed, 1e-9):.0f} req/s)")
        if server_errors or failed is None or failed or (code != 0 and not interrupted):
            raise SystemExit(1)
    finally:
        await api.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--surface", choices=["agent", "api"], default="agent")
    parser.add_argument("--max-time", type=int, default=3600, help="api: seconds at most")
    parser.add_argument("--max-examples", type=int, default=1000, help="api: per operation")
    parser.add_argument("--workers", type=int, default=2, help="api: schemathesis workers")
    parser.add_argument("--st-log", help="api: also write schemathesis' output to this file")
    args = parser.parse_args(argv)
    runner = run_api if args.surface == "api" else run
    task.react(lambda reactor: Deferred.fromCoroutine(runner(reactor, args)))


if __name__ == "__main__":
    main()
