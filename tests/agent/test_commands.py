"""CommandRunner on the real reactor with real processes (no HTTP).

The protocol-level view (over HTTPS, through a real agent process) is in the
end-to-end tests; these drive the runner directly.
"""

import base64
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from myx_agent import process as proc
from myx_agent.commands import CommandRunner
from myx_agent.contract import INTERRUPTED_ERROR
from myx_agent.errors import (
    BUSY,
    COMMAND_ID_CONFLICT,
    INVALID_PARAMS,
    UNKNOWN_COMMAND,
    RPCError,
)
from myx_agent.jsonrpc import Dispatcher
from myx_agent.outputlog import TAIL_BYTES

PY = sys.executable


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(condition, timeout: float = 60.0, step: float = 0.05) -> None:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError(f"condition not met in {timeout} s")
        await sleep(step)
        waited += step


class RunnerTestCase(unittest.TestCase):
    kill_grace = 5.0

    def make_runner(self, state_dir: Optional[str] = None, **kwargs: Any) -> CommandRunner:
        if state_dir is None:
            state_dir = self.mktemp()
        kwargs.setdefault("kill_grace", self.kill_grace)
        runner = CommandRunner(
            state_dir, deployment_tool_dir=os.path.abspath(self.mktemp()), **kwargs
        )
        runner.startService()
        self.addCleanup(runner.stopService)
        return runner

    async def read_all(
        self, runner: CommandRunner, command_id: str, max_bytes: int = 1048576
    ) -> Tuple[List[Tuple[str, bytes]], Dict[str, Any]]:
        """Every (log_type, bytes) response until is_final, and the result."""
        offset = 0
        segments: List[Tuple[str, bytes]] = []
        while True:
            res = await runner.get_command_log(command_id, offset, 10, max_bytes)
            data = base64.b64decode(res["log_data"])
            if data:
                self.assertIn(res["log_type"], ("stdout", "stderr"))
                segments.append((res["log_type"], data))
            else:
                self.assertIsNone(res["log_type"])
            self.assertEqual(res["new_offset"], offset + len(data))
            offset = res["new_offset"]
            if res["is_final"]:
                self.assertIsNotNone(res["result"])
                return segments, res["result"]
            self.assertIsNone(res["result"])

    async def log_text(self, runner: CommandRunner, command_id: str) -> bytes:
        res = await runner.get_command_log(command_id, 0, 0, 1048576)
        return base64.b64decode(res["log_data"])

    async def wait_for_log(self, runner: CommandRunner, command_id: str, needle: bytes) -> bytes:
        """Long-poll until the whole log holds ``needle``; returns the log."""
        data = b""
        while needle not in data:
            res = await runner.get_command_log(command_id, len(data), 10, 1048576)
            data += base64.b64decode(res["log_data"])
            if res["is_final"] and needle not in data:
                raise AssertionError(f"command ended without printing {needle!r}: {data!r}")
        return data

    async def rpc_error(self, d: "Deferred[Any]", code: int) -> RPCError:
        """The RPCError ``d`` fails with, which must carry exactly ``code``."""
        try:
            await d
        except RPCError as e:
            self.assertEqual(e.code, code, e.message)
            return e
        raise AssertionError(f"expected an RPCError {code}")

    def make_fifo(self) -> Tuple[str, int]:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "fifo")
        os.mkfifo(path)
        # O_RDWR never blocks on Linux and keeps the FIFO open for the child.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.addCleanup(os.close, fd)
        return path, fd


def exists(path: str) -> bool:
    return os.path.exists(path)


def is_dir(path: str) -> bool:
    return os.path.isdir(path)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_file(path: str, text: str, mode: int) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def make_dir(path: str) -> str:
    os.makedirs(path)
    return os.path.realpath(path)


def pid_dead(pid: int) -> bool:
    return not proc.is_alive(pid)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except OSError:
        pass


# A child that prints one line per byte it reads from a FIFO, alternating
# stdout and stderr, so the test decides the arrival order.
STEPPER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
i = 0
while True:
    b = os.read(fd, 1)
    if not b or b == b"q":
        break
    stream = sys.stdout if i % 2 == 0 else sys.stderr
    stream.write("line %d\n" % i)
    stream.flush()
    i += 1
