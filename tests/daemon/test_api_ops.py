# -*- test-case-name: tests.daemon.test_api_ops -*-
"""Issue #9 routes over the real store: names, tags and search, the commands list,
shell runs and tag targets, playbooks on many agents, event filters, editing
servers and agents, bulk server actions."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads

from myxd.api import AdminAPI
from myxd.api.servers import ServersAPI
from myxd.config import Settings
from myxd.install.installer import InstallInProgress
from tests.daemon.api_helpers import TOKEN
from tests.daemon.test_api import FP, APITestBase


class Installer:
    """Stands in for the SSH installer: records what the routes start."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.started: list[tuple[int, str]] = []
        self.busy: set[int] = set()

    def is_running(self, server_id: int) -> bool:
        return server_id in self.busy

    def start(self, server_id: int, kind: str, *, actor: str = "api") -> Deferred[int]:
        if server_id in self.busy:
            raise InstallInProgress("busy")
        self.started.append((server_id, kind))
        return succeed(len(self.started))

    async def delete_server(self, server_id: int, *, actor: str = "installer") -> bool:
        self.deleted_by = actor
        return bool(await self.store.delete_server(server_id))


class Playbooks:
    def playbook_names(self) -> list[str]:
        return ["b.yml", "a.yml"]


class OpsAPITests(APITestBase):
    async def _setup(self) -> None:
        await super()._setup()
        self.installer = Installer(self.store)
        servers = ServersAPI(self.store, self.installer, reactor=IReactorThreads(reactor))
        self.api = AdminAPI(
            self.store,
            self.queue,  # type: ignore[arg-type]
            self.rpc,  # type: ignore[arg-type]
            Settings(),
            self.clock,
            metrics=self.metrics,
            admin_token=TOKEN,
            servers_api=servers,
        )
        self.api._deployments_api = Playbooks()  # type: ignore[assignment]
        self.stub = StubTreq(self.api.resource())

    async def server(self, name: str, host: str = "10.0.0.1", **kw: Any) -> int:
        return int(
            await self.store.add_server(
                name=name,
                host=host,
                ssh_port=22,
                username="root",
                auth={"password": "pw-secret"},
                sudo={"mode": "none", "password": None},
                **kw,
            )
        )

    async def server_rec(self, server_id: int) -> Any:
        rec = await self.store.get_server(server_id)
        assert rec is not None
        return rec

    async def linked_agent(self, port: int, server_id: int | None, fp: str = FP) -> int:
        return int(
            await self.store.add_agent(
                host="127.0.0.1",
                rpc_port=port,
                rpc_path="p" * 16,
                token="agent-token-secret",
                secret_key="agent-secret-key",
                cert_fingerprint=fp,
                status="online" if fp else "installing",
                server_id=server_id,
            )
        )

    async def test_agent_list_names_tags_search_no_phantoms(self) -> None:
        s1 = await self.server("berlin-1")
        s2 = await self.server("typo", host="10.0.0.2")
        a1 = await self.linked_agent(23001, s1)
        await self.linked_agent(23002, s2, fp="")  # its install never finished
        a3 = await self.add_agent(23003)
        response, body = await self.request("PATCH", f"/api/servers/{s1}", body={"tags": ["DE"]})
        self.assertEqual((response.code, body["tags"]), (200, ["de"]), body)
        response, body = await self.request("GET", "/api/agents")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            [(a["id"], a["name"]) for a in body["agents"]], [(a1, "berlin-1"), (a3, "127.0.0.1")]
        )
        self.assertEqual(body["total"], 2)
        _, body = await self.request("GET", "/api/agents?q=BERL")
        self.assertEqual(([a["id"] for a in body["agents"]], body["total"]), ([a1], 1))
        _, body = await self.request("GET", "/api/agents?tag=de")
        self.assertEqual([(a["id"], a["tags"]) for a in body["agents"]], [(a1, ["de"])])
        response, body = await self.request("GET", "/api/agents?tag=no%20spaces")
        self.assertEqual((response.code, body["field"]), (400, "tag"))
        response, body = await self.request(
            "PATCH", f"/api/agents/{a3}", body={"name": "edge", "tags": ["caddy", "x"]}
        )
        self.assertEqual((response.code, body["name"], body["tags"]), (200, "edge", ["caddy", "x"]))
        response, body = await self.request("PATCH", f"/api/agents/{a3}", body={})
        self.assertEqual(response.code, 400)
        response, body = await self.request("PATCH", "/api/agents/999", body={"name": "x"})
        self.assertEqual(response.code, 404)

    async def test_commands_list_shell_and_tag_targets(self) -> None:
        a1 = await self.add_agent(23011)
        a2 = await self.add_agent(23012)
        await self.store.update_agent(a2, tags=["de"])
        response, body = await self.request(
            "POST", "/api/commands", body={"agents": "tag:DE", "shell": "uname -a | grep x"}
        )
        self.assertEqual(response.code, 201, body)
        self.assertEqual([c["agent_id"] for c in body["commands"]], [a2])
        self.assertEqual(
            (self.queue.added[-1]["command"], self.queue.added[-1]["args"]),
            ("sh", ["-c", "uname -a | grep x"]),
        )
        response, body = await self.request(
            "POST", "/api/commands", body={"agents": "all", "command": "id"}
        )
        self.assertEqual([c["agent_id"] for c in body["commands"]], [a1, a2])
        for bad, field in (
            ({"agents": "all"}, "command"),
            ({"agents": "all", "command": "id", "shell": "id"}, "command"),
            ({"agents": "all", "shell": "id", "args": ["x"]}, "args"),
            ({"agents": "tag:", "shell": "id"}, "agents"),
        ):
            response, body = await self.request("POST", "/api/commands", body=bad)
            self.assertEqual((response.code, body.get("field")), (400, field), bad)
        response, body = await self.request(
            "POST", "/api/commands", body={"agents": "tag:nobody", "shell": "id"}
        )
        self.assertEqual(response.code, 404)
        self.assertIn("nobody", body["error"])
        first = (await self.store.list_commands(limit=10))[-1]
        await self.store.update_command(first.id, status="cancelled", reason="cancelled")
        response, body = await self.request("GET", "/api/commands?status=cancelled")
        self.assertEqual(response.code, 200)
        self.assertEqual([c["id"] for c in body["commands"]], [first.id])
        self.assertEqual((body["commands"][0]["final"], body["total"]), (True, 1))
        self.assertEqual(body["commands"][0]["agent_name"], "127.0.0.1")
        _, body = await self.request("GET", f"/api/commands?agent_id={a1}&q=id")
        self.assertEqual((body["total"], body["commands"][0]["command"]), (1, "id"))
        _, body = await self.request("GET", "/api/commands?q=grep")
        self.assertEqual(body["total"], 1)
        response, body = await self.request("GET", "/api/commands?status=bogus")
        self.assertEqual((response.code, body["field"]), (400, "status"))
        response, body = await self.request("GET", "/api/commands/999")
        self.assertEqual((response.code, body["error"]), (404, "There is no command 999."))

    async def test_ansible_on_many_agents(self) -> None:
        a1 = await self.add_agent(23021)
        response, body = await self.request(
            "POST", "/api/ansible", body={"agents": "all", "playbook": "nope.yml"}
        )
        self.assertEqual(response.code, 422)
        self.assertEqual(
            (body["error"], body["field"]),
            (
                "playbook 'nope.yml' is not in the deployment tool (available: a.yml, b.yml)",
                "playbook",
            ),
        )
        self.assertEqual(self.queue.added, [])
        response, body = await self.request(
            "POST",
            "/api/ansible",
            body={"agents": [a1], "playbook": "a.yml", "extra_vars": {"x": 1}},
        )
        self.assertEqual(response.code, 201, body)
        self.assertEqual(self.queue.added[-1]["extra_vars"], {"x": 1})

    async def test_event_filters(self) -> None:
        await self.store.add_event(actor="a", action="k1", target="agent:1", outcome="ok")
        await self.store.add_event(actor="b", action="k2", target="agent:1", outcome="ok")
        await self.store.add_event(actor="b", action="k1", target="agent:2", outcome="ok")
        _, body = await self.request("GET", "/api/events?kind=k1")
        self.assertEqual([e["target"] for e in body["events"]], ["agent:2", "agent:1"])
        _, body = await self.request("GET", "/api/events?target=agent:1&actor=b")
        self.assertEqual([e["action"] for e in body["events"]], ["k2"])

    async def test_edit_server(self) -> None:
        sid = await self.server("web")
        await self.store.update_server(sid, host_key="ssh-ed25519 AAAA")
        response, body = await self.request(
            "PATCH", f"/api/servers/{sid}", body={"name": "web-2", "ssh_port": 2222}
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual((body["name"], body["ssh_port"], body["host_key"]), ("web-2", 2222, None))
        response, body = await self.request(
            "PATCH", f"/api/servers/{sid}", body={"ssh_port": 70000, "host": "bad host", "name": ""}
        )
        self.assertEqual(response.code, 400)
        self.assertEqual({e["field"] for e in body["errors"]}, {"ssh_port", "host", "name"})
        self.assertEqual((await self.server_rec(sid)).ssh_port, 2222)
        response, body = await self.request("PATCH", f"/api/servers/{sid}", body={})
        self.assertEqual(response.code, 400)
        response, body = await self.request(
            "PATCH", f"/api/servers/{sid}", body={"auth": {"password": "new-pw"}, "sudo": "sudo"}
        )
        self.assertEqual((response.code, body["sudo"]["mode"]), (200, "sudo"))
        self.assertNotIn("new-pw", str(body))
        self.assertEqual((await self.server_rec(sid)).auth, {"password": "new-pw"})
        self.installer.busy.add(sid)
        response, body = await self.request("PATCH", f"/api/servers/{sid}", body={"name": "x"})
        self.assertEqual(response.code, 409)
        response, body = await self.request("PATCH", "/api/servers/999", body={"name": "x"})
        self.assertEqual(response.code, 404)

    async def test_bulk_server_actions(self) -> None:
        s1 = await self.server("a")
        s2 = await self.server("b")
        response, body = await self.request(
            "POST", "/api/servers/bulk", body={"action": "tag", "ids": [s1, s2, 999], "tag": "Edge"}
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(
            body["results"],
            [
                {"id": s1, "ok": True, "error": None},
                {"id": s2, "ok": True, "error": None},
                {"id": 999, "ok": False, "error": "no server 999"},
            ],
        )
        _, body = await self.request("GET", "/api/servers?tag=edge")
        self.assertEqual([s["id"] for s in body["servers"]], [s1, s2])
        await self.request(
            "POST", "/api/servers/bulk", body={"action": "untag", "ids": [s1], "tag": "edge"}
        )
        _, body = await self.request("GET", "/api/servers?tag=edge")
        self.assertEqual([s["id"] for s in body["servers"]], [s2])
        _, body = await self.request("GET", "/api/servers?q=B")
        self.assertEqual([s["id"] for s in body["servers"]], [s2])
        response, body = await self.request(
            "POST", "/api/servers/bulk", body={"action": "tag", "ids": [s1]}
        )
        self.assertEqual((response.code, body["field"]), (400, "tag"))
        self.installer.busy.add(s2)
        _, body = await self.request(
            "POST", "/api/servers/bulk", body={"action": "reinstall", "ids": [s1, s2]}
        )
        self.assertEqual([r["ok"] for r in body["results"]], [True, False])
        self.assertEqual(self.installer.started, [(s1, "reinstall")])
        self.installer.busy.clear()
        _, body = await self.request(
            "POST", "/api/servers/bulk", body={"action": "delete", "ids": [s1]}
        )
        self.assertEqual(body["results"], [{"id": s1, "ok": True, "error": None}])
        self.assertIsNone(await self.store.get_server(s1))

    async def test_edits_are_audited_as_the_admin_with_what_changed(self) -> None:
        """Issue #9: PATCH of an agent or a server records the admin as the actor and
        what changed, from and to; never a password, key or passphrase."""
        sid = await self.server("web")
        await self.store.update_server(sid, host_key="ssh-ed25519 AAAA", tags=["a"])
        response, body = await self.request(
            "PATCH",
            f"/api/servers/{sid}",
            body={
                "name": "web-2",
                "ssh_port": 2222,
                "username": "root",  # unchanged: not listed as a change
                "tags": ["b", "a"],
                "auth": {"password": "new-secret-pw"},
                "sudo": {"mode": "sudo", "password": "sudo-secret-pw"},
            },
        )
        self.assertEqual(response.code, 200, body)
        (event,) = await self.store.list_events(limit=10, kind="server.edit")
        self.assertEqual(
            (event.actor, event.target, event.outcome), ("admin-api", f"server:{sid}", "ok")
        )
        self.assertEqual(
            event.details,
            {
                "fields": ["auth", "name", "ssh_port", "sudo", "tags", "username"],
                "name": {"from": "web", "to": "web-2"},
                "ssh_port": {"from": 22, "to": 2222},
                "tags": {"from": ["a"], "to": ["a", "b"]},
                "auth": {"from": "password", "to": "password"},
                "sudo": {"from": "none", "to": "sudo", "password_set": True},
                "host_key_dropped": True,
            },
        )
        a1 = await self.add_agent(23031)
        response, body = await self.request(
            "PATCH", f"/api/agents/{a1}", body={"name": "edge", "tags": ["de"]}
        )
        self.assertEqual(response.code, 200, body)
        (event,) = await self.store.list_events(limit=10, kind="agent.edit")
        self.assertEqual((event.actor, event.target), ("admin-api", f"agent:{a1}"))
        self.assertEqual(
            event.details,
            {
                "fields": ["name", "tags"],
                "name": {"from": "127.0.0.1", "to": "edge"},
                "tags": {"from": [], "to": ["de"]},
            },
        )
        everything = json.dumps(
            [(e.actor, e.details) for e in await self.store.list_events(limit=100)]
        )
        for secret in ("new-secret-pw", "sudo-secret-pw", "pw-secret", "agent-token"):
            self.assertNotIn(secret, everything)

    async def test_bulk_actions_are_audited_as_the_admin(self) -> None:
        s1 = await self.server("a")
        s2 = await self.server("b")
        await self.request(
            "POST", "/api/servers/bulk", body={"action": "tag", "ids": [s1, 999], "tag": "de"}
        )
        events = await self.store.list_events(limit=10, kind="server.bulk")
        self.assertEqual(
            [(e.actor, e.target, e.outcome, e.details) for e in events],
            [
                (
                    "admin-api",
                    "server:999",
                    "refused",
                    {"action": "tag", "tag": "de", "error": "no server 999"},
                ),
                (
                    "admin-api",
                    f"server:{s1}",
                    "ok",
                    {"action": "tag", "tag": "de", "tags": {"from": [], "to": ["de"]}},
                ),
            ],
        )
        await self.request("POST", "/api/servers/bulk", body={"action": "delete", "ids": [s2]})
        self.assertEqual(self.installer.deleted_by, "admin-api")
        (event,) = await self.store.list_events(limit=1, kind="server.bulk")
        self.assertEqual((event.actor, event.details), ("admin-api", {"action": "delete"}))
