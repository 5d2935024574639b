/**
 * The results of a run on several agents: per agent its status, exit code and reason,
 * its output on demand (expandable), a combined output with one prefix per line (the
 * agent's name), counts (ok / failed / running), "Re-run on failed", and "Cancel
 * running" (confirmed first when it stops more than one command).
 *
 * It starts a new run only through `rerun`.
 */
import { badge, confirmDialog, h, swap } from "../dom.js";
import { dash, decodeBase64 } from "../format.js";
import { ApiError, isAbort } from "../api.js";
import { FINAL, report } from "../view.js";
import { agentLabel } from "../names.js";
import { AnsiParser, pieceNode, Terminal } from "../term.js";

const POLL_MS = 1000;

/** The whole stored output of a command, as [{stream, text}] in the order stored. */
async function fetchOutput(view, id) {
  const decoders = { stdout: new TextDecoder("utf-8"), stderr: new TextDecoder("utf-8") };
  const pieces = [];
  let offset = 0;
  for (;;) {
    const data = await view.api("GET", `api/commands/${id}?offset=${offset}`);
    for (const chunk of data.output) {
      const stream = chunk.stream === "stderr" ? "stderr" : "stdout";
      const text = decoders[stream].decode(decodeBase64(chunk.data), { stream: true });
      if (text) pieces.push({ stream, text });
    }
    if (data.next_offset === offset || !data.output.length) break;
    offset = data.next_offset;
  }
  for (const stream of ["stdout", "stderr"]) {
    const text = decoders[stream].decode();
    if (text) pieces.push({ stream, text });
  }
  return pieces;
}

/**
 * Cancel the commands `ids` (labels: id -> "command 4 on web-1"), asking first when
 * there is more than one. Returns false when the operator said no, else the count of
 * commands a cancel was sent to (one that had already finished is not an error).
 */
export async function cancelCommands(view, ids, labels) {
  if (!ids.length) return 0;
  if (ids.length > 1) {
    const ok = await confirmDialog({
      title: `Cancel ${ids.length} commands?`,
      text: "Each is stopped on its agent (SIGTERM, then SIGKILL after a grace period): " +
        `${ids.map((id) => labels.get(id) || `command ${id}`).join(", ")}.`,
      confirmLabel: `Cancel ${ids.length} commands`,
    });
    if (!ok) return false;
  }
  let sent = 0;
  for (const id of ids) {
    try {
      await view.api("POST", `api/commands/${Number(id)}/cancel`);
      sent += 1;
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 409)) throw e;
    }
  }
  return sent;
}

// The queue's reason for a plain non-zero exit is "exit code N": say it once.
export function reasonOf(c) {
  return c.reason && c.reason !== `exit code ${c.exit_code}` ? c.reason : "";
}

function outcome(c) {
  if (!c.id) return "failed";
  if (!FINAL.has(c.status)) return "running";
  return c.status === "success" ? "ok" : "failed";
}

/**
 * Show `commands` (the reply of POST api/commands) in `box`; `names` maps agent id to
 * name; `rerun(agentIds)` starts the same command again on those agents.
 */
