"""The console's Deployments page, deployment view and Fleet service columns (issue #8
§4), end to end in headless Chromium against a real daemon and real agent processes
that run the deployment tool's ping.yml with real ansible-playbook. Screenshots land in
the test's temp dir."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from tests.daemon.daemon_harness import read_bytes
from tests.daemon.test_cli_deploy import seed_xray_drift, tool_agent, write_bytes
from tests.daemon.test_console import BrowserSession, BrowserTestBase

UPLOAD_BYTES = 24 * 1024 * 1024 + 5


class DeployConsoleTests(BrowserTestBase):
    async def test_upload_deploy_live_log_and_fleet_drift(self) -> None:
        await self.daemon.start()
        ids = [await self.adopt(await tool_agent(self)) for _ in range(2)]
        archive = os.path.join(self.temp_dir(), "Xray-linux-64.zip")
        write_bytes(archive, os.urandom(UPLOAD_BYTES))
        sha = hashlib.sha256(read_bytes(archive)).hexdigest()

        def deploy(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, "#/deployments")
            expect(page.locator("#page-title")).to_have_text("Deployments")
            # Upload with a progress bar: record every value the bar shows.
            page.evaluate("""() => {
                window.seenProgress = [];
                const bar = document.querySelector('#upload-progress');
                new MutationObserver(() => window.seenProgress.push(Number(bar.value)))
                    .observe(bar, {attributes: true});
            }""")
            page.set_input_files("#artifact-file", archive)
            page.locator("#artifact-upload").click()
            expect(page.locator("#upload-status")).to_contain_text("Stored Xray-linux-64.zip")
            expect(page.locator(f'#artifacts-body tr[data-id="{sha}"]')).to_contain_text("24.0 MiB")
            progress = page.evaluate("() => window.seenProgress")
            # The Xray form offers the stored archive.
            page.locator("#dep-playbook").select_option("deploy_xray.yml")
            expect(page.locator("#var-xray_archive_path option")).to_have_count(2)
            b.shot(page, "deployments-upload.png")

            # A bad JSON var is caught on the page, before any request.
            page.locator("#dep-playbook").select_option("ping.yml")
            expect(page.locator("#vars-mode-json")).to_be_checked()
            page.locator("#dep-vars-json").fill("{nope")
            page.locator("#dep-submit").click()
            expect(page.locator(".field-error")).to_have_text("This is not valid JSON.")
            # An unknown artifact id: the API's 400 shown at the field it names.
            page.locator("#dep-vars-json").fill('{"who": "console"}')
            page.locator("#dep-artifacts-json").fill('{"x": "' + "a" * 64 + '"}')
            page.locator("#dep-submit").click()
            expect(page.locator(".field-error")).to_contain_text("artifact")
            page.locator("#dep-artifacts-json").fill("")

            # Chosen agents, through the filter.
            page.locator("#dep-agents-some").check()
            page.locator("#agent-filter").fill(f"agent {ids[1]})")
            expect(page.locator(f"#pick-{ids[0]}")).to_be_hidden()
            page.locator(f"#pick-{ids[1]}").check()
            page.locator("#agent-filter").fill("")
            page.locator(f"#pick-{ids[0]}").check()
            page.locator("#dep-submit").click()
            expect(page).to_have_url(re.compile(r"#/deployments/\d+$"))
            rows = page.locator("#targets-body tr")
            expect(rows).to_have_count(2)
            for i in range(2):
                expect(rows.nth(i).locator(".status .badge")).to_have_text("success")
                expect(rows.nth(i).locator(".ok")).to_have_text("2")
                expect(rows.nth(i).locator(".failed")).to_have_text("0")
            expect(page.locator("#deployment-status .badge")).to_have_text("success")
            expect(page.locator("#dep-summary")).to_have_text("2 success")
            expect(page.locator("#dep-cancel")).to_be_hidden()
            b.shot(page, "deployment.png")
            dep_url = page.url

            # A row opens that agent's live log.
            rows.nth(0).locator(".log a").click()
            expect(page.locator("#term-final")).to_contain_text("success")
            expect(page.locator("#term")).to_contain_text("PLAY RECAP")
            b.shot(page, "deployment-log.png")
            return {"progress": progress, "dep_url": dep_url}

        seen = await self.browse(deploy)
        self.assertTrue(seen["progress"], "the progress bar never moved")
        self.assertEqual(seen["progress"][-1], 100)
        self.assertEqual(seen["progress"], sorted(seen["progress"]))
        self.assertEqual(
            read_bytes(os.path.join(self.data_dir, "artifacts", sha)), read_bytes(archive)
        )
        dep_id = int(seen["dep_url"].rsplit("/", 1)[1])
        code, dep = await self.api("GET", f"/api/deployments/{dep_id}")
        self.assertEqual(
            (dep["status"], dep["playbook"], dep["var_names"]), ("success", "ping.yml", ["who"])
        )
        self.assertEqual(sorted(t["agent_id"] for t in dep["targets"]), sorted(ids))

        await seed_xray_drift(self.daemon, ids[0], ids[1])

        def fleet(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, "#/fleet")
            headers = page.locator("#agents thead th")
            expect(headers.nth(7)).to_have_text("Xray")
            expect(headers.nth(8)).to_have_text("Caddy")
            good = page.locator(f'#agents-body tr[data-agent-id="{ids[0]}"]')
            bad = page.locator(f'#agents-body tr[data-agent-id="{ids[1]}"]')
            expect(good.locator(".svc-xray")).to_have_text("25.1.1")
            expect(bad.locator(".svc-xray")).to_have_text("24.12.0drift")
            expect(good.locator(".svc-xray .badge")).to_have_count(0)
            expect(bad.locator(".svc-caddy")).to_have_text("\u2014")
            b.shot(page, "fleet-drift.png")
            return {"title": bad.locator(".svc-xray .badge").get_attribute("title")}

        seen = await self.browse(fleet)
        self.assertEqual(
            seen["title"],
            "version 24.12.0, expected 25.1.1; config changed since the last deployment",
        )
