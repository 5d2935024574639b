# -*- test-case-name: tests.daemon.test_store,tests.daemon.test_store_contract -*-
"""The daemon's SQLite store: ``StoreService`` (the pool), ``Store`` (queries), records.

One module per kind of record (``agents``, ``commands``, ``events``,
``servers``) over a shared ``db.Database``; ``protocols`` says what each part of
the daemon uses, so that it can take a narrow piece or a fake.
"""

from myxd.errors import ConflictError, NotFoundError, OutputGapError, SchemaError, StoreError
from myxd.identity import AgentIdentity
from myxd.store.records import (
    AgentRecord,
    CommandRecord,
    EventRecord,
    HeartbeatResult,
    OutputChunk,
    ServerRecord,
)
from myxd.store.service import UNSET, Store, StoreService

__all__ = [
    "UNSET",
    "AgentIdentity",
    "AgentRecord",
    "CommandRecord",
    "ConflictError",
    "EventRecord",
    "HeartbeatResult",
    "NotFoundError",
    "OutputChunk",
    "OutputGapError",
    "SchemaError",
    "ServerRecord",
    "Store",
    "StoreError",
    "StoreService",
]
