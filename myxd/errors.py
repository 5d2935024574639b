"""Exception types shared across the MyX daemon.

Every error here carries a message that is safe to show to an operator or an
API client: it must never contain a token, a secret key, a password or a
private key.

The admin API answers each of them through one table, `myxd.api.errormap.ERROR_MAP`.
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations


class MyxError(Exception):
    """Base class for every error raised on purpose by myxd."""


class ConfigError(MyxError):
    """A configuration file or flag is invalid.

    The message is one line naming the file (if any) and the key, so that
    ``twistd`` can print it as-is and exit.
    """


class StoreError(MyxError):
    """The store could not do what was asked."""


class SchemaError(StoreError):
    """The database schema is unknown, newer than this myxd, or an upgrade failed."""


class SecretKeyError(StoreError):
    """The at-rest encryption key is missing, unreadable or does not decrypt the data."""


class StoreFull(StoreError):
    """SQLite could not write: the data dir's disk is full or over quota (HTTP 507).

    Nothing of the failed transaction was kept; reads still work, and writes
    succeed again once space frees (no restart needed).
    """


class NotFoundError(StoreError):
    """A record that an operation needs does not exist (e.g. an unknown command id)."""


class ConflictError(StoreError):
    """A write would break a uniqueness rule (e.g. an ``rpc_port`` already in use)."""


class OutputGapError(StoreError):
    """Command output was offered from an offset past what is stored.

    Storing it would leave a hole in the byte stream, so it is refused; the
    caller must re-read from ``stored_offset``.
    """

    def __init__(self, command_id: int, offset: int, stored_offset: int) -> None:
        super().__init__(
            f"command {command_id}: output offered at offset {offset} "
            f"but only {stored_offset} bytes are stored"
        )
        self.command_id = command_id
        self.offset = offset
        self.stored_offset = stored_offset


class AgentCheckFailed(MyxError):
    """An agent offered for adoption did not pass its pinned ``get_status`` check.

    ``field`` names the input at fault when there is one (``cert_fingerprint``);
    ``reason`` and ``kind`` say why, in the words of the RPC layer.
    """

    def __init__(
        self, message: str, *, reason: str, kind: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.kind = kind
        self.field = field


class DuplicateAgent(ConflictError):
    """An agent with this ``rpc_port`` is already registered."""

    field = "rpc_port"