export function showRunResults(box, view, commands, names, rerun) {
  const state = new Map(commands.map((c) => [c.agent_id, { ...c }]));
  const outputs = new Map();   // command id -> [{stream, text}] once final
  const open = new Set();      // agent ids whose output row is expanded
  const general = h("p", { class: "alert", role: "alert", id: "bulk-error" });
  const counts = h("p", { class: "counts-line", id: "bulk-counts", role: "status" });
  const body = h("tbody", { id: "bulk-body" });
  const rerunButton = h("button", { type: "button", class: "btn", id: "rerun-failed",
    disabled: true }, "Re-run on failed");
  const cancelButton = h("button", { type: "button", class: "btn btn-danger",
    id: "cancel-running", hidden: true }, "Cancel running");
  const combinedTerm = h("pre", { class: "term wrap", id: "bulk-combined-term", tabindex: "0",
    "aria-label": "Combined output, one agent name per line" });
  const combined = h("details", { class: "log", id: "bulk-combined" },
    h("summary", {}, "Combined output (each line prefixed with the agent's name)"),
    combinedTerm);
  const label = (id) => agentLabel(id, names.get(id));
  swap(box, [h("section", { class: "card", "aria-labelledby": "bulk-h" },
    h("div", { class: "page-head" },
      h("h2", { id: "bulk-h" }, `Started on ${commands.length} agent` +
        (commands.length === 1 ? "" : "s")),
      h("div", { class: "actions" }, cancelButton, rerunButton)),
    counts, general,
    h("div", { class: "table-wrap" }, h("table", { id: "bulk" },
      h("thead", {}, h("tr", {}, ["Agent", "Command", "Status", "Exit", "Reason", ""].map(
        (x) => h("th", { scope: "col" }, x)))), body)),
    combined)]);

  rerunButton.addEventListener("click", () => {
    const failed = [...state.values()].filter((c) => outcome(c) === "failed")
      .map((c) => c.agent_id);
    if (failed.length) rerun(failed);
  });

  cancelButton.addEventListener("click", async () => {
    const running = [...state.values()].filter((c) => c.id && !FINAL.has(c.status));
    const labels = new Map(running.map((c) => [c.id, `command ${c.id} on ${label(c.agent_id)}`]));
    cancelButton.disabled = true;
    try {
      await cancelCommands(view, running.map((c) => c.id), labels);
    } catch (e) {
      report(general, e);
    } finally {
      cancelButton.disabled = false;
    }
  });

  function outputRow(c) {
    const pre = h("pre", { class: "term", id: `bulk-out-${c.agent_id}` });
    const pieces = c.id ? outputs.get(c.id) : null;
    if (pieces) {
      const term = new Terminal(pre);
      for (const p of pieces) term.write(p.stream, p.text);
      term.end();
      if (!pieces.length) pre.append(h("span", { class: "waiting" }, "(no output)"));
    } else {
      pre.append(h("span", { class: "waiting" }, c.id ? "loading\u2026" : "not started"));
    }
    return h("tr", { class: "bulk-output" }, h("td", { colspan: "6" }, pre));
  }

  function render() {
    const all = [...state.values()];
    const n = { ok: 0, failed: 0, running: 0 };
    for (const c of all) n[outcome(c)] += 1;
    counts.dataset.ok = String(n.ok);
    counts.dataset.failed = String(n.failed);
    counts.dataset.running = String(n.running);
    swap(counts, [h("span", { class: "st-success" }, `${n.ok} ok`), " \u00B7 ",
      h("span", { class: "st-failed" }, `${n.failed} failed`), " \u00B7 ",
      h("span", { class: "st-running" }, `${n.running} running`)]);
    rerunButton.disabled = n.failed === 0 || n.running > 0;
    cancelButton.hidden = n.running === 0;
    cancelButton.textContent = n.running > 1 ? `Cancel running (${n.running})` : "Cancel running";
    rerunButton.textContent = n.failed ? `Re-run on failed (${n.failed})` : "Re-run on failed";
    swap(body, all.flatMap((c) => {
      const toggle = h("button", { type: "button", class: "btn btn-small",
        "aria-expanded": open.has(c.agent_id) ? "true" : "false",
        dataset: { focusKey: `out-${c.agent_id}` } },
      open.has(c.agent_id) ? "Hide output" : "Output");
      toggle.addEventListener("click", () => {
        if (open.has(c.agent_id)) open.delete(c.agent_id); else open.add(c.agent_id);
        render();
        load().catch((e) => report(general, e));
      });
      const row = h("tr", { dataset: { agentId: String(c.agent_id), outcome: outcome(c) } },
        h("td", { class: "agent" }, h("a", { href: `#/agents/${Number(c.agent_id)}` },
          label(c.agent_id))),
        h("td", {}, c.id ? h("a", { href: `#/commands/${Number(c.id)}` }, `command ${c.id}`)
          : dash),
        h("td", { class: "status" }, c.id ? badge(c.status) : badge("failed")),
        h("td", { class: "num exit" }, c.exit_code === null || c.exit_code === undefined
          ? dash : String(c.exit_code)),
        h("td", { class: "reason" }, c.id ? reasonOf(c) : (c.error || "not started")),
        h("td", {}, toggle));
      return open.has(c.agent_id) ? [row, outputRow(c)] : [row];
    }));
    renderCombined();
  }

  function renderCombined() {
    const nodes = [];
    const all = [...state.values()];
    for (const c of all) {
      const pieces = c.id ? outputs.get(c.id) : [];
      if (!pieces) continue;
      // The id too: two agents can report the same host name.
      const prefix = `${label(c.agent_id)} | `;
      const parsers = { stdout: new AnsiParser(), stderr: new AnsiParser() };
      // One line of output per line here, whatever stream it came from.
      let lineStart = true;
      for (const p of pieces) {
        for (const part of p.text.split(/(\n)/)) {
          if (part === "") continue;
          if (lineStart && part !== "\n") {
            nodes.push(h("span", { class: "prefix" }, prefix));
            lineStart = false;
          }
          if (part === "\n") {
            if (lineStart) nodes.push(h("span", { class: "prefix" }, prefix));
            nodes.push("\n");
            lineStart = true;
            continue;
          }
          nodes.push(h("span", { class: p.stream },
            parsers[p.stream].feed(part).map(pieceNode)));
        }
      }
      if (!lineStart) nodes.push("\n");
    }
    const pending = all.filter((c) => c.id && !outputs.has(c.id)).length;
    if (pending) nodes.push(h("span", { class: "waiting" }, `(${pending} still running)`));
    swap(combinedTerm, nodes.length ? nodes : [h("span", { class: "waiting" }, "(no output)")]);
  }

  let loading = false;
  async function load() {
    // Final commands' output is fetched once; running ones are shown when they end.
    if (loading) return;
    loading = true;
    try {
      for (const c of state.values()) {
        if (c.id && FINAL.has(c.status) && !outputs.has(c.id)) {
          outputs.set(c.id, await fetchOutput(view, c.id));
          render();
        }
      }
    } finally {
      loading = false;
    }
  }

  render();
  (async () => {
    while (view.alive && box.contains(body)) {
      try {
        const running = [...state.values()].filter((c) => c.id && !FINAL.has(c.status));
        const fresh = await Promise.all(running.map(
          (c) => view.api("GET", `api/commands/${c.id}?max_bytes=1`)));
        for (const f of fresh) {
          state.set(f.agent_id, { ...state.get(f.agent_id), status: f.status,
            exit_code: f.exit_code, reason: f.reason });
        }
        if (fresh.length) render();
        await load();
        general.textContent = "";
        if (![...state.values()].some((c) => c.id && !FINAL.has(c.status))) return;
      } catch (e) {
        if (!view.alive || isAbort(e)) return;
        report(general, e);
      }
      await view.sleep(POLL_MS);
    }
  })();
}