"""


class StreamTests(RunnerTestCase):
    async def test_arrival_order_log_type_and_long_poll_wake(self) -> None:
        """The combined stream keeps arrival order across stdout/stderr, one
        response never mixes streams, and a long-poll wakes on new output."""
        runner = self.make_runner()
        fifo, fd = self.make_fifo()
        res = runner.execute_command("order-1", PY, ["-c", STEPPER, fifo], None, None, None)
        self.assertEqual(res, {"status": "running", "command_id": "order-1"})
        offset = 0
        expected = b""
        for i in range(6):
            d = runner.get_command_log("order-1", offset, 30, 1048576)
            # The child is blocked on the FIFO: nothing can have arrived.
            self.assertNoResult(d)
            os.write(fd, b"g")
            got = await d
            line = b"line %d\n" % i
            self.assertEqual(base64.b64decode(got["log_data"]), line)
            self.assertEqual(got["log_type"], "stdout" if i % 2 == 0 else "stderr")
            self.assertFalse(got["is_final"])
            offset = got["new_offset"]
            expected += line
        d = runner.get_command_log("order-1", offset, 30, 1048576)
        self.assertNoResult(d)
        os.write(fd, b"q")
        end = await d
        self.assertEqual(end["log_data"], "")
        self.assertEqual(end["new_offset"], offset)
        # The command ends: the long-poll returns then, possibly before the
        # final state is visible to a read; read on until final.
        segments, result = await self.read_all(runner, "order-1")
        self.assertEqual(b"".join(data for _, data in segments), expected)
        self.assertEqual(
            [t for t, _ in segments], ["stdout", "stderr", "stdout", "stderr", "stdout", "stderr"]
        )
        self.assertTrue(result["success"])
        self.assertEqual(result["return_code"], 0)
        self.assertEqual(base64.b64decode(result["stdout"]), b"line 0\nline 2\nline 4\n")
        self.assertEqual(base64.b64decode(result["stderr"]), b"line 1\nline 3\nline 5\n")
        # Re-reads at any offset give the same bytes, stopping at the switch.
        again = await runner.get_command_log("order-1", 3, 0, 1048576)
        self.assertEqual(base64.b64decode(again["log_data"]), b"e 0\n")
        self.assertEqual(again["log_type"], "stdout")
        again = await runner.get_command_log("order-1", 7, 0, 3)
        self.assertEqual(base64.b64decode(again["log_data"]), b"lin")
        self.assertEqual(again["log_type"], "stderr")
        self.assertEqual(again["new_offset"], 10)

    async def test_interleaved_streams_keep_their_content(self) -> None:
        runner = self.make_runner()
        script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo out$i; echo err$i >&2; done"
        runner.execute_command("mix-1", "/bin/sh", ["-c", script], None, None, None)
        segments, result = await self.read_all(runner, "mix-1")
        out = b"".join(d for t, d in segments if t == "stdout")
        err = b"".join(d for t, d in segments if t == "stderr")
        self.assertEqual(out, b"".join(b"out%d\n" % i for i in range(1, 11)))
        self.assertEqual(err, b"".join(b"err%d\n" % i for i in range(1, 11)))
        self.assertTrue(result["success"])
        # Reads that caught up with the running command may end mid-stream; once
        # the log is complete, each full-size read runs to the next switch.
        final_segments, _ = await self.read_all(runner, "mix-1")
        self.assertEqual(b"".join(d for _, d in final_segments), b"".join(d for _, d in segments))
        for (t1, _), (t2, _) in zip(final_segments, final_segments[1:]):
            self.assertNotEqual(t1, t2, "a full-size read must run to the next switch")

    async def test_binary_output(self) -> None:
        runner = self.make_runner()
        script = (
            "import sys\n"
            "sys.stdout.buffer.write(bytes(range(256)) * 4); sys.stdout.buffer.flush()\n"
            "sys.stderr.buffer.write(bytes(reversed(range(256)))); sys.stderr.buffer.flush()\n"
        )
        runner.execute_command("bin-1", PY, ["-c", script], None, None, None)
        segments, result = await self.read_all(runner, "bin-1")
        self.assertEqual(b"".join(d for t, d in segments if t == "stdout"), bytes(range(256)) * 4)
        self.assertEqual(
            b"".join(d for t, d in segments if t == "stderr"), bytes(reversed(range(256)))
        )
        self.assertEqual(base64.b64decode(result["stdout"]), bytes(range(256)) * 4)
        self.assertEqual(base64.b64decode(result["stderr"]), bytes(reversed(range(256))))
        self.assertFalse(result["stdout_truncated"])

    async def test_50mb_read_back_byte_identical(self) -> None:
        """50 MiB of random bytes, read back in pages (of an odd size, so pages
        and pipe chunks never line up), hash to what the child printed."""
        runner = self.make_runner()
        script = (
            "import hashlib, os, sys\n"
            "h = hashlib.sha256(); out = sys.stdout.buffer\n"
            "for _ in range(800):\n"
            "    b = os.urandom(65536); h.update(b); out.write(b)\n"
            "out.flush(); sys.stderr.write(h.hexdigest())\n"
        )
        runner.execute_command("big-1", PY, ["-c", script], None, None, None)
        offset = 0
        h = hashlib.sha256()
        tail = b""
        stderr = b""
        while True:
            res = await runner.get_command_log("big-1", offset, 10, 1000003)
            data = base64.b64decode(res["log_data"])
            if res["log_type"] == "stdout":
                h.update(data)
                tail = (tail + data)[-TAIL_BYTES:]
            elif res["log_type"] == "stderr":
                stderr += data
            offset = res["new_offset"]
            if res["is_final"]:
                result = res["result"]
                break
        self.assertEqual(offset, 800 * 65536 + 64)
        self.assertEqual(h.hexdigest().encode(), stderr)
        self.assertTrue(result["success"])
        self.assertTrue(result["stdout_truncated"])
        self.assertFalse(result["stderr_truncated"])
        self.assertEqual(base64.b64decode(result["stdout"]), tail)
        # A page from the middle, read twice, is identical.
        a = await runner.get_command_log("big-1", 12345678, 0, 1048576)
        b = await runner.get_command_log("big-1", 12345678, 0, 1048576)
        self.assertEqual(a, b)
        self.assertEqual(len(base64.b64decode(a["log_data"])), 1048576)

    async def test_offset_past_end_and_reread(self) -> None:
        runner = self.make_runner()
        runner.execute_command("end-1", "/bin/echo", ["hello"], None, None, None)
        segments, _ = await self.read_all(runner, "end-1")
        self.assertEqual(segments, [("stdout", b"hello\n")])
        at_end = await runner.get_command_log("end-1", 6, 5, 100)
        self.assertEqual(at_end["log_data"], "")
        self.assertTrue(at_end["is_final"])
        self.assertIsNotNone(at_end["result"])
        middle = await runner.get_command_log("end-1", 2, 0, 100)
        self.assertEqual(base64.b64decode(middle["log_data"]), b"llo\n")
        self.assertTrue(middle["is_final"])
        err = await self.rpc_error(runner.get_command_log("end-1", 7, 0, 100), INVALID_PARAMS)
        self.assertEqual(err.code, INVALID_PARAMS)
        self.assertIn("offset", err.message)

    async def test_long_poll_returns_at_command_end_and_after_wait(self) -> None:
        runner = self.make_runner()
        fifo, fd = self.make_fifo()
        runner.execute_command("lp-1", PY, ["-c", STEPPER, fifo], None, None, None)
        # No output arrives: the poll comes back empty after its wait, not final.
        res = await runner.get_command_log("lp-1", 0, 0.2, 100)
        self.assertEqual((res["log_data"], res["is_final"], res["new_offset"]), ("", False, 0))
        # A poll in progress is answered when the command ends.
        d = runner.get_command_log("lp-1", 0, 30, 100)
        self.assertNoResult(d)
        os.write(fd, b"q")
        res = await d
        self.assertEqual(res["log_data"], "")
        _, result = await self.read_all(runner, "lp-1")
        self.assertTrue(result["success"])

    async def test_long_poll_can_be_cancelled(self) -> None:
        runner = self.make_runner()
        fifo, fd = self.make_fifo()
        runner.execute_command("lp-2", PY, ["-c", STEPPER, fifo], None, None, None)
        d = runner.get_command_log("lp-2", 0, 30, 100)
        d.cancel()
        await self.assertFailure(d, CancelledError)
        os.write(fd, b"gq")
        segments, _ = await self.read_all(runner, "lp-2")
        self.assertEqual(segments, [("stdout", b"line 0\n")])

    async def test_env_cwd_and_clean_child_state(self) -> None:
        """env is added, cwd is used, and the child inherits no ignored signal
        (Python ignores SIGPIPE and SIGXFSZ) on either start path: one
        posix_spawn without a cwd, the fork path with one."""
        runner = self.make_runner()
        cwd = make_dir(self.mktemp())
        script = 'echo "foo=$FOO"; pwd; echo "lc=$LC_CTYPE"; grep SigIgn /proc/self/status'
        env = {"FOO": "bar baz", "LC_CTYPE": "C"}
        runner.execute_command("env-1", "/bin/sh", ["-c", script], None, env, cwd)
        runner.execute_command("env-2", "/bin/sh", ["-c", script], None, env, None)
        for command_id, where in (("env-1", cwd), ("env-2", os.getcwd())):
            segments, result = await self.read_all(runner, command_id)
            self.assertTrue(result["success"], result)
            lines = b"".join(d for t, d in segments if t == "stdout").decode().splitlines()
            self.assertEqual(lines[:3], ["foo=bar baz", where, "lc=C"])
            sig_ign = int(lines[3].split()[1], 16)
            self.assertFalse(sig_ign & (1 << (13 - 1)), "SIGPIPE must not be ignored")
            self.assertFalse(sig_ign & (1 << (25 - 1)), "SIGXFSZ must not be ignored")

    async def test_own_session_and_no_leaked_fds(self) -> None:
        """The child leads its own session and holds only fds 0-2 (plus the one
        its listdir opens), on both start paths."""
        runner = self.make_runner()
        check = (
            "import os; print(os.getsid(0) == os.getpid() != os.getsid(os.getppid())); "
            "print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
        )
        cwd = make_dir(self.mktemp())
        runner.execute_command("sid-1", PY, ["-I", "-S", "-c", check], None, None, None)
        runner.execute_command("sid-2", PY, ["-I", "-S", "-c", check], None, None, cwd)
        for command_id in ("sid-1", "sid-2"):
            segments, _ = await self.read_all(runner, command_id)
            self.assertEqual(b"".join(d for _, d in segments), b"True\n[0, 1, 2, 3]\n")


class FailureResultTests(RunnerTestCase):
    async def test_missing_executable(self) -> None:
        runner = self.make_runner()
        res = runner.execute_command("miss-1", "no-such-program-xyz", [], None, None, None)
        self.assertEqual(res["command_id"], "miss-1")
        _, result = await self.read_all(runner, "miss-1")
        self.assertFalse(result["success"])
        self.assertIsNone(result["return_code"])
        self.assertEqual(result["error"], "executable not found: no-such-program-xyz")
        self.assertEqual(runner.running_count, 0)

    async def test_missing_cwd(self) -> None:
        runner = self.make_runner()
        runner.execute_command("miss-2", "/bin/true", [], None, None, "/no/such/dir")
        _, result = await self.read_all(runner, "miss-2")
        self.assertFalse(result["success"])
        self.assertIsNone(result["return_code"])
        self.assertEqual(result["error"], "cwd not found: /no/such/dir")

    async def test_exec_failure_reported_with_errno(self) -> None:
        """Past the pre-check (the file exists), exec itself fails: reported with
        its errno, not as an exit code."""
        runner = self.make_runner()
        script = os.path.join(make_dir(self.mktemp()), "noexec.sh")
        write_file(script, "#!/bin/sh\necho hi\n", 0o644)
        runner.execute_command("miss-3", script, [], None, None, None)
        _, result = await self.read_all(runner, "miss-3")
        self.assertEqual(result["error"], f"cannot execute {script}: Permission denied")
        self.assertIsNone(result["return_code"])
        self.assertFalse(result["success"])

    async def test_start_failures_after_the_pre_check(self) -> None:
        """What changes between the pre-check and the spawn (which waits for the
        record to be durable) is reported with its errno on both start paths:
        posix_spawn's error without a cwd, the fork child's status pipe with one."""
        runner = self.make_runner()
        base = make_dir(self.mktemp())
        scripts = {}
        for name in ("gone", "noexec", "gone-cwd", "noexec-cwd"):
            scripts[name] = os.path.join(base, name + ".sh")
            write_file(scripts[name], "#!/bin/sh\necho hi\n", 0o755)
        cwd = make_dir(self.mktemp())
        doomed_cwd = make_dir(self.mktemp())
        runner.execute_command("late-1", scripts["gone"], [], None, None, None)
        runner.execute_command("late-2", scripts["noexec"], [], None, None, None)
        runner.execute_command("late-3", scripts["gone-cwd"], [], None, None, cwd)
        runner.execute_command("late-4", scripts["noexec-cwd"], [], None, None, cwd)
        runner.execute_command("late-5", "/bin/true", [], None, None, doomed_cwd)
        # Still on the same reactor turn: nothing has been spawned yet.
        os.unlink(scripts["gone"])
        os.chmod(scripts["noexec"], 0o644)
        os.unlink(scripts["gone-cwd"])
        os.chmod(scripts["noexec-cwd"], 0o644)
        os.rmdir(doomed_cwd)
        expected = {
            "late-1": f"executable not found: {scripts['gone']}",
            "late-2": f"cannot execute {scripts['noexec']}: Permission denied",
            "late-3": f"executable not found: {scripts['gone-cwd']}",
            "late-4": f"cannot execute {scripts['noexec-cwd']}: Permission denied",
            "late-5": f"cwd not found: {doomed_cwd}",
        }
        for command_id, error in expected.items():
            segments, result = await self.read_all(runner, command_id)
            self.assertEqual(
                (result["error"], result["return_code"], result["success"], segments),
                (error, None, False, []),
                command_id,
            )

    async def test_exit_code_and_signal(self) -> None:
        runner = self.make_runner()
        runner.execute_command("rc-1", "/bin/sh", ["-c", "exit 7"], None, None, None)
        runner.execute_command("rc-2", "/bin/sh", ["-c", "kill -USR1 $$"], None, None, None)
        _, r1 = await self.read_all(runner, "rc-1")
        _, r2 = await self.read_all(runner, "rc-2")
        self.assertEqual((r1["success"], r1["return_code"], r1["error"]), (False, 7, None))
        self.assertEqual((r2["success"], r2["return_code"]), (False, -10))

    def test_bad_params_never_reach_the_runner(self) -> None:
        """Params are checked once, by the method table: a bad one is -32602 and
        claims no id (the runner itself trusts what the table passes on)."""
        from tests.agent.test_rpc_server import agent_methods, reply

        runner = self.make_runner()
        dispatcher = Dispatcher(agent_methods(runner, Clock(), []).table())  # type: ignore[arg-type]
        ok = {"command": "/bin/true", "command_id": "ok"}
        bad = [
            {**ok, "command_id": ""},
            {**ok, "command_id": "a/b"},
            {**ok, "command_id": "x" * 129},
            {**ok, "command": ""},
            {**ok, "args": ["a\0b"]},
            {**ok, "timeout": 0},
            {**ok, "env": {"A=B": "x"}},
            {**ok, "cwd": "bad\0cwd"},
        ]
        for params in bad:
            request = {"jsonrpc": "2.0", "method": "execute_command", "params": params, "id": 1}
            answer = reply(dispatcher, request)
            self.assertEqual(answer["error"]["code"], INVALID_PARAMS, params)
        self.assertFalse(os.listdir(os.path.join(runner._state_dir, "ids")))
        err = self.assertRaises(RPCError, runner.cancel_command, "nope")
        self.assertEqual(err.code, UNKNOWN_COMMAND)

    async def test_unknown_command_log(self) -> None:
        runner = self.make_runner()
        err = await self.rpc_error(runner.get_command_log("nope", 0, 0, 10), UNKNOWN_COMMAND)
        self.assertEqual(err.code, UNKNOWN_COMMAND)


class KillTests(RunnerTestCase):
    kill_grace = 1.0

    async def _grandchild_pid(self, runner: CommandRunner, command_id: str) -> int:
        data = await self.wait_for_log(runner, command_id, b"\n")
        pid = int(data.split(b"\n")[0])
        self.addCleanup(kill_quietly, pid)
        self.assertTrue(proc.is_alive(pid))
        return pid

    def clocked_runner(self) -> Tuple[CommandRunner, Clock]:
        """A runner whose timeouts and kill escalation wait for the test's Clock:
        a 1 s timeout fires when the test advances it, never while the test is
        still reading the grandchild's pid (on a loaded machine it could)."""
        clock = Clock()
        return self.make_runner(clock=clock), clock

    async def test_timeout_kills_grandchild(self) -> None:
        runner, clock = self.clocked_runner()
        runner.execute_command(
            "to-1", "/bin/sh", ["-c", "sleep 1000 & echo $!; wait"], 1.0, None, None
        )
        pid = await self._grandchild_pid(runner, "to-1")
        clock.advance(0.9)
        self.assertTrue(proc.is_alive(pid), "killed before its timeout")
        clock.advance(0.1)  # the timeout: SIGTERM to the process group
        _, result = await self.read_all(runner, "to-1")
        self.assertTrue(result["timed_out"])
        self.assertFalse(result["cancelled"])
        self.assertFalse(result["success"])
        self.assertEqual(result["return_code"], -15)
        await wait_for(lambda: pid_dead(pid))

    async def test_timeout_escalates_to_sigkill(self) -> None:
        """Both the shell and its grandchild ignore SIGTERM: SIGKILL after the grace."""
        runner, clock = self.clocked_runner()
        runner.execute_command(
            "to-2",
            "/bin/sh",
            ["-c", "trap '' TERM; sleep 1000 & echo $!; wait; wait"],
            1.0,
            None,
            None,
        )
        pid = await self._grandchild_pid(runner, "to-2")
        clock.advance(1.0)  # the timeout: SIGTERM, ignored by both
        self.assertEqual(runner.running_count, 1)
        clock.advance(self.kill_grace)  # the escalation: SIGKILL
        _, result = await self.read_all(runner, "to-2")
        self.assertTrue(result["timed_out"])
        self.assertEqual(result["return_code"], -9)
        await wait_for(lambda: pid_dead(pid))

    async def test_cancel_kills_grandchild(self) -> None:
        runner = self.make_runner()
        runner.execute_command(
            "cx-1", "/bin/sh", ["-c", "sleep 1000 & echo $!; wait"], None, None, None
        )
        pid = await self._grandchild_pid(runner, "cx-1")
        self.assertEqual(
            runner.cancel_command("cx-1"),
            {"command_id": "cx-1", "cancelled": True, "status": "running"},
        )
        _, result = await self.read_all(runner, "cx-1")
        self.assertTrue(result["cancelled"])
        self.assertFalse(result["timed_out"])
        self.assertFalse(result["success"])
        await wait_for(lambda: pid_dead(pid))
        self.assertEqual(
            runner.cancel_command("cx-1"),
            {"command_id": "cx-1", "cancelled": False, "status": "failed"},
        )

    async def test_background_process_holding_pipes_does_not_hang(self) -> None:
        """The shell exits but a background child keeps stdout open: the command
        still ends (its exit code counts) and the child is left alone."""
        runner = self.make_runner()
        runner.execute_command(
            "bg-1", "/bin/sh", ["-c", "sleep 1000 & echo $!; exit 3"], None, None, None
        )
        pid = await self._grandchild_pid(runner, "bg-1")
        _, result = await self.read_all(runner, "bg-1")
        self.assertEqual(result["return_code"], 3)
        self.assertTrue(proc.is_alive(pid))


