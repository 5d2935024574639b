"""Clock jumps (issue #12 §2): a real myxd whose wall clock moves by ±1 h.

The daemon is a real ``twistd -n myxd`` from the wheel's venv, run under
libfaketime (``apt-get install faketime``) with a control file: writing
``+3600`` to the file moves the daemon's wall clock (``time.time``,
``CLOCK_REALTIME``) one hour ahead at once, while its monotonic clock is left
alone (``FAKETIME_DONT_FAKE_MONOTONIC``), which is what an NTP step or an
operator's ``date -s`` does to a running process. Nothing else on the machine
sees the jump: the test, the fault proxy and the agent keep real time.

A real agent is adopted behind a FaultProxy that delays every chunk, so a
heartbeat is in flight for a while in every cycle. The clock jumps four times:
+1 h while the daemon waits for its next cycle, -1 h while a heartbeat is in
flight, -1 h while it waits, +1 h while one is in flight. The test timestamps
every ``heartbeat cycle`` log line with its own monotonic clock when it
arrives and checks, across all the jumps:

- no stall and no storm: consecutive cycles are ``heartbeat_min_interval`` to
  ``heartbeat_max_interval`` apart (plus the cycle's own duration), and the
  durations the daemon reports are real ones, not ±3600 s;
- no false offline: every cycle reads ``1 ok, 0 failed``, the agent is online
  after each jump, and no ``agent.unreachable`` or reinstall event was written;
- no request sent twice: the agent received exactly one request per cycle (a
  timeout fired early by a forward jump would abort the request and retry it);
- the jump was real: the agent's ``last_heartbeat`` as the daemon stores it
  (wall time) is an hour ahead of real time after the forward jump.

The schedule defaults to 2-3 s (about a minute in all);
``MYX_CLOCK_JUMP_SCHEDULE=20,60`` runs it with the production 20-60 s.
"""

from __future__ import annotations

import base64
import glob
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tests.daemon.api_helpers import TOKEN
from tests.daemon.daemon_harness import DaemonTestCase, request_lines
from tests.daemon.test_plugin import Daemon as TwistdProcess
from tests.reliability.harness import FaultTestCase
from tests.support import installed
from tests.support.agent_process import start_agent

log = Logger()

HOUR = 3600
LOW, HIGH = (float(x) for x in os.environ.get("MYX_CLOCK_JUMP_SCHEDULE", "2,3").split(","))
LATENCY = 0.6  # each way: a heartbeat batch is in flight for about 1.2 s
CYCLES_PER_JUMP = int(os.environ.get("MYX_CLOCK_JUMP_CYCLES", "3"))
SLACK = 3.0  # seconds of scheduling noise allowed on a loaded 2-core machine
# (offset of the daemon's wall clock from real time, where the jump lands)
JUMPS = [(+HOUR, "idle"), (0, "in flight"), (-HOUR, "idle"), (0, "in flight")]

CYCLE_LINE = re.compile(
    r"heartbeat cycle (\d+): (\d+) agents, (\d+) ok, (\d+) failed in (-?[\d.]+)s"
)


