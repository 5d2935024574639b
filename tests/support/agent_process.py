"""Run a real ``myx_agent`` process on 127.0.0.1 for tests, and talk to it pinned.

``start_agent(testcase)`` writes a temporary config (random token, 24-char
rpc_path, a free port, temp ssl/state/deployment-tool dirs, mode 600), starts
``python -m myx_agent --config ...`` from the installed wheel (never the
checkout; see tests/support/installed.py), waits until a pinned ``health_check``
answers, and registers cleanup with the test case so the process never
outlives the test. The pinned fingerprint is computed from the agent's
certificate file, independently of what the agent logs.

The agent's stdout/stderr go to files next to its config (``agent.stdout``,
``agent.stderr``), appended across restarts, for post-mortems.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support import installed
from tests.support.pinned_client import AgentClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0


def _reactor(reactor: Any = None) -> Any:
    if reactor is None:
        from twisted.internet import reactor as _r

        return _r
    return reactor


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the agent retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(path: str, data: Dict[str, Any], mode: int = 0o600) -> None:
    """Write *data* as JSON at *path* with *mode*, created with that mode from the start."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def cert_fingerprint(cert_path: str) -> str:
    """SHA-256 of the DER bytes of the PEM certificate at *cert_path*, lowercase hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _new_base_dir(testcase: TestCase) -> str:
    base = os.path.abspath(testcase.mktemp())
    os.makedirs(base)
    return base


def _try_fingerprint(cert_path: str) -> Tuple[Optional[str], Optional[BaseException]]:
    """(fingerprint, None) once the agent has written its certificate."""
    if not os.path.exists(cert_path):
        return None, None
    try:
        return cert_fingerprint(cert_path), None
    except ValueError as e:  # half-written by the agent right now
        return None, e


@dataclass
class ProcessExit:
    exit_code: Optional[int]
    signal: Optional[int]
    stdout: str
    stderr: str


class _AgentProtocol(ProcessProtocol):
    def __init__(self, stdout_path: str, stderr_path: str) -> None:
        self._out = open(stdout_path, "ab")  # noqa: SIM115 - closed in processEnded
        self._err = open(stderr_path, "ab")  # noqa: SIM115
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit: Optional[ProcessExit] = None
        self._waiters: List[Deferred[ProcessExit]] = []

    def wait_ended(self) -> Deferred[ProcessExit]:
        """A new Deferred that fires with the exit (at once if it happened)."""
        d: Deferred[ProcessExit] = Deferred()
        if self.exit is not None:
            d.callback(self.exit)
        else:
            self._waiters.append(d)
        return d

    def outReceived(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self._err.write(data)
        self._err.flush()
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self._out.close()
        self._err.close()
        value = reason.value
        self.exit = ProcessExit(
            getattr(value, "exitCode", None),
            getattr(value, "signal", None),
            self.stdout.decode("utf-8", "replace"),
            self.stderr.decode("utf-8", "replace"),
        )
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.exit)


class AgentProcess:
    """One spawned agent process (it may fail to start; see ``ended``)."""

    def __init__(
        self,
        config_path: str,
        *,
        reactor: Any = None,
        env: Optional[Dict[str, str]] = None,
        log_dir: Optional[str] = None,
    ) -> None:
        self.reactor = _reactor(reactor)
        log_dir = log_dir or os.path.dirname(config_path)
        self.protocol = _AgentProtocol(
            os.path.join(log_dir, "agent.stdout"), os.path.join(log_dir, "agent.stderr")
        )
        # The installed package (tests/support/installed.py), never the checkout:
        # no PYTHONPATH, and the cwd is the test's own directory.
        child_env = installed.env(PYTHONUNBUFFERED="1")
        child_env.update(env or {})
        python = installed.python()
        argv = [python, "-m", "myx_agent", "--config", config_path]
        self.transport = self.reactor.spawnProcess(
            self.protocol, python, argv, env=child_env, path=log_dir
        )
        self.pid: int = self.transport.pid

    def ended(self) -> Deferred[ProcessExit]:
        """A new Deferred that fires with the exit (at once if it happened)."""
        return self.protocol.wait_ended()

    @property
    def running(self) -> bool:
        return self.protocol.exit is None

    async def wait_exit(self, timeout: float = STOP_TIMEOUT) -> ProcessExit:
        """Wait for the process to exit; SIGKILL it (and fail) after *timeout*."""
        waiter = self.ended()
        timer = self.reactor.callLater(timeout, waiter.cancel)
        try:
            return await waiter
        except CancelledError:
            self.signal("KILL")
            await self.ended()
            raise AssertionError(f"agent pid {self.pid} did not exit within {timeout}s") from None
        finally:
            if timer.active():
                timer.cancel()

    def signal(self, sig: str) -> None:
        if self.running:
            try:
                self.transport.signalProcess(sig)
            except OSError:
                pass

    async def stop(self, sig: str = "TERM", timeout: float = STOP_TIMEOUT) -> ProcessExit:
        if not self.running:
            return await self.ended()
        self.signal(sig)
        return await self.wait_exit(timeout)


async def run_agent_until_exit(
    testcase: TestCase, config_path: str, *, timeout: float = START_TIMEOUT, reactor: Any = None
) -> ProcessExit:
    """Run the agent with *config_path* and wait for it to exit by itself (config errors)."""
    proc = AgentProcess(config_path, reactor=reactor, log_dir=_new_base_dir(testcase))
    testcase.addCleanup(lambda: Deferred.fromCoroutine(proc.stop("KILL")))
    return await proc.wait_exit(timeout)


@dataclass
class RunningAgent:
    """A live agent process and everything a test needs to reach it."""

    testcase: TestCase
    host: str
    port: int
    rpc_path: str
    token: str
    config_path: str
    base_dir: str
    ssl_dir: str
    state_dir: str
    deployment_tool_dir: str
    config: Dict[str, Any]
    fingerprint: str = ""
    process: Optional[AgentProcess] = None
    reactor: Any = None
    env: Optional[Dict[str, str]] = None  # extra environment for the process
    _clients: List[AgentClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/{self.rpc_path}/rpc"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    @property
    def stdout_path(self) -> str:
        return os.path.join(self.base_dir, "agent.stdout")

    def log_text(self) -> str:
        """Everything the agent has written to stdout (its log), across restarts."""
        try:
            with open(self.stdout_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def client(self, **kwargs: Any) -> AgentClient:
        """A pinned JSON-RPC client, closed when the test ends."""
        options: Dict[str, Any] = dict(
            host=self.host,
            port=self.port,
            rpc_path=self.rpc_path,
            token=self.token,
            fingerprint=self.fingerprint,
            reactor=self.reactor,
        )
        options.update(kwargs)
        c = AgentClient(**options)
        self.testcase.addCleanup(lambda: Deferred.fromCoroutine(c.close()))
        return c

    async def call(self, method: str, params: Any = None) -> Any:
        """One call on a shared client of this agent."""
        if not self._clients:
            self._clients.append(self.client())
        return await self._clients[0].call(method, params)

    async def stop(self, sig: str = "TERM", timeout: float = STOP_TIMEOUT) -> ProcessExit:
        """Send *sig* (``TERM`` or ``KILL``) and wait for the exit."""
        assert self.process is not None
        for c in self._clients:
            await c.close()
        return await self.process.stop(sig, timeout)

    async def restart(self, sig: str = "TERM") -> None:
        """Stop (if running) and start again with the same config, port and dirs."""
        if self.running:
            await self.stop(sig)
        await _launch(self)

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll a pinned health_check until it answers; fail if the process exits."""
        clock = _reactor(self.reactor)
        deadline = clock.seconds() + timeout
        cert_path = os.path.join(self.ssl_dir, "agent.crt")
        last_error: Optional[BaseException] = None
        while True:
            assert self.process is not None
            if not self.process.running:
                ended = await self.process.ended()
                raise AgentStartError(ended)
            fingerprint, problem = _try_fingerprint(cert_path)
            if problem is not None:
                last_error = problem
            if fingerprint is not None:
                self.fingerprint = fingerprint
                probe = AgentClient(
                    host=self.host,
                    port=self.port,
                    rpc_path=self.rpc_path,
                    token=self.token,
                    fingerprint=self.fingerprint,
                    reactor=clock,
                    timeout=10,
                )
                try:
                    if await probe.call("health_check") == {"status": "ok"}:
                        return
                except Exception as e:
                    last_error = e
                finally:
                    await probe.close()
            if clock.seconds() > deadline:
                await self.process.stop("KILL")
                raise AssertionError(
                    f"agent did not answer within {timeout}s; last error: {last_error!r}"
                )
            await deferLater(clock, 0.1, lambda: None)


