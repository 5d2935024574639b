"""Connection floods and slowloris against a real agent and a real admin API (§3).

1,000 connections are held open against each: half never send a byte (for the
agent: not even a TLS ClientHello), half send the start of a request and then
trickle one header byte a second. While they are held a real request still
succeeds; the agent's file descriptors and memory stay bounded (read from
/proc); and every held connection is dropped by the server's header deadline
(30 s, docs/protocol.md and docs/operations.md), after which the descriptors
are back to where they were. The figures are logged for docs/reliability.md.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, cast

from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from myx_agent.rpc_server import HEADER_TIMEOUT as AGENT_HEADER_TIMEOUT
from myxd.api.deadlines import HEADER_TIMEOUT as API_HEADER_TIMEOUT
from tests.daemon.daemon_harness import DaemonTestCase
from tests.support.agent_process import start_agent
from tests.support.pinned_client import RawTLS

IDLE = 500
TRICKLE = 500
# A baseline descriptor count may include a connection that is just closing
# (the start-up probe's, a pooled client's): comparisons allow this many.
SLACK = 3
log = Logger()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def at_least(wanted: int, n: int) -> bool:
    return n >= wanted


def abort(p: Any) -> None:
    if not p.closed and p.transport is not None:
        p.transport.abortConnection()


class Held(Protocol):
    def __init__(self) -> None:
        self.closed = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True


class FloodTestCase(DaemonTestCase):
    timeout = 600

    async def idle_connections(
        self, port: int, count: int, pid: int, per: int, kind: type[Held] = Held
    ) -> list[Held]:
        """*count* connections that send nothing, each one accepted by the server.

        They are opened in batches smaller than the listen backlog, and the next
        batch waits until the server process holds descriptors for this one
        (*per* descriptors per connection in process *pid*): a connection the
        kernel dropped from a full accept queue looks open to a silent client
        forever, but holds nothing on the server.
        """
        held: list[Held] = []
        for start in range(0, count, 40):
            before = fd_count(pid)
            batch = [kind() for _ in range(min(40, count - start))]
            await DeferredList(
                [
                    connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", port), p)
                    for p in batch
                ],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
            wanted = before + per * (len(batch) - SLACK)
            await self.until(
                lambda: deferLater(self.reactor, 0, fd_count, pid),
                partial(at_least, wanted),
                "the server to accept a batch",
                interval=0.01,
            )
            held += batch
        for p in held:
            self.addCleanup(abort, p)
        return held

    def trickle(self, writers: list[Any], filler: bytes) -> LoopingCall:
        """Write one more byte of a never-ending header on every writer, every second."""
        state = {"n": 0}

        def tick() -> None:
            byte = filler[state["n"] % len(filler) : state["n"] % len(filler) + 1]
            state["n"] += 1
            for w in writers:
                if not w.is_closed:
                    w.write(byte)

        loop = LoopingCall(tick)
        loop.clock = self.reactor
        loop.start(1.0)
        self.addCleanup(lambda: loop.stop() if loop.running else None)
        return loop

    async def wait_all_closed(self, conns: list[Any], limit: float) -> float:
        started = self.reactor.seconds()
        await self.until(
            lambda: deferLater(self.reactor, 0, lambda: sum(not c.is_closed for c in conns)),
            lambda open_: open_ == 0,
            "the server to drop every held connection",
            timeout=limit,
            interval=0.5,
        )
        return self.reactor.seconds() - started


class _TCPView:
    """RawTLS-like view of a Held protocol (is_closed, write)."""

    def __init__(self, p: Held) -> None:
        self.p = p

    @property
    def is_closed(self) -> bool:
        return self.p.closed

    def write(self, data: bytes) -> None:
        assert self.p.transport is not None
        self.p.transport.write(data)


class _PlainHTTP(Held):
    @property
    def is_closed(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class AgentFloodTests(FloodTestCase):
    async def test_agent_holds_1000_slow_connections_and_sheds_them(self) -> None:
        agent = await start_agent(self)
        pid = agent.pid
        fds0, rss0 = fd_count(pid), rss_kib(pid)
        idle = [_TCPView(p) for p in await self.idle_connections(agent.port, IDLE, pid, 1)]
        tricklers: list[RawTLS] = []
        for _ in range(TRICKLE):
            raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint)
            raw.write(b"POST /%s/rpc HTTP/1.1\r\nHost: a\r\nX-Slow: " % agent.rpc_path.encode())
            tricklers.append(raw)
            self.addCleanup(raw.close)
        opened = self.reactor.seconds()
        self.trickle(tricklers, b"abcdefghij")
        peak = await self.until(
            lambda: deferLater(self.reactor, 0, fd_count, pid),
            lambda n: n >= fds0 + IDLE + TRICKLE - SLACK or any(t.is_closed for t in tricklers),
            "the agent to hold the connections",
        )
        self.assertGreaterEqual(peak, fds0 + IDLE + TRICKLE - SLACK)  # all held at once
        # A real request still succeeds while all of them are held.
        self.assertEqual(await agent.client().call("health_check"), {"status": "ok"})
        rss1 = rss_kib(pid)
        self.assertLessEqual(peak, fds0 + IDLE + TRICKLE + 20)
        self.assertLess(rss1 - rss0, 200 * 1024, "agent RSS grew by 200 MiB or more")
        held = await self.wait_all_closed(idle + tricklers, AGENT_HEADER_TIMEOUT * 3 + 60)
        fds1 = await self.until(
            lambda: deferLater(self.reactor, 0, fd_count, pid),
            lambda n: n <= fds0 + 3,
            "the agent's descriptors to come back",
        )
        log.info(
            "flood figures: agent held {n} connections, fds {fds0} -> {peak} -> {fds1}, "
            "RSS {rss0} -> {rss1} KiB, all dropped {held:.1f} s after the last opened",
            n=IDLE + TRICKLE,
            fds0=fds0,
            peak=peak,
            fds1=fds1,
            rss0=rss0,
            rss1=rss1,
            held=self.reactor.seconds() - opened,
        )
        del held
        self.assertTrue(agent.running)
        self.assertEqual(await agent.client().call("health_check"), {"status": "ok"})


class APIFloodTests(FloodTestCase):
    async def test_api_holds_1000_slow_connections_and_sheds_them(self) -> None:
        await self.daemon.start()
        port = int(self.daemon.base.rsplit(":", 1)[1])
        pid = os.getpid()  # the daemon runs in this process
        fds0, rss0 = fd_count(pid), rss_kib(pid)
        idle = [_TCPView(p) for p in await self.idle_connections(port, IDLE, pid, 2)]
        tricklers = await self.idle_connections(port, TRICKLE, pid, 2, _PlainHTTP)
        for p in tricklers:
            cast(_PlainHTTP, p).write(b"GET /api/agents HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        self.trickle(tricklers, b"abcdefghij")
        await deferLater(self.reactor, 1.5, lambda: None)
        code, body = await self.api("GET", "/api/agents")
        self.assertEqual(code, 200, body)
        code, _ = await self.api("GET", "/api/health", auth=False)
        self.assertEqual(code, 200)
        # Both ends live in this process: 2 descriptors per held connection.
        peak, rss1 = fd_count(pid), rss_kib(pid)
        self.assertLessEqual(peak, fds0 + 2 * (IDLE + TRICKLE) + 40)
        self.assertGreaterEqual(peak, fds0 + 2 * (IDLE + TRICKLE - SLACK))  # all held at once
        self.assertLess(rss1 - rss0, 200 * 1024)
        opened = self.reactor.seconds()
        await self.wait_all_closed(idle + tricklers, API_HEADER_TIMEOUT * 3 + 60)
        fds1 = await self.until(
            lambda: deferLater(self.reactor, 0, fd_count, pid),
            lambda n: n <= fds0 + 10,
            "the descriptors to come back",
        )
        log.info(
            "flood figures: admin API held {n} connections, fds {fds0} -> {peak} -> {fds1}, "
            "RSS {rss0} -> {rss1} KiB, all dropped within {held:.1f} s",
            n=IDLE + TRICKLE,
            fds0=fds0,
            peak=peak,
            fds1=fds1,
            rss0=rss0,
            rss1=rss1,
            held=self.reactor.seconds() - opened,
        )
        code, _ = await self.api("GET", "/api/health", auth=False)
        self.assertEqual(code, 200)
