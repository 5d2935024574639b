"""The fast paths added for issue 5 (benchmarks): they must keep the behaviour of
the slow ones they replace.

- ``Store.read_command_output``: one transaction = ``get_command`` + ``read_output``;
  concurrent reads are grouped into one transaction, each answered on its own.
- ``PinnedTLSPolicy``: one SSL context for every agent, buffers released while idle.
- ``_PinnedEndpointFactory``: https only; an IP literal is dialled directly (no
  resolver thread), and nothing is built for a request the pool serves.
- ``log_poll_wait = 0``: the architecture's plain polling is a valid setting,
  and a real daemon with it reads a real command's output with ``wait=0``
  polls, byte for byte.
"""

from __future__ import annotations

import sys
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported

from myxd.config import Settings, load_settings
from myxd.errors import ConfigError
from myxd.rpc.client import _PinnedEndpointFactory
from myxd.rpc.tls import PinnedTLSPolicy, PinRegistry
from myxd.store import OutputChunk
from tests.daemon.test_store import StoreTestBase, d
from tests.reliability.harness import SCRIPT, FaultTestCase, expected_output, marker_runs
from tests.support.agent_process import start_agent

PIN = "cd" * 32


class ReadCommandOutputTests(StoreTestBase):
    def test_same_as_get_command_and_read_output(self) -> Deferred[Any]:
        async def go() -> None:
            agent_id = await self.agent(9100)
            rec = await self.store.create_command(
                agent_id=agent_id, kind="command", command="echo", args=["x"], timeout=None
            )
            await self.store.append_output(rec.id, 0, "stdout", b"hello ")
            await self.store.append_output(rec.id, 6, "stderr", b"oops")
            for offset, max_bytes in ((0, 1 << 20), (3, 5), (10, 1), (7, 100)):
                got_rec, got_chunks = await self.store.read_command_output(
                    rec.id, offset, max_bytes
                )
                self.assertEqual(got_rec, await self.store.get_command(rec.id))
                self.assertEqual(
                    got_chunks, await self.store.read_output(rec.id, offset, max_bytes)
                )
            _, chunks = await self.store.read_command_output(rec.id, 3, 5)
            self.assertEqual(
                chunks, [OutputChunk(3, "stdout", b"lo "), OutputChunk(6, "stderr", b"oo")]
            )

        return d(go())

    def test_unknown_command_and_bad_arguments(self) -> Deferred[Any]:
        async def go() -> None:
            self.assertEqual(await self.store.read_command_output(12345), (None, []))
            with self.assertRaises(ValueError):
                await self.store.read_command_output(12345, -1)
            with self.assertRaises(ValueError):
                await self.store.read_command_output(12345, 0, 0)

        return d(go())

    def test_concurrent_reads_are_grouped_and_each_answered(self) -> Deferred[Any]:
        async def go() -> None:
            agent_id = await self.agent(9103)
            rec = await self.store.create_command(
                agent_id=agent_id, kind="command", command="echo", args=[], timeout=None
            )
            await self.store.append_output(rec.id, 0, "stdout", b"abcdef")
            trips: list[str] = []
            real_run = self.service.db.run

            def counting_run(interaction: Any, *args: Any) -> Deferred[Any]:
                trips.append(getattr(interaction, "__name__", "?"))
                return real_run(interaction, *args)

            self.patch(self.service.db, "run", counting_run)
            asked = [
                (rec.id, 0, 1 << 20),
                (rec.id, 2, 2),
                (rec.id, -1, 10),  # bad offset: fails alone
                (rec.id + 1000, 0, 10),  # unknown command
                (rec.id, 6, 10),  # at the end
                (rec.id, 0, 0),  # bad size: fails alone
            ]
            reads = [self.store.read_command_output(*a) for a in asked]
            results: list[Any] = []
            for r in reads:
                try:
                    got, chunks = await r
                    results.append((got, chunks))
                except ValueError:
                    results.append("ValueError")
            # The first read went at once; the five asked while it ran, together.
            self.assertEqual(trips, ["_read_batch", "_read_batch"])
            self.patch(self.service.db, "run", real_run)
            current = await self.store.get_command(rec.id)
            self.assertEqual(
                results,
                [
                    (current, [OutputChunk(0, "stdout", b"abcdef")]),
                    (current, [OutputChunk(2, "stdout", b"cd")]),
                    "ValueError",
                    (None, []),
                    (current, []),
                    "ValueError",
                ],
            )
            # The same answers one by one, ungrouped.
            for a, expected in zip(asked, results, strict=True):
                if expected == "ValueError":
                    with self.assertRaises(ValueError):
                        await self.store.read_command_output(*a)
                else:
                    self.assertEqual(await self.store.read_command_output(*a), expected)

        return d(go())

    def test_a_read_sees_every_append_that_finished_before_it(self) -> Deferred[Any]:
        async def go() -> None:
            agent_id = await self.agent(9104)
            rec = await self.store.create_command(
                agent_id=agent_id, kind="command", command="echo", args=[], timeout=None
            )
            offset = 0
            for i in range(20):
                line = f"line {i}\n".encode()
                # A read in flight, so the next read is queued behind it.
                before = self.store.read_command_output(rec.id, 0)
                offset = await self.store.append_output(rec.id, offset, "stdout", line)
                got, chunks = await self.store.read_command_output(rec.id, 0)
                self.assertEqual(got.output_offset, offset)
                self.assertEqual(
                    b"".join(c.data for c in chunks),
                    b"".join(f"line {j}\n".encode() for j in range(i + 1)),
                )
                await before

        return d(go())


