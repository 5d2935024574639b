# -*- test-case-name: tests.daemon.test_store_contract,tests.daemon.test_api -*-
"""The daemon's fixed vocabularies, defined once: statuses, kinds and error kinds.

The store checks values against these, the API validates and serializes with
them, metrics pre-fill their label sets from them, and the fleet code decides
with them when a command is over. Plain constants only: this module imports
nothing and must never grow logic. (The agent keeps its own copy of what it
shares with this file: it is a separate program with its own contract,
docs/protocol.md.)
"""

from __future__ import annotations

AGENT_STATUSES = ("online", "offline", "installing", "error")

COMMAND_STATUSES = ("pending", "running", "success", "failed", "cancelled", "timed_out")
# A command in one of these is over: its status, exit code and output are final.
FINAL_STATUSES = frozenset({"success", "failed", "cancelled", "timed_out"})
UNFINISHED_STATUSES = ("pending", "running")
COMMAND_KINDS = ("command", "ansible")
OUTPUT_STREAMS = ("stdout", "stderr")

SERVER_STATUSES = ("new", "installing", "installed", "failed", "needs_attention", "uninstalled")
INSTALL_KINDS = ("install", "reinstall", "uninstall")
INSTALL_STATUSES = ("running", "ok", "failed", "cancelled")
INSTALL_STEP_STATUSES = ("running", "ok", "failed", "skipped")

# How an agent RPC failed, after retries (see myxd.rpc.retry.classify).
RETRYABLE = "retryable"
AUTH = "auth"
FINAL = "final"
ERROR_KINDS = (RETRYABLE, AUTH, FINAL)

# JSON-RPC error the agent answers for a command id it does not know
# (docs/protocol.md, the error code table).
UNKNOWN_COMMAND = -32004

# Tags on servers and agents (issue #9): 1-32 of these characters, lower-cased,
# at most MAX_TAGS per object.
TAG_PATTERN = r"^[A-Za-z0-9._-]{1,32}$"
MAX_TAGS = 32
