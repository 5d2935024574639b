"""Adopt an agent that was installed without SSH: check it, then save it.

`Adopter.adopt` asks the agent for ``get_status`` once, over TLS pinned to the
given certificate fingerprint, and saves the agent (online, with that first
heartbeat) only when the answer is good. A refused check leaves nothing in the
store but an audit event.

It never retries the check (the operator is waiting), never logs the agent's
token, and never writes anything before the pinned check succeeded.
"""

# test-case-name: tests.daemon.test_api

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from myxd.audit import record_event
from myxd.errors import AgentCheckFailed, ConflictError, DuplicateAgent, NotFoundError
from myxd.netpolicy import TargetNotAllowed, TargetPolicy
from myxd.rpc.client import AgentEndpoint
from myxd.rpc.retry import AgentRPCError, CertificateMismatch
from myxd.store.records import AgentRecord, HeartbeatResult

if TYPE_CHECKING:
    from myxd.rpc.client import AgentRPC
    from myxd.store.protocols import AdminStore as Store

__all__ = ["Adopter"]


class Adopter:
    log = Logger()

    def __init__(
        self,
        store: Store,
        rpc: AgentRPC,
        reactor: IReactorTime,
        policy: TargetPolicy | None = None,
    ) -> None:
        self._store = store
        self._rpc = rpc
        self._reactor = reactor
        self._policy = policy

    async def _event(self, action: str, target: str, outcome: str, details: Any) -> None:
        await record_event(self._store, self.log, action, target, outcome, details)

    async def adopt(
        self,
        *,
        host: str,
        port: int,
        path: str,
        token: str,
        fingerprint: str,
        name: str | None = None,
        tags: Sequence[str] = (),
    ) -> AgentRecord:
        """Check the agent, then save it (with its ``name`` and ``tags``, in the same
        row); `AgentCheckFailed` or `DuplicateAgent` if not."""
        target = f"{host}:{port}"
        if self._policy is not None:
            try:
                await self._policy.check(host)
            except TargetNotAllowed as e:
                await self._event("agent.adopt", target, "refused", {"reason": str(e)})
                raise
        endpoint = AgentEndpoint(
            host=host, port=port, path=path, token=token, fingerprint=fingerprint
        )
        started = self._reactor.seconds()
        try:
            status = await self._rpc.call(endpoint, "get_status", retry=False)
        except CertificateMismatch as e:
            await self._event("agent.adopt", target, "refused", {"reason": "certificate mismatch"})
            raise AgentCheckFailed(
                "cert_fingerprint: does not match the agent's certificate",
                field="cert_fingerprint",
                reason=e.reason,
                kind=e.kind,
            ) from None
        except AgentRPCError as e:
            await self._event("agent.adopt", target, "refused", {"reason": e.reason})
            raise AgentCheckFailed(
                f"the agent could not be checked: {e.reason}", reason=e.reason, kind=e.kind
            ) from None
        latency = self._reactor.seconds() - started
        if not isinstance(status, dict):
            raise AgentCheckFailed(
                "the agent answered get_status with something unexpected",
                reason="bad get_status result",
            )
        try:
            agent_id = await self._store.add_agent(
                host=host,
                rpc_port=port,
                rpc_path=path,
                token=token,
                secret_key=secrets.token_urlsafe(32),
                cert_fingerprint=fingerprint,
                status="online",
                name=name,
                tags=tags,
            )
        except ConflictError:
            raise DuplicateAgent(
                "rpc_port: an agent with this port is already registered"
            ) from None
        version = status.get("version")
        await self._store.record_heartbeat_results(
            [
                HeartbeatResult(
                    agent_id=agent_id,
                    at=self._store.now(),
                    ok=True,
                    version=version if isinstance(version, str) else None,
                    details=status,
                    latency=latency,
                )
            ]
        )
        self.log.info("agent {agent_id} adopted at {target}", agent_id=agent_id, target=target)
        await self._event(
            "agent.adopt",
            f"agent:{agent_id}",
            "ok",
            {"host": host, "rpc_port": port, "name": name, "tags": sorted(set(tags))},
        )
        rec = await self._store.get_agent(agent_id)
        if rec is None:
            raise NotFoundError(f"agent {agent_id} was deleted while being adopted")
        return rec
