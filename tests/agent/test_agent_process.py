"""The real agent process on 127.0.0.1, reached over TLS with a pinned client.

Every method, auth, the fixed 404, body limits, keep-alive, ALPN, TLS version,
config errors as real process exits with one clear line, and clean SIGTERM.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import sys
import tarfile
from typing import Any, Dict, Optional, Tuple

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import ContextFactory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import RequestTransmissionFailed

from myx_agent import __version__
from myx_agent.rpc_server import NOT_FOUND_RESPONSE, TOO_LARGE_RESPONSE, UNAUTHORIZED_RESPONSE
from tests.support import installed
from tests.support.agent_process import (
    RunningAgent,
    free_port,
    run_agent_until_exit,
    start_agent,
    write_config,
)
from tests.support.pinned_client import (
    AgentClient,
    AgentRPCError,
    PinnedConnectionCreator,
    RawTLS,
)

PLAYBOOK = b"""\
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: say hello
      debug:
        msg: "hello from {{ who }}"
"""


def tool_archive(version: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (
            ("VERSION", version.encode() + b"\n"),
            ("playbooks/hello.yml", PLAYBOOK),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def read_until_final(
    agent: RunningAgent, command_id: str, limit: int = 600
) -> Tuple[bytes, Dict[str, Any]]:
    """The whole log stream of a command and its final result."""
    offset, data = 0, b""
    for _ in range(limit):
        r = await agent.call(
            "get_command_log", {"command_id": command_id, "offset": offset, "wait": 5}
        )
        chunk = base64.b64decode(r["log_data"])
        data += chunk
        assert r["new_offset"] == offset + len(chunk)
        offset = r["new_offset"]
        if r["is_final"]:
            return data, r["result"]
    raise AssertionError(f"{command_id} not final after {limit} reads")


def tls11_client(fingerprint: str) -> PinnedConnectionCreator:
    """A pinned client that offers TLS 1.0-1.1 only."""
    creator = PinnedConnectionCreator(fingerprint)
    creator._ctx.set_min_proto_version(SSL.TLS1_VERSION)
    creator._ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
    creator._ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return creator


class EveryMethodTests(TestCase):
    timeout = 300

    async def test_simple_methods(self) -> None:
        agent = await start_agent(self)
        self.assertEqual(await agent.call("health_check"), {"status": "ok"})
        beat = await agent.call("heartbeat")
        self.assertEqual(sorted(beat), ["time", "uptime", "version"])
        self.assertEqual(beat["version"], __version__)
        self.assertIsInstance(beat["time"], float)
        self.assertGreaterEqual(beat["uptime"], 0)
        self.assertEqual(await agent.call("get_port"), agent.port)
        status = await agent.call("get_status")
        self.assertEqual(
            sorted(status),
            sorted(
                [
                    "version",
                    "hostname",
                    "os",
                    "python",
                    "uptime",
                    "load_avg",
                    "memory",
                    "disk",
                    "running_commands",
                    "deployment_tool_version",
                    "deployment_tool_dir",
                    "rpc_port",
                    "cert_fingerprint",
                ]
            ),
        )
        self.assertEqual(status["cert_fingerprint"], agent.fingerprint)
        self.assertEqual(status["rpc_port"], agent.port)
        self.assertEqual(status["hostname"], socket.gethostname())
        self.assertEqual(status["python"], "{}.{}.{}".format(*sys.version_info[:3]))
        self.assertEqual(status["running_commands"], 0)
        self.assertIsNone(status["deployment_tool_version"])
        self.assertTrue(os.path.isabs(status["deployment_tool_dir"]))
        self.assertEqual(len(status["load_avg"]), 3)
        self.assertGreater(status["memory"]["total"], status["memory"]["available"] or 0)
        self.assertEqual(status["disk"]["path"], "/")
        self.assertGreater(status["disk"]["total"], 0)

    async def test_batch_and_notification_over_https(self) -> None:
        agent = await start_agent(self)
        client = agent.client()
        status, body = await client.rpc(
            [
                {"jsonrpc": "2.0", "method": "heartbeat", "id": 1},
                {"jsonrpc": "2.0", "method": "get_status", "id": "two"},
                {"jsonrpc": "2.0", "method": "nope", "id": 3},
            ]
        )
        self.assertEqual(status, 200)
        self.assertEqual([r["id"] for r in body], [1, "two", 3])
        self.assertEqual(body[1]["result"]["rpc_port"], agent.port)
        self.assertEqual(body[2]["error"]["code"], -32601)
        status, body = await client.rpc({"jsonrpc": "2.0", "method": "health_check"})
        self.assertEqual((status, body), (204, None))
        status, body = await client.rpc([{"jsonrpc": "2.0", "method": "health_check"}] * 51)
        self.assertEqual((status, body["error"]["code"], body["id"]), (200, -32600, None))

    async def test_commands(self) -> None:
        agent = await start_agent(self)
        started = await agent.call(
            "execute_command",
            {"command": "/bin/sh", "args": ["-c", "echo out; echo err >&2"], "command_id": "c-1"},
        )
        self.assertEqual(started, {"status": "running", "command_id": "c-1"})
        data, result = await read_until_final(agent, "c-1")
        self.assertEqual(sorted(data.splitlines()), [b"err", b"out"])
        self.assertTrue(result["success"])
        self.assertEqual(result["return_code"], 0)
        again = await agent.call(
            "execute_command",
            {"command": "/bin/sh", "args": ["-c", "echo no"], "command_id": "c-1"},
        )
        self.assertEqual(again["duplicate"], True)

        await agent.call(
            "execute_command", {"command": "sleep", "args": ["60"], "command_id": "c-2"}
        )
        cancelled = await agent.call("cancel_command", {"command_id": "c-2"})
        self.assertEqual((cancelled["command_id"], cancelled["cancelled"]), ("c-2", True))
        _, result = await read_until_final(agent, "c-2")
        self.assertTrue(result["cancelled"])
        self.assertFalse(result["success"])

        with self.assertRaises(AgentRPCError) as ctx:
            await agent.call("get_command_log", {"command_id": "never-ran"})
        self.assertEqual(ctx.exception.code, -32004)
        with self.assertRaises(AgentRPCError) as ctx:
            await agent.call("execute_command", {"command": "ls", "command_id": "bad id"})
        self.assertEqual(ctx.exception.code, -32602)
        self.assertIn("'command_id'", str(ctx.exception.message))

    async def test_deployment_tool_and_ansible(self) -> None:
        agent = await start_agent(self)
        archive = tool_archive("9.8.7")
        synced = await agent.call(
            "sync_deployment_tool",
            {
                "archive": base64.b64encode(archive).decode(),
                "sha256": hashlib.sha256(archive).hexdigest(),
                "version": "9.8.7",
            },
        )
        self.assertEqual(synced, {"changed": True, "version": "9.8.7"})
        self.assertEqual((await agent.call("get_status"))["deployment_tool_version"], "9.8.7")
        with self.assertRaises(AgentRPCError) as ctx:
            await agent.call(
                "sync_deployment_tool",
                {"archive": base64.b64encode(archive).decode(), "sha256": "0" * 64, "version": "1"},
            )
        self.assertEqual(ctx.exception.code, -32010)

        started = await agent.call(
            "execute_ansible",
            {"playbook": "hello.yml", "extra_vars": {"who": "myx"}, "command_id": "a-1"},
        )
        self.assertEqual(started["status"], "running")
        data, result = await read_until_final(agent, "a-1")
        self.assertIn(b"hello from myx", data)
        self.assertTrue(result["success"], result)
        self.assertEqual(result["ansible"]["status"], "successful")
        with self.assertRaises(AgentRPCError) as ctx:
            await agent.call("execute_ansible", {"playbook": "../x.yml", "command_id": "a-2"})
        self.assertEqual(ctx.exception.code, -32602)


class HTTPSurfaceTests(TestCase):
    timeout = 180

    async def test_auth(self) -> None:
        agent = await start_agent(self)
        client = agent.client()
        expected = UNAUTHORIZED_RESPONSE.partition(b"\r\n\r\n")[2]
        for token in (None, "", "wrong-token", agent.token + "x", agent.token.upper()):
            r = await client.post(b'{"jsonrpc":"2.0","method":"health_check","id":1}', token=token)
            self.assertEqual((r.status, r.body), (401, expected), token)
        self.assertEqual(json.loads(expected)["error"]["code"], -32001)
        self.assertEqual(await client.call("health_check"), {"status": "ok"})

    async def test_unknown_paths_and_methods_identical(self) -> None:
        agent = await start_agent(self)
        seen = set()
        variants = [
            (b"GET", b"/"),
            (b"POST", b"/rpc"),
            (b"POST", b"/" + agent.rpc_path.encode() + b"/rpc/x"),
            (b"GET", b"/" + agent.rpc_path.encode() + b"/rpc"),
            (b"PUT", b"/" + agent.rpc_path.encode() + b"/rpc"),
            (b"DELETE", b"/favicon.ico"),
        ]
        for token in (agent.token.encode(), None, b"wrong-token-1234567"):
            for method, path in variants:
                raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint)
                head = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                if token is not None:
                    head += b"X-Agent-Token: " + token + b"\r\n"
                raw.write(head + b"\r\n")
                await raw.wait_closed()
                seen.add(raw.data)
        self.assertEqual(seen, {NOT_FOUND_RESPONSE})

    async def test_token_checked_before_body(self) -> None:
        agent = await start_agent(self)
        raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint)
        raw.write(
            b"POST /" + agent.rpc_path.encode() + b"/rpc HTTP/1.1\r\nHost: x\r\n"
            b"X-Agent-Token: wrong-token-000000\r\nContent-Length: 900000\r\n\r\n{"
        )
        await raw.wait_closed()
        self.assertEqual(raw.data, UNAUTHORIZED_RESPONSE)

    async def test_body_limit(self) -> None:
        agent = await start_agent(self)
        raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint)
        raw.write(
            b"POST /" + agent.rpc_path.encode() + b"/rpc HTTP/1.1\r\nHost: x\r\n"
            b"X-Agent-Token: " + agent.token.encode() + b"\r\nContent-Length: 1048577\r\n\r\n"
        )
        await raw.wait_closed()
        self.assertEqual(raw.data, TOO_LARGE_RESPONSE)
        client = agent.client()
        call = b'{"jsonrpc":"2.0","method":"get_port","id":1}'
        r = await client.post(call + b" " * (1048576 - len(call)))
        self.assertEqual((r.status, r.json()["result"]), (200, agent.port))
        r = await client.post(call + b" " * (1048577 - len(call)))
        self.assertEqual(r.status, 413)

    async def test_keep_alive_connection_reuse(self) -> None:
        agent = await start_agent(self)
        raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint)
        self.addCleanup(lambda: Deferred.fromCoroutine(raw.close()))
        end = 0
        for i in range(5):
            body = b'{"jsonrpc":"2.0","method":"heartbeat","id":%d}' % i
            raw.write(
                b"POST /" + agent.rpc_path.encode() + b"/rpc HTTP/1.1\r\nHost: x\r\n"
                b"X-Agent-Token: " + agent.token.encode() + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            status, headers, payload, end = await raw.read_response(end)
            self.assertEqual(status, 200)
            self.assertNotIn(b"close", headers.get(b"connection", b""))
            self.assertEqual(headers.get(b"content-type"), b"application/json")
            # twisted.web's Server and Date headers are dropped (no version to scan for).
            self.assertNotIn(b"server", headers)
            self.assertNotIn(b"date", headers)
            self.assertEqual(json.loads(payload)["id"], i)
        self.assertFalse(raw.is_closed)
        self.assertEqual(raw.creator.connections, 1)  # one handshake for five calls

    async def test_alpn_clients_get_http11(self) -> None:
        agent = await start_agent(self)
        creator = PinnedConnectionCreator(agent.fingerprint)
        creator._ctx.set_alpn_protos([b"h2", b"http/1.1"])
        raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint, creator=creator)
        self.addCleanup(lambda: Deferred.fromCoroutine(raw.close()))
        body = b'{"jsonrpc":"2.0","method":"health_check","id":1}'
        raw.write(
            b"POST /" + agent.rpc_path.encode() + b"/rpc HTTP/1.1\r\nHost: x\r\n"
            b"X-Agent-Token: " + agent.token.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        status, _, payload, _ = await raw.read_response()
        self.assertEqual((status, json.loads(payload)["result"]), (200, {"status": "ok"}))
        self.assertEqual(raw.negotiated_protocol, b"http/1.1")

    async def test_wrong_pin_is_refused(self) -> None:
        agent = await start_agent(self)
        client = AgentClient(
            host=agent.host,
            port=agent.port,
            rpc_path=agent.rpc_path,
            token=agent.token,
            fingerprint="0" * 64,
            timeout=30,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        with self.assertRaises(RequestTransmissionFailed) as ctx:
            await client.call("health_check")
        # The request never left: the TLS handshake failed on the pin.
        reasons = ctx.exception.reasons
        self.assertEqual(len(reasons), 1, reasons)
        self.assertIsInstance(reasons[0].value, SSL.Error)
        self.assertIn("certificate verify failed", str(reasons[0].value))
        self.assertEqual(set(client.policy.creator.seen), {agent.fingerprint})

    async def test_tls_below_1_2_is_refused(self) -> None:
        agent = await start_agent(self)
        creator = tls11_client(agent.fingerprint)
        raw = await RawTLS.connect(agent.host, agent.port, agent.fingerprint, creator=creator)
        raw.write(b"GET / HTTP/1.1\r\n\r\n")
        await raw.wait_closed()
        self.assertEqual(raw.data, b"")
        self.assertEqual(creator.seen, [])  # no certificate was ever presented

    async def test_tls_1_1_client_works_where_allowed(self) -> None:
        """Positive control for the test above: the same TLS 1.1-only client
        completes a handshake (and reads bytes) with a server, holding the
        agent's own certificate, that allows TLS 1.1."""
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor
        agent = await start_agent(self)
        server_ctx = SSL.Context(SSL.TLS_METHOD)
        server_ctx.set_min_proto_version(SSL.TLS1_VERSION)
        server_ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        server_ctx.use_certificate_file(os.path.join(agent.ssl_dir, "agent.crt"))
        server_ctx.use_privatekey_file(os.path.join(agent.ssl_dir, "agent.key"))

        class Factory_(ContextFactory):
            def getContext(self) -> SSL.Context:
                return server_ctx

        class Hello(Protocol):
            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

        port = reactor.listenSSL(0, Factory.forProtocol(Hello), Factory_(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        creator = tls11_client(agent.fingerprint)
        raw = await RawTLS.connect(
            "127.0.0.1", port.getHost().port, agent.fingerprint, creator=creator
        )
        raw.write(b"GET / HTTP/1.1\r\n\r\n")
        status, _, _, _ = await raw.read_response()
        transport: Any = raw._proto.transport
        version = transport.getHandle().get_protocol_version_name()
        transport.loseConnection()
        await raw.wait_closed()
        self.assertEqual(status, 204)
        self.assertEqual(version, "TLSv1.1")
        self.assertEqual(set(creator.seen), {agent.fingerprint})

    async def test_log_has_fingerprint_and_no_secrets(self) -> None:
        agent = await start_agent(self)
        client = agent.client()
        await client.call("heartbeat")
        await client.post(b"{}", token="wrong-token-123456789")
        await client.post(b"{}", path="/" + agent.rpc_path + "/other")
        await agent.stop()
        log = agent.log_text()
        self.assertIn(f"cert_fingerprint={agent.fingerprint}", log)
        self.assertIn("rpc heartbeat ok", log)
        self.assertIn("http 401 unauthorized", log)
        self.assertIn("http 404 not found", log)
        self.assertNotIn(agent.token, log)
        self.assertNotIn(agent.config["secret_key"], log)
        self.assertNotIn(agent.rpc_path, log)


class LifecycleTests(TestCase):
    timeout = 240

    async def test_sigterm_stops_cleanly_with_a_running_command(self) -> None:
        agent = await start_agent(self)
        await agent.call(
            "execute_command", {"command": "sleep", "args": ["300"], "command_id": "s-1"}
        )
        ended = await agent.stop("TERM")
        self.assertEqual((ended.exit_code, ended.signal), (0, None))
        self.assertIn("myx-agent stopped", agent.log_text())
        self.assertEqual(ended.stderr, "")

    async def test_restart_keeps_identity(self) -> None:
        agent = await start_agent(self)
        first = agent.fingerprint
        await agent.restart()
        self.assertEqual(agent.fingerprint, first)
        self.assertEqual((await agent.call("get_status"))["cert_fingerprint"], first)
        await agent.stop("KILL")
        await start_agent(self, reuse=agent)
        self.assertEqual(await agent.call("get_port"), agent.port)

    async def test_console_entry_point(self) -> None:
        # The console script of the installed wheel, run outside the checkout.
        env, cwd = installed.env(), self.mktemp()
        os.makedirs(cwd)
        out, err, status = await getProcessOutputAndValue(
            installed.script("myx-agent"), ["--version"], env=env, path=cwd
        )
        self.assertEqual((out, err, status), (f"myx-agent {__version__}\n".encode(), b"", 0))
        out, err, status = await getProcessOutputAndValue(
            installed.python(), ["-m", "myx_agent", "--help"], env=env, path=cwd
        )
        self.assertEqual(status, 0)
        self.assertIn(b"--config PATH", out)
        self.assertIn(b"/etc/myx-agent/config.json", out)


def default_config_exists() -> bool:
    return os.path.exists("/etc/myx-agent/config.json")


class StartErrorTests(TestCase):
    timeout = 180

    def config_path(self, data: Optional[Dict[str, Any]] = None, mode: int = 0o600) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "config.json")
        config = {
            "agent_token": "token-0123456789abcdefgh",
            "secret_key": "secret-key-zyxw",
            "rpc_port": free_port(),
            "rpc_path": "abcdefghijklmnop",
            "bind": "127.0.0.1",
            "state_dir": os.path.join(base, "state"),
            "deployment_tool_dir": os.path.join(base, "tool"),
        }
        config.update(data or {})
        write_config(path, config, mode)
        return path

    def new_dir(self) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        return base

    @staticmethod
    def write_text(path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    async def assert_clear_exit(self, path: str, *needles: str) -> str:
        ended = await run_agent_until_exit(self, path)
        self.assertNotIn(ended.exit_code, (0, None), ended)
        lines = ended.stderr.splitlines()
        self.assertEqual(len(lines), 1, ended.stderr)
        line = lines[0]
        self.assertTrue(line.startswith("myx-agent: error: "), line)
        for needle in needles:
            self.assertIn(needle, line)
        self.assertNotIn("Traceback", ended.stdout + ended.stderr)
        self.assertNotIn("token-0123456789abcdefgh", ended.stdout + ended.stderr)
        return line

    async def test_invalid_json(self) -> None:
        path = self.config_path()
        self.write_text(path, '{"rpc_port": 1,,}')
        await self.assert_clear_exit(path, path, "invalid JSON")

    async def test_missing_field(self) -> None:
        path = self.config_path()
        data = {
            "agent_token": "token-0123456789abcdefgh",
            "secret_key": "secret-key-zyxw",
            "rpc_path": "abcdefghijklmnop",
        }
        write_config(path, data)
        await self.assert_clear_exit(path, path, "'rpc_port'", "required")

    async def test_invalid_field(self) -> None:
        await self.assert_clear_exit(
            self.config_path({"rpc_path": "bad/path/abcdefghijk"}), "'rpc_path'"
        )

    async def test_loose_permissions(self) -> None:
        path = self.config_path(mode=0o644)
        await self.assert_clear_exit(path, path, "0644", "too open")

    async def test_missing_file(self) -> None:
        path = os.path.join(self.new_dir(), "missing", "config.json")
        await self.assert_clear_exit(path, path, "not found")

    async def test_default_path(self) -> None:
        if default_config_exists():
            self.skipTest("this machine has a real /etc/myx-agent/config.json")
        cwd = self.new_dir()
        out, err, status = await getProcessOutputAndValue(
            installed.python(), ["-m", "myx_agent"], env=installed.env(), path=cwd
        )
        self.assertEqual(status, 2)
        self.assertEqual(
            err, b"myx-agent: error: config /etc/myx-agent/config.json: file not found\n"
        )

    async def test_port_in_use(self) -> None:
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        path = self.config_path({"rpc_port": port})
        line = await self.assert_clear_exit(path, path, str(port), "'rpc_port'", "in use")
        self.assertIn("127.0.0.1", line)

    async def test_unusable_ssl_dir(self) -> None:
        blocker = os.path.join(self.new_dir(), "file")
        self.write_text(blocker, "x")
        await self.assert_clear_exit(self.config_path({"ssl_dir": blocker}), blocker)

    async def test_unusable_state_dir(self) -> None:
        blocker = os.path.join(self.new_dir(), "file")
        self.write_text(blocker, "x")
        state_dir = os.path.join(blocker, "state")
        await self.assert_clear_exit(self.config_path({"state_dir": state_dir}), state_dir)

    async def test_half_identity(self) -> None:
        path = self.config_path()
        agent_ssl = os.path.join(os.path.dirname(path), "ssl")
        os.makedirs(agent_ssl, mode=0o700)
        self.write_text(os.path.join(agent_ssl, "agent.key"), "x")
        await self.assert_clear_exit(path, "agent.crt", "missing")
