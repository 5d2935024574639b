# -*- test-case-name: tests.agent.test_agent_process -*-
"""What the agent process imports at start, for its memory budget (issue 14 §2).

The agent speaks TLS through pyOpenSSL only, but Twisted's ``twisted.python.compat``
imports ``http.cookiejar``, which imports ``urllib.request`` and ``http.client``,
which import the standard library's ``ssl``: a second OpenSSL (the system's
libssl/libcrypto, about 4.4 MiB of RSS) that the agent never uses. Both import
it optionally (``try: import ssl``), so ``defer_stdlib_ssl`` makes that import
fail until ``allow_stdlib_ssl`` is called by code that may need it (an Ansible
run, in-process). Everything else that is heavy is imported where it is used
(ansible_runner, the deployment-tool sync's archive code).

What it must never do: hide a module that is already imported, or be used
outside the agent's own process start (``main.run``).
"""

import sys


def defer_stdlib_ssl() -> bool:
    """Make ``import ssl`` fail (ImportError) until allowed; True if done."""
    if "ssl" in sys.modules:
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]
    return True


def allow_stdlib_ssl() -> None:
    """Let ``import ssl`` work again (modules that already fell back stay so)."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
