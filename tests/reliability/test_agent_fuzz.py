"""Hostile input to a real agent over TLS (issue #12 §3): generated, structure-aware.

With the token: every generated body (tests/support/rpc_fuzz.py) gets an answer
that is not a 5xx, holds no traceback and is JSON-RPC when it is a 200, and the
agent answers health_check after every batch of bodies. Without the token:
401 every time, and the body is provably never parsed. CI runs a bounded,
fixed-seed sample; bench/fuzz.py runs the long one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from myx_agent.jsonrpc import Method
from myx_agent.methods import AgentMethods
from myx_agent.rpc_server import UNAUTHORIZED_RESPONSE
from tests.support.agent_process import start_agent
from tests.support.pinned_client import RawTLS
from tests.support.rpc_fuzz import METHODS, generate, problems

CI_EXAMPLES = 400
CI_SEED = 20260412
CHECK_EVERY = 50


def marker_path(relative: str) -> str:
    return os.path.abspath(relative)


def exists(path: str) -> bool:
    return os.path.exists(path)


class _Stub:
    running_count = 0


def real_table() -> list[Method]:
    methods = AgentMethods(
        runner=_Stub(),  # type: ignore[arg-type]
        rpc_port=1,
        cert_fingerprint="0" * 64,
        deployment_tool_dir="/nonexistent",
        sync_tool=lambda *a: None,  # type: ignore[arg-type]
        read_tool_version=lambda d: None,
        system=None,  # type: ignore[arg-type]
        reactor=object(),  # type: ignore[arg-type]
    )
    return methods.table()


class AgentFuzzTests(TestCase):
    timeout = 600

    def test_generator_knows_every_method_and_param(self) -> None:
        table = {m.name: tuple(p.name for p in m.params) for m in real_table()}
        self.assertEqual(METHODS, table)

    def test_the_judge_flags_what_it_must(self) -> None:
        ok = b'{"jsonrpc":"2.0","result":{"status":"ok"},"id":1}'
        self.assertEqual(problems(200, {}, ok), [])
        self.assertEqual(problems(204, {}, b""), [])
        self.assertEqual(problems(500, {}, b""), ["HTTP 500"])
        self.assertEqual(problems(400, {}, b""), ["unexpected HTTP 400"])
        self.assertEqual(
            problems(200, {}, b"<html>"),
            ["'<html' in the body", "200 with a body that is not JSON"],
        )
        self.assertEqual(problems(200, {}, b"[1]"), ["200 with a body that is not JSON-RPC 2.0"])
        leak = (
            b'{"jsonrpc":"2.0","error":{"code":-32603,"message":"Traceback (most recent"},"id":1}'
        )
        self.assertEqual(problems(200, {}, leak), ["'Traceback' in the body"])
        # An echo of the request's own words is not a leak.
        echo = (
            b'{"jsonrpc":"2.0","error":{"code":-32602,'
            b'"message":"unknown param \'Traceback\'"},"id":1}'
        )
        self.assertEqual(problems(200, {}, echo, b'{"params":{"Traceback":1}}'), [])

    def test_same_seed_same_bodies(self) -> None:
        self.assertEqual(generate(30, 7), generate(30, 7))
        self.assertNotEqual(generate(30, 7), generate(30, 8))

    async def test_generated_bodies_with_the_token(self) -> None:
        agent = await start_agent(self)
        client = agent.client(timeout=60)
        bodies = generate(CI_EXAMPLES, CI_SEED)
        failures: list[str] = []
        kinds = {"batch": 0, "not json": 0}
        for n, body in enumerate(bodies, 1):
            result = await client.post(body)
            found = problems(result.status, result.headers, result.body, body)
            if found:
                failures.append(f"{body[:200]!r}: {found}: {result.body[:200]!r}")
            kinds["batch"] += body.startswith(b"[")
            if n % CHECK_EVERY == 0 or n == len(bodies):
                self.assertTrue(agent.running, "the agent process died")
                self.assertEqual(await agent.call("health_check"), {"status": "ok"})
        self.assertEqual(failures, [])
        self.assertGreater(kinds["batch"], 10)
        log = agent.log_text()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("request handling failed", log)

    async def test_without_the_token_401_and_never_parsed(self) -> None:
        agent = await start_agent(self)
        marker = marker_path(self.mktemp())
        # A body that, parsed and run, creates a file: the proof of parsing.
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "execute_command",
                "params": {"command": "touch", "args": [marker], "command_id": "fuzz-proof"},
                "id": 1,
            }
        ).encode()
        variants: list[dict[str, Any]] = [
            {"token": None},
            {"token": "wrong"},
            {"token": agent.token.upper() if agent.token.upper() != agent.token else "x"},
            # (A trailing space would be stripped by HTTP itself: not a different token.)
            {"token": agent.token[:-1]},
            {"token": agent.token + "x"},
            {"token": None, "headers": {"X-Agent-Token": [agent.token, agent.token]}},
            {"token": None, "headers": {"Authorization": [f"Bearer {agent.token}"]}},
        ]
        client = agent.client()
        bodies = [body] + generate(100, CI_SEED + 1)
        sent = 0
        for i, variant in enumerate(variants):
            for b in bodies:
                result = await client.post(b, **variant)
                # Messages name the variant by number: never print a token.
                self.assertEqual(result.status, 401, (i, b[:100]))
                self.assertEqual(result.body, UNAUTHORIZED_RESPONSE.split(b"\r\n\r\n", 1)[1], i)
                sent += 1
        self.assertFalse(exists(marker))
        # The body is refused before it is read: a 50 MB declared body gets its
        # 401 although not one byte of it is ever sent.
        raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint)
        raw.write(
            b"POST /%s/rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n" % agent.rpc_path.encode()
        )
        status, _, _, _ = await raw.read_response()
        self.assertEqual(status, 401)
        await raw.wait_closed()
        # Positive control: the same body with the token does create the file.
        result = await client.post(body)
        self.assertEqual(result.status, 200, result.body)
        for _ in range(400):
            if exists(marker):
                break
            await deferLater(agent.reactor, 0.05, lambda: None)
        self.assertTrue(exists(marker))
        self.assertGreaterEqual(sent, 600)
