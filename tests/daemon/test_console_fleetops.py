"""The console's fleet operations (issue #9), end to end in headless Chromium.

Same harness as test_console.py: a real daemon and real agent processes on loopback,
Debian's Chromium driven by Playwright in a worker thread. Covered here: names and
tags everywhere, the Fleet page's search, status and tag filters (kept in the
address), editing an agent's name and tags, the commands list (filters, paging,
cancelled and timed_out badges, cancelling several after a confirmation), the events
filters and paging, editing a server with every field error at once, bulk actions on
servers with per-server results, the Run page on a tag, its Ansible mode, and the
Deployments picker's select-by-tag. Screenshots land in each test's temp dir.
No timing is asserted here: bench/console_fleet.py measures the Fleet page.
"""

from __future__ import annotations

import re
import socket
from functools import partial
from typing import Any

from tests.daemon.test_cli_deploy import tool_agent
from tests.daemon.test_console import BrowserSession, BrowserTestBase
from tests.support.agent_process import free_port, start_agent

HOST = socket.gethostname()
FINAL = ("success", "failed", "cancelled", "timed_out")


class FleetOpsConsoleTests(BrowserTestBase):
    async def store(self) -> Any:
        assert self.daemon.root is not None
        return self.daemon.root.getServiceNamed("store").store

    async def edit_agent(self, agent_id: int, body: dict[str, Any]) -> None:
        code, reply = await self.api("PATCH", f"/api/agents/{agent_id}", body)
        self.assertEqual(code, 200, reply)

    # -- the fleet: names, tags, search and filters ------------------------------------

    async def test_fleet_names_tags_search_filters_and_agent_edit(self) -> None:
        await self.daemon.start()
        ids = [await self.adopt(await start_agent(self)) for _ in range(3)]
        await self.edit_agent(ids[0], {"name": "web-de-1", "tags": ["de", "edge"]})
        await self.edit_agent(ids[1], {"name": "web-fi-1", "tags": ["fi"]})

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, "#/fleet")
            rows = page.locator("#agents-body tr[data-agent-id]")
            expect(rows).to_have_count(3)
            first = page.locator(f'#agents-body tr[data-agent-id="{ids[0]}"]')
            expect(first.locator(".name")).to_have_text("web-de-1")
            expect(first.locator(".tags .tag")).to_have_text(["de", "edge"])
            # No name given: the host name the agent reports.
            expect(page.locator(f'#agents-body tr[data-agent-id="{ids[2]}"] .name')).to_have_text(
                HOST
            )
            # Search by name, on the server, with the total.
            page.locator("#fleet-search").fill("fi-")
            expect(rows).to_have_count(1)
            expect(rows.first).to_have_attribute("data-agent-id", str(ids[1]))
            expect(page.locator("#fleet-range")).to_have_text("1\u20131 of 1")
            expect(page).to_have_url(re.compile(r"#/fleet\?q=fi-$"))
            page.locator("#fleet-search").fill("")
            expect(rows).to_have_count(3)
            # By tag: and "Run on tag" goes to the Run page with that tag.
            page.locator("#fleet-tag").fill("de")
            expect(rows).to_have_count(1)
            expect(rows.first).to_have_attribute("data-agent-id", str(ids[0]))
            expect(page.locator("#run-tag")).to_have_attribute("href", "#/run?agents=tag:de")
            # A status no agent has: said plainly; the counts follow the filters.
            page.locator("#fleet-status").select_option("offline")
            expect(page.locator("#agents-body td.empty")).to_have_text(
                "No agent matches these filters."
            )
            expect(page.locator('#counts [data-status="online"] .n')).to_have_text("1")
            expect(page.locator('#counts [data-status="all"] .n')).to_have_text("1")
            page.locator("#fleet-clear").click()
            expect(rows).to_have_count(3)
            # A status count is a filter too (and keeps the search).
            page.locator("#fleet-search").fill("web")
            expect(rows).to_have_count(2)
            page.locator('#counts [data-status="online"]').click()
            expect(page.locator("#fleet-status")).to_have_value("online")
            expect(rows).to_have_count(2)
            expect(page).to_have_url(re.compile(r"#/fleet\?q=web&status=online$"))
            b.shot(page, "fleet-filtered.png")
            # The filters come back from the address.
            page.goto(f"{b.base}/#/fleet?q=web&tag=fi")
            page.reload()
            expect(page.locator("#fleet-search")).to_have_value("web")
            expect(page.locator("#fleet-tag")).to_have_value("fi")
            expect(rows).to_have_count(1)

            # The agent page: the name in the heading and the tab title; edit the tags.
            rows.first.locator("td.num a").click()
            expect(page.locator("#page-title")).to_have_text(f"web-fi-1 (agent {ids[1]})")
            expect(page).to_have_title(re.compile(re.escape(f"web-fi-1 (agent {ids[1]})")))
            expect(page.locator("#agent-tags .tag")).to_have_text(["fi"])
            page.locator("#agent-edit-box summary").click()
            expect(page.locator("#agent-name-input")).to_have_value("web-fi-1")
            page.locator("#agent-tags-input").fill("fi, caddy bad!")
            page.locator("#agent-edit-save").click()
            expect(page.locator("#agent-edit .field-error")).to_have_text(
                "Not a valid tag: bad!. A tag is 1-32 letters, digits, '.', '_' or '-'."
            )
            page.locator("#agent-tags-input").fill("fi, caddy")
            page.locator("#agent-name-input").fill("edge-fi-1")
            page.locator("#agent-edit-save").click()
            expect(page.locator("#page-title")).to_have_text(f"edge-fi-1 (agent {ids[1]})")
            expect(page.locator("#agent-tags .tag")).to_have_count(2)
            b.shot(page, "agent-edited.png")

            # The Run page takes the tag from the fleet's link.
            page.goto(f"{b.base}/#/run?agents=tag:caddy")
            expect(page.locator("#target-tag")).to_be_checked()
            expect(page.locator("#run-tag")).to_have_value("caddy")
            expect(page.locator("#run-tag-count")).to_have_text("1 agent has it")
            expect(page.locator("#agent-pick")).to_be_hidden()
            return {}

        await self.browse(scenario)
        code, agent = await self.api("GET", f"/api/agents/{ids[1]}")
        self.assertEqual((agent["name"], sorted(agent["tags"])), ("edge-fi-1", ["caddy", "fi"]))

    # -- the commands list ----------------------------------------------------------------

    async def test_commands_list_filters_paging_badges_and_cancel_many(self) -> None:
        agent_id = await self.started()
        await self.edit_agent(agent_id, {"name": "web-1"})
        store = await self.store()
        statuses = ["success", "failed", "cancelled", "timed_out", "success"]
        for i in range(55):
            await store.create_command(
                agent_id=agent_id,
                kind="command",
                command="echo",
                args=[f"marker-{i}"],
                timeout=None,
                status=statuses[i % 5],
            )
        await store.create_command(
            agent_id=agent_id,
            kind="ansible",
            command="ping.yml",
            args=[],
            timeout=None,
            status="success",
        )
        running = []
        for _ in range(2):
            code, body = await self.api(
                "POST", "/api/commands", {"agents": [agent_id], "shell": "sleep 120"}
            )
            self.assertEqual(code, 201, body)
            running.append(body["commands"][0]["id"])
        for c in running:
            await self.until(
                partial(self.command, c), lambda r: r["status"] == "running", f"command {c} runs"
            )

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page)
            page.locator('nav a[data-nav="commands"]').click()
            rows = page.locator("#commands-body tr[data-command-id]")
            expect(rows).to_have_count(50)
            expect(page.locator("#commands-range")).to_have_text("1\u201350 of 58")
            expect(rows.first.locator(".agent")).to_have_text(f"web-1 (agent {agent_id})")
            page.get_by_role("button", name="Older").click()
            expect(rows).to_have_count(8)
            expect(page.locator("#commands-range")).to_have_text("51\u201358 of 58")
            page.get_by_role("button", name="Newer").click()
            expect(rows).to_have_count(50)
            # cancelled and timed_out: their own badges.
            page.locator("#cmd-status").select_option("cancelled")
            expect(page.locator("#commands-range")).to_have_text("1\u201311 of 11")
            expect(rows.locator(".status .badge.st-cancelled")).to_have_count(11)
            expect(rows.first.locator(".status .badge")).to_have_text("cancelled")
            cancelled_colour = rows.first.locator(".badge").evaluate(
                "e => getComputedStyle(e).color"
            )
            page.locator("#cmd-status").select_option("timed_out")
            expect(page.locator("#commands-range")).to_have_text("1\u201311 of 11")
            expect(rows.first.locator(".status .badge")).to_have_text("timed_out")
            page.locator("#cmd-status").select_option("")
            # Kind, text, agent and time range.
            page.locator("#cmd-kind").select_option("ansible")
            expect(rows).to_have_count(1)
            expect(rows.first.locator(".cmd")).to_have_text("ansible-playbook ping.yml")
            page.locator("#cmd-kind").select_option("")
            page.locator("#cmd-q").fill("marker-7")
            expect(rows).to_have_count(1)
            expect(rows.first.locator(".cmd")).to_have_text("echo marker-7")
            expect(page).to_have_url(re.compile(r"#/commands\?q=marker-7$"))
            page.locator("#cmd-q").fill("")
            expect(page.locator("#cmd-agent option")).to_have_count(2)
            page.locator("#cmd-agent").select_option(str(agent_id))
            expect(page.locator("#commands-range")).to_have_text("1\u201350 of 58")
            page.locator("#cmd-since").fill("2099-01-01T00:00")
            expect(page.locator("#commands-body td.empty")).to_have_text(
                "No command matches these filters."
            )
            page.locator("#cmd-clear").click()
            expect(page.locator("#commands-range")).to_have_text("1\u201350 of 58")
            b.shot(page, "commands.png")

            # Cancel the two running ones: asked first (no is no), then both stop.
            page.locator("#cmd-status").select_option("running")
            expect(rows).to_have_count(2)
            page.locator("#cmd-select-all").check()
            cancel = page.locator("#cancel-selected")
            expect(cancel).to_have_text("Cancel selected (2)")
            cancel.click()
            dialog = page.locator("#confirm")
            expect(dialog).to_be_visible()
            expect(page.locator("#confirm-title")).to_have_text("Cancel 2 commands?")
            expect(page.locator("#confirm-text")).to_contain_text(
                f"command {running[0]} on web-1 (agent {agent_id})"
            )
            b.shot(page, "cancel-confirm.png")
            page.keyboard.press("Escape")
            expect(dialog).to_be_hidden()
            expect(rows).to_have_count(2)
            cancel.click()
            page.locator("#confirm-yes").click()
            expect(rows).to_have_count(0)

            # An unknown id: said once, and no endless wait.
            page.locator("#open-command").fill("999")
            page.locator("#open-form button").click()
            expect(page.locator("#command-error")).to_have_text("There is no command 999.")
            expect(page.locator(".waiting")).to_have_count(0)
            failed_colour = page.evaluate("""() => {
                const b = document.createElement('span');
                b.className = 'badge st-failed';
                document.body.append(b);
                return getComputedStyle(b).color;
            }""")
            return {"cancelled": cancelled_colour, "failed": failed_colour}

        seen = await self.browse(scenario)
        self.assertNotEqual(seen["cancelled"], seen["failed"])
        for c in running:
            final = await self.wait_final(c)
            self.assertIn(final["status"], FINAL)
            self.assertNotEqual(final["status"], "success")
        code, events = await self.api("GET", "/api/events?kind=command.cancel&limit=10")
        self.assertEqual(
            sorted(e["target"] for e in events["events"]), sorted(f"command:{c}" for c in running)
        )

    # -- events --------------------------------------------------------------------------

    async def test_events_filters_paging_and_details(self) -> None:
        agent_id = await self.started()
        await self.edit_agent(agent_id, {"name": "web-1", "tags": ["de"]})
        store = await self.store()
        for i in range(60):
            await store.add_event(
                actor="robot", action="test.filler", target=f"n:{i}", outcome="ok", details={"i": i}
            )

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, "#/events")
            rows = page.locator("#events-body tr[data-event-id]")
            expect(rows).to_have_count(50)
            # By kind: exact, applied with Enter, kept in the address.
            page.locator("#ev-kind").fill("agent.edit")
            page.locator("#ev-kind").press("Enter")
            expect(rows).to_have_count(1)
            edit = rows.first
            expect(edit).to_have_attribute("data-action", "agent.edit")
            expect(edit.locator(".target .target-name")).to_have_text("web-1")
            # What changed, as "old → new" (the agent was named by its host).
            expect(edit.locator("dl.details dt")).to_have_text(["fields", "name", "tags"])
            expect(edit.locator("dl.details dd")).to_have_text(
                ["name, tags", "127.0.0.1 \u2192 web-1", "none \u2192 de"]
            )
            expect(page).to_have_url(re.compile(r"#/events\?kind=agent\.edit$"))
            b.shot(page, "events-kind.png")
            # By target and actor, with paging inside the filter.
            page.locator("#ev-kind").fill("")
            page.locator("#ev-target").fill(f"agent:{agent_id}")
            page.locator("#ev-apply").click()
            expect(rows.first.locator(".target a")).to_have_text(f"agent:{agent_id}")
            expect(page.locator('#events-body tr[data-action="test.filler"]')).to_have_count(0)
            targets = rows.locator(".target a").all_text_contents()
            page.locator("#ev-target").fill("")
            page.locator("#ev-actor").fill("robot")
            page.locator("#ev-apply").click()
            expect(rows.first).to_have_attribute("data-action", "test.filler")
            expect(rows).to_have_count(50)
            page.get_by_role("button", name="Older").click()
            expect(rows).to_have_count(10)
            expect(rows.locator(".actor")).to_have_text(["robot"] * 10)
            page.get_by_role("button", name="Newer").click()
            expect(rows).to_have_count(50)
            page.locator("#ev-actor").fill("nobody")
            page.locator("#ev-apply").click()
            expect(page.locator("#events-body td.empty")).to_have_text(
                "No event matches these filters."
            )
            page.locator("#ev-clear").click()
            expect(rows).to_have_count(50)
            return {"targets": targets}

        seen = await self.browse(scenario)
        self.assertTrue(seen["targets"])
        self.assertEqual(set(seen["targets"]), {f"agent:{agent_id}"})

    # -- servers: edit, bulk actions ----------------------------------------------------

    async def add_server(self, name: str, port: int) -> int:
        code, body = await self.api(
            "POST",
            "/api/servers",
            {
                "name": name,
                "host": "127.0.0.1",
                "ssh_port": port,
                "username": "root",
                "auth": {"password": "not-a-real-password"},
                "start": False,
            },
        )
        self.assertEqual(code, 201, body)
        return int(body["server"]["id"])

    async def test_server_edit_errors_at_once_and_bulk_actions(self) -> None:
        await self.daemon.start()
        closed = free_port()
        sids = [await self.add_server(n, closed) for n in ("edge-1", "edge-2", "edge-3")]

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, f"#/servers/{sids[0]}")
            # The server's name in the heading and the tab title.
            expect(page.locator("#page-title")).to_have_text(f"edge-1 (server {sids[0]})")
            expect(page).to_have_title(re.compile(re.escape(f"edge-1 (server {sids[0]})")))
            page.locator("#srv-edit").click()
            form = page.locator("#edit-form")
            expect(page.locator("#edit-name")).to_have_value("edge-1")
            expect(page.locator("#edit-port")).to_have_value(str(closed))
            expect(page.locator("#edit-auth-keep")).to_be_checked()
            # Everything the page can see, at once.
            page.locator("#edit-name").fill("")
            page.locator("#edit-port").fill("70000")
            page.locator("#edit-tags").fill("de, no/slash")
            page.locator("#edit-submit").click()
            errors = form.locator(".field-error")
            expect(errors).to_have_count(3)
            page_errors = errors.all_text_contents()
            expect(page.locator("#edit-form-error")).to_have_text("3 fields need attention.")
            expect(page.locator("#edit-name")).to_be_focused()
            # What only the daemon finds: both its errors at once, in the form's words.
            page.locator("#edit-name").fill("edge-1b")
            page.locator("#edit-port").fill(str(closed))
            page.locator("#edit-tags").fill("de, edge")
            page.locator("#edit-host").fill("bad_host!")
            page.locator("#edit-pin").fill("SHA256:nope")
            page.locator("#edit-submit").click()
            expect(errors).to_have_count(2)
            api_errors = errors.all_text_contents()
            expect(page.locator("#edit-form-error")).to_have_text("2 fields need attention.")
            b.shot(page, "edit-errors.png")
            page.locator("#edit-host").fill("localhost")
            page.locator("#edit-pin").fill("")
            page.locator("#edit-submit").click()
            expect(page.locator("#server-note")).to_have_text("Saved edge-1b.")
            expect(page.locator("#page-title")).to_have_text(f"edge-1b (server {sids[0]})")
            expect(page.locator("#server-tags .tag")).to_have_text(["de", "edge"])
            expect(page.locator("#edit-card")).to_be_hidden()

            # Bulk: select two, add a tag (asked first), one result per server.
            page.locator('nav a[data-nav="servers"]').click()
            for sid in sids[1:]:
                page.locator(f"#srv-sel-{sid}").check()
            expect(page.locator("#bulk-chosen")).to_have_text("2 selected:")
            page.locator("#bulk-tag").click()  # no tag typed yet
            expect(page.locator("#bulk-tag-error")).to_have_text("Type the tag to add first.")
            page.locator("#bulk-tag-name").fill("bad tag")
            page.locator("#bulk-tag").click()
            expect(page.locator("#bulk-tag-error")).to_have_text(
                "A tag is 1-32 letters, digits, '.', '_' or '-'."
            )
            expect(page.locator("#confirm")).to_be_hidden()
            page.locator("#bulk-tag-name").fill("Caddy")
            page.locator("#bulk-tag").click()
            expect(page.locator("#confirm-title")).to_have_text("Add the tag caddy to 2 servers?")
            expect(page.locator("#confirm-text")).to_contain_text(f"edge-2 (server {sids[1]})")
            page.locator("#confirm-yes").click()
            results = page.locator("#bulk-results-table tbody tr")
            expect(results).to_have_count(2)
            expect(page.locator("#bulk-results-h")).to_have_text("Add tag: 2 of 2 done")
            row = page.locator(f'#servers-body tr[data-server-id="{sids[1]}"]')
            expect(row.locator(".tags .tag")).to_have_text(["caddy"])
            # Reinstall: asked, "no" starts nothing; "yes" starts both.
            page.locator("#bulk-reinstall").click()
            expect(page.locator("#confirm-title")).to_have_text("Reinstall 2 servers?")
            page.keyboard.press("Escape")
            page.locator("#bulk-reinstall").click()
            page.locator("#confirm-yes").click()
            expect(page.locator("#bulk-results-h")).to_have_text("Reinstall: 2 of 2 done")
            expect(results.locator(".result .badge")).to_have_text(["started", "started"])
            # Delete all three: the one whose install may still run says why.
            page.locator("#srv-select-all").check()
            expect(page.locator("#bulk-chosen")).to_have_text("3 selected:")
            page.locator("#bulk-delete").click()
            expect(page.locator("#confirm-title")).to_have_text("Delete 3 servers?")
            b.shot(page, "bulk-confirm.png")
            page.locator("#confirm-yes").click()
            expect(page.locator("#bulk-results-h")).to_contain_text("Delete: ")
            expect(results).to_have_count(3)
            b.shot(page, "bulk-results.png")
            outcome = {
                r.get_attribute("data-server-id"): (
                    r.get_attribute("data-ok"),
                    r.locator(".reason").text_content(),
                )
                for r in results.all()
            }

            # The add form: the daemon's errors all at once too; tags are kept.
            page.goto(f"{b.base}/#/servers")
            page.locator("#add-server").evaluate("d => { d.open = true; }")
            page.locator("#srv-name").fill("edge-4")
            page.locator("#srv-host").fill("bad_host!")
            page.locator("#srv-port").fill(str(closed))
            page.locator("#srv-password").fill("not-a-real-password")
            page.locator("#srv-pin").fill("SHA256:nope")
            page.locator("#srv-tags").fill("fi edge")
            page.locator("#srv-start").uncheck()
            page.locator("#srv-submit").click()
            add_errors = page.locator("#server-form .field-error")
            expect(add_errors).to_have_count(2)
            expect(page.locator("#server-form-error")).to_have_text("2 fields need attention.")
            added_errors = add_errors.all_text_contents()
            page.locator("#srv-host").fill("127.0.0.1")
            page.locator("#srv-pin").fill("")
            page.locator("#srv-submit").click()
            expect(page).to_have_url(re.compile(r"#/servers/\d+$"))
            expect(page.locator("#page-title")).to_have_text(re.compile(r"^edge-4 \(server \d+\)$"))
            expect(page.locator("#server-tags .tag")).to_have_text(["edge", "fi"])
            return {
                "page_errors": page_errors,
                "api_errors": api_errors,
                "outcome": outcome,
                "added_errors": added_errors,
            }

        seen = await self.browse(scenario)
        self.assertEqual(
            seen["page_errors"],
            [
                "Give the server a name.",
                "The SSH port must be a number from 1 to 65535.",
                "Not a valid tag: no/slash. A tag is 1-32 letters, digits, '.', '_' or '-'.",
            ],
        )
        self.assertEqual(len(seen["api_errors"]), 2, seen["api_errors"])
        self.assertEqual(seen["added_errors"][0], "Host must be a host name or an IP address")
        self.assertTrue(seen["added_errors"][1].startswith("Host key fingerprint "), seen)
        self.assertEqual(seen["api_errors"][0], "Host must be a host name or an IP address")
        self.assertTrue(seen["api_errors"][1].startswith("Host key fingerprint "), seen)
        for text in seen["api_errors"]:
            self.assertNotIn("host_key_fingerprint", text)
        # Deleted unless an install of it was still running; never silently.
        for sid, (ok, why) in seen["outcome"].items():
            self.assertIn((ok, why), {("true", ""), ("false", "an install of it is running")}, sid)
        code, body = await self.api("GET", "/api/servers")
        # edge-4 was added after the delete: it has an id of its own, never one of
        # the servers the bulk action named (schema 004).
        edge4 = [s["id"] for s in body["servers"] if s["name"] == "edge-4"]
        self.assertEqual(len(edge4), 1)
        self.assertNotIn(edge4[0], [int(sid) for sid in seen["outcome"]])
        left = {s["id"]: s for s in body["servers"] if s["name"] != "edge-4"}
        for sid, (ok, _why) in seen["outcome"].items():
            self.assertEqual(int(sid) in left, ok == "false")
        if sids[0] in left:
            s = left[sids[0]]
            self.assertEqual(
                (s["name"], s["host"], s["tags"]), ("edge-1b", "localhost", ["de", "edge"])
            )

    # -- the Run page: a tag, Ansible, cancelling several ---------------------------------

    async def test_run_on_tag_ansible_and_cancel_confirmation(self) -> None:
        await self.daemon.start()
        ids = [await self.adopt(await tool_agent(self)) for _ in range(2)]
        other = await self.adopt(await start_agent(self))
        for i, agent_id in enumerate(ids):
            await self.edit_agent(agent_id, {"name": f"de-{i}", "tags": ["de"]})

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, "#/run?agents=tag:de")
            expect(page.locator("#run-tag-count")).to_have_text("2 agents have it")
            page.locator("#run-script").fill("sleep 120")
            with page.expect_request(
                lambda r: r.method == "POST" and r.url.endswith("/api/commands")
            ) as posted:
                page.locator("#run-submit").click()
            sent = posted.value.post_data_json
            bulk = page.locator("#bulk-body tr[data-agent-id]")
            expect(bulk).to_have_count(2)
            expect(page.locator("#bulk-counts")).to_have_text(
                "0 ok \u00b7 0 failed \u00b7 2 running"
            )
            cancel = page.locator("#cancel-running")
            expect(cancel).to_have_text("Cancel running (2)")
            cancel.click()
            expect(page.locator("#confirm-title")).to_have_text("Cancel 2 commands?")
            expect(page.locator("#confirm-text")).to_contain_text("de-0 (agent")
            page.keyboard.press("Escape")
            expect(page.locator("#confirm")).to_be_hidden()
            expect(page.locator("#bulk-counts")).to_contain_text("2 running")
            cancel.click()
            page.locator("#confirm-yes").click()
            expect(page.locator("#bulk-counts")).to_have_text(
                "0 ok \u00b7 2 failed \u00b7 0 running"
            )
            expect(cancel).to_be_hidden()
            badges = bulk.locator(".status .badge").all_text_contents()
            b.shot(page, "run-tag-cancelled.png")

            # A tag nobody has: said at the tag.
            page.goto(f"{b.base}/#/run?agents=tag:nobody")
            page.locator("#run-script").fill("true")
            page.locator("#run-submit").click()
            expect(page.locator(".row:has(#run-tag) .field-error")).to_have_text(
                "No agent has the tag nobody."
            )

            # Ansible: the playbooks of the deployment tool; bad JSON and an unknown
            # playbook in operator words; then ping.yml on the tag.
            page.goto(f"{b.base}/#/run?agents=tag:de")
            page.locator("#runmode-ansible").check()
            expect(page.locator("#run-script")).to_be_hidden()
            expect(page.locator("#run-playbooks-note")).to_contain_text("ping.yml")
            page.locator("#run-playbook").fill("nope.yml")
            page.locator("#run-extra-vars").fill("{nope")
            page.locator("#run-submit").click()
            vars_error = page.locator(".row:has(#run-extra-vars) .field-error")
            expect(vars_error).to_contain_text("The extra vars are not valid JSON")
            page.locator("#run-extra-vars").fill("[1]")
            page.locator("#run-submit").click()
            expect(vars_error).to_have_text(
                'The extra vars must be a JSON object, like {"who": "me"}.'
            )
            page.locator("#run-extra-vars").fill('{"who": "console"}')
            page.locator("#run-submit").click()
            book_error = page.locator(".row:has(#run-playbook) .field-error")
            expect(book_error).to_contain_text(
                'There is no playbook "nope.yml" in the deployment tool. Choose one of: '
            )
            expect(book_error).to_contain_text("ping.yml")
            unknown = book_error.text_content()
            b.shot(page, "ansible-errors.png")
            page.locator("#run-playbook").fill("ping.yml")
            expect(page.locator("#run-argv li")).to_have_text(["ansible-playbook", "ping.yml"])
            page.locator("#run-submit").click()
            expect(bulk).to_have_count(2)
            expect(page.locator("#bulk-counts")).to_have_text(
                "2 ok \u00b7 0 failed \u00b7 0 running"
            )
            links = bulk.locator('a[href^="#/commands/"]')
            hrefs = [links.nth(i).get_attribute("href") for i in range(2)]
            b.shot(page, "ansible-run.png")

            # Check mode: the preview says so, and the runs carry it to the agents.
            page.goto(f"{b.base}/#/run?agents=tag:de")
            page.locator("#runmode-ansible").check()
            page.locator("#run-playbook").fill("ping.yml")
            page.locator("#run-check").check()
            expect(page.locator("#run-argv li")).to_have_text(
                ["ansible-playbook", "--check", "--diff", "ping.yml"]
            )
            page.locator("#run-submit").click()
            # The page may still show the first run's results (same address): wait
            # for the new run's rows before reading them.
            earlier = re.compile("^(" + "|".join(re.escape(str(x)) for x in hrefs) + ")$")
            for i in range(2):
                expect(links.nth(i)).not_to_have_attribute("href", earlier)
            expect(bulk).to_have_count(2)
            expect(page.locator("#bulk-counts")).to_have_text(
                "2 ok \u00b7 0 failed \u00b7 0 running"
            )
            checked = [links.nth(i).get_attribute("href") for i in range(2)]

            # Deployments: select the agents of a tag in the picker.
            page.goto(f"{b.base}/#/deployments")
            page.locator("#dep-agents-some").check()
            page.locator("#dep-tag").fill("de")
            page.locator("#dep-tag-select").click()
            expect(page.locator("#dep-tag-status")).to_have_text(
                "Selected 2 agents with the tag de."
            )
            for agent_id in ids:
                expect(page.locator(f"#pick-{agent_id}")).to_be_checked()
            expect(page.locator(f"#pick-{other}")).not_to_be_checked()
            page.locator("#dep-tag").fill("nobody")
            page.locator("#dep-tag-select").click()
            expect(page.locator("#dep-tag-status")).to_have_text("No agent has the tag nobody.")
            return {
                "sent": sent,
                "badges": badges,
                "unknown": unknown,
                "hrefs": hrefs,
                "checked": checked,
            }

        seen = await self.browse(scenario)
        self.assertEqual(seen["sent"], {"agents": "tag:de", "shell": "sleep 120", "timeout": None})
        for status in seen["badges"]:
            self.assertIn(status, FINAL)
            self.assertNotEqual(status, "success")
        self.assertNotIn("JSON-RPC", seen["unknown"])
        for href in seen["hrefs"]:
            rec = await self.command(int(str(href).rsplit("/", 1)[1]))
            self.assertEqual(
                (rec["kind"], rec["command"], rec["status"]), ("ansible", "ping.yml", "success")
            )
            self.assertIn(rec["agent_id"], ids)
            self.assertEqual((rec["extra"] or {}).get("extra_vars"), {"who": "console"})
            self.assertNotIn("check", rec["extra"] or {})
        self.assertEqual(len(set(seen["checked"]) - set(seen["hrefs"])), 2)
        for href in seen["checked"]:
            rec = await self.command(int(str(href).rsplit("/", 1)[1]))
            self.assertEqual((rec["kind"], rec["status"]), ("ansible", "success"))
            self.assertIs((rec["extra"] or {}).get("check"), True)
