"""Fakes for the install steps: a scripted ``RemoteHost`` and a scripted agent RPC.

``FakeHost`` answers each command with the first reply whose marker the
command contains (exit 0 and no output otherwise), and records every command
and upload, so a test can say what a step did on the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from myxd.install.ssh import CommandResult, Sudo, SudoError
from myxd.rpc.client import AgentEndpoint


@dataclass
class Upload:
    data: bytes | None
    local_path: str | None
    mode: int


def result(command: str, stdout: str = "", stderr: str = "", exit_code: int = 0) -> CommandResult:
    return CommandResult(
        command=command,
        exit_code=exit_code,
        signal=None,
        stdout=stdout.encode(),
        stderr=stderr.encode(),
    )


Reply = Callable[[str], CommandResult]


@dataclass
class FakeHost:
    """A target that never runs anything: it answers from a script and records."""

    root: bool = True
    host_key_fingerprint: str = "SHA256:fakefakefake"
    host_key_trust: str = "pinned"
    commands: list[tuple[str, bool]] = field(default_factory=list)  # (command, as root)
    uploads: dict[str, Upload] = field(default_factory=dict)
    closed: bool = False
    _replies: list[tuple[str, Reply]] = field(default_factory=list)

    def reply(self, marker: str, stdout: str = "", stderr: str = "", exit_code: int = 0) -> None:
        """Answer commands containing ``marker`` (the newest matching reply wins)."""
        self._replies.insert(0, (marker, lambda c: result(c, stdout, stderr, exit_code)))

    def reply_with(self, marker: str, reply: Reply) -> None:
        self._replies.insert(0, (marker, reply))

    def ran(self, marker: str, *, privileged: bool | None = None) -> list[str]:
        return [
            c
            for c, root in self.commands
            if marker in c and (privileged is None or privileged == root)
        ]

    def _answer(self, command: str) -> CommandResult:
        for marker, reply in self._replies:
            if marker in command:
                return reply(command)
        return result(command)

    @property
    def connected(self) -> bool:
        return not self.closed

    async def run(
        self, command: str, *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        self.commands.append((command, False))
        return self._answer(command)

    async def run_privileged(
        self, script: str, sudo: Sudo, *, timeout: float | None = None
    ) -> CommandResult:
        if not self.root and sudo.mode != "sudo":
            raise SudoError("user u is not root and sudo is not enabled for this server")
        self.commands.append((script, True))
        return self._answer(script)

    async def upload(
        self,
        remote_path: str,
        data: bytes | None = None,
        *,
        local_path: str | None = None,
        mode: int = 0o600,
    ) -> None:
        self.uploads[remote_path] = Upload(data, local_path, mode)

    async def uid(self) -> int:
        return 0 if self.root else 1000

    async def is_root(self) -> bool:
        return self.root

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeRPC:
    """Answers agent calls from per-method queues; records (endpoint, method, params)."""

    calls: list[tuple[AgentEndpoint, str, Any]] = field(default_factory=list)
    answers: dict[str, list[Any]] = field(default_factory=dict)

    def answer(self, method: str, *results: Any) -> None:
        """Queue results (or exceptions to raise) for ``method``; the last one repeats."""
        self.answers.setdefault(method, []).extend(results)

    async def call(
        self,
        ep: AgentEndpoint,
        method: str,
        params: dict[str, Any] | list[Any] | None = None,
        *,
        retry: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        self.calls.append((ep, method, params))
        queue = self.answers.get(method) or [None]
        value = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(value, BaseException):
            raise value
        return value
