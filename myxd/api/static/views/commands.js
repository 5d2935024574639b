/**
 * The Commands page: every agent's commands, newest first, filtered on the server
 * (GET api/commands: agent, status, kind, text, created between two times), a page at
 * a time with the total; running ones can be selected and cancelled (confirmed first
 * when more than one); and a box to open a command by id.
 *
 * The filters live in the address ("#/commands?status=failed&q=uname"), updated
 * without reloading the page.
 */
import { badge, h, page, swap, timeAgo } from "../dom.js";
import { commandLine, dash, fmtDuration, fmtTime } from "../format.js";
import { clearFieldErrors, fieldError } from "../forms.js";
import { agentLabel, agentName, allAgents } from "../names.js";
import { FINAL, PAGE, REFRESH_MS, report } from "../view.js";
import { cancelCommands } from "./run-results.js";

const STATUSES = ["pending", "running", "success", "failed", "cancelled", "timed_out"];
const KINDS = ["command", "ansible"];

/** "2026-12-04T13:05" (a datetime-local value, local time) <-> unix seconds. */
function toSeconds(value) {
  if (!value) return null;
  const t = new Date(value).getTime();
  return Number.isFinite(t) ? t / 1000 : NaN;
}
function toLocal(seconds) {
  const d = new Date(seconds * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T` +
    `${p(d.getHours())}:${p(d.getMinutes())}`;
}

export function commandsView(main, view, params) {
  const num = (v) => (/^[0-9]{1,18}$/.test(v || "") ? Number(v) : null);
  const f = {
    agent_id: num(params.get("agent_id")),
    status: STATUSES.includes(params.get("status")) ? params.get("status") : "",
    kind: KINDS.includes(params.get("kind")) ? params.get("kind") : "",
    q: (params.get("q") || "").slice(0, 200),
    since: num(params.get("since")),
    until: num(params.get("until")),
  };
  let offset = num(params.get("offset")) || 0;
  const error = h("p", { class: "alert", role: "alert", id: "commands-error" });
  const updated = h("span", {}, "loading\u2026");
  const cancelSel = h("button", { type: "button", class: "btn btn-danger", id: "cancel-selected",
    disabled: true }, "Cancel selected");
  main.append(page("Commands", h("span", {}, "Every agent's commands, newest first \u00B7 " +
    "updated ", updated), [cancelSel]), error);

  // -- open by id ------------------------------------------------------------------
  const idInput = h("input", { type: "text", inputmode: "numeric", id: "open-command",
    class: "short", autocomplete: "off" });
  const openForm = h("form", { class: "inline-form", novalidate: true, id: "open-form" },
    h("label", { for: "open-command" }, "Open command by id"), idInput,
    h("button", { type: "submit", class: "btn" }, "Open"));
  openForm.addEventListener("submit", (event) => {
    event.preventDefault();
    clearFieldErrors(openForm);
    if (!/^[0-9]{1,18}$/.test(idInput.value.trim()) || Number(idInput.value) < 1) {
      fieldError(idInput, "Enter a command id (a positive number).");
      idInput.focus();
      return;
    }
    location.hash = `#/commands/${Number(idInput.value.trim())}`;
  });

  // -- filters -----------------------------------------------------------------------
  const agentSel = h("select", { id: "cmd-agent" },
    h("option", { value: "" }, "Any agent"),
    f.agent_id ? h("option", { value: String(f.agent_id), selected: true },
      `agent ${f.agent_id}`) : null);
  const statusSel = h("select", { id: "cmd-status" }, h("option", { value: "" }, "Any status"),
    STATUSES.map((s) => h("option", { value: s, selected: s === f.status }, s)));
  const kindSel = h("select", { id: "cmd-kind" }, h("option", { value: "" }, "Any kind"),
    KINDS.map((k) => h("option", { value: k, selected: k === f.kind }, k)));
  const text = h("input", { type: "search", id: "cmd-q", value: f.q, autocomplete: "off",
    spellcheck: "false", placeholder: "Part of the command line" });
  const since = h("input", { type: "datetime-local", id: "cmd-since",
    value: f.since ? toLocal(f.since) : null });
  const until = h("input", { type: "datetime-local", id: "cmd-until",
    value: f.until ? toLocal(f.until) : null });
  const rangeError = h("p", { class: "field-error", id: "cmd-range-error", hidden: true });
  const clear = h("button", { type: "button", class: "btn btn-small", id: "cmd-clear" },
    "Clear filters");
  const cell = (id, label, input) => h("div", {}, h("label", { for: id }, label), input);
  const filters = h("form", { class: "filters", id: "cmd-filters", role: "search",
    "aria-label": "Filter commands", novalidate: true },
  cell("cmd-agent", "Agent", agentSel), cell("cmd-status", "Status", statusSel),
  cell("cmd-kind", "Kind", kindSel), cell("cmd-q", "Text", text),
  cell("cmd-since", "Created from", since), cell("cmd-until", "Created until", until),
  h("div", { class: "filters-end" }, clear), rangeError);
  filters.addEventListener("submit", (e) => e.preventDefault());

  const selectAll = h("input", { type: "checkbox", id: "cmd-select-all",
    "aria-label": "Select every running command on this page" });
  const body = h("tbody", { id: "commands-body" });
  const pager = h("div", { class: "pager", id: "commands-pager" });
  main.append(h("div", { class: "card" }, openForm), filters,
    h("div", { class: "table-wrap" }, h("table", { id: "commands" },
      h("caption", { class: "visually-hidden" }, "Commands"),
      h("thead", {}, h("tr", {}, h("th", { class: "sel", scope: "col" }, selectAll),
        ["ID", "Agent", "Command", "Kind", "Status", "Exit", "Created", "Duration"].map(
          (t) => h("th", { scope: "col", class: t === "ID" || t === "Exit" ? "num" : null },
            t)))), body)), pager);

  const names = new Map();
  const selected = new Set();
  let rows = [];
  let seq = 0;

  allAgents(view).then((agents) => {
    for (const a of agents) names.set(a.id, agentName(a));
    swap(agentSel, [h("option", { value: "" }, "Any agent"),
      ...agents.map((a) => h("option", { value: String(a.id), selected: a.id === f.agent_id },
        agentLabel(a.id, names.get(a.id))))]);
  }).catch((e) => report(error, e));

  function query(withPage) {
    const parts = [];
    for (const k of ["agent_id", "status", "kind", "q", "since", "until"]) {
      if (f[k] !== null && f[k] !== "") parts.push(`${k}=${encodeURIComponent(f[k])}`);
    }
    if (withPage) parts.push(`limit=${PAGE}`, `offset=${offset}`);
    else if (offset) parts.push(`offset=${offset}`);
    return parts.join("&");
  }

  function changed() {
    offset = 0;
    const q = query(false);
    history.replaceState(null, "", `#/commands${q ? `?${q}` : ""}`);
    load().catch(onError);
  }
  agentSel.addEventListener("change", () => { f.agent_id = num(agentSel.value); changed(); });
  statusSel.addEventListener("change", () => { f.status = statusSel.value; changed(); });
  kindSel.addEventListener("change", () => { f.kind = kindSel.value; changed(); });
  text.addEventListener("input", () => { f.q = text.value.trim(); changed(); });
  for (const [input, key] of [[since, "since"], [until, "until"]]) {
    input.addEventListener("change", () => {
      const s = toSeconds(input.value);
      f[key] = s === null || Number.isNaN(s) ? null : Math.floor(s) + (key === "until" ? 59 : 0);
      const bad = f.since !== null && f.until !== null && f.since > f.until;
      rangeError.hidden = !bad;
      rangeError.textContent = bad ? "\u201CCreated from\u201D is after \u201Ccreated until\u201D: " +
        "no command can match." : "";
      changed();
    });
  }
  clear.addEventListener("click", () => {
    Object.assign(f, { agent_id: null, status: "", kind: "", q: "", since: null, until: null });
    agentSel.value = statusSel.value = kindSel.value = text.value = since.value = until.value = "";
    rangeError.hidden = true;
    changed();
  });

  function syncSelection() {
    for (const id of [...selected]) {
      const c = rows.find((r) => r.id === id);
      if (!c || FINAL.has(c.status)) selected.delete(id);
    }
    cancelSel.disabled = selected.size === 0;
    cancelSel.textContent = selected.size ? `Cancel selected (${selected.size})`
      : "Cancel selected";
    const open = rows.filter((c) => !FINAL.has(c.status));
    selectAll.disabled = open.length === 0;
    selectAll.checked = open.length > 0 && open.every((c) => selected.has(c.id));
  }
  selectAll.addEventListener("change", () => {
    for (const c of rows) {
      if (FINAL.has(c.status)) continue;
      if (selectAll.checked) selected.add(c.id); else selected.delete(c.id);
    }
    for (const box of body.querySelectorAll("input[type=checkbox]")) box.checked = selectAll.checked;
    syncSelection();
  });
  cancelSel.addEventListener("click", async () => {
    const ids = [...selected].sort((a, b) => a - b);
    const labels = new Map(rows.filter((c) => selected.has(c.id)).map((c) => [c.id,
      `command ${c.id} on ${agentLabel(c.agent_id, names.get(c.agent_id) || c.agent_name)}`]));
    cancelSel.disabled = true;
    try {
      const sent = await cancelCommands(view, ids, labels);
      if (sent !== false) {
        selected.clear();
        await load();
      }
    } catch (e) {
      report(error, e);
    } finally {
      syncSelection();
    }
  });

  function row(c) {
    const open = !FINAL.has(c.status);
    const box = open ? h("input", { type: "checkbox", id: `cmd-sel-${c.id}`,
      "aria-label": `Select command ${c.id}`, checked: selected.has(c.id),
      dataset: { focusKey: `cmd-sel-${c.id}` } }) : null;
    if (box) {
      box.addEventListener("change", () => {
        if (box.checked) selected.add(c.id); else selected.delete(c.id);
        syncSelection();
      });
    }
    const name = names.get(c.agent_id) || c.agent_name;
    return h("tr", { dataset: { commandId: String(c.id), status: String(c.status) } },
      h("td", { class: "sel" }, box),
      h("td", { class: "num" }, h("a", { href: `#/commands/${Number(c.id)}`,
        dataset: { focusKey: `c-${c.id}` } }, String(c.id))),
      h("td", { class: "agent" }, h("a", { href: `#/agents/${Number(c.agent_id)}` },
        agentLabel(c.agent_id, name))),
      h("td", { class: "cmd" }, h("code", {}, c.kind === "ansible"
        ? `ansible-playbook ${c.command}` : commandLine(c))),
      h("td", { class: "kind" }, c.kind),
      h("td", { class: "status" }, badge(c.status),
        c.reason && c.reason !== `exit code ${c.exit_code}`
          ? h("div", { class: "muted small" }, c.reason) : null),
      h("td", { class: "num exit" }, c.exit_code === null ? dash : String(c.exit_code)),
      h("td", { class: "nowrap", title: fmtTime(c.created_at) }, timeAgo(c.created_at)),
      h("td", { class: "nowrap" }, fmtDuration(c.started_at && c.finished_at
        ? c.finished_at - c.started_at : null)));
  }

  async function load() {
    const mine = ++seq;
    const data = await view.api("GET", `api/commands?${query(true)}`);
    if (mine !== seq) return;
    if (data.commands.length === 0 && offset > 0 && data.total > 0) {
      offset = Math.max(0, Math.floor((data.total - 1) / PAGE) * PAGE);
      return load();
    }
    error.textContent = "";
    rows = data.commands;
    const filtered = query(false) !== "" && query(false) !== `offset=${offset}`;
    swap(body, rows.length ? rows.map(row) : [h("tr", {}, h("td", { class: "empty",
      colspan: "9" }, filtered ? "No command matches these filters." : "No commands yet."))]);
    body.dataset.total = String(data.total);
    syncSelection();
    const first = data.total ? offset + 1 : 0;
    const last = offset + rows.length;
    swap(pager, [
      h("span", { class: "muted small", id: "commands-range" },
        `${first}\u2013${last} of ${data.total}`),
      h("button", { type: "button", class: "btn btn-small", disabled: offset === 0,
        dataset: { focusKey: "newer" },
        onclick: () => { offset = Math.max(0, offset - PAGE); load().catch(onError); } },
      "\u2190 Newer"),
      h("button", { type: "button", class: "btn btn-small", disabled: last >= data.total,
        dataset: { focusKey: "older" },
        onclick: () => { offset += PAGE; load().catch(onError); } }, "Older \u2192"),
    ]);
    updated.replaceChildren(timeAgo(Date.now() / 1000));
  }
  const onError = (e) => report(error, e);
  view.every(REFRESH_MS, load, onError);
}
