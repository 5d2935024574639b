"""The console as a fleet operator uses it (issue #9), end to end in headless Chromium.

Same harness as test_console.py: a real daemon and real agent processes on loopback,
Debian's Chromium driven by Playwright in a worker thread. Covered here: ANSI colours
in output, agent names wherever an agent appears, the shell mode of the Run page,
multi-agent results (exit code, reason, output, combined view, counts, re-run on
failed), readable install steps and the reinstall note, the disk bar and its label,
every add-server field error at once in the form's words, an unknown command id,
and event details as key/value pairs. Screenshots land in each test's temp dir.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from tests.daemon.daemon_harness import file_size
from tests.daemon.test_console import BrowserSession, BrowserTestBase, new_dir
from tests.support.agent_process import free_port, start_agent

HOST = socket.gethostname()

# Colours, bold, and a sequence cut in two writes (the parser keeps state across reads).
ANSI_SCRIPT = (
    r"printf '\033[31mRED\033[0m plain \033[1;32mBOLD\033[0m\n'; sleep 1; "
    r"printf '\033[3'; sleep 1; printf '4mBLUE\033[0m \033[38;5;208mORANGE\033[0m\n'"
)


class OperatorConsoleTests(BrowserTestBase):
    async def test_colours_names_disk_events_and_unknown_command(self) -> None:
        agent_id = await self.started()
        code, body = await self.api(
            "POST",
            f"/api/agents/{agent_id}/commands",
            {"command": "/bin/sh", "args": ["-c", ANSI_SCRIPT], "timeout": 60},
        )
        self.assertEqual(code, 201, body)
        command_id = body["id"]
        assert self.daemon.root is not None
        store = self.daemon.root.getServiceNamed("store").store
        await store.add_event(
            actor="test",
            action="test.details",
            target=f"agent:{agent_id}",
            outcome="ok",
            details={"step": "upload", "attempt": 2, "nested": {"a": [1, 2]}},
        )

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page)
            # Fleet: the agent's name (the host name it reports; it has no server record).
            row = page.locator(f'#agents-body tr[data-agent-id="{agent_id}"]')
            expect(row.locator(".name")).to_have_text(HOST)
            # The agent page: its name in the heading and the title; disk bar = label.
            row.locator("a").first.click()
            expect(page.locator("#page-title")).to_have_text(f"{HOST} (agent {agent_id})")
            expect(page).to_have_title(re.compile(re.escape(f"{HOST} (agent {agent_id})")))
            disk_text = page.locator("#disk-text")
            expect(disk_text).to_contain_text(" used of ")
            disk = page.evaluate("""() => {
                const m = document.querySelector('#disk-meter');
                return {value: Number(m.value), max: Number(m.max),
                        text: document.querySelector('#disk-text').textContent};
            }""")
            b.shot(page, "agent.png")

            # The command's page: colours rendered, never raw codes; the agent's name.
            page.goto(f"{b.base}/#/commands/{command_id}")
            expect(page.locator("#term-final")).to_contain_text("success (exit code 0)")
            expect(page.locator("#command-agent")).to_have_text(f"{HOST} (agent {agent_id})")
            expect(page.locator("#page-title")).to_have_text(f"Command {command_id} on {HOST}")
            red = page.locator("#term .ansi-red-fg")
            expect(red).to_have_text("RED")
            expect(page.locator("#term .ansi-green-fg.ansi-bold")).to_have_text("BOLD")
            expect(page.locator("#term .ansi-blue-fg")).to_have_text("BLUE")
            colours = page.evaluate("""() => ({
                red: getComputedStyle(document.querySelector('#term .ansi-red-fg')).color,
                plain: getComputedStyle(document.querySelector('#term .stdout')).color,
                orange: Array.from(document.querySelectorAll('#term span'))
                    .filter(s => s.textContent === 'ORANGE').map(s => s.style.color),
            })""")
            streams = self._term_streams(page)
            b.shot(page, "ansi.png")

            # An unknown command: said once, and no endless "waiting for output".
            page.goto(f"{b.base}/#/commands/999999")
            expect(page.locator("#command-error")).to_have_text("There is no command 999999.")
            expect(page.locator("#term")).to_be_hidden()
            expect(page.locator(".waiting")).to_have_count(0)
            unknown_png = b.shot(page, "unknown-command.png")

            # Events: details as key/value pairs, the target agent's name beside it.
            page.locator('nav a[data-nav="events"]').click()
            ev = page.locator('#events-body tr[data-action="test.details"]')
            expect(ev.locator("dl.details dt")).to_have_text(["attempt", "nested", "step"])
            expect(ev.locator("dl.details dd")).to_have_text(["2", '{"a":[1,2]}', "upload"])
            expect(ev.locator(".target .target-name")).to_have_text(HOST)
            b.shot(page, "events-details.png")
            return {
                "disk": disk,
                "colours": colours,
                "streams": streams,
                # Asked once, answered 404, never asked again (checked after the events
                # page, so a poller that kept going would have been seen by then).
                "asked": [url for url, _ in b.requests if "/api/commands/999999" in url],
                "unknown_png": unknown_png,
            }

        seen = await self.browse(scenario)
        # The page shows the text without escape codes, byte for byte.
        self.assertEqual(seen["streams"], {"stdout": "RED plain BOLD\nBLUE ORANGE\n"})
        self.assertNotEqual(seen["colours"]["red"], seen["colours"]["plain"])
        self.assertEqual(seen["colours"]["orange"], ["rgb(255, 135, 0)"])  # 256-colour 208
        stored = await self.read_all(command_id)
        self.assertIn(b"\x1b[31mRED", stored)  # the daemon keeps the raw bytes
        # Disk: the bar's value is the used space, and the words say the same share.
        disk = seen["disk"]
        share = round(disk["value"] / disk["max"] * 100)
        self.assertIn(f"({share}%,", disk["text"])
        self.assertIn("used of", disk["text"])
        self.assertEqual(len(seen["asked"]), 1, seen["asked"])
        self.assertGreater(file_size(seen["unknown_png"]), 5_000)

    async def test_shell_mode_and_multi_agent_results(self) -> None:
        await self.daemon.start()
        ids = [await self.adopt(await start_agent(self)) for _ in range(2)]
        lock = os.path.join(new_dir(self), "lock")
        # The first agent to run it creates the directory; the other fails (exit 4)
        # and removes it, so a re-run on the failed agent succeeds.
        script = (
            f"if mkdir {lock} 2>/dev/null; then echo first; "
            f"else echo second >&2; rmdir {lock}; exit 4; fi"
        )

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, f"#/run?agents={ids[0]}")
            # Shell is the default mode, with the preview of what will run.
            expect(page.locator("#runmode-shell")).to_be_checked()
            expect(page.locator("#run-command")).to_be_hidden()
            page.locator("#run-script").fill("echo a b | tr a-z A-Z")
            expect(page.locator("#run-argv li")).to_have_text(["sh", "-c", "echo a b | tr a-z A-Z"])
            expect(page.locator(f"#pick-{ids[0]} + span")).to_contain_text(HOST)
            with page.expect_request(
                lambda r: r.method == "POST" and r.url.endswith("/api/commands")
            ) as posted:
                page.locator("#run-submit").click()
            sent = posted.value.post_data_json
            expect(page).to_have_url(re.compile(r"#/commands/\d+$"))
            expect(page.locator("#term-final")).to_contain_text("success")
            single = self._term_streams(page)
            single_id = int(page.url.rsplit("/", 1)[1])

            # Several agents: per-agent results, counts, outputs, combined view.
            page.goto(f"{b.base}/#/run?agents={ids[0]},{ids[1]}")
            page.locator("#run-script").fill(script)
            page.locator("#run-submit").click()
            counts = page.locator("#bulk-counts")
            expect(counts).to_have_text("1 ok \u00b7 1 failed \u00b7 0 running")
            failed = page.locator('#bulk-body tr[data-outcome="failed"]')
            ok = page.locator('#bulk-body tr[data-outcome="ok"]')
            expect(failed.locator(".exit")).to_have_text("4")
            expect(ok.locator(".exit")).to_have_text("0")
            failed_agent = int(failed.get_attribute("data-agent-id") or "0")
            expect(failed.locator(".agent")).to_have_text(f"{HOST} (agent {failed_agent})")
            failed.get_by_role("button", name="Output").click()
            expect(page.locator(f"#bulk-out-{failed_agent}")).to_have_text("second")
            combined = page.locator("#bulk-combined")
            combined.locator("summary").click()
            term = page.locator("#bulk-combined-term")
            expect(term).to_contain_text(f"{HOST} (agent {failed_agent}) | second")
            combined_text = term.text_content() or ""
            b.shot(page, "multi-run.png")
            # Re-run on failed: only the failed agent, which now succeeds.
            rerun = page.locator("#rerun-failed")
            expect(rerun).to_have_text("Re-run on failed (1)")
            rerun.click()
            expect(page.locator("#bulk-body tr[data-agent-id]")).to_have_count(1)
            expect(counts).to_have_text("1 ok \u00b7 0 failed \u00b7 0 running")
            expect(page.locator("#bulk-body tr[data-agent-id]")).to_have_attribute(
                "data-agent-id", str(failed_agent)
            )
            expect(rerun).to_be_disabled()
            b.shot(page, "multi-rerun.png")
            return {
                "sent": sent,
                "single": single,
                "single_id": single_id,
                "failed_agent": failed_agent,
                "combined": combined_text,
            }

        seen = await self.browse(scenario)
        self.assertEqual(seen["single"], {"stdout": "A B\n"})
        self.assertEqual(
            seen["sent"], {"agents": [ids[0]], "shell": "echo a b | tr a-z A-Z", "timeout": None}
        )
        rec = await self.command(seen["single_id"])
        # Sent as the API's `shell` field (the daemon runs it as sh -c), not as an argv.
        self.assertEqual((rec["command"], rec["args"]), ("sh", ["-c", "echo a b | tr a-z A-Z"]))
        ok_agent = [i for i in ids if i != seen["failed_agent"]][0]
        lines = seen["combined"].splitlines()
        self.assertEqual(
            sorted(lines),
            sorted(
                [
                    f"{HOST} (agent {ok_agent}) | first",
                    f"{HOST} (agent {seen['failed_agent']}) | second",
                ]
            ),
        )
        # Three runs on the failed agent's side: the single run was on ids[0] only.
        code, events = await self.api("GET", "/api/events?limit=100")
        creates = [e for e in events["events"] if e["action"] == "command.create"]
        self.assertEqual(len(creates), 1 + 2 + 1)

    async def test_server_form_errors_step_labels_and_reinstall_note(self) -> None:
        await self.daemon.start()
        code, body = await self.api("GET", "/api/servers")
        self.assertEqual((code, body), (200, {"servers": []}), "server management is on")
        closed_port = free_port()

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, "#/servers")
            expect(page.locator("#server-form")).to_be_visible()
            # Everything wrong at once: no name, no host, a bad port, no password.
            page.locator("#srv-port").fill("70000")
            page.locator("#srv-submit").click()
            errors = page.locator("#server-form .field-error")
            expect(errors).to_have_count(4)
            texts = errors.all_text_contents()
            expect(page.locator("#server-form-error")).to_have_text("4 fields need attention.")
            expect(page.locator("#srv-name")).to_be_focused()
            b.shot(page, "form-errors.png")
            # An error only the daemon finds, in the form's words (not "host must ...").
            page.locator("#srv-name").fill("web-1")
            page.locator("#srv-host").fill("bad_host!")
            page.locator("#srv-port").fill(str(closed_port))
            page.locator("#srv-password").fill("not-a-real-password")
            page.locator("#srv-submit").click()
            host_error = page.locator(".row:has(#srv-host) .field-error")
            expect(host_error).to_have_text("Host must be a host name or an IP address")
            expect(errors).to_have_count(1)
            page.locator("#srv-host").fill("127.0.0.1")
            page.locator("#srv-submit").click()
            expect(page).to_have_url(re.compile(r"#/servers/\d+$"))
            server_id = int(page.url.rsplit("/", 1)[1])
            expect(page.locator("#page-title")).to_have_text(f"web-1 (server {server_id})")
            step = page.locator('#install-steps tr[data-step="connect"]')
            expect(step).to_have_attribute("data-status", "failed")
            expect(step.locator(".step")).to_have_text("Connect over SSH connect")
            expect(step.locator(".step code")).to_have_text("connect")
            # The reinstall note goes away once that install has ended.
            page.locator("#srv-reinstall").click()
            page.locator("#confirm-yes").click()
            note = page.locator("#server-note")
            expect(note).to_have_text("Reinstall started.")
            expect(page.locator("#install > p").first).to_have_text(
                re.compile(r"^reinstall #\d+ failed started .*, finished ")
            )
            expect(note).to_be_hidden()
            b.shot(page, "server-steps.png")
            return {"texts": texts}

        seen = await self.browse(scenario)
        self.assertEqual(
            seen["texts"],
            [
                "Give the server a name.",
                "Give the host's IP address or name.",
                "The SSH port must be a number from 1 to 65535.",
                "Enter the SSH password.",
            ],
        )
