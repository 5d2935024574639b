# -*- test-case-name: tests.agent.test_agent_process -*-
"""Start the agent: ``python -m myx_agent --config PATH`` or ``myx-agent --config PATH``.

Reads the config, makes or loads the TLS identity, and builds a service tree
(``build_service``): a ``MultiService`` of the TLS listener
(``StreamServerEndpointService``) and the command runner; the method table
also gets the artifact cache at ``<state_dir>/artifacts``. It runs under
``react()`` until SIGTERM/SIGINT, then stops the tree (the runner kills the
commands' process trees) before exiting.

A problem that stops the start (bad config, unusable ssl_dir or state_dir,
port in use) is printed to stderr as exactly one line, ``myx-agent: error:
...``, naming the file and the field or cause, and the process exits non-zero
without a traceback. Logs go to stdout. Never log the token or secret_key.

Heavy modules (the runner, ansible-runner) are imported inside functions so
that the idle agent stays small; nothing here runs at import time.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence, Tuple

from myx_agent import __version__
from myx_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config

if TYPE_CHECKING:
    from twisted.application.service import MultiService

EXIT_CONFIG = 2
EXIT_START = 1
# How long SIGTERM waits for the runner to kill and reap its commands.
STOP_TIMEOUT = 20.0

USAGE = f"""\
usage: myx-agent [--config PATH]

MyX agent {__version__}: a passive JSON-RPC 2.0 server over TLS.

options:
  --config PATH  the agent's JSON config (default {DEFAULT_CONFIG_PATH})
  --version      print the version and exit
  -h, --help     show this help and exit
