"""The daemon's SQLite store: ``StoreService`` (the pool), ``Store`` (queries), records."""

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
