"""The web console, end to end in a real browser.

A real daemon (tap.makeService on a temp data dir, its API on 127.0.0.1:0) runs on
the reactor with a real myx_agent process adopted through the API, and Debian's
headless Chromium, driven by Playwright's sync API, uses the console like an
operator would. The browser part runs in a worker thread (deferToThread):
Playwright's sync API must never run on the reactor thread, which keeps serving the
daemon meanwhile. Screenshots land in each test's temp dir.

No Chromium is a failure with a clear message, never a skip: CI installs it
(.ci/run). The static routes' headers, their place behind (or before) the token
gate, and that a regular ``pip install .`` ships the files are checked without a
browser.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.threads import deferToThread

from myxd.api.console import ASSETS, MODULES, PUBLIC_PATHS, Console
from tests.daemon.api_helpers import TOKEN
from tests.daemon.daemon_harness import DaemonTestCase, file_size, read_bytes
from tests.daemon.test_api import APITestBase
from tests.support.agent_process import free_port, start_agent

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: Any = {"width": 1280, "height": 800}
UI_WAIT_MS = 90_000  # generous: other test runs share this 2-core machine
STATIC_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "myxd",
    "api",
    "static",
)
CSP = "default-src 'self'"


def new_dir(test: Any) -> str:
    path = os.path.abspath(test.mktemp())
    os.makedirs(path)
    return path


def header(response: Any, name: bytes) -> str:
    values = response.headers.getRawHeaders(name) or [b""]
    return str(values[0].decode("latin-1"))


# -- the static routes, without a browser ------------------------------------------


class ConsoleRouteTests(APITestBase):
    async def test_page_is_public_with_strict_headers(self) -> None:
        response, body = await self.request("GET", "/", auth=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"content-type"), "text/html; charset=utf-8")
        self.assertTrue(header(response, b"content-security-policy").startswith(CSP))
        self.assertIn("frame-ancestors 'none'", header(response, b"content-security-policy"))
        self.assertEqual(header(response, b"x-content-type-options"), "nosniff")
        self.assertEqual(header(response, b"cache-control"), "no-cache")
        self.assertEqual(body, read_bytes(os.path.join(STATIC_DIR, "index.html")))
        # Everything the page loads comes from this origin, relative to "/".
        text = body.decode("utf-8")
        self.assertIn('<script type="module" src="console/app.js"></script>', text)
        self.assertIn('href="console/app.css"', text)
        self.assertNotRegex(text, r"(?i)(https?:)?//")
        self.assertNotRegex(text, r"(?i)<script>|\son[a-z]+=|style=")  # CSP: nothing inline

    async def test_assets_types_and_revalidation(self) -> None:
        for name, ctype in ASSETS.items():
            if name == "index.html":
                continue
            response, body = await self.request("GET", f"/console/{name}", auth=False)
            self.assertEqual(response.code, 200, name)
            self.assertEqual(header(response, b"content-type"), ctype)
            self.assertEqual(header(response, b"x-content-type-options"), "nosniff")
            etag = header(response, b"etag")
            self.assertRegex(etag, r'^"[0-9a-f]{32}"$')
            if name != "icon.svg":
                self.assertEqual(body, read_bytes(os.path.join(STATIC_DIR, name)))
                self.assertEqual(etag, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
            again, body = await self.request(
                "GET", f"/console/{name}", auth=False, headers={b"If-None-Match": [etag.encode()]}
            )
            self.assertEqual((again.code, body), (304, b""), name)
            other, _ = await self.request(
                "GET", f"/console/{name}", auth=False, headers={b"If-None-Match": [b'"0000"']}
            )
            self.assertEqual(other.code, 200)
        response, body = await self.request("HEAD", "/console/app.js", auth=False)
        self.assertEqual((response.code, body), (200, b""))
        # Module scripts are refused by the browser unless served as JavaScript.
        response, _ = await self.request("GET", "/console/views/fleet.js", auth=False)
        self.assertEqual(header(response, b"content-type"), "text/javascript; charset=utf-8")

    async def test_only_the_allowlist_is_public(self) -> None:
        self.assertEqual(
            set(PUBLIC_PATHS),
            {b"/", b"/console/app.css", b"/console/icon.svg"}
            | {f"/console/{m}".encode() for m in MODULES},
        )
        self.assertIn(b"/console/app.js", PUBLIC_PATHS)
        self.assertIn(b"/console/views/fleet.js", PUBLIC_PATHS)
        for path in (
            "/console/",
            "/console/nope.js",
            "/console/views/",
            "/console/views/nope.js",
            "/console/views/../app.js",
            "/console/views/..%2F..%2Fconsole.py",
            "/console/index.html",
            "/console/a/b",
            "/console/..%2Fapp.py",
            "/index.html",
            "/api/agents",
            "/api/events",
            "/metrics",
            "/api/servers",
        ):
            response, body = await self.request("GET", path, auth=False)
            self.assertEqual(
                (response.code, body), (401, {"error": "missing or wrong admin token"}), path
            )
        # Public means GET/HEAD only.
        response, _ = await self.request("POST", "/", auth=False, body={})
        self.assertEqual(response.code, 401)
        response, body = await self.request("POST", "/", body={})
        self.assertEqual((response.code, body), (405, {"error": "method not allowed"}))
        # With the token, an unknown asset is a plain 404 and nothing else is served.
        for path in (
            "/console/nope.js",
            "/console/a/b",
            "/console/..%2Fapp.py",
            "/console/views/..%2F..%2Fconsole.py",
            "/console/static/app.js",
        ):
            response, body = await self.request("GET", path)
            self.assertEqual((response.code, body), (404, {"error": "not found"}), path)
        response, body = await self.request("GET", "/console/index.html")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.rpc.calls, [])

    def test_console_reads_only_its_own_files(self) -> None:
        console = Console()
        self.assertEqual(set(console._assets), set(ASSETS))
        for name in ("index.html", "app.css", *MODULES):
            self.assertEqual(console._assets[name].body, read_bytes(os.path.join(STATIC_DIR, name)))
        # The page must not keep the token anywhere but sessionStorage, nor in URLs,
        # and must never parse data as HTML. (Vendored code is checked by its own test.)
        own = [m for m in MODULES if not m.startswith("vendor/")]
        js = "\n".join(read_bytes(os.path.join(STATIC_DIR, m)).decode("utf-8") for m in own)
        for banned in (
            "localStorage",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "EventSource",
            "eval(",
            "new Function",
        ):
            self.assertFalse(banned in js, f"the console uses {banned}")

    def test_vendored_code_is_unmodified_with_its_licence(self) -> None:
        readme = read_bytes(os.path.join(STATIC_DIR, "vendor", "README.md")).decode()
        for name in [m for m in MODULES if m.startswith("vendor/")]:
            base = os.path.basename(name)
            digest = hashlib.sha256(read_bytes(os.path.join(STATIC_DIR, name))).hexdigest()
            self.assertIn(f"`{base}` sha256: `{digest}`", readme, name)
            licence = os.path.join(STATIC_DIR, "vendor", base.replace(".js", ".LICENSE"))
            self.assertIn(b"Permission is hereby granted", read_bytes(licence))

    def test_modules_are_all_listed_and_import_no_cycle(self) -> None:
        """Every .js file under static/ is served, every import names a served module,
        and the import graph has no cycle (the architecture reads top-down)."""
        on_disk = set()
        for folder, _dirs, files in os.walk(STATIC_DIR):
            for f in files:
                if f.endswith(".js"):
                    on_disk.add(os.path.relpath(os.path.join(folder, f), STATIC_DIR))
        self.assertEqual(on_disk, set(MODULES))
        graph: dict[str, set[str]] = {}
        for m in MODULES:
            text = read_bytes(os.path.join(STATIC_DIR, m)).decode("utf-8")
            targets = re.findall(r'^import\s[^;]*?from\s+"(\.{1,2}/[^"]+)";', text, re.M)
            resolved = {os.path.normpath(os.path.join(os.path.dirname(m), t)) for t in targets}
            self.assertLessEqual(resolved, set(MODULES), m)
            graph[m] = resolved
        self.assertTrue(graph["app.js"])  # the entry module imports the rest
        # Depth-first search for a back edge.
        state: dict[str, int] = {}

        def visit(node: str, path: list[str]) -> None:
            state[node] = 1
            for nxt in sorted(graph[node]):
                if state.get(nxt) == 1:
                    self.fail("import cycle: " + " -> ".join([*path, node, nxt]))
                if nxt not in state:
                    visit(nxt, [*path, node])
            state[node] = 2

        for m in MODULES:
            if m not in state:
                visit(m, [])
        # Everything is reachable from the entry module (nothing is dead weight).
        seen: set[str] = set()
        todo = ["app.js"]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        self.assertEqual(seen, set(MODULES))

    async def test_a_regular_pip_install_ships_the_files(self) -> None:
        from tests.daemon.test_plugin import run
        from tests.support import installed

        root = new_dir(self)
        python = installed.python()  # the wheel, installed in a venv of its own
        out, code = await run(
            [
                python,
                "-c",
                (
                    "import hashlib, myxd.api.console as c\n"
                    "con = c.Console()\n"
                    "print(c.__file__)\n"
                    "for n in sorted(con._assets):\n"
                    "    print(n, hashlib.sha256(con._assets[n].body).hexdigest())\n"
                ),
            ],
            root,
        )
        self.assertEqual(code, 0, out)
        lines = out.strip().splitlines()
        self.assertTrue(lines[0].startswith(installed.venv()), out)
        shipped = dict(line.split(" ") for line in lines[1:])
        for name in ("index.html", "app.css", *MODULES):
            self.assertEqual(
                shipped[name],
                hashlib.sha256(read_bytes(os.path.join(STATIC_DIR, name))).hexdigest(),
                name,
            )

    test_a_regular_pip_install_ships_the_files.timeout = 600  # type: ignore[attr-defined]


# -- the browser ---------------------------------------------------------------------


class BrowserSession:
    """Chromium through Playwright's sync API. Lives in ONE worker thread, never the
    reactor's; collects page errors, CSP reports and every request the pages make."""

    def __init__(self, base: str, shots: str, user_data_dir: str) -> None:
        self.base = base
        self.shots = shots
        self.user_data_dir = user_data_dir
        self.errors: list[str] = []
        self.requests: list[tuple[str, str | None]] = []

    def __enter__(self) -> BrowserSession:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self.context = self._pw.chromium.launch_persistent_context(
                self.user_data_dir,
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport=VIEWPORT,
            )
        except BaseException:
            self._pw.stop()
            raise
        from playwright.sync_api import expect

        self.context.set_default_timeout(UI_WAIT_MS)
        expect.set_options(timeout=UI_WAIT_MS)
        self.context.on("page", self._watch)
        for page in self.context.pages:
            self._watch(page)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.context.close()
        finally:
            self._pw.stop()

    def _watch(self, page: Any) -> None:
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

        def console(msg: Any) -> None:
            # A refused request also logs a console error ("status of 401"); those are
            # expected here. A script error or a CSP violation is not.
            if msg.type == "error" and "status of" not in msg.text:
                self.errors.append(f"console: {msg.text}")

        page.on("console", console)
        page.on("request", lambda r: self.requests.append((r.url, r.headers.get("authorization"))))

    def page(self) -> Any:
        pages = self.context.pages
        return pages[0] if pages else self.context.new_page()

    def shot(self, page: Any, name: str) -> str:
        path = os.path.join(self.shots, name)
        page.screenshot(path=path, full_page=False)
        return path

    def sign_in(self, page: Any, hash_path: str = "") -> None:
        """Open the console (at a hash route) in a tab and sign in with the keyboard."""
        from playwright.sync_api import expect

        page.goto(f"{self.base}/{hash_path}")
        token = page.locator("#token")
        expect(token).to_be_focused(timeout=UI_WAIT_MS)
        token.fill(TOKEN)
        token.press("Enter")
        expect(page.locator("#nav")).to_be_visible(timeout=UI_WAIT_MS)