"""


def _die(message: str, code: int) -> NoReturn:
    line = " ".join(message.split())  # exactly one line, whatever the cause said
    sys.stderr.write(f"myx-agent: error: {line}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def parse_args(argv: Sequence[str]) -> str:
    """The config path from the command line (argparse is avoided: it costs memory)."""
    config = DEFAULT_CONFIG_PATH
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if arg == "--version":
            sys.stdout.write(f"myx-agent {__version__}\n")
            raise SystemExit(0)
        if arg == "--config":
            if not args:
                _die("--config needs a path", EXIT_CONFIG)
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg[len("--config=") :]
        else:
            _die(f"unknown argument {arg!r} (see --help)", EXIT_CONFIG)
    if not config:
        _die("--config needs a path", EXIT_CONFIG)
    return config


def _start_logging() -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stdout),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def build_service(config: AgentConfig, reactor: Any) -> Tuple[MultiService, str]:
    """The agent's service tree and its certificate fingerprint.

    Children start in order: first the TLS listener (a second agent on the
    same port and state_dir fails here, before it could touch the first one's
    commands), then the command runner (recovery of the state_dir). They stop
    in reverse: the runner kills its commands while clients can still read
    their final results, then the listener closes."""
    from twisted.application.internet import StreamServerEndpointService
    from twisted.application.service import MultiService
    from twisted.internet.endpoints import SSL4ServerEndpoint

    from myx_agent.artifacts import ArtifactCache
    from myx_agent.commands import CommandRunner
    from myx_agent.deploytool import read_deployment_tool_version, sync_deployment_tool
    from myx_agent.jsonrpc import Dispatcher
    from myx_agent.methods import AgentMethods
    from myx_agent.rpc_server import build_factory
    from myx_agent.sysinfo import SystemInfo
    from myx_agent.tls import TLSSetupError, ensure_identity, fingerprint_of_pem, server_context

    try:
        cert_pem, key_pem = ensure_identity(config.ssl_dir, generate_in_child=True)
        context = server_context(cert_pem, key_pem, config.ssl_dir)
        fingerprint = fingerprint_of_pem(cert_pem)
    except TLSSetupError as e:
        _die(str(e), EXIT_START)
    try:
        runner = CommandRunner(
            config.state_dir,
            deployment_tool_dir=config.deployment_tool_dir,
            max_concurrent=config.max_concurrent_commands,
            reactor=reactor,
            wall=time.time,
        )
    except Exception as e:
        _die(f"state_dir {config.state_dir}: cannot set up the command runner: {e}", EXIT_START)
    # Created on the first chunk; nothing is touched on disk here.
    artifacts = ArtifactCache(
        os.path.join(config.state_dir, "artifacts"), config.artifact_cache_max_bytes, reactor
    )
    methods = AgentMethods(
        runner=runner,
        rpc_port=config.rpc_port,
        cert_fingerprint=fingerprint,
        deployment_tool_dir=config.deployment_tool_dir,
        sync_tool=lambda d, archive, sha, version: sync_deployment_tool(
            d, archive, sha, version, reactor=reactor, cache_dir=artifacts.root
        ),
        read_tool_version=read_deployment_tool_version,
        system=SystemInfo(),
        artifacts=artifacts,
        reactor=reactor,
        wall=time.time,
    )
    factory = build_factory(
        rpc_path=config.rpc_path,
        token=config.agent_token,
        dispatcher=Dispatcher(methods.table()),
        reactor=reactor,
    )
    endpoint = SSL4ServerEndpoint(
        reactor, config.rpc_port, context, backlog=128, interface=config.bind
    )
    listener = StreamServerEndpointService(endpoint, factory)
    # A port in use must fail startService itself, so it becomes one clear line.
    listener._raiseSynchronously = True
    listener.setName("rpc-listener")
    runner.setName("command-runner")
    top = MultiService()
    listener.setServiceParent(top)
    runner.setServiceParent(top)
    return top, fingerprint


async def serve(reactor: Any, config: AgentConfig) -> None:
    """Start the service tree and run until the reactor is told to stop
    (SIGTERM/SIGINT); then stop the tree, the runner within STOP_TIMEOUT."""
    from twisted.internet.defer import Deferred
    from twisted.internet.error import CannotListenError
    from twisted.logger import Logger

    from myx_agent.clock import use_monotonic_time

    log = Logger(namespace="myx_agent.main")
    # Timeouts, kill escalation, log waits and sweeps count monotonic seconds: a
    # wall-clock jump (NTP step, date -s) neither fires nor holds them. Records
    # keep wall time (wall=time.time below).
    use_monotonic_time(reactor)
    _start_logging()
    if config.unknown_keys:
        log.warn(
            "config {path}: ignoring unknown keys {keys}",
            path=config.path,
            keys=", ".join(k[:64] for k in config.unknown_keys[:20]),
        )
    top, fingerprint = build_service(config, reactor)
    try:
        top.startService()
    except CannotListenError as e:
        cause = getattr(e.socketError, "strerror", None) or str(e.socketError)
        _die(
            f"cannot listen on {config.bind}:{config.rpc_port} "
            f"(field 'rpc_port' in config {config.path}): {cause}",
            EXIT_START,
        )
    except Exception as e:
        _die(f"state_dir {config.state_dir}: cannot start the command runner: {e}", EXIT_START)

    async def shutdown() -> None:
        stopped = top.stopService()
        stopped.addTimeout(STOP_TIMEOUT, reactor)
        try:
            await stopped
        except Exception:
            log.failure("the agent did not stop cleanly")
        log.info("myx-agent stopped")

    # The reactor waits for this before it stops (twistd does the same).
    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(shutdown()))
    log.info(
        "myx-agent {version} listening on {bind}:{port} cert_fingerprint={fingerprint}",
        version=__version__,
        bind=config.bind,
        port=config.rpc_port,
        fingerprint=fingerprint,
    )
    # Serve until the reactor stops; react() then exits with status 0.
    await Deferred()


def run(config: AgentConfig) -> NoReturn:
    """Run the agent with a loaded config until it is told to stop; exits."""
    from myx_agent.imports import defer_for_agent

    # Before Twisted is imported: see myx_agent.imports.
    defer_for_agent()
    from twisted.internet.task import react

    react(serve, [config])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point. Returns the exit status."""
    path = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(path)
    except ConfigError as e:
        _die(str(e), EXIT_CONFIG)
    return run(config)
