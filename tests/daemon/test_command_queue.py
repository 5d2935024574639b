"""CommandQueue on a Clock: execute, long-poll log streaming, finals, failures, resume."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from myxd.errors import NotFoundError
from myxd.fleet.commands import LOG_CHUNK_BYTES, CommandQueue, CommandUpdate
from myxd.rpc import AgentEndpoint, RemoteError
from myxd.store.records import CommandRecord
from tests.daemon.fleet_fakes import FakeStore, ScriptedRPC, agent_record, settings, unreachable

OK_RESULT = {
    "success": True,
    "return_code": 0,
    "stdout": "aGk=",
    "stderr": "",
    "stdout_truncated": False,
    "stderr_truncated": False,
    "timed_out": False,
    "cancelled": False,
    "interrupted": False,
    "error": None,
    "started_at": 1.0,
    "finished_at": 2.5,
    "kind": "command",
}


class FakeCommandLog:
    """The agent's side of one command: a combined stream with long-poll reads."""

    def __init__(self, clock: Clock, *, long_poll: bool = True) -> None:
        self.clock = clock
        self.long_poll = long_poll
        self.segments: list[tuple[int, str, bytes]] = []
        self.size = 0
        self.result: dict[str, Any] | None = None
        self.waiters: list[Deferred[None]] = []

    def write(self, stream: str, data: bytes) -> None:
        self.segments.append((self.size, stream, data))
        self.size += len(data)
        self._wake()

    def finish(self, result: dict[str, Any]) -> None:
        self.result = result
        self._wake()

    @property
    def data(self) -> bytes:
        return b"".join(d for _, _, d in self.segments)

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.called:  # a long-poll that timed out is already answered
                w.callback(None)

    def read(self, params: dict[str, Any]) -> Any:
        offset, wait, cap = params["offset"], params["wait"], params["max_bytes"]
        if offset > self.size:
            return RemoteError(-32602, "invalid params: offset past end of log")
        if offset == self.size and self.result is None and wait > 0 and self.long_poll:
            d: Deferred[None] = Deferred()
            self.waiters.append(d)

            def timed_out() -> None:
                if not d.called:
                    d.callback(None)

            call = self.clock.callLater(wait, timed_out)

            def answer(_: object) -> Any:
                if call.active():
                    call.cancel()
                return self.read({**params, "wait": 0})

            return d.addCallback(answer)
        for start, stream, data in self.segments:
            if start <= offset < start + len(data):
                piece = data[offset - start :][:cap]
                end = offset + len(piece)
                final = self.result is not None and end == self.size
                return {
                    "log_data": base64.b64encode(piece).decode(),
                    "log_type": stream,
                    "new_offset": end,
                    "is_final": final,
                    "result": self.result if final else None,
                }
        final = self.result is not None
        return {
            "log_data": "",
            "log_type": None,
            "new_offset": offset,
            "is_final": final,
            "result": self.result if final else None,
        }


class Metrics:
    def __init__(self) -> None:
        self.lags: list[float] = []
        self.created: list[str] = []

    def poll_lag(self, seconds: float) -> None:
        self.lags.append(seconds)

    def command_created(self, kind: str) -> None:
        self.created.append(kind)


class QueueTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeStore(self.clock)
        self.store.add(agent_record(1))
        self.rpc = ScriptedRPC()
        self.logs: dict[str, FakeCommandLog] = {}
        self.metrics = Metrics()
        self.rpc.handlers["execute_command"] = self.execute
        self.rpc.handlers["execute_ansible"] = self.execute
        self.rpc.handlers["get_command_log"] = lambda ep, p: self.log_for(p["command_id"]).read(p)
        self.rpc.handlers["cancel_command"] = self.cancel

    def execute(self, ep: AgentEndpoint, params: dict[str, Any]) -> Any:
        uid = params["command_id"]
        dup = uid in self.logs
        self.log_for(uid)
        return {"status": "running", "command_id": uid, **({"duplicate": True} if dup else {})}

    def cancel(self, ep: AgentEndpoint, params: dict[str, Any]) -> Any:
        log = self.logs.get(params["command_id"])
        if log is None:
            return RemoteError(-32004, "unknown command_id")
        log.finish({**OK_RESULT, "success": False, "return_code": -15, "cancelled": True})
        return {"command_id": params["command_id"], "cancelled": True, "status": "running"}

    def log_for(self, uid: str, **kw: Any) -> FakeCommandLog:
        if uid not in self.logs:
            self.logs[uid] = FakeCommandLog(self.clock, **kw)
        return self.logs[uid]

    def queue(self, **overrides: Any) -> CommandQueue:
        q = CommandQueue(
            self.store,
            self.rpc,  # type: ignore[arg-type]
            settings(**overrides),
            self.clock,
            metrics=self.metrics,
        )
        self.addCleanup(self.stop, q)
        return q

    def stop(self, q: CommandQueue) -> None:
        # Every queue is stopped, started or not: a poller left suspended on this
        # test's Clock would be closed later by the garbage collector, during some
        # other test, and its `finally` (giving back its poll slot) would resume a
        # poller queued on that slot that the collector had already closed
        # ("cannot reuse already awaited coroutine", logged into that other test).
        self.successResultOf(q.stopService())
        self.assertEqual([c for c in self.store.commands if q.is_polling(c)], [])

    def add(
        self,
        q: CommandQueue,
        command: str = "echo",
        args: list[str] | None = None,
        timeout: float | None = 10,
        **kw: Any,
    ) -> CommandRecord:
        return self.successResultOf(
            Deferred.fromCoroutine(
                q.add_command(1, command, args if args is not None else ["hi"], timeout, **kw)
            )
        )

    def record(self, command_id: int) -> CommandRecord:
        return self.store.commands[command_id]

    def log_calls(self) -> list[dict[str, Any]]:
        return [p for m, p in self.rpc.calls if m == "get_command_log"]