class BrowserTestBase(DaemonTestCase):
    """A real daemon plus a fresh headless Chromium per scenario (no tests of its own;
    test_console_*.py modules build on it)."""

    timeout = 400

    def setUp(self) -> None:
        super().setUp()
        if not os.access(CHROMIUM, os.X_OK):
            self.fail(
                f"Chromium is not installed at {CHROMIUM}: the console tests need it. "
                "Install Debian's package: apt-get install -y chromium "
                "(.ci/run does this in CI)."
            )
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            self.fail(
                "Playwright is not installed: pip install '.[test]' (it is in the "
                "test extra; the browser itself is Debian's chromium)."
            )
        self.shots = os.path.abspath(self.mktemp())
        os.makedirs(self.shots)

    async def browse(self, scenario: Callable[[BrowserSession], T]) -> T:
        """Run `scenario` with a fresh browser in a worker thread; fail on page errors."""
        profile = tempfile.mkdtemp(prefix="profile-", dir=self.shots)
        session = BrowserSession(self.daemon.base, self.shots, profile)

        def in_thread() -> T:
            with session:
                return scenario(session)

        result = await deferToThread(in_thread)
        self.assertEqual(session.errors, [], "the page logged errors")
        api_calls = [(url, auth) for url, auth in session.requests if "/api/" in url]
        self.assertTrue(api_calls)
        for url, auth in api_calls:
            self.assertNotIn(TOKEN, url)
            self.assertIsNotNone(auth, url)
            self.assertTrue(str(auth).startswith("Bearer "), url)
        for url, _ in session.requests:
            self.assertTrue(url.startswith(self.daemon.base + "/"), url)  # nothing external
        self._session = session
        return result

    async def started(self) -> int:
        await self.daemon.start()
        agent = await start_agent(self)
        return await self.adopt(agent)

    @staticmethod
    def _term_streams(page: Any) -> dict[str, str]:
        """The terminal's text per stream, as the page shows it."""
        pairs = page.evaluate("""() => Array.from(
            document.querySelectorAll('#term span.stdout, #term span.stderr'),
            s => [s.classList.contains('stderr') ? 'stderr' : 'stdout', s.textContent])""")
        out: dict[str, str] = {}
        for stream, text in pairs:
            out[stream] = out.get(stream, "") + text
        return out