class AtMostOnceTests(RunnerTestCase):
    async def test_duplicate_never_runs_twice_also_after_restart(self) -> None:
        state = self.mktemp()
        counter = os.path.join(make_dir(self.mktemp()), "counter")
        script = f"echo run >> {counter}"
        runner = self.make_runner(state)
        first = runner.execute_command("dup-1", "/bin/sh", ["-c", script], None, None, None)
        second = runner.execute_command("dup-1", "/bin/sh", ["-c", script], None, None, None)
        self.assertEqual(first, {"status": "running", "command_id": "dup-1"})
        self.assertEqual(second, {"status": "running", "command_id": "dup-1", "duplicate": True})
        await self.read_all(runner, "dup-1")
        self.assertEqual(
            runner.execute_command("dup-1", "/bin/sh", ["-c", script], None, None, None),
            {"status": "success", "command_id": "dup-1", "duplicate": True},
        )
        err = self.assertRaises(RPCError, runner.execute_ansible, "dup-1", "x.yml", {}, None)
        self.assertEqual(err.code, COMMAND_ID_CONFLICT)
        await runner.stopService()

        again = self.make_runner(state)
        self.assertEqual(
            again.execute_command("dup-1", "/bin/sh", ["-c", script], None, None, None),
            {"status": "success", "command_id": "dup-1", "duplicate": True},
        )
        self.assertEqual(again.running_count, 0)
        segments, result = await self.read_all(again, "dup-1")
        self.assertTrue(result["success"])
        self.assertEqual(read_text(counter), "run\n")

    async def test_marker_is_durable_before_spawn(self) -> None:
        """The id is on disk as soon as execute returns, before any output."""
        runner = self.make_runner()
        runner.execute_command("mk-1", "/bin/true", [], None, None, None)
        marker = os.path.join(runner._state_dir, "ids", "id-mk-1")
        self.assertEqual(json.loads(read_text(marker))["kind"], "command")
        await self.read_all(runner, "mk-1")
        self.assertEqual(json.loads(read_text(marker)), {"kind": "command", "status": "success"})

    async def test_concurrency_limit(self) -> None:
        runner = self.make_runner(max_concurrent=2)
        runner.execute_command("cc-1", "/bin/sleep", ["1000"], None, None, None)
        runner.execute_command("cc-2", "/bin/sleep", ["1000"], None, None, None)
        self.assertEqual(runner.running_count, 2)
        err = self.assertRaises(
            RPCError, runner.execute_command, "cc-3", "/bin/true", [], None, None, None
        )
        self.assertEqual(err.code, BUSY)
        self.assertIn("max_concurrent_commands=2", err.message)
        # Nothing was recorded for cc-3: it can run later.
        self.assertFalse(exists(os.path.join(runner._state_dir, "ids", "id-cc-3")))
        await self.rpc_error(runner.get_command_log("cc-3", 0, 0, 10), UNKNOWN_COMMAND)
        # A duplicate of a running id is still answered while busy.
        self.assertTrue(
            runner.execute_command("cc-1", "/bin/sleep", [], None, None, None)["duplicate"]
        )
        runner.cancel_command("cc-1")
        await self.read_all(runner, "cc-1")
        self.assertEqual(
            runner.execute_command("cc-3", "/bin/true", [], None, None, None)["command_id"], "cc-3"
        )
        _, result = await self.read_all(runner, "cc-3")
        self.assertTrue(result["success"])
        runner.cancel_command("cc-2")
        await self.read_all(runner, "cc-2")


