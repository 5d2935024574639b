"""Fleet simulator: one process hosting N agent endpoints with the real agent stack.

Each endpoint is what a real ``myx_agent`` serves, minus the process: its own
TLS identity (EC P-256 certificate, cached on disk so a second run starts fast,
but one per endpoint), its own port on 127.0.0.1, token and rpc_path, its own
``CommandRunner`` and state dir, the real ``Dispatcher`` / ``AgentMethods``
method table and the real HTTP layer from ``myx_agent.rpc_server.build_factory``
behind ``reactor.listenSSL`` with ``myx_agent.tls.server_context``.

Run from the repository root:

    .venv/bin/python -m bench.fleet_sim --count 1000 --base-port 20000 --out fleet.jsonl

It prints ``READY <n> <out>`` once every endpoint listens and the adoption file
is written (JSON lines: host, rpc_port, rpc_path, token, cert_fingerprint, index),
then serves until SIGTERM/SIGINT or ``--duration`` seconds. Several processes
share a fleet with ``--shard i/n`` (each hosts every index ``k`` of
``range(count)`` whose ``k * n // count == i``, so the shards' files concatenate
to the whole fleet); one process is limited by RLIMIT_NOFILE (two descriptors
per endpoint under load: the listener and the daemon's keep-alive connection).

Faults, for the false-offline and retry measurements (on ``--fault-fraction``
of the endpoints, chosen by index):
- ``--latency-ms X [--jitter-ms J]``: every answer is delayed by X (+- J) ms;
- ``--fail-rate P --fail-mode reset|http500|hang``: each request is, with
  probability P, answered by a connection reset, an HTTP 500, or never.

``--record FILE`` writes, at exit, the arrival times (epoch seconds) of every
request that carried a ``heartbeat`` call, per endpoint index: B3 computes
heartbeat lateness and gaps from it.

Everything binds 127.0.0.1 only. State dirs live under ``--root`` (default
``/dev/shm/myx-fleet-sim``: on one simulated host, N agents' fsyncs would
otherwise queue on one disk, which N real hosts do not) and are removed at exit;
the certificate cache is kept for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import shutil
import sys
import tempfile
import time
from array import array
from typing import Any, Dict, List, Optional, Tuple

DEFAULT_ROOT = (
    "/dev/shm/myx-fleet-sim"
    if os.path.isdir("/dev/shm")
    else os.path.join(tempfile.gettempdir(), "myx-fleet-sim")
)
HOST = "127.0.0.1"


def raise_nofile() -> Tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def shard_indices(count: int, shard: int, shards: int) -> List[int]:
    return [k for k in range(count) if k * shards // count == shard]


def parse_shard(text: str) -> Tuple[int, int]:
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError("--shard is i/n, e.g. 0/2") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError("--shard i/n needs 0 <= i < n")
    return i, n


class DelayedDispatcher:
    """Answers after an artificial delay (the inner dispatch runs first, as an
    agent on a far link would: the work is done, the answer travels slowly)."""

    def __init__(
        self, inner: Any, reactor: Any, delay: float, jitter: float, rng: random.Random
    ) -> None:
        self._inner = inner
        self._reactor = reactor
        self._delay = delay
        self._jitter = jitter
        self._rng = rng

    @property
    def method_names(self) -> Any:
        return self._inner.method_names

    def dispatch(self, body: bytes) -> Any:
        from twisted.internet.defer import Deferred

        d = self._inner.dispatch(body)
        delay = max(
            0.0,
            self._delay + (self._rng.uniform(-self._jitter, self._jitter) if self._jitter else 0.0),
        )
        out: Deferred[Any] = Deferred()

        def later(result: Any) -> None:
            self._reactor.callLater(delay, out.callback, result)

        d.addCallback(later)
        d.addErrback(out.errback)
        return out


class RecordingDispatcher:
    """Notes the arrival time of every request that holds a heartbeat call."""

    def __init__(self, inner: Any, times: array) -> None:
        self._inner = inner
        self._times = times

    @property
    def method_names(self) -> Any:
        return self._inner.method_names

    def dispatch(self, body: bytes) -> Any:
        # A byte search, not a parse: the real dispatcher parses it right after.
        if b'"heartbeat"' in body:
            self._times.append(time.time())
        return self._inner.dispatch(body)


def fault_factory(site: Any, rate: float, mode: str, rng: random.Random) -> Any:
    """Wrap the HTTP site so that a request is, with probability `rate`, failed."""
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

    class FaultyProtocol(ProtocolWrapper):
        hung = False

        def dataReceived(self, data: bytes) -> None:
            if self.hung:
                return
            if data[:5] == b"POST " and rng.random() < rate:
                transport: Any = self.transport
                if mode == "reset":
                    transport.abortConnection()
                    return
                if mode == "http500":
                    body = b"simulated failure\n"
                    transport.write(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: "
                        b"%d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                    )
                    transport.loseConnection()
                    return
                self.hung = True  # "hang": swallow this connection's requests
                return
            super().dataReceived(data)

    class FaultyFactory(WrappingFactory):
        protocol = FaultyProtocol
        noisy = False

    return FaultyFactory(site)


class Endpoint:
    """One simulated agent: identity, runner, listener."""

    def __init__(self, index: int, port: Any, runner: Any, info: Dict[str, Any]) -> None:
        self.index = index
        self.port = port
        self.runner = runner
        self.info = info


def build_endpoint(
    index: int,
    args: argparse.Namespace,
    reactor: Any,
    system: Any,
    run_dir: str,
    times: Optional[array],
    rng: random.Random,
) -> Endpoint:
    from twisted.internet.error import CannotListenError

    from myx_agent.commands import CommandRunner
    from myx_agent.deploytool import read_deployment_tool_version, sync_deployment_tool
    from myx_agent.jsonrpc import Dispatcher
    from myx_agent.methods import AgentMethods
    from myx_agent.rpc_server import build_factory
    from myx_agent.tls import ensure_identity, fingerprint_of_pem, server_context

    ssl_dir = os.path.join(args.root, "certs", f"{index:06d}")
    cert_pem, key_pem = ensure_identity(ssl_dir)
    context = server_context(cert_pem, key_pem, ssl_dir)
    fingerprint = fingerprint_of_pem(cert_pem)
    state_dir = os.path.join(run_dir, "state", f"{index:06d}")
    tool_dir = os.path.join(run_dir, "tool", f"{index:06d}")
    runner = CommandRunner(
        state_dir, deployment_tool_dir=tool_dir, max_concurrent=args.max_concurrent, reactor=reactor
    )
    token = secrets.token_urlsafe(24)
    rpc_path = secrets.token_urlsafe(18)

    faulty = (index * 7919) % 1000 < args.fault_fraction * 1000

    wanted = args.base_port + index if args.base_port else 0
    methods = AgentMethods(
        runner=runner,
        rpc_port=wanted,
        cert_fingerprint=fingerprint,
        deployment_tool_dir=tool_dir,
        sync_tool=lambda d, archive, sha, version: sync_deployment_tool(
            d, archive, sha, version, reactor=reactor
        ),
        read_tool_version=read_deployment_tool_version,
        system=system,
        reactor=reactor,
    )
    dispatcher: Any = Dispatcher(methods.table())
    if faulty and args.latency_ms > 0:
        dispatcher = DelayedDispatcher(
            dispatcher, reactor, args.latency_ms / 1000.0, args.jitter_ms / 1000.0, rng
        )
    if times is not None:
        dispatcher = RecordingDispatcher(dispatcher, times)
    factory: Any = build_factory(
        rpc_path=rpc_path, token=token, dispatcher=dispatcher, reactor=reactor
    )
    if faulty and args.fail_rate > 0:
        factory = fault_factory(factory, args.fail_rate, args.fail_mode, rng)
    try:
        port = reactor.listenSSL(wanted, factory, context, interface=HOST, backlog=512)
    except CannotListenError:
        port = reactor.listenSSL(0, factory, context, interface=HOST, backlog=512)
    actual = port.getHost().port
    # get_port/get_status must report the port really listened on (the wanted
    # one was taken when this differs).
    methods._rpc_port = actual
    runner.startService()
    info = {
        "host": HOST,
        "rpc_port": actual,
        "rpc_path": rpc_path,
        "token": token,
        "cert_fingerprint": fingerprint,
        "index": index,
    }
    return Endpoint(index, port, runner, info)


def _write_atomic(path: str, text: str, mode: int = 0o600) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _quiet_logging() -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    # The agent logs every request at info; a simulator of thousands of agents
    # keeps warnings only (still on stderr, so a real problem shows).
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=int, required=True, help="endpoints in the whole fleet")
    p.add_argument(
        "--base-port",
        type=int,
        default=0,
        help="endpoint k listens on base+k (0: any free port); a taken port "
        "falls back to a free one",
    )
    p.add_argument("--out", required=True, help="adoption file to write (JSON lines)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n (default 0/1)")
    p.add_argument(
        "--root",
        default=DEFAULT_ROOT,
        help=f"certificate cache and state dirs (default {DEFAULT_ROOT})",
    )
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--fail-mode", choices=("reset", "http500", "hang"), default="reset")
    p.add_argument(
        "--fault-fraction",
        type=float,
        default=1.0,
        help="share of endpoints that get the latency/failure (default all)",
    )
    p.add_argument(
        "--max-concurrent", type=int, default=32, help="max_concurrent_commands per endpoint"
    )
    p.add_argument("--record", help="write heartbeat arrival times here at exit (JSON)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many s")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    soft, hard = raise_nofile()
    shard, shards = args.shard
    indices = shard_indices(args.count, shard, shards)
    need = 2 * len(indices) + 64
    if soft < need:
        sys.stderr.write(
            f"fleet_sim: RLIMIT_NOFILE {soft} < {need} needed for "
            f"{len(indices)} endpoints; use more --shard processes\n"
        )
        return 2

    from twisted.internet import reactor

    from myx_agent.sysinfo import SystemInfo

    _quiet_logging()
    os.makedirs(args.root, mode=0o700, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=args.root)
    rng = random.Random(args.seed)
    system = SystemInfo()
    recordings: Dict[int, array] = {}
    endpoints: List[Endpoint] = []
    t0 = time.monotonic()
    try:
        for k in indices:
            times = None
            if args.record:
                times = recordings.setdefault(k, array("d"))
            endpoints.append(build_endpoint(k, args, reactor, system, run_dir, times, rng))
    except Exception:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    lines = "".join(json.dumps(e.info, separators=(",", ":")) + "\n" for e in endpoints)
    _write_atomic(args.out, lines)
    sys.stdout.write(
        f"READY {len(endpoints)} {args.out} setup={time.monotonic() - t0:.1f}s nofile={soft}\n"
    )
    sys.stdout.flush()

    stopping = [False]

    async def shutdown() -> None:
        from twisted.internet.defer import gatherResults

        for e in endpoints:
            e.port.stopListening()
        stops = []
        for e in endpoints:
            d = e.runner.stopService()
            d.addTimeout(20, reactor)
            d.addErrback(lambda _: None)
            stops.append(d)
        await gatherResults(stops)
        if args.record:
            data = {str(k): list(v) for k, v in recordings.items()}
            _write_atomic(args.record, json.dumps(data))
        shutil.rmtree(run_dir, ignore_errors=True)

    def before_shutdown() -> Any:
        from twisted.internet.defer import Deferred

        stopping[0] = True
        return Deferred.fromCoroutine(shutdown())

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    if args.duration > 0:
        reactor.callLater(args.duration, reactor.stop)
    # Twisted's own handlers: SIGTERM/SIGINT stop the reactor (running the
    # shutdown above), and SIGCHLD reaps the commands' processes.
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
