# -*- test-case-name: tests.install.test_steps -*-
"""The install journal: every step's status and log in the store, and in the event stream.

The API, console and CLI show live progress from these records. ``step``
runs one step body and turns whatever it raises into an ``InstallError``
naming the step, so a failure is always recorded before it propagates.

Never records a password, key, passphrase, token or secret (step logs are
remote stdout/stderr, which never carry them: secrets travel by SFTP or stdin).
A failure to write an event is logged, never raised: the install goes on.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.logger import Logger

from myxd.install.bundle import BundleError
from myxd.install.hostkeys import HostKeyError
from myxd.install.session import InstallError, InstallSession, InstallStore, StepResult
from myxd.install.ssh import SSHError


class InstallJournal:
    """Records steps and events for the installer and the automatic reinstalls."""

    log = Logger()

    def __init__(self, store: InstallStore) -> None:
        self._store = store

    async def event(
        self,
        action: str,
        server_id: int | None,
        outcome: str,
        details: dict[str, Any] | None,
        *,
        target: str | None = None,
        actor: str = "installer",
    ) -> None:
        """One audit event; ``actor`` is who asked for it (the installer for its own steps)."""
        try:
            await self._store.add_event(
                actor=actor,
                action=action,
                target=target or (f"server:{server_id}" if server_id is not None else None),
                outcome=outcome,
                details=details,
            )
        except Exception:
            self.log.failure("could not record event {action}", action=action)

    async def step(
        self, s: InstallSession, name: str, body: Callable[[InstallSession], Awaitable[StepResult]]
    ) -> StepResult:
        """Run ``body(s)`` as step ``name``: recorded as running, then ok/skipped or failed."""
        await self._store.record_install_step(s.install_id, name, "running")
        await self.event(
            "install.step", s.server.id, "running", {"install_id": s.install_id, "step": name}
        )
        try:
            result = await body(s)
        except InstallError as e:
            err = e
        except (SSHError, HostKeyError, BundleError) as e:
            err = InstallError(name, str(e))
        except Exception as e:
            self.log.failure("install step {step} crashed", step=name)
            err = InstallError(name, f"internal error: {type(e).__name__}: {e}")
        else:
            await self._store.record_install_step(s.install_id, name, result.status, log=result.log)
            await self.event(
                "install.step",
                s.server.id,
                result.status,
                {"install_id": s.install_id, "step": name, "log": result.log[-500:]},
            )
            return result
        err.step = name if err.step in ("", "internal") else err.step
        await self._store.record_install_step(
            s.install_id, name, "failed", log=err.stderr, error=err.message
        )
        await self.event(
            "install.step",
            s.server.id,
            "failed",
            {"install_id": s.install_id, "step": name, "error": err.message},
        )
        raise err

    async def progress(self, s: InstallSession, step: str, text: str) -> None:
        """A running step's latest progress line (replaces its stored log)."""
        await self._store.record_install_step(s.install_id, step, "running", log=text)
        await self.event(
            "install.step",
            s.server.id,
            "running",
            {"install_id": s.install_id, "step": step, "log": text},
        )


__all__ = ["InstallJournal"]
