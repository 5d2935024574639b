# -*- test-case-name: tests.install.test_reinstall -*-
"""Automatic reinstalls: the heartbeat's hook for agents that stopped answering.

``ReinstallPolicy`` decides, per server, whether a reinstall may start now:
exponential backoff between attempts (``rpc.retry.backoff_delay``, capped at
``max_delay``), at most ``max_attempts`` before a person must look, and a fresh
count after ``reset_after`` quiet seconds. It reads only its clock.

``AutoReinstall`` applies it: skips adopted agents and servers already being
installed, marks servers without stored credentials ``needs_attention``,
records every decision as an event and starts the reinstall through the
installer. It never waits for the reinstall itself, never overlaps two installs
of one server, and never lets an error escape to the heartbeat (it is logged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from myxd.install.journal import InstallJournal
from myxd.install.session import InstallInProgress, InstallOutcome, InstallStore
from myxd.rpc.retry import backoff_delay
from myxd.store.records import AgentRecord


@dataclass
class _Attempts:
    attempts: int = 0
    last_attempt: float | None = None
    capped: bool = False


@dataclass(frozen=True)
class Decision:
    """``go`` (attempt number ``attempts``), ``wait`` (``delay`` not over yet),
    ``cap`` (the limit was just reached: say so once) or ``capped`` (said already)."""

    action: str
    attempts: int
    delay: float = 0.0


class ReinstallPolicy:
    """When a server may be reinstalled automatically. Keeps per-server counts in memory."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        base: float = 300.0,
        max_delay: float = 6 * 3600.0,
        max_attempts: int = 5,
        reset_after: float = 24 * 3600.0,
    ) -> None:
        self._clock = clock
        self.base = base
        self.max_delay = max_delay
        self.max_attempts = max_attempts
        self.reset_after = reset_after
        self._state: dict[int, _Attempts] = {}

    def delay(self, attempts: int) -> float:
        """Seconds to wait after attempt number ``attempts`` before the next one."""
        return min(self.max_delay, backoff_delay(attempts, self.base))

    def decide(self, server_id: int) -> Decision:
        """Whether to reinstall now; a ``go`` counts as an attempt made now."""
        now = self._clock.seconds()
        state = self._state.setdefault(server_id, _Attempts())
        if state.last_attempt is not None and now - state.last_attempt > self.reset_after:
            # A fresh count, as if never tried: no backoff before the first attempt.
            self._state[server_id] = state = _Attempts()
        if state.attempts >= self.max_attempts:
            if state.capped:
                return Decision("capped", state.attempts)
            state.capped = True
            return Decision("cap", state.attempts)
        if state.last_attempt is not None:
            delay = self.delay(state.attempts)
            if now - state.last_attempt < delay:
                return Decision("wait", state.attempts, delay)
        state.attempts += 1
        state.last_attempt = now
        return Decision("go", state.attempts)

    def succeeded(self, server_id: int) -> None:
        """A reinstall worked: lift the cap, but keep the count.

        An agent that dies again right away must still reach the cap; only the
        quiet period (``reset_after``) resets the count.
        """
        state = self._state.get(server_id)
        if state is not None:
            state.capped = False

    def forget(self, server_id: int) -> None:
        self._state.pop(server_id, None)


class Installs(Protocol):
    """What the hook needs of the installer."""

    def is_running(self, server_id: int) -> bool: ...
    def start(self, server_id: int, kind: str, *, actor: str = ...) -> Deferred[int]: ...
    def wait(self, server_id: int) -> Deferred[InstallOutcome] | None: ...


class AutoReinstall:
    """The heartbeat's reinstall hook: ``hook(agent, reason)``."""

    log = Logger()

    def __init__(
        self,
        store: InstallStore,
        journal: InstallJournal,
        policy: ReinstallPolicy,
        installs: Installs,
    ) -> None:
        self._store = store
        self._journal = journal
        self.policy = policy
        self._installs = installs

    def hook(self, agent: AgentRecord, reason: str) -> Deferred[None]:
        """Rate-limited, capped, never overlapping.

        Fires once the decision is made and recorded; the reinstall itself runs
        in the background.
        """
        d = Deferred.fromCoroutine(self._decide(agent, reason))
        d.addErrback(self._log_failure, agent)
        return d

    def _log_failure(self, f: Failure, agent: AgentRecord) -> None:
        self.log.failure("automatic reinstall of agent {agent_id} failed", f, agent_id=agent.id)

    async def _decide(self, agent: AgentRecord, reason: str) -> None:
        server_id = agent.server_id
        details: dict[str, Any] = {"agent_id": agent.id, "reason": reason}
        event = self._journal.event
        if server_id is None:
            await event(
                "agent.auto_reinstall",
                None,
                "skipped",
                {**details, "why": "adopted agent without a server"},
                target=f"agent:{agent.id}",
            )
            return
        if not agent.cert_fingerprint:
            # Never pinned: its install has not finished (or failed and is the
            # operator's to retry), so it is not a dead agent to reinstall.
            await event(
                "server.auto_reinstall",
                server_id,
                "skipped",
                {**details, "why": "the agent was never installed (no certificate pin)"},
            )
            return
        server = await self._store.get_server(server_id)
        if server is None:
            return
        if self._installs.is_running(server_id):
            await event(
                "server.auto_reinstall",
                server_id,
                "skipped",
                {**details, "why": "an install is already running"},
            )
            return
        if not server.auth:
            await self._store.update_server(
                server_id,
                status="needs_attention",
                status_reason=f"agent unreachable ({reason}); no SSH credentials stored",
            )
            await event(
                "server.auto_reinstall",
                server_id,
                "needs_attention",
                {**details, "why": "no stored credentials"},
            )
            return
        decision = self.policy.decide(server_id)
        if decision.action == "capped":
            return
        if decision.action == "cap":
            await self._store.update_server(
                server_id,
                status="needs_attention",
                status_reason=f"{decision.attempts} automatic reinstalls did not bring the "
                f"agent back; last reason: {reason}",
            )
            await event(
                "server.auto_reinstall",
                server_id,
                "capped",
                {**details, "attempts": decision.attempts},
            )
            return
        if decision.action == "wait":
            self.log.debug(
                "auto reinstall of server {server_id} deferred: backoff {delay}s",
                server_id=server_id,
                delay=decision.delay,
            )
            return
        await event(
            "server.auto_reinstall", server_id, "started", {**details, "attempt": decision.attempts}
        )
        try:
            await self._installs.start(server_id, "reinstall", actor="auto")
        except InstallInProgress:
            return
        waiter = self._installs.wait(server_id)
        if waiter is not None:
            waiter.addCallback(self._done, server_id)
            waiter.addErrback(lambda f: self.log.failure("auto reinstall outcome", f))

    def _done(self, outcome: InstallOutcome, server_id: int) -> None:
        if outcome.ok:
            self.policy.succeeded(server_id)


__all__ = ["AutoReinstall", "Decision", "Installs", "ReinstallPolicy"]
