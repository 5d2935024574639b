"""allowed_target_networks: the policy, the setting, and where it is enforced."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from myxd.config import Settings, load_settings
from myxd.errors import ConfigError
from myxd.netpolicy import TargetNotAllowed, TargetPolicy, parse_networks


def d(coro: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coro)


class PolicyTests(TestCase):
    def test_parse(self) -> None:
        self.assertEqual(
            [str(n) for n in parse_networks("127.0.0.0/8, ::1/128")],
            [
                "127.0.0.0/8",
                "::1/128",
            ],
        )
        for bad in ("", " , ", "10.0.0.0/33", "example.com", "1.2.3.4/8/8"):
            with self.assertRaises(ValueError, msg=bad):
                parse_networks(bad)

    def test_addresses_and_names(self) -> Deferred[Any]:
        policy = TargetPolicy("127.0.0.0/8", reactor)

        async def go() -> None:
            self.assertFalse(policy.allows_everything)
            await policy.check("127.0.0.1")
            await policy.check("127.5.6.7")
            await policy.check("localhost")  # resolves to loopback only here
            for host in ("192.0.2.1", "::2", "10.0.0.1"):
                with self.assertRaises(TargetNotAllowed) as cm:
                    await policy.check(host)
                self.assertIn("outside allowed_target_networks", str(cm.exception))
            # (A name that does not resolve is refused too; not tried here, as the
            # lookup could leave the machine.)
            # IPv4-mapped IPv6 is judged as the IPv4 address it is.
            self.assertTrue(policy.allows_address("::ffff:127.0.0.1"))
            self.assertFalse(policy.allows_address("::ffff:192.0.2.1"))

        return d(go())

    def test_default_allows_everything_without_resolving(self) -> Deferred[Any]:
        policy = TargetPolicy(Settings().allowed_target_networks, reactor)
        self.assertTrue(policy.allows_everything)
        return d(policy.check("name-that-does-not-resolve.invalid"))

    def test_setting_is_checked_at_start(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()))
        os.makedirs(path)
        toml = os.path.join(path, "myxd.toml")
        with open(toml, "w") as f:
            f.write('allowed_target_networks = "127.0.0.0/8, nonsense"\n')
        with self.assertRaises(ConfigError) as cm:
            load_settings(toml, {})
        self.assertIn("allowed_target_networks", str(cm.exception))
        self.assertIn("'nonsense' is not a network", str(cm.exception))


class EnforcedTests(TestCase):
    """The admin API with allowed_target_networks = 127.0.0.0/8: targets outside it
    are refused before anything is saved or any connection is tried."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        return d(self._setUp(base))

    async def _setUp(self, base: str) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.interfaces import IReactorThreads

        from myxd.api import AdminAPI
        from myxd.api.servers import ServersAPI
        from myxd.install import Installer
        from myxd.metrics import Metrics
        from myxd.store import StoreService
        from tests.daemon.api_helpers import TOKEN

        settings = Settings(data_dir=base, allowed_target_networks="127.0.0.0/8")
        ss = StoreService(os.path.join(base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
        self.store = ss.store
        self.rpc_calls: list[Any] = []
        rpc = _NoRPC(self.rpc_calls)
        installer = Installer(self.store, rpc, settings, reactor)
        api = AdminAPI(
            self.store,
            None,  # type: ignore[arg-type]
            rpc,  # type: ignore[arg-type]
            settings,
            reactor,
            metrics=Metrics(),
            admin_token=TOKEN,
            servers_api=ServersAPI(self.store, installer, reactor=IReactorThreads(reactor)),
        )
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(api.site())
        self.addCleanup(port.stopListening)
        self.base_url = f"http://127.0.0.1:{port.getHost().port}"
        self.token = TOKEN

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        import json

        import treq
        from twisted.web.client import HTTPConnectionPool
        from twisted.web.http_headers import Headers

        pool = HTTPConnectionPool(reactor, persistent=False)
        resp = await treq.post(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers=Headers(
                {
                    b"Authorization": [b"Bearer " + self.token.encode()],
                    b"Content-Type": [b"application/json"],
                }
            ),
            pool=pool,
        )
        content = await treq.content(resp)
        return resp.code, json.loads(content)

    def test_server_outside_is_refused_and_not_saved(self) -> Deferred[Any]:
        async def go() -> None:
            code, body = await self.post(
                "/api/servers",
                {
                    "name": "far",
                    "host": "192.0.2.10",
                    "ssh_port": 22,
                    "username": "root",
                    "auth": {"password": "pw-not-used"},
                    "start": False,
                },
            )
            self.assertEqual((code, body.get("field")), (400, "host"), body)
            self.assertIn("outside allowed_target_networks", body["error"])
            self.assertEqual(await self.store.list_servers(), [])

        return d(go())

    def test_adoption_outside_is_refused_without_a_connection(self) -> Deferred[Any]:
        async def go() -> None:
            code, body = await self.post(
                "/api/agents",
                {
                    "host": "192.0.2.10",
                    "rpc_port": 24351,
                    "rpc_path": "p" * 16,
                    "token": "t" * 20,
                    "cert_fingerprint": "ab" * 32,
                },
            )
            self.assertEqual((code, body.get("field")), (400, "host"), body)
            self.assertEqual(self.rpc_calls, [])
            self.assertEqual(await self.store.list_agents(), [])

        return d(go())


class _NoRPC:
    """An RPC client that records and refuses: nothing may be called here."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    async def call(self, *args: Any, **kw: Any) -> Any:
        from myxd.rpc.retry import AgentRPCError

        self.calls.append(args)
        raise AgentRPCError("final", "no RPC in this test")

    async def close(self) -> None:
        pass