class GroupCommitTests(StoreTestBase):
    def test_concurrent_appends_are_each_answered_and_a_bad_one_stops_no_other(
        self,
    ) -> Deferred[Any]:
        async def go() -> None:
            agent_id = await self.agent(9101)
            a = await self.store.create_command(
                agent_id=agent_id, kind="command", command="a", args=[], timeout=None
            )
            b = await self.store.create_command(
                agent_id=agent_id, kind="command", command="b", args=[], timeout=None
            )
            # Issued together: the first goes alone, the rest queue behind it and
            # are written in one later transaction, in the order issued.
            ds = [
                self.store.append_output(a.id, 0, "stdout", b"12"),
                self.store.append_output(a.id, 2, "stdout", b"34"),
                self.store.append_output(b.id, 5, "stdout", b"gap"),  # gap
                self.store.append_output(a.id, 0, "stdout", b"1234"),  # replay
                self.store.append_output(b.id, 0, "stderr", b"xy"),
                self.store.append_output(999, 0, "stdout", b"z"),  # unknown
                self.store.append_output(b.id, 2, "bogus", b"z"),
            ]  # bad stream
            results = []
            for x in ds:
                try:
                    results.append(await x)
                except Exception as e:
                    results.append(type(e).__name__)
            self.assertEqual(results, [2, 4, "OutputGapError", 4, 2, "NotFoundError", "ValueError"])
            self.assertEqual(
                await self.store.read_output(a.id), [OutputChunk(0, "stdout", b"1234")]
            )
            self.assertEqual(await self.store.read_output(b.id), [OutputChunk(0, "stderr", b"xy")])

        return d(go())

    def test_stop_waits_for_queued_appends(self) -> Deferred[Any]:
        async def go() -> None:
            agent_id = await self.agent(9102)
            rec = await self.store.create_command(
                agent_id=agent_id, kind="command", command="a", args=[], timeout=None
            )
            ds = [self.store.append_output(rec.id, i, "stdout", b"x") for i in range(5)]
            await self.service.stopService()
            self.assertEqual([self.successResultOf(x) for x in ds], [1, 2, 3, 4, 5])
            svc = await self.open()
            stored = await svc.store.get_command(rec.id)
            self.assertEqual(stored.output_offset if stored else None, 5)

        return d(go())


class SharedContextTests(unittest.TestCase):
    def test_context_releases_idle_buffers_and_verifies_the_peer(self) -> None:
        policy = PinnedTLSPolicy(PinRegistry())
        # set_mode(0) changes nothing and returns the mode in force.
        self.assertTrue(policy.context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)
        self.assertEqual(
            policy.context.get_verify_mode(), SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        )


class EndpointFactoryTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pins = PinRegistry()
        self.factory = _PinnedEndpointFactory(self.reactor, PinnedTLSPolicy(self.pins), 7.0)

    def test_only_https(self) -> None:
        with self.assertRaises(SchemeNotSupported):
            self.factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:9000/p/rpc"))

    def test_nothing_is_dialled_until_connect(self) -> None:
        self.factory.endpointForURI(URI.fromBytes(b"https://127.0.0.1:9000/p/rpc"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_ip_literal_dialled_directly_with_timeout(self) -> None:
        self.pins.set("127.0.0.1", 9000, PIN)
        endpoint = self.factory.endpointForURI(URI.fromBytes(b"https://127.0.0.1:9000/p/rpc"))
        endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, _factory, timeout, _bind)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9000, 7.0))

    def test_ipv6_literal_dialled_directly(self) -> None:
        endpoint = self.factory.endpointForURI(URI.fromBytes(b"https://[::1]:9001/p/rpc"))
        endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("::1", 9001))


class PlainPollingSettingTests(unittest.TestCase):
    def test_zero_wait_is_plain_polling(self) -> None:
        self.assertEqual(Settings(log_poll_wait=0).log_poll_wait, 0)
        self.assertEqual(load_settings(None, {"log_poll_wait": "0"}).log_poll_wait, 0)

    def test_negative_wait_is_refused(self) -> None:
        with self.assertRaises(ConfigError):
            Settings(log_poll_wait=-1)


class PlainPollingRunTests(FaultTestCase):
    async def test_zero_wait_reads_output_by_plain_polls(self) -> None:
        daemon = await self.start_daemon(log_poll_wait=0, log_poll_interval=0.1)
        queue = daemon.service("commands")
        polls: list[dict[str, Any]] = []
        original = queue._rpc.call

        def call(ep: Any, method: str, params: Any = None, **kw: Any) -> Any:
            # Test-side instrumentation of the queue's one RPC client.
            if method == "get_command_log":
                polls.append(dict(params))
            return original(ep, method, params, **kw)

        queue._rpc.call = call
        agent = await start_agent(self)
        agent_id = await self.adopt(agent)
        records = 640  # 10 pauses of 0.1 s: the output spans many polls
        marker = self.temp_dir() + "/runs"
        code, body = await self.api(
            "POST",
            f"/api/agents/{agent_id}/commands",
            {"command": sys.executable, "args": ["-c", SCRIPT, marker, str(records), "0.1"]},
        )
        self.assertEqual(code, 201, body)
        final = await self.wait_final(int(body["id"]))
        self.assertEqual(final["status"], "success", final)
        self.assertTrue(await self.read_all(int(body["id"])) == expected_output(records))
        self.assertEqual(marker_runs(marker), 1)
        self.assertGreater(len(polls), 5, polls)
        self.assertEqual({p.get("wait") for p in polls}, {0}, polls[:3])
