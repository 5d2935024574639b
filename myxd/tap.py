"""``twistd myxd``: command-line options and the daemon's service tree.

``Options`` turns flags and the TOML file into one ``Settings`` (a bad value
makes twistd exit with a one-line message). ``makeService`` builds a
``MultiService``: store, RPC client, SSH installer, heartbeat scheduler,
command queue and the admin API listener, started in that order and stopped in reverse, one
after the other, so that the store closes only after everything that writes
to it has stopped.

This module is only imported by twistd through the plugin; it never starts
the reactor, and it never logs the admin token (only the path of its file).
A bad configuration stops twistd with one line and exit status ``EXIT_CONFIG``.
"""

# test-case-name: tests.daemon.test_plugin

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
)
from twisted.python import usage

from myxd.config import Settings, field_doc, field_names, flag_name, load_settings
from myxd.errors import ConfigError

DB_FILE_NAME = "myxd.sqlite"
ADMIN_TOKEN_FILE_NAME = "admin-token"  # noqa: S105 - a file name, not a secret
# EX_CONFIG of sysexits.h: a bad configuration (packaging/myxd.service does not
# restart on it).
EXIT_CONFIG = 78

_OWN_FLAGS = ("data_dir", "api")


def _flag_parameters() -> list[list[Any]]:
    params: list[list[Any]] = [
        ["data-dir", "d", None, f"{field_doc('data_dir')} [default: {Settings.data_dir}]"],
        ["api", "a", None, f"{field_doc('api')} [default: {Settings.api}]"],
        ["config", "c", None, "TOML config file; flags override its values"],
    ]
    for name in field_names():
        if name in _OWN_FLAGS:
            continue
        default = getattr(Settings, name, None)
        shown = "" if default is None else f" [default: {default}]"
        params.append([flag_name(name), None, None, field_doc(name) + shown])
    return params


class Options(usage.Options):
    """Flags of ``twistd myxd``; ``self["settings"]`` holds the result."""

    synopsis = "[options]"
    longdesc = (
        "MyX fleet daemon. Values come from the defaults, then --config FILE (TOML, "
        "keys spelled with underscores), then these flags."
    )
    optParameters = _flag_parameters()

    def postOptions(self) -> None:
        overrides = {name: self[flag_name(name)] for name in field_names()}
        try:
            settings = load_settings(self["config"], overrides)
            _check_endpoint(settings.api, "--api" if self["api"] is not None else "api")
            _check_deployment_tool(settings)
        except ConfigError as e:
            config_failed(self, str(e))
        self["settings"] = settings


def under_twistd(options: Any) -> bool:
    """True when twistd parsed these options (as its ``myxd`` subcommand)."""
    return getattr(options, "parent", None) is not None


