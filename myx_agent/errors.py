# -*- test-case-name: tests.agent.test_rpc_server -*-
"""JSON-RPC error codes of the agent contract (docs/protocol.md), in one place.

Anything raised as RPCError reaches the client as a JSON-RPC error object with
exactly this code, message and data. Anything else is an internal error (-32603)
and is logged, never shown.
"""

from typing import Any, Optional

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Application errors (-32000..-32099).
BUSY = -32000  # max_concurrent_commands reached; nothing was started
UNAUTHORIZED = -32001  # missing or wrong X-Agent-Token (HTTP 401)
UNKNOWN_COMMAND = -32004  # no command with this command_id
COMMAND_ID_CONFLICT = -32005  # command_id already used by a different kind
SYNC_FAILED = -32010  # deployment-tool archive rejected (hash, format)
ARTIFACT_REJECTED = -32011  # a transfer was refused (size, hash); nothing was kept
STATE_UNWRITABLE = -32012  # state_dir cannot hold a new command (disk full); nothing was started


class RPCError(Exception):
    """An error meant for the client, with a JSON-RPC code."""

    def __init__(self, code: int, message: str, data: Optional[Any] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict:
        err: dict = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def invalid_params(message: str) -> RPCError:
    return RPCError(INVALID_PARAMS, message)