class RestartTests(RunnerTestCase):
    kill_grace = 1.0

    async def test_stop_mid_command_reads_interrupted_after_restart(self) -> None:
        state = self.mktemp()
        runner = self.make_runner(state)
        runner.execute_command(
            "rs-1", "/bin/sh", ["-c", "sleep 1000 & echo $!; wait"], None, None, None
        )
        data = await self.wait_for_log(runner, "rs-1", b"\n")
        pid = int(data.strip())
        self.addCleanup(kill_quietly, pid)
        poll = runner.get_command_log("rs-1", len(data), 30, 100)
        self.assertNoResult(poll)
        await runner.stopService()
        # A reader waiting at stop is answered with the final state.
        answered = await poll
        self.assertTrue(answered["is_final"])
        self.assertTrue(answered["result"]["interrupted"])
        await wait_for(lambda: pid_dead(pid))

        again = self.make_runner(state)
        segments, result = await self.read_all(again, "rs-1")
        self.assertEqual(segments, [("stdout", data)])
        self.assertTrue(result["interrupted"])
        self.assertFalse(result["success"])
        self.assertIsNone(result["return_code"])
        self.assertEqual(result["error"], INTERRUPTED_ERROR)
        self.assertEqual(base64.b64decode(result["stdout"]), data)
        self.assertTrue(
            again.execute_command("rs-1", "/bin/true", [], None, None, None)["duplicate"]
        )

    async def test_stop_escalates_to_sigkill(self) -> None:
        state = self.mktemp()
        runner = self.make_runner(state)
        runner.execute_command(
            "rs-2",
            "/bin/sh",
            ["-c", "trap '' TERM; sleep 1000 & echo $!; wait; wait"],
            None,
            None,
            None,
        )
        data = await self.wait_for_log(runner, "rs-2", b"\n")
        pid = int(data.strip())
        self.addCleanup(kill_quietly, pid)
        await runner.stopService()
        await wait_for(lambda: pid_dead(pid))
        again = self.make_runner(state)
        _, result = await self.read_all(again, "rs-2")
        self.assertTrue(result["interrupted"])

    async def test_crash_mid_command_reads_interrupted_and_orphans_die(self) -> None:
        """A crash leaves no result on disk. Simulated by starting a second runner
        on a copy of the state while the first still runs the command: the new
        runner reports it interrupted and kills the orphaned session."""
        state = self.mktemp()
        runner = self.make_runner(state)
        runner.execute_command(
            "cr-1",
            "/bin/sh",
            ["-c", "echo out; echo err >&2; sleep 1000 & echo $!; wait"],
            None,
            None,
            None,
        )
        data = await self._until_lines(runner, "cr-1", 3)
        pid = int([line for line in data.split(b"\n") if line.isdigit()][0])
        self.addCleanup(kill_quietly, pid)

        copy = self.mktemp()
        shutil.copytree(state, copy)
        after = self.make_runner(copy)
        segments, result = await self.read_all(after, "cr-1")
        self.assertEqual(b"".join(d for _, d in segments), data)
        self.assertTrue(result["interrupted"])
        self.assertEqual(result["error"], INTERRUPTED_ERROR)
        self.assertEqual(base64.b64decode(result["stderr"]), b"err\n")
        await wait_for(lambda: pid_dead(pid))
        # The original runner sees its command killed (SIGKILL by the new one).
        _, original = await self.read_all(runner, "cr-1")
        self.assertEqual(original["return_code"], -9)

    async def _until_lines(self, runner: CommandRunner, cid: str, n: int) -> bytes:
        data = b""
        while data.count(b"\n") < n:
            res = await runner.get_command_log(cid, len(data), 10, 1048576)
            data += base64.b64decode(res["log_data"])
            if res["is_final"]:
                break
        return data


