# -*- test-case-name: tests.daemon.test_store,tests.daemon.test_fast_paths -*-
"""The database the record stores share: run one interaction, drain, group work.

``Database`` wraps the adbapi ``ConnectionPool`` that ``StoreService`` opens:
``run`` starts one ``runInteraction`` (one transaction), ``drain`` waits for
everything started so far, and ``batcher`` groups many small requests into one
transaction each (the output group commit, grouped live reads). The SQL helpers
here (``check``, ``update_row``, ``counts``, JSON columns) are shared by the
per-record modules.

Rules this module keeps:
- It never runs SQL, file I/O or crypto on the reactor thread: interactions
  run in the pool's one thread, and callers get Deferreds.
- It never hands work to a pool that is not open or already closed: such work
  fails at once with ``StoreError`` instead of waiting forever.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.python.failure import Failure

from myxd.errors import NotFoundError, StoreError, StoreFull
from myxd.store.crypto import SecretBox

T = TypeVar("T")
Item = TypeVar("Item")
Result = TypeVar("Result")

# adbapi hands interactions a Transaction that proxies a sqlite3 cursor.
Txn = sqlite3.Cursor

BUSY_TIMEOUT_MS = 10000

# sqlite3 result codes (the primary code is the low byte of an extended one).
SQLITE_FULL = 13


def _disk_full(failure: Failure) -> Failure:
    """A transaction SQLite refused for lack of space becomes ``StoreFull`` (HTTP 507)."""
    exc = failure.value
    if isinstance(exc, sqlite3.Error) and (
        (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_FULL
        or "disk is full" in str(exc)
    ):
        return Failure(StoreFull("the daemon's data dir is full: nothing was written"))
    return failure


class _Unset:
    """Marks a keyword argument the caller did not pass (so None can mean NULL)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def open_connection(conn: sqlite3.Connection) -> None:
    """The pool's ``cp_openfun``: rows by name, WAL, foreign keys on."""
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"SQLite refused WAL mode (journal_mode={mode})")
    # NORMAL is durable against process crashes in WAL mode; output offsets and
    # bytes are committed together, so a lost tail after a power cut is simply
    # fetched again from the agent.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.commit()


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def like(text: str) -> str:
    """``text`` with LIKE's wildcards escaped (ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def tags_text(tags: Sequence[str]) -> str:
    """Tags as stored: ",a,b," (lower-cased, sorted, unique); no tags is ''."""
    clean = sorted({t.lower() for t in tags})
    return f",{','.join(clean)}," if clean else ""


def tags_of(text: str | None) -> tuple[str, ...]:
    return tuple(t for t in (text or "").split(",") if t)


def check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def update_row(
    t: Txn, table: str, row_id: int, fields: dict[str, Any], now: float, what: str
) -> None:
    """UPDATE the given columns and ``updated_at``; NotFoundError if no such row."""
    # Column names come from the fixed keyword lists of the callers, never from input.
    assignments = ", ".join(f"{name} = ?" for name in fields)
    sql = f"UPDATE {table} SET {assignments + ', ' if fields else ''}updated_at = ? WHERE id = ?"  # noqa: S608
    t.execute(sql, [*fields.values(), now, row_id])
    if not t.rowcount:
        raise NotFoundError(f"{what} {row_id} not found")


def counts(t: Txn, table: str, statuses: Sequence[str]) -> dict[str, int]:
    """Every status (zero-filled) -> number of rows of ``table``."""
    out = dict.fromkeys(statuses, 0)
    t.execute(f"SELECT status, COUNT(*) FROM {table} GROUP BY status")  # noqa: S608
    for status, n in t.fetchall():
        out[status] = int(n)
    return out


class SupportsSeconds(Protocol):
    """The clock the store stamps rows with (``IReactorTime.seconds``)."""

    def seconds(self) -> float: ...


class Database:
    """One open store: the pool, the secret box and the clock, for the record stores.

    ``StoreService`` calls ``open`` once the pool exists and ``close`` when it
    stops; until ``open`` and after ``close`` every ``run`` fails with StoreError.
    """

    def __init__(self, clock: SupportsSeconds) -> None:
        self._clock = clock
        self._pool: adbapi.ConnectionPool | None = None
        self._box: SecretBox | None = None
        self._closed = False
        self._pending: set[Deferred[Any]] = set()
        self._batchers: list[Batcher[Any, Any]] = []

    def open(self, pool: adbapi.ConnectionPool) -> None:
        """Hand work to ``pool`` from now on (the secret box comes later, from its thread)."""
        self._pool = pool

    def set_secret_box(self, box: SecretBox) -> None:
        """Called in the pool's thread, before any query, once the key is loaded."""
        self._box = box

    def close(self) -> None:
        """Refuse work from now on (call after ``drain``; the pool is closed by its owner)."""
        self._closed = True

    def box(self) -> SecretBox:
        """The key that encrypts secrets at rest; StoreError before the store opened."""
        if self._box is None:
            raise StoreError("the store is not started")
        return self._box

    def now(self) -> float:
        return float(self._clock.seconds())

    def run(self, interaction: Callable[..., T], *args: Any) -> Deferred[T]:
        """``interaction(txn, *args)`` as one transaction in the pool's thread."""
        if self._pool is None:
            return fail(StoreError("the store is not started"))
        if self._closed:
            return fail(StoreError("the store is closed"))
        d: Deferred[T] = self._pool.runInteraction(interaction, *args)
        d.addErrback(_disk_full)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d

    def drain(self) -> Deferred[Any]:
        """Fires once every interaction started so far, and every queued batch, has finished."""
        waits = list(self._pending)
        for batcher in self._batchers:
            if batcher.busy:
                waits.append(batcher.when_idle())
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=False)

    def batcher(
        self, txn: Callable[[Txn, list[Item]], list[Result | Exception]]
    ) -> Batcher[Item, Result]:
        """A ``Batcher`` over this database that ``drain`` waits for."""
        batcher: Batcher[Item, Result] = Batcher(self, txn)
        self._batchers.append(batcher)
        return batcher


