# -*- test-case-name: tests.agent.test_agent_process -*-
"""``python -m myx_agent``: the same as the ``myx-agent`` console script."""

from myx_agent.main import main

raise SystemExit(main())