class RetentionTests(RunnerTestCase):
    async def _finished_commands(self, state: str, ids: List[str]) -> None:
        runner = self.make_runner(state)
        for cid in ids:
            runner.execute_command(cid, "/bin/echo", [cid * 100], None, None, None)
            await self.read_all(runner, cid)
        await runner.stopService()

    def _clock_runner(self, state: str, **kwargs: Any) -> Tuple[CommandRunner, Clock]:
        clock = Clock()
        clock.advance(reactor.seconds())
        runner = CommandRunner(state, deployment_tool_dir=self.mktemp(), reactor=clock, **kwargs)
        runner.startService()
        self.addCleanup(runner.stopService)
        return runner, clock

    async def test_expired_commands_removed_marker_kept(self) -> None:
        state = self.mktemp()
        await self._finished_commands(state, ["old-1", "old-2"])
        runner, clock = self._clock_runner(state, retention_seconds=3600)
        clock.advance(runner.FIRST_SWEEP)
        # Not expired yet.
        self.assertTrue(is_dir(os.path.join(state, "commands", "c-old-1")))
        clock.advance(3600 + runner.SWEEP_INTERVAL * 1.2)
        self.assertFalse(exists(os.path.join(state, "commands", "c-old-1")))
        self.assertFalse(exists(os.path.join(state, "commands", "c-old-2")))
        marker = os.path.join(state, "ids", "id-old-1")
        self.assertLess(len(read_text(marker)), 64)
        err = await self.rpc_error(runner.get_command_log("old-1", 0, 0, 10), UNKNOWN_COMMAND)
        self.assertEqual(err.code, UNKNOWN_COMMAND)
        self.assertIn("retention", err.message)
        self.assertEqual(
            runner.execute_command("old-1", "/bin/true", [], None, None, None),
            {"status": "success", "command_id": "old-1", "duplicate": True},
        )
        self.assertEqual(runner.running_count, 0)

    async def test_size_cap_removes_oldest_first(self) -> None:
        state = self.mktemp()
        await self._finished_commands(state, ["a1", "a2", "a3"])
        # Each log is 201 bytes; a cap of 450 keeps the newest two.
        runner, clock = self._clock_runner(state, retention_max_bytes=450)
        clock.advance(runner.FIRST_SWEEP)
        left = sorted(os.listdir(os.path.join(state, "commands")))
        self.assertEqual(left, ["c-a2", "c-a3"])

    async def test_sweep_survives_errors(self) -> None:
        state = self.mktemp()
        await self._finished_commands(state, ["e1"])
        runner, clock = self._clock_runner(state, retention_seconds=10)
        calls = []
        real = runner.sweep

        def broken() -> bool:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("disk on fire")
            return real()

        runner.sweep = broken  # type: ignore[method-assign]
        clock.advance(runner.FIRST_SWEEP)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(is_dir(os.path.join(state, "commands", "c-e1")))
        clock.advance(runner.SWEEP_INTERVAL * 1.2)
        self.assertEqual(len(calls), 2)
        self.assertFalse(exists(os.path.join(state, "commands", "c-e1")))
