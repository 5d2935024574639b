"""The servers API, mounted in the real AdminAPI behind its token gate, served on
127.0.0.1 with a real SQLite store and the real Installer. Installs here point
at a closed local port, so they fail at ``connect`` quickly and no host is needed
(tests/install/test_install_real.py covers real installs)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from myxd.api.app import AdminAPI
from myxd.api.servers import ServersAPI
from myxd.config import Settings
from myxd.install import Installer
from myxd.metrics import Metrics
from myxd.rpc.client import AgentRPC
from myxd.store import StoreService
from tests.support.sshd import SSHServer, free_port, keygen

TOKEN = "servers-api-test-token-0123456789"
AUTH: dict[bytes | str, list[bytes | str]] = {b"Authorization": [f"Bearer {TOKEN}".encode()]}
PASSWORD = "pw-that-must-never-show-9f3a"
# Only turns a hang into a failure; waits are on conditions.
WAIT = 90.0


def _make_dir(path: str) -> str:
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    return path


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keygen(path: str, passphrase: str = "") -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", path],
        check=True,
        capture_output=True,
    )
    with open(path) as f:
        return f.read()


class ServersAPITests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._setUp())

    async def _setUp(self) -> None:
        self.base = _make_dir(self.mktemp())
        self.settings = Settings(data_dir=self.base, ssh_connect_timeout=10)
        ss = StoreService(os.path.join(self.base, "myxd.sqlite"), reactor)
        ss.startService()
        await ss.when_ready()
        self.addCleanup(ss.stopService)
        self.store = ss.store
        rpc = AgentRPC(reactor, self.settings)
        self.addCleanup(rpc.close)
        self.installer = Installer(self.store, rpc, self.settings, reactor)
        self.installer.startService()
        self.addCleanup(self.installer.stopService)
        servers = ServersAPI(self.store, self.installer, reactor=IReactorThreads(reactor))
        api = AdminAPI(
            self.store,
            None,  # type: ignore[arg-type]
            rpc,
            self.settings,
            reactor,
            metrics=Metrics(),
            admin_token=TOKEN,
            servers_api=servers,
        )
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(api.site())
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}/api/servers"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.closed_port = free_port()
        self.bodies: list[bytes] = []

    async def call(
        self,
        method: str,
        path: str = "",
        body: Any = None,
        *,
        auth: bool = True,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers: dict[bytes | str, list[bytes | str]] = dict(AUTH) if auth else {}
        if data is not None:
            headers[b"Content-Type"] = [b"application/json"]
        resp = await treq.request(
            method, self.url + path, data=data, headers=headers, pool=self.pool
        )
        content = await treq.content(resp)
        self.bodies.append(content)
        return resp.code, json.loads(content) if content else None

    def valid(self, **over: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": "web-1",
            "host": "127.0.0.1",
            "ssh_port": self.closed_port,
            "username": "root",
            "auth": {"password": PASSWORD},
            "sudo": {"mode": "sudo", "password": PASSWORD},
        }
        doc.update(over)
        return {k: v for k, v in doc.items() if v is not None}

    def assert_no_secrets(self) -> None:
        for body in self.bodies:
            self.assertNotIn(PASSWORD.encode(), body)
            self.assertNotIn(b"PRIVATE KEY", body)
            self.assertNotIn(b'"token"', body)
            self.assertNotIn(b"secret_key", body)

    async def wait_install_done(self, server_id: int, after: int = 0) -> dict[str, Any]:
        """The latest install (newer than install ``after``) once it is over, whatever
        its final status: waits on that condition, the deadline only turns a hang
        into a failure (a loaded machine can take long to connect or time out)."""
        deadline = reactor.seconds() + WAIT
        while True:
            code, doc = await self.call("GET", f"/{server_id}/install")
            if code == 200 and doc["id"] > after and not doc["running"]:
                if doc["status"] != "running":
                    return dict(doc)
            if reactor.seconds() > deadline:
                self.fail(f"install of server {server_id} did not finish: {doc}")
            await deferLater(reactor, 0.05, lambda: None)

    async def test_token_is_required(self) -> None:
        code, _ = await self.call("GET", "", auth=False)
        self.assertEqual(code, 401)
        code, _ = await self.call("POST", "", self.valid(), auth=False)
        self.assertEqual(code, 401)
        self.assertEqual(await self.store.list_servers(), [])

    async def test_bad_input_names_the_field(self) -> None:
        key_path = os.path.join(self.base, "k")
        enc_key = _keygen(key_path + "enc", "secret-pass")
        cases = [
            (self.valid(name=None), "name"),
            (self.valid(name=""), "name"),
            (self.valid(host="not a host!"), "host"),
            (self.valid(ssh_port=0), "ssh_port"),
            (self.valid(ssh_port="22"), "ssh_port"),
            (self.valid(username="a b"), "username"),
            (self.valid(auth=None), "auth"),
            (self.valid(auth="pw"), "auth"),
            (self.valid(auth={}), "auth"),
            (self.valid(auth={"password": "x", "private_key": "y"}), "auth"),
            (self.valid(auth={"password": ""}), "auth.password"),
            (self.valid(auth={"password": "x", "passphrase": "p"}), "auth.passphrase"),
            (self.valid(auth={"password": "x", "other": 1}), "auth.other"),
            (self.valid(auth={"private_key": "not a key"}), "auth.private_key"),
            (self.valid(auth={"private_key": enc_key}), "auth.passphrase"),
            (self.valid(auth={"private_key": enc_key, "passphrase": "wrong"}), "auth.passphrase"),
            (self.valid(sudo="root"), "sudo"),
            (self.valid(sudo={"mode": "su"}), "sudo.mode"),
            (self.valid(sudo={"mode": "none", "password": "x"}), "sudo.password"),
            (self.valid(host_key_fingerprint="MD5:00"), "host_key_fingerprint"),
            (self.valid(start="yes"), "start"),
            ({**self.valid(), "extra": 1}, "extra"),
        ]
        for doc, field in cases:
            code, body = await self.call("POST", "", doc)
            self.assertEqual((code, body.get("field")), (400, field), (doc.keys(), body))
        code, body = await self.call("POST", "", raw=b"{not json")
        self.assertEqual((code, body["field"]), (400, "body"))
        self.assertEqual(await self.store.list_servers(), [], "nothing half-written")
        self.assertEqual(await self.store.list_agents(), [])
        self.assert_no_secrets()

    async def test_create_install_fails_clearly_then_reinstall_and_delete(self) -> None:
        code, doc = await self.call("POST", "", self.valid())
        self.assertEqual(code, 201, doc)
        server = doc["server"]
        self.assertIsInstance(doc["install_id"], int)
        self.assertEqual(server["auth_method"], "password")
        self.assertEqual(server["sudo"], {"mode": "sudo", "password_set": True})
        # The install runs on its own: it may already have failed (and dropped its
        # never-finished agent) by the time the 201 is written, or not yet.
        if server["agent_id"] is not None:
            self.assertEqual(server["agent_status"], "installing", server)
            self.assertIsInstance(server["agent"]["rpc_port"], int)
        else:
            self.assertEqual(server["status"], "failed", server)

        install = await self.wait_install_done(server["id"])
        self.assertEqual(install["status"], "failed")
        self.assertEqual(
            [(s["step"], s["status"]) for s in install["steps"]], [("connect", "failed")]
        )
        self.assertIn("connection refused", install["steps"][0]["error"])
        self.assertIn("connect:", install["error"])

        code, one = await self.call("GET", f"/{server['id']}")
        self.assertEqual(code, 200)
        self.assertEqual(one["status"], "failed")
        # The install never finished: no agent is left behind (issue #9, no phantom
        # agents); the server shows the install's error.
        self.assertIsNone(one["agent_id"])
        self.assertIsNone(await self.store.get_agent_for_server(server["id"]))
        self.assertEqual(await self.store.list_agents(), [])
        self.assertIn("connect:", one["status_reason"])
        code, listing = await self.call("GET", "")
        self.assertEqual([s["id"] for s in listing["servers"]], [server["id"]])
        code, listing = await self.call("GET", "/")
        self.assertEqual(code, 200)

        code, started = await self.call("POST", f"/{server['id']}/reinstall")
        self.assertEqual((code, started["kind"]), (202, "reinstall"))
        install = await self.wait_install_done(server["id"], after=install["id"])
        self.assertEqual((install["kind"], install["status"]), ("reinstall", "failed"))
        # The reinstall drew an identity, failed too, and left no agent either.
        self.assertIsNone(await self.store.get_agent_for_server(server["id"]))

        code, body = await self.call(
            "POST", f"/{server['id']}/reinstall", {"forget_host_key": "yes"}
        )
        self.assertEqual((code, body["field"]), (400, "forget_host_key"))

        code, _ = await self.call("DELETE", f"/{server['id']}")
        self.assertEqual(code, 200)
        for path in (f"/{server['id']}", f"/{server['id']}/install"):
            code, _ = await self.call("GET", path)
            self.assertEqual(code, 404)
        code, _ = await self.call("POST", f"/{server['id']}/uninstall")
        self.assertEqual(code, 404)
        self.assertIsNone(await self.store.get_agent_for_server(server["id"]))
        events = await self.store.list_events(limit=100)
        self.assertIn("install.step", {e.action for e in events})
        for e in events:
            self.assertNotIn(PASSWORD, repr(e.details))
        self.assert_no_secrets()

    async def test_create_without_start_and_with_key(self) -> None:
        key = _keygen(os.path.join(self.base, "k2"), "pp")
        code, doc = await self.call(
            "POST",
            "",
            self.valid(
                auth={"private_key": key, "passphrase": "pp"},
                start=False,
                sudo="none",
                host_key_fingerprint="SHA256:" + "A" * 43,
            ),
        )
        self.assertEqual(code, 201, doc)
        self.assertIsNone(doc["install_id"])
        self.assertEqual(doc["server"]["auth_method"], "private_key")
        self.assertEqual(doc["server"]["host_key_fingerprint"], "SHA256:" + "A" * 43)
        self.assertEqual(doc["server"]["status"], "new")
        code, body = await self.call("GET", f"/{doc['server']['id']}/install")
        self.assertEqual(code, 404)
        self.assert_no_secrets()

    async def test_unknown_routes_and_methods(self) -> None:
        code, _ = await self.call("GET", "/999")
        self.assertEqual(code, 404)
        code, _ = await self.call("GET", "/abc")
        self.assertEqual(code, 404)
        code, _ = await self.call("PUT", "/1")
        self.assertIn(code, (404, 405))
        code, _ = await self.call("DELETE", "/99999999999999999999999")
        self.assertEqual(code, 404)

    async def test_concurrent_install_is_409(self) -> None:
        # An SSH server that accepts TCP but never speaks keeps the install in
        # "connect" until the connect timeout, long enough to ask again.
        from twisted.internet.protocol import Factory, Protocol

        silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(silent.stopListening)
        code, doc = await self.call("POST", "", self.valid(ssh_port=silent.getHost().port))
        self.assertEqual(code, 201)
        sid = doc["server"]["id"]
        code, body = await self.call("POST", f"/{sid}/reinstall")
        self.assertEqual(code, 409, body)
        self.assertIn("already running", body["error"])
        code, body = await self.call("DELETE", f"/{sid}")
        self.assertEqual(code, 409)
        install = await self.wait_install_done(sid)
        self.assertIn("timed out", install["steps"][0]["error"])

    async def test_admin_actions_are_audited_as_the_admin(self) -> None:
        """Issue #9: what the admin API asks of the real Installer (add, install,
        reinstall, forget the host key, delete; one by one or in bulk) is recorded
        with the admin as the actor; the installer's own steps stay its own. No
        event holds a password."""
        code, doc = await self.call("POST", "", self.valid())
        self.assertEqual(code, 201, doc)
        sid = doc["server"]["id"]
        first = await self.wait_install_done(sid)
        code, body = await self.call("POST", "/bulk", {"action": "reinstall", "ids": [sid]})
        self.assertEqual((code, body["results"][0]["ok"]), (200, True), body)
        second = await self.wait_install_done(sid, after=first["id"])
        code, _ = await self.call("POST", f"/{sid}/reinstall", {"forget_host_key": True})
        self.assertEqual(code, 202)
        await self.wait_install_done(sid, after=second["id"])
        code, body = await self.call("POST", "/bulk", {"action": "delete", "ids": [sid]})
        self.assertEqual(body["results"], [{"id": sid, "ok": True, "error": None}])

        events = list(reversed(await self.store.list_events(limit=500)))
        mine = [e for e in events if e.target == f"server:{sid}"]
        by_admin = [(e.action, e.outcome) for e in mine if e.actor == "admin-api"]
        # The bulk row and the install's start row are written side by side: in
        # either order.
        self.assertEqual(
            sorted(by_admin),
            sorted(
                [
                    ("server.create", "ok"),
                    ("server.install", "started"),
                    ("server.reinstall", "started"),
                    ("server.bulk", "ok"),
                    ("server.host_key_forgotten", "ok"),
                    ("server.reinstall", "started"),
                    ("server.delete", "ok"),
                    ("server.bulk", "ok"),
                ]
            ),
        )
        create = next(e for e in mine if e.action == "server.create")
        assert create.details is not None
        self.assertEqual(
            {k: create.details[k] for k in ("name", "host", "ssh_port")},
            {"name": "web-1", "host": "127.0.0.1", "ssh_port": self.closed_port},
        )
        # The installer reports its own steps and outcomes.
        self.assertEqual(
            {e.actor for e in mine if e.action == "install.step" or e.outcome == "failed"},
            {"installer"},
        )
        for e in events:
            self.assertNotIn(PASSWORD, repr(e.details))
        self.assert_no_secrets()

    async def test_moved_server_has_its_host_key_checked_again(self) -> None:
        """Issue #9 over real sshd: a PATCH of the port to a host with another host
        key drops the stored key, so the next connect checks the key again (trust
        on first use, or against a pinned fingerprint), never the old key silently.
        The control: the same move with the old key kept is refused at connect."""
        old = SSHServer(os.path.join(self.base, "sshd-old"), reactor)
        new = SSHServer(os.path.join(self.base, "sshd-new"), reactor)
        for sshd in (old, new):
            await sshd.start()
            self.addCleanup(sshd.stop)
        key_path = os.path.join(self.base, "id_ed25519")
        public = keygen(key_path, "ed25519")
        for sshd in (old, new):
            sshd.authorize("root", public)
        private_key = _read(key_path)
        old_fps = {old.host_fingerprint(k) for k in ("ed25519", "ecdsa")}
        new_fps = {new.host_fingerprint(k) for k in ("ed25519", "ecdsa")}
        self.assertFalse(old_fps & new_fps)

        async def connect_step(sid: int, after: int) -> tuple[dict[str, Any], dict[str, Any]]:
            install = await self.wait_install_done(sid, after=after)
            return install, install["steps"][0]

        code, doc = await self.call(
            "POST",
            "",
            self.valid(ssh_port=old.port, auth={"private_key": private_key}, sudo="none"),
        )
        self.assertEqual(code, 201, doc)
        sid = doc["server"]["id"]
        # connect stores the old host's key on first use (a later step fails here:
        # this machine runs no systemd; only connect matters).
        install, step = await connect_step(sid, 0)
        self.assertEqual(step["step"], "connect")
        self.assertEqual(step["status"], "ok", step)
        self.assertRegex(step["log"], r"\(first-use\)$")
        server = await self.store.get_server(sid)
        assert server is not None and server.host_key is not None
        stored_old = server.host_key
        self.assertIn(step["log"].split("host key ")[1].split()[0], old_fps)

        # Control: moved to the new host with the old key kept, connect refuses.
        await self.store.update_server(sid, ssh_port=new.port)
        code, _ = await self.call("POST", f"/{sid}/reinstall")
        self.assertEqual(code, 202)
        install, step = await connect_step(sid, install["id"])
        self.assertEqual((step["step"], step["status"]), ("connect", "failed"), step)
        self.assertIn("host key changed", step["error"])
        self.assertIn("no credentials were sent", step["error"])
        await self.store.update_server(sid, ssh_port=old.port)
        server = await self.store.get_server(sid)
        assert server is not None
        self.assertEqual(server.host_key, stored_old)

        # PATCH moves it: the stored key is dropped, the new host's key is trusted
        # on first use and stored in its place.
        code, body = await self.call("PATCH", f"/{sid}", {"ssh_port": new.port})
        self.assertEqual((code, body["ssh_port"], body["host_key"]), (200, new.port, None), body)
        code, _ = await self.call("POST", f"/{sid}/reinstall")
        self.assertEqual(code, 202)
        install, step = await connect_step(sid, install["id"])
        self.assertEqual((step["step"], step["status"]), ("connect", "ok"), step)
        self.assertRegex(step["log"], r"\(first-use\)$")
        presented = step["log"].split("host key ")[1].split()[0]
        self.assertIn(presented, new_fps)
        server = await self.store.get_server(sid)
        assert server is not None and server.host_key is not None
        self.assertNotEqual(server.host_key, stored_old)

        # Moved back with a pin that is not the old host's: refused at connect...
        code, body = await self.call(
            "PATCH", f"/{sid}", {"ssh_port": old.port, "host_key_fingerprint": presented}
        )
        self.assertEqual((code, body["host_key"]), (200, None), body)
        code, _ = await self.call("POST", f"/{sid}/reinstall")
        install, step = await connect_step(sid, install["id"])
        self.assertEqual((step["step"], step["status"]), ("connect", "failed"), step)
        self.assertIn("does not match the pinned fingerprint", step["error"])
        # ... and with the old host's own fingerprint pinned, accepted as pinned.
        code, body = await self.call(
            "PATCH", f"/{sid}", {"host_key_fingerprint": old.host_fingerprint("ed25519")}
        )
        self.assertEqual(code, 200, body)
        code, _ = await self.call("POST", f"/{sid}/reinstall")
        install, step = await connect_step(sid, install["id"])
        self.assertEqual((step["step"], step["status"]), ("connect", "ok"), step)
        self.assertRegex(step["log"], r"\(pinned\)$")
        self.assertIn(old.host_fingerprint("ed25519"), step["log"])
        events = await self.store.list_events(limit=50, kind="server.edit")
        self.assertEqual(
            [e.details.get("host_key_dropped") for e in events if e.details], [None, True, True]
        )
        self.assert_no_secrets()