class StreamingTests(QueueTestCase):
    def test_execute_then_stream_then_final(self) -> None:
        q = self.queue()
        updates: list[CommandUpdate] = []
        rec = self.add(q, "echo", ["hello"], 10, env={"A": "1"}, cwd="/tmp")
        q.subscribe(rec.id, updates.append)
        self.assertEqual(rec.status, "running")
        method, params = self.rpc.calls[0]
        self.assertEqual(method, "execute_command")
        self.assertEqual(
            params,
            {
                "command": "echo",
                "args": ["hello"],
                "timeout": 10.0,
                "command_id": rec.command_uid,
                "env": {"A": "1"},
                "cwd": "/tmp",
            },
        )
        self.assertEqual(self.record(rec.id).attempts, 1)
        [poll] = self.log_calls()
        self.assertEqual(
            poll,
            {
                "command_id": rec.command_uid,
                "offset": 0,
                "wait": 10.0,
                "max_bytes": LOG_CHUNK_BYTES,
            },
        )
        log = self.logs[rec.command_uid]
        log.write("stdout", b"hello\n")
        self.assertEqual(bytes(self.store.output[rec.id]), b"hello\n")
        self.assertEqual(updates, [CommandUpdate(rec.id, 6, "running", False)])
        log.write("stderr", b"oops\n")
        log.finish(OK_RESULT)
        self.assertEqual(bytes(self.store.output[rec.id]), b"hello\noops\n")
        self.assertEqual([s for _, s, _ in self.store.streams[rec.id]], ["stdout", "stderr"])
        final = self.record(rec.id)
        self.assertEqual(
            (final.status, final.exit_code, final.reason, final.finished_at),
            ("success", 0, None, 2.5),
        )
        assert final.result is not None
        self.assertNotIn("stdout", final.result)
        self.assertEqual(final.result["kind"], "command")
        self.assertEqual(updates[-1], CommandUpdate(rec.id, 11, "success", True))
        self.assertFalse(q.is_polling(rec.id))
        actions = [e["action"] for e in self.store.events]
        self.assertEqual(actions, ["command.create", "command.finish"])
        self.assertEqual(self.store.events[0]["details"]["env_keys"], ["A"])
        self.assertNotIn("1", str(self.store.events[0]["details"].get("env_keys")))

    def test_output_keeps_flowing_without_waiting(self) -> None:
        q = self.queue()
        rec = self.add(q)
        log = self.logs[rec.command_uid]
        big = bytes(range(256)) * 2500  # 640,000 bytes: three reads
        log.write("stdout", big)
        log.finish(OK_RESULT)
        self.assertEqual(bytes(self.store.output[rec.id]), big)
        # Three reads back to back, then one long-poll at the end that the final ends.
        self.assertEqual(
            [p["offset"] for p in self.log_calls()],
            [0, LOG_CHUNK_BYTES, 2 * LOG_CHUNK_BYTES, len(big)],
        )
        self.assertEqual(self.record(rec.id).status, "success")

    def test_quiet_command_with_long_poll_costs_one_request_per_wait(self) -> None:
        q = self.queue(log_poll_wait=10, log_poll_interval=1)
        rec = self.add(q)
        self.assertEqual(len(self.log_calls()), 1)
        self.clock.advance(9.5)
        self.assertEqual(len(self.log_calls()), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(self.log_calls()), 2)
        self.clock.advance(10)
        self.assertEqual(len(self.log_calls()), 3)
        self.logs[rec.command_uid].write("stdout", b"x")
        self.assertEqual(bytes(self.store.output[rec.id]), b"x")

    def test_agent_answering_at_once_is_polled_once_per_interval(self) -> None:
        q = self.queue(log_poll_wait=10, log_poll_interval=1)
        self.rpc.handlers["execute_command"] = lambda ep, p: (
            self.log_for(p["command_id"], long_poll=False),
            {"status": "running", "command_id": p["command_id"]},
        )[1]
        self.add(q)
        self.assertEqual(len(self.log_calls()), 1)
        self.clock.advance(0.75)
        self.assertEqual(len(self.log_calls()), 1)
        self.clock.advance(0.25)
        self.assertEqual(len(self.log_calls()), 2)
        for _ in range(8):
            self.clock.advance(1)
        self.assertEqual(len(self.log_calls()), 10)
        self.assertTrue(all(lag == 0 for lag in self.metrics.lags))

    def test_ansible_goes_through_the_same_path(self) -> None:
        q = self.queue()
        rec = self.successResultOf(
            Deferred.fromCoroutine(q.add_ansible(1, "ping.yml", {"x": 1}, 60))
        )
        self.assertEqual((rec.kind, rec.command), ("ansible", "ping.yml"))
        method, params = self.rpc.calls[0]
        self.assertEqual(
            (method, params),
            (
                "execute_ansible",
                {
                    "playbook": "ping.yml",
                    "extra_vars": {"x": 1},
                    "timeout": 60.0,
                    "command_id": rec.command_uid,
                },
            ),
        )
        log = self.logs[rec.command_uid]
        log.write("stdout", b"PLAY [ping]\n")
        log.finish(
            {
                **OK_RESULT,
                "kind": "ansible",
                "ansible": {"status": "successful", "rc": 0, "stats": {}},
            }
        )
        final = self.record(rec.id)
        self.assertEqual(final.status, "success")
        assert final.result is not None
        self.assertEqual(final.result["ansible"]["status"], "successful")
        self.assertEqual(self.metrics.created, ["ansible"])


