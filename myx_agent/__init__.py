# -*- test-case-name: tests.agent.test_agent_process -*-
"""MyX agent: a passive TLS JSON-RPC 2.0 server. It never contacts the daemon."""

__version__ = "0.1.0"
