# -*- test-case-name: tests.install.test_steps -*-
"""``RemoteHost``: what the install steps need from a connected target, and no more.

The conch client (``ssh.SSHClient``) implements it; tests implement it with a
fake that records commands and uploads, so each step can be tested alone.
The seam is the whole point: a step must never reach past this protocol into
conch, and this module must never import conch (it only describes the shape).
"""

from __future__ import annotations

from typing import Protocol

from myxd.install.ssh import CommandResult, Sudo


class RemoteHost(Protocol):
    """One authenticated connection to a target, used for every step of one install."""

    # How the connection came to be trusted; shown in the ``connect`` step's log.
    host_key_fingerprint: str
    host_key_trust: str  # pinned | known | first-use

    @property
    def connected(self) -> bool: ...

    async def run(
        self, command: str, *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run ``command`` as the login user; a non-zero exit status is not an error."""

    async def run_privileged(
        self, script: str, sudo: Sudo, *, timeout: float | None = None
    ) -> CommandResult:
        """Run a shell script as root (directly or through sudo); sudo failures raise."""

    async def upload(
        self,
        remote_path: str,
        data: bytes | None = None,
        *,
        local_path: str | None = None,
        mode: int = 0o600,
    ) -> None:
        """Write ``data`` (or the file at ``local_path``) to ``remote_path`` atomically."""

    async def uid(self) -> int:
        """The login user's numeric id."""

    async def is_root(self) -> bool:
        """Whether the login user is root (then no sudo is needed)."""

    async def close(self) -> None:
        """Disconnect; safe to call twice."""


__all__ = ["RemoteHost"]
