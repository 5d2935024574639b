"""Agent benchmark: idle RSS, keep-alive heartbeat rate and CPU per call, RSS while streaming.

Run from the repository root:

    .venv/bin/python -m bench.agent_bench [--calls 5000] [--stream-mib 1024]
        [--installed] [--agents 10] [--commands 10000]

It starts a real ``python -m myx_agent`` on 127.0.0.1 with a temporary config
and state dir (removed at the end), talks to it over pinned TLS with a small
keep-alive HTTP/1.1 client, and prints figures. It asserts nothing.

The agent runs with bytecode caching on (``PYTHONPYCACHEPREFIX`` in the temp
dir, filled by a first start), as an installed agent would: a start that
compiles its modules from source holds several MB more.

With ``--installed`` the agents run the way users run them: the package as
``pip install .`` put it in the interpreter's site-packages (with its compiled
bytecode), started from a neutral cwd with no PYTHONPATH; reinstall after
changing the code. ``--agents N`` starts N agents and prints the median idle
RSS (issue 14 measures 10 agents after 3 s).

``--commands N`` runs N ``true`` commands one after the other through
``execute_command`` + ``get_command_log`` (long-poll until final) and prints the
agent's CPU per command (the per-command budget: from execute_command to the
final result) and its RSS after 1,000 and after N commands. At the end the RSS
after all phases (N commands and the 1 GiB stream) is compared with the idle
figure: it must be back within 5 MiB (no leak).

Targets (issue 14): idle RSS <= 48 MiB; RSS growth while streaming 1 GiB of
output through get_command_log <= 20 MiB; RSS back within 5 MiB of idle after
10,000 commands and the stream.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from tests.support.pinned_client import PinnedConnectionCreator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def mib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 20):.1f} MiB"


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                parts = rest.split()
                out[key] = int(parts[0]) * (1024 if key != "Threads" else 1)
    return out


def proc_cpu_seconds(pid: int, children: bool = False) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11], fields[12] are utime, stime (fields 14, 15 of stat(5)); 13, 14
    # are cutime, cstime: reaped children (a command, and any helper it needed)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


class KeepAliveHTTP(Protocol):
    """One connection, one request at a time, Content-Length responses only."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiting: Optional[Deferred[Tuple[int, bytes]]] = None
        self.closed: Deferred[None] = Deferred()

    def request(self, raw: bytes) -> Deferred[Tuple[int, bytes]]:
        assert self.waiting is None and self.transport is not None
        self.waiting = Deferred()
        self.transport.write(raw)
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        end_head = self.buf.find(b"\r\n\r\n")
        if end_head < 0 or self.waiting is None:
            return
        head = bytes(self.buf[:end_head]).lower()
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        end = end_head + 4 + length
        if len(self.buf) < end:
            return
        body = bytes(self.buf[end_head + 4 : end])
        del self.buf[:end]
        d, self.waiting = self.waiting, None
        d.callback((status, body))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.errback(reason)
        self.closed.callback(None)


_PORTS_GIVEN: set = set()


