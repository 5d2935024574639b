# -*- test-case-name: tests.agent.test_rpc_server,tests.agent.test_commands -*-
"""Values the agent contract (docs/protocol.md) fixes, defined once.

Command ids, kinds, statuses, the read limits of ``get_command_log`` and the
chunk size of ``put_artifact_chunk``. The
method table (``methods.py``) checks params against these; the command runner
and its on-disk records use them. Error codes live in ``errors.py``.

What it must never do: import anything beyond the standard library (every agent
module imports it, and the idle agent's memory budget is tight).
"""

import re

#: A command id on the wire and on disk (it becomes part of file names).
COMMAND_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
COMMAND_ID_DESCRIPTION = "1-128 characters of [A-Za-z0-9._:-]"

#: Longest long-poll of get_command_log, seconds.
MAX_WAIT = 30.0
#: Most bytes one get_command_log returns.
MAX_READ_BYTES = 1024 * 1024

#: Most decoded bytes one put_artifact_chunk carries: its base64 (699,052
#: characters) plus the JSON envelope stays well inside the 1 MiB body limit.
MAX_CHUNK_BYTES = 512 * 1024

KIND_COMMAND = "command"
KIND_ANSIBLE = "ansible"

RUNNING = "running"
SUCCESS = "success"
FAILED = "failed"
FINAL_STATUSES = frozenset({SUCCESS, FAILED})

#: The error of a command that was running when the agent stopped or crashed.
INTERRUPTED_ERROR = "interrupted by agent restart"


def status_of(result: dict) -> str:
    """The final status a stored result stands for."""
    return SUCCESS if result.get("success") else FAILED
