"""The agent's JSON-RPC error texts said in an operator's words, for the `myx` CLI.

Only presentation: it rewrites the text it prints and never changes what the
API stores or returns (`myx show` and `--json` print the raw reason, code
included; `-v` adds it after the words). It must never drop the detail the
agent gave (a playbook name, a path): only the code and its prefix are replaced.
"""

from __future__ import annotations

import re

# JSON-RPC error codes of the agent (docs/protocol.md) in an operator's words.
_RPC_WORDS = {
    -32700: "the agent could not read the daemon's request",
    -32600: "the agent refused a malformed request",
    -32601: "the agent does not support this (upgrade the agent)",
    -32602: "the agent refused the request",
    -32603: "the agent failed internally",
    -32000: "the agent is busy (too many commands running); nothing was started",
    -32001: "the agent rejected the daemon's token",
    -32004: "the agent does not know this command",
    -32005: "the agent already has a different command with this id",
    -32010: "the agent rejected the deployment tool archive",
}
_RPC_ERROR = re.compile(r"JSON-RPC error (-?\d+): (?:invalid params: )?([^\n]*)")


def operator_words(reason: str) -> str:
    """A reason with any "JSON-RPC error -32602: invalid params: x" said as words."""

    def words(m: re.Match[str]) -> str:
        what = _RPC_WORDS.get(int(m.group(1)), f"the agent answered with error {m.group(1)}")
        detail = m.group(2).strip()
        return f"{what}: {detail}" if detail else what

    return _RPC_ERROR.sub(words, reason)


def explain(raw: str, verbose: bool) -> str:
    """``operator_words(raw)``; with ``verbose``, the raw text follows when it differs."""
    words = operator_words(raw)
    if verbose and words != raw:
        words += f" [raw: {raw}]"
    return words