class ConsoleBrowserTests(BrowserTestBase):
    # -- sign-in and the fleet ---------------------------------------------------------

    async def test_sign_in_fleet_and_401(self) -> None:
        agent_id = await self.started()

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            page.goto(b.base + "/")
            token = page.locator("#token")
            expect(token).to_be_focused()
            expect(page.locator("#nav")).to_be_hidden()
            # a wrong token: a clear 401 message, and the prompt stays
            token.fill("not-the-admin-token")
            token.press("Enter")
            expect(page.locator("#login-error")).to_contain_text("HTTP 401")
            expect(page.locator("#login-error")).to_contain_text("refused")
            expect(page.locator("#nav")).to_be_hidden()
            stored = page.evaluate("() => sessionStorage.getItem('myx.adminToken')")
            assert stored is None, stored

            # the right one, by keyboard only: the fleet shows the real agent online
            token.fill(TOKEN)
            token.press("Enter")
            row = page.locator(f'#agents-body tr[data-agent-id="{agent_id}"]')
            expect(row.locator(".status .badge")).to_have_text("online")
            expect(row.locator(".host")).to_have_text("127.0.0.1")
            expect(row.locator(".heartbeat")).to_have_text(re.compile(r"^(just now|\d+s ago)$"))
            expect(page.locator('#counts [data-status="online"] .n')).to_have_text("1")
            expect(page.locator('#counts [data-status="offline"] .n')).to_have_text("0")
            expect(page.locator('#counts [data-status="all"] .n')).to_have_text("1")
            online_colour = row.locator(".status .badge").evaluate("e => getComputedStyle(e).color")
            # the table refreshes by itself (every 5 s)
            with page.expect_request(lambda r: "/api/agents?limit=50" in r.url, timeout=UI_WAIT_MS):
                pass
            expect(row.locator(".status .badge")).to_have_text("online")
            fleet_png = b.shot(page, "fleet.png")
            storage = page.evaluate(
                "() => ({session: sessionStorage.getItem('myx.adminToken'),"
                " local: localStorage.length})"
            )

            # the daemon stops accepting the stored token: back to the prompt, with why
            page.evaluate("() => sessionStorage.setItem('myx.adminToken', 'stale-token')")
            page.reload()
            expect(page.locator("#login-error")).to_contain_text("HTTP 401")
            expect(page.locator("#token")).to_be_visible()
            expect(page.locator("#nav")).to_be_hidden()
            page.locator("#token").fill(TOKEN)
            page.locator("#token-submit").click()
            expect(row.locator(".status .badge")).to_have_text("online")
            # forgetting the token works too
            page.locator("#signout").click()
            expect(page.locator("#token")).to_be_visible()
            gone = page.evaluate("() => sessionStorage.getItem('myx.adminToken')")
            return {
                "storage": storage,
                "gone": gone,
                "url": page.url,
                "online_colour": online_colour,
                "fleet_png": fleet_png,
            }

        seen = await self.browse(scenario)
        self.assertEqual(seen["storage"], {"session": TOKEN, "local": 0})
        self.assertIsNone(seen["gone"])
        self.assertNotIn(TOKEN, seen["url"])
        self.assertEqual(seen["online_colour"], "rgb(26, 127, 55)")  # --ok green
        self.assertGreater(file_size(seen["fleet_png"]), 10_000)
        used = [auth for url, auth in self._session.requests if "/api/" in url]
        self.assertIn(f"Bearer {TOKEN}", used)
        self.assertIn("Bearer not-the-admin-token", used)

    # -- run, live output, command view --------------------------------------------------

    async def test_run_shows_output_live_with_stderr_and_exit_code(self) -> None:
        agent_id = await self.started()

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, f"#/run?agents={agent_id}")
            expect(page.locator(f"#pick-{agent_id}")).to_be_checked()
            # Program + arguments mode (the shell mode is the default).
            page.locator("#runmode-program").check()
            # The API's 400 names the field: the message shows next to that field.
            page.locator("#run-submit").click()
            command_error = page.locator(".row:has(#run-command) .field-error")
            expect(command_error).to_contain_text("command")
            expect(page.locator("#run-command")).to_have_attribute("aria-invalid", "true")
            page.locator("#run-command").fill("sh")
            page.locator("#run-timeout").fill("-5")
            page.locator("#run-submit").click()
            expect(page.locator(".row:has(#run-timeout) .field-error")).to_contain_text(
                "greater than 0"
            )
            expect(command_error).to_have_count(0)
            page.locator("#run-timeout").fill("120")
            # Shell-like split, shown explicitly before running.
            page.locator("#run-args").fill("-c 'echo out; echo err >&2; exit 3'")
            expect(page.locator("#run-argv li")).to_have_text(
                ["sh", "-c", "echo out; echo err >&2; exit 3"]
            )
            page.locator("#run-submit").click()
            expect(page).to_have_url(re.compile(r"#/commands/\d+$"))
            command_id = int(page.url.rsplit("/", 1)[1])
            expect(page.locator("#command-badge")).to_have_text("failed")
            expect(page.locator("#command-exit")).to_have_text("exit code 3")
            expect(page.locator("#term-final")).to_contain_text("failed (exit code 3)")
            expect(page.locator("#cancel")).to_be_hidden()
            first = self._term_streams(page)
            colours = page.evaluate("""() => ({
                out: getComputedStyle(document.querySelector('#term .stdout')).color,
                err: getComputedStyle(document.querySelector('#term .stderr')).color})""")
            command_png = b.shot(page, "command.png")

            # The command view by URL, on a fresh load: it reads from offset 0 again.
            page.goto(f"{b.base}/#/events")
            with page.expect_request(lambda r: f"/api/commands/{command_id}?offset=0&" in r.url):
                page.goto(f"{b.base}/#/commands/{command_id}")
                page.reload()
            expect(page.locator("#term-final")).to_contain_text("exit code 3")
            again = self._term_streams(page)

            # A new tab has no token: it asks, then opens the command it was sent to.
            tab = b.context.new_page()
            tab.goto(f"{b.base}/#/commands/{command_id}")
            expect(tab.locator("#token")).to_be_focused()
            tab.locator("#token").fill(TOKEN)
            tab.locator("#token").press("Enter")
            expect(tab.locator("#term-final")).to_contain_text("exit code 3")
            in_tab = self._term_streams(tab)
            return {
                "id": command_id,
                "first": first,
                "again": again,
                "tab": in_tab,
                "colours": colours,
                "png": command_png,
            }

        seen = await self.browse(scenario)
        expected = {"stdout": "out\n", "stderr": "err\n"}
        self.assertEqual(seen["first"], expected)
        self.assertEqual(seen["again"], expected)
        self.assertEqual(seen["tab"], expected)
        self.assertNotEqual(seen["colours"]["out"], seen["colours"]["err"])
        self.assertGreater(file_size(seen["png"]), 10_000)
        final = await self.command(seen["id"])
        self.assertEqual(
            (final["status"], final["exit_code"], final["agent_id"]), ("failed", 3, agent_id)
        )
        self.assertEqual(final["args"], ["-c", "echo out; echo err >&2; exit 3"])
        self.assertEqual(final["timeout"], 120)
        self.assertEqual(sorted((await self.read_all(seen["id"])).splitlines()), [b"err", b"out"])

    async def test_long_command_streams_incrementally_and_cancel_stops_it(self) -> None:
        agent_id = await self.started()
        script = 'i=0; while :; do echo "line $i"; i=$((i+1)); sleep 0.2; done'

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, f"#/run?agents={agent_id}")
            # One argument per line this time: the script keeps its spaces and quotes.
            page.locator("#runmode-program").check()
            page.locator("#argmode-lines").check()
            page.locator("#run-command").fill("/bin/sh")
            page.locator("#run-args").fill(f"-c\n{script}\n")
            expect(page.locator("#run-argv li")).to_have_text(["/bin/sh", "-c", script])
            page.locator("#run-timeout").fill("300")
            page.locator("#run-submit").click()
            expect(page).to_have_url(re.compile(r"#/commands/\d+$"))
            command_id = int(page.url.rsplit("/", 1)[1])
            term = page.locator("#term")
            expect(term).to_contain_text("line 2")
            early = term.text_content() or ""
            running = page.locator("#command-badge").text_content()
            final_early = page.locator("#term-final").count()
            # Later lines arrive in the same view, without a reload: wait for two
            # lines past the last one already shown (however far it got by now).
            shown = max(int(n) for n in re.findall(r"line (\d+)", early))
            expect(term).to_contain_text(f"line {max(shown + 2, 6)}")
            later = term.text_content() or ""
            cancel = page.locator("#cancel")
            expect(cancel).to_be_visible()
            cancel.focus()
            page.keyboard.press("Enter")  # keyboard works
            expect(page.locator("#command-badge")).to_have_text("cancelled")
            expect(page.locator("#term-final")).to_be_visible()
            expect(cancel).to_be_hidden()
            expect(page.locator("#command-note")).to_contain_text("stopped")
            return {
                "id": command_id,
                "early": early,
                "later": later,
                "running": running,
                "final_early": final_early,
                "text": self._term_streams(page),
            }

        seen = await self.browse(scenario)
        self.assertEqual(seen["running"], "running")
        self.assertEqual(seen["final_early"], 0)
        self.assertTrue(seen["later"].startswith(seen["early"]), seen)
        self.assertGreater(len(seen["later"]), len(seen["early"]))
        final = await self.wait_final(seen["id"])
        self.assertEqual(final["status"], "cancelled")  # its own status (issue #9 §2)
        self.assertIn("cancel", (final["reason"] or "").lower())
        stored = (await self.read_all(seen["id"])).decode()
        # The page showed exactly what the daemon stored, in order, and it stopped.
        self.assertEqual(seen["text"].get("stdout", ""), stored)
        lines = stored.splitlines()
        self.assertEqual(lines, [f"line {i}" for i in range(len(lines))])
        self.assertGreaterEqual(len(lines), 7)
        code, events = await self.api("GET", "/api/events?limit=100")
        self.assertIn(
            ("command.cancel", f"command:{seen['id']}"),
            [(e["action"], e["target"]) for e in events["events"]],
        )

    async def test_run_on_several_agents_chosen_in_the_fleet(self) -> None:
        await self.daemon.start()
        ids = [await self.adopt(await start_agent(self)) for _ in range(2)]

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page)
            run_selected = page.locator("#run-selected")
            expect(run_selected).to_be_disabled()
            for agent_id in ids:
                page.get_by_label(f"Select agent {agent_id}").check()
            expect(run_selected).to_have_text("Run on selected (2)")
            run_selected.click()
            expect(page).to_have_url(re.compile(r"#/run\?agents=\d+,\d+$"))
            for agent_id in ids:
                expect(page.locator(f"#pick-{agent_id}")).to_be_checked()
            page.locator("#runmode-program").check()
            page.locator("#run-command").fill("hostname")
            page.locator("#run-submit").click()
            rows = page.locator("#bulk-body tr")
            expect(rows).to_have_count(2)
            for i in range(2):
                expect(rows.nth(i).locator(".badge")).to_have_text("success")
            links = rows.locator('a[href^="#/commands/"]')
            hrefs = [links.nth(i).get_attribute("href") for i in range(2)]
            return {"hrefs": hrefs}

        seen = await self.browse(scenario)
        command_ids = [int(str(h).rsplit("/", 1)[1]) for h in seen["hrefs"]]
        finals = [await self.command(c) for c in command_ids]
        self.assertEqual(sorted(f["agent_id"] for f in finals), sorted(ids))
        for f in finals:
            self.assertEqual(
                (f["status"], f["exit_code"], f["command"]), ("success", 0, "hostname")
            )
            self.assertEqual(await self.read_all(f["id"]), socket.gethostname().encode() + b"\n")

    # -- agent detail, history, events (and escaping) ------------------------------------

    async def test_agent_detail_history_and_events(self) -> None:
        agent_id = await self.started()
        markup = ["<img src=x onerror=window.__xss=1>", "<b>bold</b>"]
        code, body = await self.api(
            "POST",
            f"/api/agents/{agent_id}/commands",
            {"command": "/bin/echo", "args": markup, "timeout": 60},
        )
        self.assertEqual(code, 201, body)
        command_id = body["id"]
        await self.wait_final(command_id)
        # Enough later events that the adoption moves to the second page of the trail.
        assert self.daemon.root is not None
        store = self.daemon.root.getServiceNamed("store").store
        for i in range(60):
            await store.add_event(
                actor="test", action="test.filler", target=f"n:{i}", outcome="ok", details={"i": i}
            )

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page)
            page.locator(f'#agents-body tr[data-agent-id="{agent_id}"] a').click()
            expect(page).to_have_url(re.compile(rf"#/agents/{agent_id}$"))
            system = page.locator("#agent-system")
            expect(system).to_contain_text(socket.gethostname())
            for label in (
                "OS",
                "Load average",
                "Memory",
                "Disk",
                "Deployment tool",
                "Running commands",
            ):
                expect(system).to_contain_text(label)
            expect(system.locator("meter")).to_have_count(2)
            expect(page.locator("#agent-summary")).to_contain_text("online")
            history = page.locator("#history-body tr")
            expect(history).to_have_count(1)
            expect(history.first).to_contain_text(
                "/bin/echo '<img src=x onerror=window.__xss=1>' '<b>bold</b>'"
            )
            expect(history.first).to_contain_text("success")
            history.first.locator("a").click()
            expect(page).to_have_url(re.compile(rf"#/commands/{command_id}$"))
            expect(page.locator("#term-final")).to_contain_text("success (exit code 0)")
            shown = self._term_streams(page)
            counts = page.evaluate(
                "() => [document.querySelectorAll('#main img, #main b').length,"
                " window.__xss === undefined]"
            )
            # the events page, from the navigation bar; newest first, 50 a page
            page.locator('nav a[data-nav="events"]').click()
            rows = page.locator("#events-body tr")
            expect(rows).to_have_count(50)
            expect(rows.first).to_have_attribute("data-action", "test.filler")
            adopt = page.locator('#events-body tr[data-action="agent.adopt"]')
            expect(adopt).to_have_count(0)
            page.get_by_role("button", name="Older").click()
            expect(rows).to_have_count(13)
            expect(adopt).to_have_count(1)
            expect(adopt.locator(".outcome")).to_have_text("ok")
            expect(adopt.locator(".target a")).to_have_text(f"agent:{agent_id}")
            expect(adopt.locator(".target a")).to_have_attribute("href", f"#/agents/{agent_id}")
            expect(page.locator('#events-body tr[data-action="command.create"]')).to_have_count(1)
            b.shot(page, "events.png")
            page.get_by_role("button", name="Newer").click()
            expect(rows).to_have_count(50)
            expect(adopt).to_have_count(0)
            page.get_by_role("button", name="Older").click()
            adopt.locator(".target a").click()
            expect(page.locator("#agent-summary")).to_contain_text("online")
            return {"shown": shown, "counts": counts}

        seen = await self.browse(scenario)
        self.assertEqual(seen["shown"], {"stdout": " ".join(markup) + "\n"})
        self.assertEqual(seen["counts"], [0, True])

    # -- servers -----------------------------------------------------------------------

    async def test_servers_add_form_errors_and_install_progress(self) -> None:
        await self.daemon.start()
        code, body = await self.api("GET", "/api/servers")
        self.assertEqual((code, body), (200, {"servers": []}))
        closed_port = free_port()

        def scenario(b: BrowserSession) -> dict[str, Any]:
            from playwright.sync_api import expect

            page = b.page()
            b.sign_in(page, "#/servers")
            form = page.locator("#server-form")
            expect(form).to_be_visible()
            page.locator("#srv-name").fill("web-1")
            page.locator("#srv-host").fill("127.0.0.1")
            page.locator("#srv-port").fill(str(closed_port))
            page.locator("#srv-auth-key").check()
            page.locator("#srv-key").fill("this is not a private key")
            page.locator("#srv-submit").click()
            key_error = page.locator(".row:has(#srv-key) .field-error")
            expect(key_error).to_be_visible()
            expect(page.locator("#srv-key")).to_have_attribute("aria-invalid", "true")
            # sudo with a password shows its own field
            expect(page.locator("#srv-sudo-password")).to_be_hidden()
            page.locator("#srv-sudo").select_option("sudo-password")
            expect(page.locator("#srv-sudo-password")).to_be_visible()
            page.locator("#srv-sudo").select_option("none")
            page.locator("#srv-auth-password").check()
            page.locator("#srv-password").fill("not-a-real-password")
            page.locator("#srv-submit").click()
            expect(page).to_have_url(re.compile(r"#/servers/\d+$"))
            server_id = int(page.url.rsplit("/", 1)[1])
            # Nothing listens on that loopback port: the connect step fails, and the page
            # shows the step, its status and the error as the install runs.
            step = page.locator('#install-steps tr[data-step="connect"]')
            expect(step).to_have_attribute("data-status", "failed")
            expect(page.locator("#install-error")).to_contain_text("connect")
            expect(page.locator("#server-status")).to_have_text("failed")
            expect(page.locator("#install")).to_contain_text("install #")
            b.shot(page, "server.png")
            # Reinstall asks first; cancelling starts nothing.
            page.locator("#srv-reinstall").click()
            dialog = page.locator("#confirm")
            expect(dialog).to_be_visible()
            expect(dialog).to_contain_text("keeps its port, path and token")
            page.keyboard.press("Escape")
            expect(dialog).to_be_hidden()
            first_install = page.locator("#install strong").text_content()
            page.locator("#srv-reinstall").click()
            page.locator("#confirm-yes").click()
            expect(page.locator("#install strong")).to_contain_text("reinstall #")
            expect(page.locator('#install-steps tr[data-step="connect"]')).to_have_attribute(
                "data-status", "failed"
            )
            # The secrets left the form once the daemon had them.
            page.goto(f"{b.base}/#/servers")
            row = page.locator(f'#servers-body tr[data-server-id="{server_id}"]')
            expect(row).to_contain_text("web-1")
            expect(row).to_contain_text("password")
            return {"id": server_id, "first": first_install}

        seen = await self.browse(scenario)
        self.assertRegex(seen["first"] or "", r"^install #\d+")
        code, install = await self.api("GET", f"/api/servers/{seen['id']}/install")
        self.assertEqual(code, 200, install)
        self.assertEqual((install["kind"], install["status"]), ("reinstall", "failed"))
        code, events = await self.api("GET", "/api/events?limit=200")
        seen_events = {(e["action"], e["outcome"], e["target"]) for e in events["events"]}
        self.assertIn(("server.reinstall", "started", f"server:{seen['id']}"), seen_events)
        self.assertIn(("server.install", "started", f"server:{seen['id']}"), seen_events)