class Agent:
    """A real agent process in a temp dir."""

    def __init__(self, tmp: str, python: str, installed: bool = False) -> None:
        self.tmp = tmp
        self.python = python
        self.installed = installed
        self.token = secrets.token_urlsafe(32)
        self.rpc_path = secrets.token_urlsafe(18)
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            # Agents made one after the other must not get the same free port.
            if self.port not in _PORTS_GIVEN:
                _PORTS_GIVEN.add(self.port)
                break
        self.config_path = os.path.join(tmp, "config.json")
        config = {
            "agent_token": self.token,
            "secret_key": secrets.token_urlsafe(16),
            "rpc_port": self.port,
            "rpc_path": self.rpc_path,
            "bind": "127.0.0.1",
            "ssl_dir": os.path.join(tmp, "ssl"),
            "state_dir": os.path.join(tmp, "state"),
            "deployment_tool_dir": os.path.join(tmp, "tool"),
        }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        self.env = dict(os.environ)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        if installed:
            # As a user runs it: the installed package and its bytecode.
            self.env.pop("PYTHONPATH", None)
            self.env.pop("PYTHONPYCACHEPREFIX", None)
        else:
            self.env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
            self.env["PYTHONPATH"] = REPO
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.fingerprint = ""

    def start(self) -> None:
        log = open(os.path.join(self.tmp, "agent.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.python, "-m", "myx_agent", "--config", self.config_path],
            env=self.env,
            cwd=self.tmp if self.installed else REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rpc_request(self, method: str, params: Any = None, id_: int = 1) -> bytes:
        call: Dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id_}
        if params is not None:
            call["params"] = params
        body = json.dumps(call).encode()
        return (
            f"POST /{self.rpc_path}/rpc HTTP/1.1\r\nHost: bench\r\n"
            f"X-Agent-Token: {self.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body


async def connect(reactor: Any, agent: Agent) -> KeepAliveHTTP:
    creator = PinnedConnectionCreator(agent.fingerprint)
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", agent.port))
    proto = await endpoint.connect(Factory.forProtocol(KeepAliveHTTP))
    assert isinstance(proto, KeepAliveHTTP)
    return proto


async def call(conn: KeepAliveHTTP, agent: Agent, method: str, params: Any = None) -> Any:
    status, body = await conn.request(agent.rpc_request(method, params))
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    reply = json.loads(body)
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def read_fingerprint(cert_path: str) -> Optional[str]:
    from myx_agent.tls import TLSSetupError, fingerprint_of_pem

    try:
        with open(cert_path, "rb") as f:
            return fingerprint_of_pem(f.read())
    except (OSError, TLSSetupError):
        return None


def log_tail(agent: Agent) -> str:
    with open(os.path.join(agent.tmp, "agent.log"), "rb") as f:
        return f.read()[-2000:].decode(errors="replace")


async def wait_ready(reactor: Any, agent: Agent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    cert = os.path.join(agent.tmp, "ssl", "agent.crt")
    while time.monotonic() < deadline:
        assert agent.proc is not None
        if agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {agent.proc.returncode}: {log_tail(agent)}")
        fingerprint = read_fingerprint(cert)
        if fingerprint is not None:
            agent.fingerprint = fingerprint
            try:
                conn = await connect(reactor, agent)
            except Exception:
                pass
            else:
                await call(conn, agent, "health_check")
                assert conn.transport is not None
                conn.transport.loseConnection()
                await conn.closed
                return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise RuntimeError("agent did not become ready")


async def bench_idle(reactor: Any, agent: Agent, settle: float) -> None:
    await task.deferLater(reactor, settle, lambda: None)
    st = proc_status(agent.pid)
    print(
        f"idle RSS after start (ready, 1 call served, {settle:.0f} s settle): "
        f"{mib(st['VmRSS'])}  [anon {mib(st['RssAnon'])}, file-backed {mib(st['RssFile'])}, "
        f"threads {st['Threads']}; start-up peak VmHWM {mib(st['VmHWM'])}]  target <= 45 MiB"
    )


async def bench_heartbeats(reactor: Any, agent: Agent, calls: int, connections: int) -> None:
    conns = [await connect(reactor, agent) for _ in range(connections)]
    for c in conns:  # warm-up: handshakes and first-call allocations
        for _ in range(20):
            await call(c, agent, "heartbeat")
    per_conn = calls // connections
    cpu0 = proc_cpu_seconds(agent.pid)
    t0 = time.perf_counter()

    async def loop(c: KeepAliveHTTP) -> None:
        for _ in range(per_conn):
            await call(c, agent, "heartbeat")

    await gatherResults([Deferred.fromCoroutine(loop(c)) for c in conns])
    wall = time.perf_counter() - t0
    cpu = proc_cpu_seconds(agent.pid) - cpu0
    total = per_conn * connections
    print(
        f"keep-alive heartbeat, {connections} connection(s), {total} calls: "
        f"{total / wall:.0f} calls/s, agent CPU {cpu / total * 1e3:.3f} ms/call "
        f"({cpu / wall * 100:.0f}% of a core; client in the same machine)"
    )
    for c in conns:
        assert c.transport is not None
        c.transport.loseConnection()
        await c.closed


async def bench_stream(reactor: Any, agent: Agent, total_mib: int) -> None:
    conn = await connect(reactor, agent)
    total = total_mib << 20
    st = proc_status(agent.pid)
    rss_before = st["VmRSS"]
    await call(
        conn,
        agent,
        "execute_command",
        {
            "command": "head",
            "args": ["-c", str(total), "/dev/urandom"],
            "command_id": "bench-stream",
        },
    )
    offset = 0
    peak = rss_before
    t0 = time.perf_counter()
    cpu0 = proc_cpu_seconds(agent.pid)
    while True:
        r = await call(
            conn,
            agent,
            "get_command_log",
            {"command_id": "bench-stream", "offset": offset, "wait": 5, "max_bytes": 1 << 20},
        )
        offset += len(base64.b64decode(r["log_data"]))
        if offset != r["new_offset"]:
            raise RuntimeError(f"offset mismatch {offset} != {r['new_offset']}")
        peak = max(peak, proc_status(agent.pid)["VmRSS"])
        if r["is_final"]:
            break
    wall = time.perf_counter() - t0
    cpu = proc_cpu_seconds(agent.pid) - cpu0
    st = proc_status(agent.pid)
    peak = max(peak, st["VmRSS"])
    print(
        f"streaming {mib(offset)} through get_command_log (1 MiB reads): "
        f"{offset / wall / (1 << 20):.0f} MiB/s, agent CPU {cpu:.1f} s"
    )
    print(
        f"  RSS before {mib(rss_before)}, highest between reads {mib(peak)}, after "
        f"{mib(st['VmRSS'])}: growth {mib(peak - rss_before)}; "
        f"transient peak inside a read (VmHWM) {mib(st['VmHWM'])}: "
        f"growth {mib(max(0, st['VmHWM'] - rss_before))}  target growth <= 20 MiB"
    )
    assert conn.transport is not None
    conn.transport.loseConnection()
    await conn.closed


async def bench_commands(reactor: Any, agent: Agent, count: int) -> None:
    """``true`` N times, one after the other; agent CPU per command and RSS."""
    conn = await connect(reactor, agent)
    for i in range(20):  # warm-up
        await run_true(conn, agent, f"warm-{i}")
    cpu0 = proc_cpu_seconds(agent.pid)
    all0 = proc_cpu_seconds(agent.pid, children=True)
    t0 = time.perf_counter()
    rss_1000 = None
    for i in range(count):
        await run_true(conn, agent, f"true-{i}")
        if i + 1 == 1000:
            rss_1000 = proc_status(agent.pid)["VmRSS"]
    wall = time.perf_counter() - t0
    cpu = proc_cpu_seconds(agent.pid) - cpu0
    total = proc_cpu_seconds(agent.pid, children=True) - all0
    st = proc_status(agent.pid)
    print(
        f"{count} `true` commands in sequence (execute_command, then get_command_log "
        f"long-polls until final): {count / wall:.0f} commands/s, agent CPU "
        f"{cpu / count * 1e3:.2f} ms/command, with its children (the command and "
        f"any start helper) {total / count * 1e3:.2f} ms/command"
    )
    print(
        f"  RSS after 1,000 commands {mib(rss_1000) if rss_1000 else '-'}, "
        f"after {count}: {mib(st['VmRSS'])} (threads {st['Threads']})"
    )
    assert conn.transport is not None
    conn.transport.loseConnection()
    await conn.closed


async def run_true(conn: KeepAliveHTTP, agent: Agent, command_id: str) -> None:
    await call(conn, agent, "execute_command", {"command": "true", "command_id": command_id})
    offset = 0
    while True:
        r = await call(
            conn,
            agent,
            "get_command_log",
            {"command_id": command_id, "offset": offset, "wait": 10},
        )
        offset = r["new_offset"]
        if r["is_final"]:
            if not r["result"]["success"]:
                raise RuntimeError(f"{command_id}: {r['result']}")
            return


async def idle_median(reactor: Any, args: argparse.Namespace, count: int) -> None:
    """Start ``count`` agents at once, wait until each is ready, settle, read RSS."""
    agents = []
    try:
        for i in range(count):
            tmp = tempfile.mkdtemp(prefix=f"myx-agent-bench-{i}-")
            agents.append(Agent(tmp, args.agent_python, args.installed))
        for a in agents:
            a.start()
        for a in agents:
            await wait_ready(reactor, a)
        await task.deferLater(reactor, args.settle, lambda: None)
        rss = sorted(proc_status(a.pid)["VmRSS"] for a in agents)
        mid = len(rss) // 2
        med = rss[mid] if len(rss) % 2 else (rss[mid - 1] + rss[mid]) / 2
        print(
            f"idle RSS of {count} agents after {args.settle:.0f} s: median {mib(med)} "
            f"(min {mib(rss[0])}, max {mib(rss[-1])})  target <= 48 MiB"
        )
    finally:
        for a in agents:
            a.stop()
            shutil.rmtree(a.tmp, ignore_errors=True)


async def run(reactor: Any, args: argparse.Namespace) -> None:
    import twisted

    print(
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Twisted {twisted.__version__}, {platform.system()} {platform.release()}"
    )
    print(
        f"agent interpreter: {args.agent_python}"
        + (" (installed package, neutral cwd)" if args.installed else " (this checkout)")
    )
    if args.agents > 1:
        await idle_median(reactor, args, args.agents)
    tmp = tempfile.mkdtemp(prefix="myx-agent-bench-")
    agent = Agent(tmp, args.agent_python, args.installed)
    try:
        # A first start fills the bytecode cache (PYTHONPYCACHEPREFIX holds the
        # bytecode of every module, Twisted's too); the measured one reuses it.
        agent.start()
        await wait_ready(reactor, agent)
        agent.stop()
        agent.start()
        await wait_ready(reactor, agent)
        await bench_idle(reactor, agent, args.settle)
        idle = proc_status(agent.pid)["VmRSS"]
        for n in args.connections if args.calls else []:  # --calls 0: no heartbeat runs
            await bench_heartbeats(reactor, agent, args.calls, n)
        st = proc_status(agent.pid)
        print(f"RSS after the heartbeat runs: {mib(st['VmRSS'])}")
        if args.commands:
            await bench_commands(reactor, agent, args.commands)
        if args.stream_mib:
            await bench_stream(reactor, agent, args.stream_mib)
        if args.commands or args.stream_mib:
            await task.deferLater(reactor, args.settle, lambda: None)
            now = proc_status(agent.pid)["VmRSS"]
            print(
                f"RSS after all phases, {args.settle:.0f} s settle: {mib(now)}, "
                f"{mib(now - idle)} above idle ({mib(idle)})  target <= 5 MiB"
            )
    finally:
        agent.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="heartbeats per run")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[1, 4], help="concurrent keep-alive conns"
    )
    parser.add_argument("--stream-mib", type=int, default=1024, help="0 skips the stream run")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before RSS")
    parser.add_argument("--commands", type=int, default=0, help="`true` commands to run")
    parser.add_argument("--agents", type=int, default=1, help="agents for the idle median")
    parser.add_argument(
        "--installed",
        action="store_true",
        help="run the installed package (pip install .) from a neutral cwd",
    )
    parser.add_argument(
        "--agent-python",
        default=sys.executable,
        help="interpreter that runs the agent (e.g. a venv made from the distro's python3)",
    )
    args = parser.parse_args(argv)
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