class Batcher(Generic[Item, Result]):
    """Items submitted while a batch is being written go together in the next one.

    One transaction per batch, and the next batch waits for the one in flight:
    under load each trip through the pool's thread carries many items, and
    when idle an item goes at once. ``txn(t, items)`` returns one result or
    exception per item, in order; an exception answers only its own item. A
    failure of the whole transaction fails every item of that batch.
    """

    def __init__(
        self, db: Database, txn: Callable[[Txn, list[Item]], list[Result | Exception]]
    ) -> None:
        self._db = db
        self._txn = txn
        self._queue: list[tuple[Item, Deferred[Result]]] = []
        self._running: Deferred[Any] | None = None
        self._idle: list[Deferred[None]] = []

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._queue)

    def submit(self, item: Item) -> Deferred[Result]:
        d: Deferred[Result] = Deferred()
        self._queue.append((item, d))
        if self._running is None:
            self._flush()
        return d

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is queued or being written (every item answered)."""
        d: Deferred[None] = Deferred()
        if self.busy:
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        running = self._db.run(self._txn, [item for item, _ in batch])
        self._running = running

        def settle(outcome: list[Result | Exception] | Failure) -> None:
            self._running = None
            if self._queue:
                self._flush()
            for i, (_, d) in enumerate(batch):
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    one = outcome[i]
                    if isinstance(one, Exception):
                        d.errback(Failure(one))
                    else:
                        d.callback(one)
            # Last, so that whoever waits for the store to drain (stop) sees
            # every item answered.
            if not self.busy and self._idle:
                waiters, self._idle = self._idle, []
                for w in waiters:
                    w.callback(None)

        running.addBoth(settle)