class FailureTests(QueueTestCase):
    def test_agent_reported_timeout_is_timed_out_without_retry(self) -> None:
        q = self.queue()
        rec = self.add(q)
        self.logs[rec.command_uid].finish(
            {**OK_RESULT, "success": False, "return_code": -15, "timed_out": True}
        )
        final = self.record(rec.id)
        self.assertEqual(final.status, "timed_out")
        self.assertEqual(final.exit_code, -15)
        self.assertIn("timed out", final.reason or "")
        self.assertEqual(self.rpc.methods().count("execute_command"), 1)
        self.clock.pump([1.0] * 30)
        self.assertEqual(self.rpc.methods().count("execute_command"), 1)

    def test_nonzero_exit_is_failed_with_code(self) -> None:
        q = self.queue()
        rec = self.add(q)
        self.logs[rec.command_uid].finish({**OK_RESULT, "success": False, "return_code": 3})
        final = self.record(rec.id)
        self.assertEqual(
            (final.status, final.exit_code, final.reason), ("failed", 3, "exit code 3")
        )

    def test_unreachable_at_execute_fails_and_counts_towards_reinstall(self) -> None:
        self.rpc.handlers["execute_command"] = lambda ep, p: unreachable(3)
        q = self.queue()
        rec = self.add(q)
        final = self.record(rec.id)
        self.assertEqual(final.status, "failed")
        self.assertEqual(final.attempts, 3)
        self.assertIn("connection refused", final.reason or "")
        self.assertEqual(self.log_calls(), [])
        [[hb]] = self.store.heartbeat_writes
        self.assertEqual((hb.agent_id, hb.ok, hb.error_kind), (1, False, "retryable"))
        self.assertEqual(self.store.agents[1].failed_cycles, 1)
        self.assertIn("agent.unreachable", [e["action"] for e in self.store.events])
        self.assertFalse(q.is_polling(rec.id))

    def test_unreachable_while_polling_fails_after_the_limit(self) -> None:
        q = self.queue(log_unreachable_limit=120)
        rec = self.add(q)  # timeout 10 s: the limit is max(120, 10 + 60)
        self.rpc.handlers["get_command_log"] = lambda ep, p: unreachable(3)
        self.clock.advance(10)  # the pending long-poll returns empty; next poll fails
        self.assertEqual(self.record(rec.id).status, "running")
        for _ in range(200):
            if self.record(rec.id).status != "running":
                break
            self.clock.advance(5)
        final = self.record(rec.id)
        self.assertEqual(final.status, "failed")
        self.assertIn("unreachable", final.reason or "")
        # Asked again and again, backing off, for the whole limit; not forever.
        fails = len(self.log_calls())
        self.assertGreater(fails, 4)
        self.assertLess(fails, 40)
        assert final.finished_at is not None and final.started_at is not None
        self.assertGreaterEqual(final.finished_at - final.started_at, 120)
        self.assertEqual(len(self.store.heartbeat_writes), 1)

    def test_output_written_while_unreachable_is_read_when_the_agent_is_back(self) -> None:
        # Found by the flapping-link scenario: one failed read used to fail a
        # command that was still running, and its later output was never read.
        q = self.queue()
        rec = self.add(q)
        log = self.log_for(rec.command_uid)
        log.write("stdout", b"before ")
        self.clock.advance(0)
        read = self.rpc.handlers["get_command_log"]
        self.rpc.handlers["get_command_log"] = lambda ep, p: unreachable(3)
        self.clock.advance(10)
        log.write("stdout", b"during ")
        self.clock.advance(20)
        self.assertEqual(self.record(rec.id).status, "running")
        self.rpc.handlers["get_command_log"] = read
        log.write("stdout", b"after")
        log.finish(OK_RESULT)
        self.clock.advance(60)
        final = self.record(rec.id)
        self.assertEqual(final.status, "success")
        self.assertEqual(bytes(self.store.output[rec.id]), b"before during after")

    def test_auth_failure_while_polling_does_not_count_as_unreachable(self) -> None:
        from myxd.rpc import AgentRPCError

        q = self.queue()
        rec = self.add(q)
        self.rpc.handlers["get_command_log"] = lambda ep, p: AgentRPCError("auth", "401", 1)
        self.clock.advance(10)
        self.assertEqual(self.record(rec.id).status, "failed")
        self.assertEqual(self.store.heartbeat_writes, [])

    def test_unknown_to_agent_fails(self) -> None:
        q = self.queue()
        self.rpc.handlers["get_command_log"] = lambda ep, p: RemoteError(-32004, "unknown")
        rec = self.add(q)
        final = self.record(rec.id)
        self.assertEqual(final.status, "failed")
        self.assertIn("-32004", final.reason or "")

    def test_garbled_log_response_fails_cleanly(self) -> None:
        q = self.queue()
        self.rpc.handlers["get_command_log"] = lambda ep, p: {
            "log_data": "!!!",
            "log_type": "stdout",
            "new_offset": 3,
            "is_final": False,
        }
        rec = self.add(q)
        self.assertEqual(self.record(rec.id).status, "failed")
        self.assertIn("base64", self.record(rec.id).reason or "")

    def test_store_failure_rereads_the_same_range(self) -> None:
        q = self.queue()
        rec = self.add(q)
        self.store.fail_next["append_output"] = [RuntimeError("database is locked")]
        log = self.logs[rec.command_uid]
        log.write("stdout", b"abc")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(bytes(self.store.output[rec.id]), b"")
        self.clock.advance(1)
        self.assertEqual(bytes(self.store.output[rec.id]), b"abc")
        log.write("stdout", b"def")
        log.finish(OK_RESULT)
        self.assertEqual(bytes(self.store.output[rec.id]), b"abcdef")

    def test_command_deleted_while_polling_stops_the_poller(self) -> None:
        q = self.queue()
        rec = self.add(q)
        self.store.fail_next["append_output"] = [NotFoundError("command gone")]
        self.logs[rec.command_uid].write("stdout", b"abc")
        self.assertFalse(q.is_polling(rec.id))
        calls = len(self.log_calls())
        self.clock.pump([1.0] * 30)
        self.assertEqual(len(self.log_calls()), calls)

    def test_subscriber_errors_do_not_stop_the_poller(self) -> None:
        q = self.queue()
        rec = self.add(q)
        seen: list[int] = []

        def bad(update: CommandUpdate) -> None:
            raise ValueError("subscriber bug")

        q.subscribe(rec.id, bad)
        unsubscribe = q.subscribe(rec.id, lambda u: seen.append(u.output_offset))
        self.logs[rec.command_uid].write("stdout", b"12")
        unsubscribe()
        unsubscribe()
        self.logs[rec.command_uid].write("stdout", b"34")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        self.assertEqual(seen, [2])
        self.assertEqual(bytes(self.store.output[rec.id]), b"1234")


