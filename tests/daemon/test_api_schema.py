"""Schemathesis against the admin API's own OpenAPI document (issue #12 §3).

The real AdminAPI (with the real servers routes, a real SQLite store and the real
Installer's record keeping) listens on 127.0.0.1; the schemathesis CLI reads
/api/openapi.json from it and sends generated requests, positive and negative, with
deterministic generation and a bounded example count. The run passes only with no 5xx answer and
every response matching its documented status, content type and schema.

Generated input never leaves this machine and never runs a program: the agent RPC
client here refuses every call without connecting (so adoption of any generated
host fails cleanly with 422), commands are only recorded (the queue never sends
them), and installs are only recorded (the installer never opens SSH). The SSE
stream is left out: a pending command's stream stays open by design. The server
is tests/support/fuzz_api.py, shared with ``bench/fuzz.py --surface api``.
"""

from __future__ import annotations

import os
import re

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support.fuzz_api import FuzzAPI, serve, st_args, st_path

MAX_EXAMPLES = int(os.environ.get("MYX_SCHEMATHESIS_EXAMPLES", "25"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


class SchemathesisTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    async def _serve(self) -> FuzzAPI:
        api = await serve(self.base, reactor)
        self.addCleanup(api.close)
        return api

    async def test_every_operation_matches_its_document(self) -> None:
        api = await self._serve()
        args = [
            *st_args(api.url, CHECKS),
            "--max-examples",
            str(MAX_EXAMPLES),
            # deterministic generation: the same cases on every run (no seed needed)
            "--generation-deterministic",
            "--workers",
            "1",
        ]
        out, err, code = await getProcessOutputAndValue(
            st_path(), args, env={**os.environ, "NO_COLOR": "1"}, path=self.base
        )
        text = (out + err).decode("utf-8", "replace")
        if os.environ.get("MYX_SCHEMATHESIS_SHOW"):
            print(text)
        self.assertEqual(code, 0, text[-6000:])
        # Not a vacuous pass: operations were really exercised.
        m = re.search(r"Tested: (\d+)", text)
        self.assertIsNotNone(m, text[-3000:])
        assert m is not None
        self.assertGreaterEqual(int(m.group(1)), 20, text[-3000:])
        m = re.search(r"(\d+) generated, (\d+) passed", text)
        self.assertIsNotNone(m, text[-3000:])
        assert m is not None
        self.assertEqual(m.group(1), m.group(2), text[-3000:])
        self.assertGreaterEqual(int(m.group(1)), 200, text[-3000:])
        # The server's own count: no 5xx answer, whatever schemathesis reported.
        self.assertFalse([c for c in api.statuses if c >= 500], dict(api.statuses))
