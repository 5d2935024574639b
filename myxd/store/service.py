# -*- test-case-name: tests.daemon.test_store -*-
"""The SQLite store as one service: the pool, the schema, and the record stores.

``StoreService`` owns the ``ConnectionPool`` (one connection, one thread, WAL,
foreign keys on), brings the schema up to date when it starts, and drains and
closes the pool when it stops. ``Store`` composes the record stores
(``agents``, ``commands``, ``events``, ``servers``) over one ``Database`` and
offers their methods on one object; callers that need only one kind of record
take the narrow piece, or a protocol from ``myxd.store.protocols``.

Each public query is one ``runInteraction``, so each logical write is one
transaction: a failure leaves nothing half-written.

Rules this module keeps:
- It never runs SQL, file I/O or crypto on the reactor thread: all of it runs in
  the pool's thread, and every query returns a Deferred.
- It never logs a token, secret key, password, private key or sudo password,
  and never stores one unencrypted (see ``myxd.store.crypto``).
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, cast

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd._reactor import CoreReactor, default_reactor
from myxd.store import migrate
from myxd.store.agents import AgentStore
from myxd.store.commands import CommandStore
from myxd.store.crypto import KEY_FILE_NAME, SecretBox, load_or_create_key
from myxd.store.db import UNSET, Database, SupportsSeconds, open_connection
from myxd.store.deployments import DeploymentStore
from myxd.store.events import EventStore
from myxd.store.servers import ServerStore

__all__ = ["UNSET", "Store", "StoreService"]


class Store:
    """Every query of the daemon, from the four record stores. Use ``StoreService.store``.

    The methods are the record stores' own (bound in ``__init__``), so the
    facade adds no behaviour and no call overhead.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        # The wall-clock time rows are stamped with: for any timestamp that is
        # stored (never the reactor's seconds(), which are monotonic in myxd).
        self.now = db.now
        self.agents = AgentStore(db)
        self.commands = CommandStore(db)
        self.events = EventStore(db)
        self.servers = ServerStore(db)
        self.deployments = DeploymentStore(db)

        agents = self.agents
        self.new_agent_identity = agents.new_agent_identity
        self.add_agent = agents.add_agent
        self.get_agent = agents.get_agent
        self.get_agent_for_server = agents.get_agent_for_server
        self.list_agents = agents.list_agents
        self.search_agents = agents.search_agents
        self.delete_agent = agents.delete_agent
        self.set_agent_status = agents.set_agent_status
        self.update_agent = agents.update_agent
        self.record_heartbeat_results = agents.record_heartbeat_results
        self.agent_counts_by_status = agents.agent_counts_by_status

        commands = self.commands
        self.create_command = commands.create_command
        self.get_command = commands.get_command
        self.get_command_by_uid = commands.get_command_by_uid
        self.list_commands = commands.list_commands
        self.search_commands = commands.search_commands
        self.list_unfinished_commands = commands.list_unfinished_commands
        self.update_command = commands.update_command
        self.append_output = commands.append_output
        self.read_output = commands.read_output
        self.read_command_output = commands.read_command_output
        self.command_counts_by_status = commands.command_counts_by_status

        self.add_event = self.events.add_event
        self.list_events = self.events.list_events

        servers = self.servers
        self.add_server = servers.add_server
        self.get_server = servers.get_server
        self.list_servers = servers.list_servers
        self.list_servers_filtered = servers.list_servers
        self.update_server = servers.update_server
        self.delete_server = servers.delete_server
        self.start_install = servers.start_install
        self.record_install_step = servers.record_install_step
        self.finish_install = servers.finish_install
        self.get_latest_install = servers.get_latest_install


class StoreService(Service):
    """Owns the connection pool; ``.store`` is the ``Store``, ``.db`` its ``Database``.

    The pool is created in ``startService``. Queries issued after that but
    before the schema upgrade finishes simply queue behind it: the pool has
    exactly one thread and runs work in order. ``when_ready()`` fires once the
    store is open, or fails with the reason it could not be opened (in which
    case, with ``stop_reactor_on_failure``, the reactor is stopped: a daemon
    without its store is useless).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        reactor: CoreReactor | None = None,
        *,
        key_path: str | None = None,
        schema_dir: str | None = None,
        stop_reactor_on_failure: bool = False,
        clock: SupportsSeconds | None = None,
    ) -> None:
        self._reactor: CoreReactor = default_reactor(reactor)
        self.path = os.path.abspath(path)
        self.key_path = key_path or os.path.join(os.path.dirname(self.path), KEY_FILE_NAME)
        self.schema_dir = schema_dir or migrate.DEFAULT_SCHEMA_DIR
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.pool: adbapi.ConnectionPool | None = None
        # Rows are stamped with ``clock`` (the wall clock in the daemon), else the reactor.
        self.db = Database(clock if clock is not None else self._reactor)
        self.store = Store(self.db)
        self.migration: migrate.MigrationReport | None = None
        self._outcome: Any = None
        self._waiters: list[Deferred[migrate.MigrationReport]] = []

    def when_ready(self) -> Deferred[migrate.MigrationReport]:
        """Fires with the migration report once open; fails if the store cannot open."""
        d: Deferred[migrate.MigrationReport] = Deferred()
        if self._outcome is None:
            self._waiters.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)
        return d

    def startService(self) -> None:
        super().startService()
        self.pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=open_connection,
            cp_reactor=self._reactor,
        )
        self.db.open(self.pool)
        d = self.pool.runWithConnection(self._open)
        d.addCallbacks(self._opened, self._failed)

    def _open(self, conn: Any) -> migrate.MigrationReport:
        # adbapi's Connection proxies the sqlite3 connection's methods.
        raw = cast(sqlite3.Connection, conn)
        # Secrets are encrypted, but command output and host names are not:
        # keep the files private even if the data dir's mode is loosened.
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(self.path + suffix, 0o600)
            except FileNotFoundError:
                pass
        self.db.set_secret_box(SecretBox(load_or_create_key(self.key_path)))
        return migrate.upgrade(raw, self.path, self.schema_dir)

    def _opened(self, report: migrate.MigrationReport) -> None:
        self.migration = report
        if report.from_version == 0:
            self.log.info("store {path} created", path=self.path)
        elif report.from_version != report.to_version:
            self.log.info(
                "store {path} schema upgraded v{old} -> v{new} (backup: {backup})",
                path=self.path,
                old=report.from_version,
                new=report.to_version,
                backup=report.backup_path or "none needed",
            )
        self.log.info(
            "store {path} open at schema v{version}", path=self.path, version=report.to_version
        )
        self._settle(report)

    def _failed(self, failure: Failure) -> None:
        self.log.failure("store {path} could not be opened", failure, path=self.path)
        self._settle(failure)
        if self.stop_reactor_on_failure and self._reactor.running:
            self._reactor.stop()

    def _settle(self, outcome: Any) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        pool = self.pool
        d = self.db.drain()

        def close(_: Any) -> None:
            # Work queued after this point is refused, not left waiting forever.
            self.db.close()
            if pool is not None:
                pool.close()

        d.addBoth(close)
        return d