def config_failed(options: Any, message: str) -> NoReturn:
    """Stop on a bad configuration.

    Under twistd: the one-line reason on stderr (no usage text) and exit status
    ``EXIT_CONFIG``, which the systemd unit lists in RestartPreventExitStatus=
    so a broken config is not restarted forever. Elsewhere (tests, embedding):
    a ``usage.UsageError``.
    """
    if under_twistd(options):
        sys.stderr.write(f"myxd: error: {message}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_CONFIG)
    raise usage.UsageError(message)


def _check_deployment_tool(settings: Settings) -> None:
    from myxd.install.bundle import BundleError, check_deployment_tool_dir, deployment_tool_dir

    try:
        if settings.deployment_tool_dir is not None:
            check_deployment_tool_dir(settings.deployment_tool_dir)
        else:
            check_deployment_tool_dir(deployment_tool_dir())
    except BundleError as e:
        raise ConfigError(f"deployment_tool_dir: {e}") from None


def filtered_log_observer(twistd_options: Any, level: str) -> ILogObserver:
    """twistd's own log observer (stdout, --logfile or --syslog) behind a level filter.

    At info, conch's protocol chatter (its debug lines, and "Disconnecting with
    error, code 11" logged at info for every normal close) stays out of the
    journal; ``--log-level debug`` shows everything.
    """
    from twisted.scripts._twistd_unix import UnixAppLogger

    observer: Any = UnixAppLogger(twistd_options)._getLogObserver()
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    predicate = LogLevelFilterPredicate(
        defaultLogLevel=LogLevel.debug if level == "debug" else LogLevel.info
    )
    if level != "debug":
        # Conch's classes log per channel and per SFTP packet at info; ours in
        # myxd.install.ssh subclass them, so their events carry our namespace.
        for namespace in (
            "twisted.conch",
            "myxd.install.ssh",
            "myxd.install.sshauth",
            "myxd.install.sshchannels",
        ):
            predicate.setLogLevelForNamespace(namespace, LogLevel.warn)
    return FilteringLogObserver(observer, [predicate])


def _check_endpoint(description: str, where: str) -> None:
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: not a valid endpoint {description!r}: {e}") from e


def prepare_data_dir(path: str) -> str:
    """Create the data dir (mode 700), or tighten an existing one; returns its abs path."""
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def remove_stale_admin_token(data_dir: str, log: Logger | None = None) -> None:
    """With ``admin_token`` in the settings, a generated token file no longer works: drop it."""
    path = os.path.join(data_dir, ADMIN_TOKEN_FILE_NAME)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as e:
        (log or Logger(namespace="myxd")).warn(
            "{path} is stale (admin_token is set in the config) but cannot be removed: {error}",
            path=path,
            error=e.strerror,
        )
        return
    (log or Logger(namespace="myxd")).info(
        "removed {path}: admin_token is set in the config, the generated token no longer works",
        path=path,
    )


def ensure_admin_token(data_dir: str, log: Logger | None = None) -> str:
    """The token in ``<data_dir>/admin-token``, generated (mode 600) if absent.

    The token itself is never logged; the start that creates it logs the path.
    """
    import secrets

    path = os.path.join(data_dir, ADMIN_TOKEN_FILE_NAME)
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        # Only the path: the journal is readable by more people than the file.
        (log or Logger(namespace="myxd")).info(
            "admin API token created in {path} (mode 600); the myx CLI and the console need it",
            path=path,
        )
        return token
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the admin token: {e}") from e
    if len(token) < 16:
        raise ConfigError(f"{path}: admin token is shorter than 16 characters")
    return token


class APIService(StreamServerEndpointService):
    """Serves the admin API on its endpoint; logs where, so ``--api tcp:0`` shows its port.

    A bind failure at start raises (twistd reports it and exits) instead of
    leaving a daemon up without its API.
    """

    log = Logger()
    _raiseSynchronously = True

    #: The listening port once bound, None before and after (tests and benches read it).
    port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._bound)

    def stopService(self) -> Deferred[None]:
        self.port = None
        return super().stopService()

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        self.log.info(
            "myxd admin API listening on {host}:{port}",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
        )
        return port


class MyxdService(MultiService):
    """The daemon's root service: starts children in order, stops them in reverse.

    Unlike ``MultiService``, stopping waits for each child before the next, so
    the store outlives the services that still flush into it.
    """

    log = Logger()

    def __init__(self, settings: Settings, log_observer: ILogObserver | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.log_observer = log_observer

    def setServiceParent(self, parent: Any) -> Any:
        # twistd makes the application after makeService and starts logging
        # with the application's ILogObserver component, if it has one.
        result = super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        return result

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "myxd started (data dir {data_dir}, api {api})",
            data_dir=os.path.abspath(self.settings.data_dir),
            api=self.settings.api,
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=child.name or child)
        self.log.info("myxd stopped cleanly")


