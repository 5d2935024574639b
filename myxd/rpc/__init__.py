"""Agent RPC: the daemon's JSON-RPC 2.0 client for myx_agent.

`tls` pins each agent's self-signed certificate, `retry` holds the one error
classification and backoff policy, `client` is the `AgentRPC` itself. Nothing in
this package ever disables certificate verification or logs an agent token.
"""

from myxd.rpc.client import AgentEndpoint, AgentRPC, RPCCallError
from myxd.rpc.retry import (
    AgentRPCError,
    CertificateMismatch,
    RemoteError,
    backoff_delay,
    classify,
)

__all__ = [
    "AgentEndpoint",
    "AgentRPC",
    "AgentRPCError",
    "CertificateMismatch",
    "RPCCallError",
    "RemoteError",
    "backoff_delay",
    "classify",
]