class AgentStartError(AssertionError):
    def __init__(self, ended: ProcessExit) -> None:
        super().__init__(
            f"agent exited during start (code {ended.exit_code}, signal {ended.signal}): "
            f"{ended.stderr.strip()[-2000:]}"
        )
        self.ended = ended


async def _launch(agent: RunningAgent) -> None:
    agent.process = AgentProcess(agent.config_path, reactor=agent.reactor, env=agent.env)
    await agent.wait_ready()


async def start_agent(
    testcase: TestCase,
    *,
    config_overrides: Optional[Dict[str, Any]] = None,
    reuse: Optional[RunningAgent] = None,
    reactor: Any = None,
    env: Optional[Dict[str, str]] = None,
) -> RunningAgent:
    """Start a real agent process and wait until it answers a pinned health_check.

    *config_overrides* are merged into the generated config (a value of None
    removes the key). With *reuse*, the stopped agent's config, dirs and port
    are used again (same identity, same state), like a service restart.
    """
    if reuse is not None:
        if reuse.running:
            raise AssertionError("stop the agent before starting it again")
        await _launch(reuse)
        return reuse

    base = _new_base_dir(testcase)
    overrides = dict(config_overrides or {})
    config: Dict[str, Any] = {
        "agent_token": secrets.token_urlsafe(32),
        "secret_key": secrets.token_urlsafe(32),
        "rpc_port": free_port(),
        "rpc_path": secrets.token_urlsafe(18),
        "bind": HOST,
        "ssl_dir": os.path.join(base, "ssl"),
        "state_dir": os.path.join(base, "state"),
        "deployment_tool_dir": os.path.join(base, "deployment-tool"),
    }
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_path = os.path.join(base, "config.json")
    agent = RunningAgent(
        testcase=testcase,
        host=config.get("bind", HOST),
        port=config["rpc_port"],
        rpc_path=config["rpc_path"],
        token=config["agent_token"],
        config_path=config_path,
        base_dir=base,
        ssl_dir=config.get("ssl_dir", os.path.join(base, "ssl")),
        state_dir=config["state_dir"],
        deployment_tool_dir=config["deployment_tool_dir"],
        config=config,
        reactor=_reactor(reactor),
        env=env,
    )

    async def cleanup() -> None:
        if agent.running:
            ended = await agent.stop("TERM")
            if ended.signal is not None or ended.exit_code not in (0, None):
                testcase.fail(f"agent did not stop cleanly on SIGTERM: {ended}")

    testcase.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    for attempt in range(5):
        write_config(config_path, config)
        try:
            await _launch(agent)
            return agent
        except AgentStartError as e:
            port_taken = "already in use" in e.ended.stderr.lower()
            if not port_taken or "rpc_port" in overrides or attempt == 4:
                raise
            # Another test run took the port between free_port() and bind.
            config["rpc_port"] = agent.port = free_port()
    raise AssertionError("unreachable")