class InputTests(QueueTestCase):
    def test_bad_input_names_the_field(self) -> None:
        q = self.queue()
        cases: list[tuple[Any, str]] = [
            (q.add_command(1, "", [], None), "command"),
            (q.add_command(1, "ls", "-l", None), "args"),
            (q.add_command(1, "ls", [1], None), "args"),  # type: ignore[list-item]
            (q.add_command(1, "ls", [], 0), "timeout"),
            (q.add_command(1, "ls", [], True), "timeout"),
            (q.add_command(1, "ls", [], None, env={"A": 1}), "env"),  # type: ignore[dict-item]
            (q.add_ansible(1, "", {}, None), "playbook"),
            (q.add_ansible(1, "p.yml", [], None), "extra_vars"),  # type: ignore[arg-type]
        ]
        for coro, field in cases:
            err = self.failureResultOf(Deferred.fromCoroutine(coro), ValueError).value
            self.assertIn(field, str(err))
        self.assertEqual(self.store.commands, {})
        self.assertEqual(self.rpc.calls, [])

    def test_unknown_agent(self) -> None:
        q = self.queue()
        self.failureResultOf(
            Deferred.fromCoroutine(q.add_command(99, "ls", [], None)), NotFoundError
        )
        self.assertEqual(self.store.commands, {})


class BoundTests(QueueTestCase):
    def test_never_more_than_max_log_pollers_in_flight(self) -> None:
        q = self.queue(max_log_pollers=2, log_poll_wait=10)
        recs = [self.add(q, "cmd", [str(i)]) for i in range(5)]
        self.assertEqual(self.rpc.max_in_flight["get_command_log"], 2)
        self.assertEqual(len(self.log_calls()), 2)
        for rec in recs:
            log = self.logs[rec.command_uid]
            log.write("stdout", rec.args[0].encode())
            log.finish(OK_RESULT)
        self.assertEqual(self.rpc.max_in_flight["get_command_log"], 2)
        for rec in recs:
            self.assertEqual(self.record(rec.id).status, "success")
            self.assertEqual(bytes(self.store.output[rec.id]), rec.args[0].encode())

    def test_waiting_for_a_slot_shows_as_poll_lag(self) -> None:
        q = self.queue(max_log_pollers=1, log_poll_wait=10)
        self.add(q, "a")
        self.add(q, "b")
        self.clock.advance(10)  # first long-poll ends; the second poller gets the slot
        self.assertIn(10.0, self.metrics.lags)