def faketime_library() -> str | None:
    for pattern in (
        "/usr/lib/*/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def need_faketime(test: TestCase) -> str:
    """libfaketime's library; a missing one fails the test (.ci/run installs it)."""
    lib = faketime_library()
    if lib is None:
        test.fail("libfaketime is not installed (apt-get install faketime; .ci/run does)")
    assert lib is not None
    return lib


def faketime_env(lib: str, control: str) -> dict[str, str]:
    """The process's wall clock follows ``control``; its monotonic clock does not."""
    return {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": control,
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def set_offset(control: str, seconds: int) -> None:
    """Move the daemon's wall clock to real time + ``seconds`` (atomically)."""
    tmp = control + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{seconds:+d}\n")
    os.replace(tmp, control)


@dataclass(frozen=True)
class Cycle:
    number: int
    agents: int
    ok: int
    failed: int
    duration: float
    arrived: float  # the test's time.monotonic() when the line arrived
    line: str


class CycleWatcher(TwistdProcess):
    """The twistd child; also every heartbeat cycle line, timestamped on arrival."""

    def __init__(self) -> None:
        super().__init__()
        self.cycles: list[Cycle] = []
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        super().outReceived(data)
        now = time.monotonic()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            m = CYCLE_LINE.search(line)
            if m is not None:
                self.cycles.append(
                    Cycle(
                        int(m.group(1)),
                        int(m.group(2)),
                        int(m.group(3)),
                        int(m.group(4)),
                        float(m.group(5)),
                        now,
                        line,
                    )
                )

    errReceived = outReceived


class _Base:
    base = ""


class ClockJumpTests(FaultTestCase):
    timeout = int(max(400, 4 * (len(JUMPS) * CYCLES_PER_JUMP + 4) * (HIGH + 5)))

    def spawn(self, control: str, lib: str) -> CycleWatcher:
        proto = CycleWatcher()
        twistd = installed.script("twistd")
        argv = [
            twistd,
            "--nodaemon",
            "--pidfile=",
            "myxd",
            "--data-dir",
            self.data_dir,
            "--api",
            "tcp:0:interface=127.0.0.1",
            "--admin-token",
            TOKEN,
            "--heartbeat-min-interval",
            f"{LOW:g}",
            "--heartbeat-max-interval",
            f"{HIGH:g}",
            "--rpc-timeout",
            "20",
            "--reinstall-after-cycles",
            "100000",
        ]
        env = installed.env(**faketime_env(lib, control))
        transport = self.reactor.spawnProcess(proto, twistd, argv, env=env, path=self.temp_dir())

        async def stop() -> None:
            if proto.reason is None:
                transport.signalProcess("KILL")
                await proto.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return proto

    async def next_cycles(self, proto: CycleWatcher, after: int, count: int) -> list[Cycle]:
        """Wait for ``count`` more cycle lines than ``after``; the new ones."""

        async def seen() -> int:
            if proto.reason is not None:
                self.fail(f"myxd exited:\n{proto.text}")
            return len(proto.cycles)

        try:
            await self.until(
                seen,
                lambda n: n >= after + count,
                f"{count} heartbeat cycles after #{after}",
                timeout=count * (HIGH + 10) + 60,
                interval=0.02,
            )
        except self.failureException as e:
            t0 = proto.cycles[0].arrived if proto.cycles else 0.0
            seen_lines = "\n".join(f"{c.arrived - t0:8.2f} {c.line}" for c in proto.cycles)
            self.fail(f"{e}\ncycles seen (s since the first):\n{seen_lines}")
        return proto.cycles[after : after + count]

    async def agent_record(self, agent_id: int) -> dict[str, Any]:
        code, body = await self.api("GET", f"/api/agents/{agent_id}")
        self.assertEqual(code, 200, body)
        return dict(body)

    async def test_heartbeats_keep_their_schedule_across_clock_jumps(self) -> None:
        lib = need_faketime(self)
        self.addCleanup(self.pool.closeCachedConnections)
        control = os.path.join(self.temp_dir(), "faketime")
        set_offset(control, 0)
        proto = self.spawn(control, lib)
        m = await proto.wait_for(r"myxd admin API listening on 127\.0\.0\.1:(\d+)")
        base = _Base()
        base.base = f"http://127.0.0.1:{m.group(1)}"
        self.daemon = base  # type: ignore[assignment]

        agent, proxy, agent_id = await self.proxied_agent()
        proxy.latency = LATENCY

        # Two cycles that saw the agent, before any jump: the baseline.
        def with_agent() -> list[Cycle]:
            return [c for c in proto.cycles if c.agents == 1]

        await self.until(
            lambda: _value(len(with_agent())), lambda n: n >= 2, "two cycles with the agent"
        )
        start = proto.cycles.index(with_agent()[-1])
        requests_at_start = len(request_lines(agent))
        jumps: list[tuple[int, str, float, int]] = []  # offset, where, when, cycles before
        last_heartbeat_ahead = 0.0
        for offset, where in JUMPS:
            seen = len(proto.cycles)
            # Land the jump between cycles (right after one ended) or while a
            # heartbeat is held in the proxy (its request has just arrived).
            await self.next_cycles(proto, seen, 1)
            if where == "in flight":
                chunks = proxy.counts["delayed_chunks"]
                await self.until(
                    lambda: _value(proxy.counts["delayed_chunks"]),
                    lambda n, c=chunks: n > c,  # type: ignore[misc]
                    "the next heartbeat request to reach the proxy",
                    timeout=HIGH + 30,
                    interval=0.01,
                )
            set_offset(control, offset)
            jumps.append((offset, where, time.monotonic(), len(proto.cycles)))
            await self.next_cycles(proto, len(proto.cycles), CYCLES_PER_JUMP)
            rec = await self.agent_record(agent_id)
            self.assertEqual(rec["status"], "online", rec)
            if offset == HOUR:
                last_heartbeat_ahead = float(rec["last_heartbeat"]) - time.time()
                # The daemon's wall clock really moved: it stamps records an hour ahead.
                self.assertGreater(last_heartbeat_ahead, HOUR - 120, rec)
        final = await self.next_cycles(proto, len(proto.cycles), 1)
        cycles = proto.cycles[start : proto.cycles.index(final[0]) + 1]

        # Every cycle saw the agent alive; the daemon reports real durations.
        for c in cycles:
            self.assertEqual((c.agents, c.ok, c.failed), (1, 1, 0), c.line)
            self.assertLess(abs(c.duration), 2 * LATENCY + SLACK, c.line)
        # Consecutive cycles keep the schedule: no stall, no storm.
        gaps = []
        for prev, cur in zip(cycles, cycles[1:]):
            self.assertEqual(cur.number, prev.number + 1, cur.line)
            gap = cur.arrived - prev.arrived
            gaps.append(gap)
            self.assertGreaterEqual(gap, LOW - 0.5, f"cycle {cur.number} came early: {gap:.2f} s")
            self.assertLessEqual(
                gap, HIGH + cur.duration + SLACK, f"cycle {cur.number} came late: {gap:.2f} s"
            )
        # One request per cycle reached the agent: no timeout fired early.
        requests = len(request_lines(agent)) - requests_at_start
        self.assertEqual(requests, len(cycles) - 1, "requests at the agent vs cycles")
        code, events = await self.api("GET", "/api/events?limit=500")
        self.assertEqual(code, 200, events)
        items = events["events"]
        self.assertFalse(
            [e for e in items if re.search(r"unreachable|reinstall", str(e.get("action")))],
            "an agent.unreachable or reinstall event",
        )
        self.assertNotIn("Traceback", proto.text)
        log.info(
            "fault figures: clock jumps {jumps}; schedule {low:g}-{high:g} s; {cycles} cycles,"
            " gaps {gmin:.2f}-{gmax:.2f} s, {requests} requests at the agent, 0 failed;"
            " last_heartbeat {ahead:.0f} s ahead of real time after +1 h",
            jumps=", ".join(f"{o:+d} s ({w})" for o, w, _, _ in jumps),
            low=LOW,
            high=HIGH,
            cycles=len(cycles),
            gmin=min(gaps),
            gmax=max(gaps),
            requests=requests,
            ahead=last_heartbeat_ahead,
        )


async def _value(value: Any) -> Any:
    return value


class AgentClockJumpTests(DaemonTestCase):
    """A real agent whose wall clock moves by ±1 h (libfaketime, as above): its
    command timeouts keep real time, and what it reports keeps wall time. The
    commands themselves run without libfaketime (``env -u LD_PRELOAD``): only the
    agent's clock is under test."""

    async def final(self, agent: Any, command_id: str) -> tuple[dict[str, Any], bytes]:
        """The command's final result and output, by long-polls; fails after 120 s."""
        offset, out = 0, b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = await agent.call(
                "get_command_log", {"command_id": command_id, "offset": offset, "wait": 5}
            )
            out += base64.b64decode(r["log_data"])
            offset = r["new_offset"]
            if r["is_final"]:
                return r["result"], out
        self.fail(f"command {command_id} not final after 120 s")

    async def test_command_timeouts_keep_real_time_across_clock_jumps(self) -> None:
        lib = need_faketime(self)
        control = os.path.join(self.temp_dir(), "faketime")
        set_offset(control, 0)
        agent = await start_agent(self, env=faketime_env(lib, control))

        def run(command_id: str, script: str, timeout: float) -> dict[str, Any]:
            return {
                "command_id": command_id,
                "command": "/usr/bin/env",
                "args": ["-u", "LD_PRELOAD", "/bin/sh", "-c", script],
                "timeout": timeout,
            }

        # +1 h while a command with a 30 s timeout runs: the timeout does not fire
        # (on the wall clock, 3,600 s passed at once).
        await agent.call("execute_command", run("fwd", "sleep 2; echo done", 30))
        set_offset(control, +HOUR)
        result, out = await self.final(agent, "fwd")
        self.assertTrue(result["success"], result)
        self.assertFalse(result["timed_out"], result)
        self.assertEqual(out, b"done\n")
        # The jump was real: the agent reports (heartbeat) and stamps wall time an hour ahead.
        status = await agent.call("heartbeat")
        self.assertGreater(status["time"] - time.time(), HOUR - 120, status)
        self.assertGreater(result["finished_at"] - time.time(), HOUR - 120, result)

        # Back to -1 h while a command with a 2 s timeout sleeps: the timeout fires
        # after about 2 s of real time, not after the wall clock catches up.
        started = time.monotonic()
        await agent.call("execute_command", run("back", "sleep 60", 2))
        set_offset(control, -HOUR)
        result, _ = await self.final(agent, "back")
        took = time.monotonic() - started
        # A wall-clock timer would have held it for an hour: the sleep would have
        # ended on its own after 60 s, a success.
        self.assertTrue(result["timed_out"], result)
        self.assertLess(result["finished_at"] - time.time(), -HOUR + 120, result)
        log.info(
            "fault figures: agent clock jumps +3600 s and -3600 s; the 30 s timeout did not"
            " fire early, the 2 s timeout fired after {took:.2f} s of real time",
            took=took,
        )