def makeService(options: Options | dict[str, Any]) -> MultiService:
    """The service tree of the daemon, from parsed ``Options``."""
    from twisted.internet import endpoints, reactor
    from twisted.internet.interfaces import IReactorThreads

    from myx_agent.clock import WallClock, use_monotonic_time
    from myxd.api.app import AdminAPI
    from myxd.api.deployments import DeploymentsAPI
    from myxd.api.servers import ServersAPI
    from myxd.artifacts.store import ArtifactStore
    from myxd.deploy.service import DeploymentService, tool_playbooks
    from myxd.deploy.transfer import ArtifactPusher
    from myxd.fleet.commands import CommandQueue
    from myxd.fleet.heartbeat import HeartbeatService
    from myxd.install import Installer
    from myxd.install.bundle import deployment_tool_dir
    from myxd.metrics import Metrics
    from myxd.rpc.client import AgentRPC
    from myxd.store import StoreService

    settings: Settings = options["settings"]
    log = Logger(namespace="myxd")
    try:
        data_dir = prepare_data_dir(settings.data_dir)
        if settings.admin_token is not None:
            remove_stale_admin_token(data_dir, log)
            admin_token = settings.admin_token
        else:
            admin_token = ensure_admin_token(data_dir, log)
    except OSError as e:
        config_failed(options, f"data_dir {settings.data_dir}: {e.strerror or e}")
    except ConfigError as e:
        config_failed(options, str(e))

    # Schedules and timeouts count monotonic seconds: a wall-clock jump must not
    # hold or fire them (docs/reliability.md, "Clock jumps"); rows keep wall time.
    use_monotonic_time(reactor)

    observer = None
    if under_twistd(options):
        observer = filtered_log_observer(options.parent, settings.log_level)  # type: ignore[union-attr]
    root = MyxdService(settings, observer)
    metrics = Metrics()

    store_service = StoreService(
        os.path.join(data_dir, DB_FILE_NAME),
        reactor,
        stop_reactor_on_failure=True,
        clock=WallClock(),
    )
    store_service.setName("store")
    store_service.setServiceParent(root)
    store = store_service.store

    rpc = AgentRPC(reactor, settings, metrics=metrics)
    rpc.setName("rpc")
    rpc.setServiceParent(root)

    installer = Installer(store, rpc, settings, reactor, data_dir=data_dir, metrics=metrics)
    installer.setName("installer")
    installer.setServiceParent(root)

    heartbeat = HeartbeatService(
        store,
        rpc,
        settings,
        reactor,
        reinstall_hook=installer.auto_reinstall,
        metrics=metrics,
    )
    heartbeat.setName("heartbeat")
    heartbeat.setServiceParent(root)

    queue = CommandQueue(store, rpc, settings, reactor, metrics=metrics)
    queue.setName("commands")
    queue.setServiceParent(root)

    artifacts = ArtifactStore(
        os.path.join(data_dir, "artifacts"), settings.artifact_max_bytes, reactor
    )
    tool_dir = settings.deployment_tool_dir or deployment_tool_dir()
    deployer = DeploymentService(
        store,
        queue,
        artifacts,
        ArtifactPusher(rpc, reactor),
        lambda: tool_playbooks(tool_dir),
        default_timeout=settings.deployment_timeout,
    )
    deployer.setName("deployments")
    deployer.setServiceParent(root)

    api = AdminAPI(
        store,
        queue,
        rpc,
        settings,
        reactor,
        metrics=metrics,
        admin_token=admin_token,
        servers_api=ServersAPI(store, installer, reactor=IReactorThreads(reactor)),
        deployments_api=DeploymentsAPI(
            store, deployer, artifacts, lambda: tool_playbooks(tool_dir)
        ),
        artifact_max_bytes=settings.artifact_max_bytes,
    )
    listener = APIService(endpoints.serverFromString(reactor, settings.api), api.site())
    listener.setName("api")
    listener.setServiceParent(root)
    return root


__all__ = [
    "APIService",
    "MyxdService",
    "Options",
    "ensure_admin_token",
    "makeService",
    "prepare_data_dir",
]