class ResumeTests(QueueTestCase):
    def running(self, *, offset: int, attempts: int, uid: str = "uid-r") -> CommandRecord:
        rec = CommandRecord(
            id=50,
            agent_id=1,
            command_uid=uid,
            kind="command",
            command="seq",
            args=[],
            timeout=None,
            extra=None,
            status="running",
            exit_code=None,
            reason=None,
            result=None,
            attempts=attempts,
            output_offset=offset,
            created_at=0.0,
            started_at=0.0,
            finished_at=None,
        )
        return rec

    def test_resume_from_stored_offset(self) -> None:
        log = self.log_for("uid-r")
        log.write("stdout", b"0123456789")
        self.store.put_command(self.running(offset=4, attempts=1), b"0123")
        q = self.queue()
        q.startService()
        self.assertNotIn("execute_command", self.rpc.methods())
        self.assertEqual([p["offset"] for p in self.log_calls()], [4, 10])
        log.write("stderr", b"abc")
        log.finish(OK_RESULT)
        self.assertEqual(bytes(self.store.output[50]), log.data)
        self.assertEqual(self.record(50).status, "success")

    def test_resume_of_a_never_accepted_command_executes_it_first(self) -> None:
        self.store.put_command(self.running(offset=0, attempts=0))
        q = self.queue()
        q.startService()
        self.assertEqual(self.rpc.methods(), ["execute_command", "get_command_log"])
        self.assertEqual(self.rpc.calls[0][1]["command_id"], "uid-r")

    def test_stop_and_restart_mid_command_loses_and_duplicates_nothing(self) -> None:
        q = self.queue()
        q.startService()
        rec = self.add(q, "seq")
        log = self.logs[rec.command_uid]
        log.write("stdout", b"line 1\n")
        self.successResultOf(q.stopService())
        self.assertEqual(self.record(rec.id).status, "running")
        # The command keeps printing while myxd is down.
        log.write("stdout", b"line 2\n")
        log.write("stderr", b"warn\n")
        q2 = self.queue()
        q2.startService()
        log.write("stdout", b"line 3\n")
        log.finish(OK_RESULT)
        self.assertEqual(bytes(self.store.output[rec.id]), log.data)
        self.assertEqual(self.record(rec.id).status, "success")
        self.assertEqual(self.rpc.methods().count("execute_command"), 1)

    def test_stop_cancels_pollers(self) -> None:
        q = self.queue()
        q.startService()
        rec = self.add(q)
        self.assertTrue(q.is_polling(rec.id))
        self.successResultOf(q.stopService())
        self.assertFalse(q.is_polling(rec.id))
        calls = len(self.log_calls())
        self.clock.pump([1.0] * 60)
        self.assertEqual(len(self.log_calls()), calls)


class CancelTests(QueueTestCase):
    def test_cancel_calls_the_agent_and_the_poller_stores_the_result(self) -> None:
        q = self.queue()
        rec = self.add(q)
        out = self.successResultOf(Deferred.fromCoroutine(q.cancel(rec.id)))
        self.assertEqual(out.id, rec.id)
        self.assertIn(("cancel_command", {"command_id": rec.command_uid}), self.rpc.calls)
        final = self.record(rec.id)
        self.assertEqual((final.status, final.reason), ("cancelled", "cancelled"))
        self.assertIn(
            ("command.cancel", "requested"),
            [(e["action"], e["outcome"]) for e in self.store.events],
        )

    def test_cancel_unknown_and_finished(self) -> None:
        q = self.queue()
        self.failureResultOf(Deferred.fromCoroutine(q.cancel(404)), NotFoundError)
        rec = self.add(q)
        self.logs[rec.command_uid].finish(OK_RESULT)
        calls = len(self.rpc.calls)
        out = self.successResultOf(Deferred.fromCoroutine(q.cancel(rec.id)))
        self.assertEqual(out.status, "success")
        self.assertEqual(len(self.rpc.calls), calls)

    def test_cancel_before_the_agent_accepted_it(self) -> None:
        pending: Deferred[Any] = Deferred()
        self.rpc.handlers["execute_command"] = lambda ep, p: pending
        q = self.queue()
        rec = self.add(q)
        out = self.successResultOf(Deferred.fromCoroutine(q.cancel(rec.id)))
        self.assertEqual((out.status, out.reason), ("cancelled", "cancelled before it started"))
        self.assertFalse(q.is_polling(rec.id))

    def test_agent_deleted_while_myxd_was_down(self) -> None:
        q = self.queue()
        q.startService()
        rec = self.add(q)
        self.successResultOf(q.stopService())
        del self.store.agents[1]
        q2 = self.queue()
        q2.startService()
        self.assertEqual(self.record(rec.id).status, "failed")
        self.assertEqual(self.record(rec.id).reason, "agent was deleted")
