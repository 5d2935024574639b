/**
 * MyX web console: a single page over the daemon's admin API, as ES modules with no
 * build step. This entry module wires the page's fixed controls and starts the router.
 *
 * Where things live: dom.js (building the page), format.js (pure formatting),
 * api.js (the token and fetch), view.js (a page's lifetime), forms.js (field
 * errors), names.js (agent names), term.js (command output with ANSI colours),
 * router.js + routes.js (pages), login.js (sign-in), views/*.js (one module per
 * page; views/run-results.js is the multi-agent results part of the Run page),
 * vendor/ (third-party code, unmodified, with its licence).
 *
 * Rules every module keeps:
 * - Data from the API is only ever put into the page as text (textContent, text
 *   nodes, attribute values); nothing is ever parsed as HTML.
 * - The admin token lives in sessionStorage (this tab only) and travels only in the
 *   Authorization header; never in a URL, never in storage that outlives the tab.
 * - Live output is followed with long-polls (GET /api/commands/{id}?offset=N&wait=10):
 *   the browser's server-sent-events client cannot send an Authorization header.
 */
import { $ } from "./dom.js";
import { ago } from "./format.js";
import { route, signOut } from "./router.js";

/** Keep every "12s ago" current. */
function tick() {
  for (const el of document.querySelectorAll("time[data-ago]")) {
    const text = ago(Number(el.dataset.ago));
    if (el.textContent !== text) el.textContent = text;
  }
}

function start() {
  $("#skip-link").addEventListener("click", (event) => {
    // The hash is the router's: move focus without touching it.
    event.preventDefault();
    const title = $("#page-title") || $("#main");
    title.focus();
  });
  $("#signout").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  setInterval(tick, 1000);
  route();
}

// Module scripts run deferred, after the document is parsed.
start();
