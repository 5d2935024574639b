# -*- test-case-name: tests.install.test_steps -*-
"""The agent record an install works on: drawing a new agent's identity, or reusing one.

A reinstall keeps the agent's port, path and token; a first install draws them
from the store, within the installer's port range. Never logs the token or the
secret key (the records' reprs hide them).
"""

from __future__ import annotations

from myxd.install.session import InstallError, InstallStore
from myxd.store.records import AgentRecord, ServerRecord


async def new_agent(
    store: InstallStore, server_id: int, host: str, port_range: tuple[int, int]
) -> int:
    """Save a fresh agent identity for this server; returns the agent id."""
    ident = await store.new_agent_identity()
    low, high = port_range
    for _ in range(100):
        if low <= ident.rpc_port <= high:
            break
        # Redraw: the store picks from its whole range (the reservation of a
        # discarded draw is released when the daemon restarts).
        ident = await store.new_agent_identity()
    else:
        raise InstallError("connect", f"no free agent port in {low}-{high}")
    return int(
        await store.add_agent(
            host=host,
            rpc_port=ident.rpc_port,
            rpc_path=ident.rpc_path,
            token=ident.token,
            secret_key=ident.secret_key,
            cert_fingerprint="",
            status="installing",
            server_id=server_id,
        )
    )


async def agent_for(
    store: InstallStore, server: ServerRecord, port_range: tuple[int, int]
) -> AgentRecord:
    """The server's agent, marked installing; a new one if it has none yet."""
    agent = await store.get_agent_for_server(server.id)
    if agent is None:
        await new_agent(store, server.id, server.host, port_range)
        agent = await store.get_agent_for_server(server.id)
        if agent is None:  # pragma: no cover - just saved
            raise InstallError("connect", "the new agent record vanished")
    else:
        await store.update_agent(agent.id, status="installing", status_reason=None)
    return agent


__all__ = ["agent_for", "new_agent"]
