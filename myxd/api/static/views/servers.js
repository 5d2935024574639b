/**
 * The Servers page: servers managed over SSH (with their tags), bulk actions on the
 * selected ones (reinstall, uninstall, delete, add a tag: each confirmed first, then
 * one result per server, from POST api/servers/bulk), and the add-server form.
 */
import { badge, confirmDialog, h, page, swap, tagChips } from "../dom.js";
import { dash } from "../format.js";
import { ApiError } from "../api.js";
import { REFRESH_MS, report } from "../view.js";
import { agentLabel, TAG_RE } from "../names.js";
import { addServerForm } from "./server-form.js";

/** What each bulk action is called, asked and confirmed with. */
const ACTIONS = {
  reinstall: { label: "Reinstall", danger: false,
    text: "Each agent is installed again over SSH. It keeps its port, path and token." },
  uninstall: { label: "Uninstall", danger: true,
    text: "Each agent's service and files are removed from its host over SSH." },
  delete: { label: "Delete", danger: true,
    text: "The daemon forgets each server, its credentials and its agent. Nothing is " +
      "removed from the hosts: uninstall first for that." },
  tag: { label: "Add tag", danger: false, text: "" },
};

export function serversView(main, view) {
  const error = h("p", { class: "alert", role: "alert", id: "servers-error" });
  const body = h("tbody", { id: "servers-body" });
  const selected = new Set();
  const selectAll = h("input", { type: "checkbox", id: "srv-select-all",
    "aria-label": "Select all servers", dataset: { focusKey: "srv-select-all" } });
  const tagInput = h("input", { type: "text", id: "bulk-tag-name", class: "short",
    placeholder: "tag", autocomplete: "off", spellcheck: "false",
    "aria-label": "Tag to add to the selected servers" });
  const buttons = Object.fromEntries(Object.entries(ACTIONS).map(([action, a]) => [action,
    h("button", { type: "button", class: a.danger ? "btn btn-danger" : "btn",
      id: `bulk-${action}`, disabled: true }, a.label)]));
  const chosenText = h("span", { class: "muted small", id: "bulk-chosen" }, "None selected.");
  const bulkBar = h("div", { class: "bulk-bar", role: "group", "aria-label": "Bulk actions",
    id: "bulk-bar" }, chosenText, buttons.reinstall, buttons.uninstall, buttons.delete,
  h("span", { class: "bulk-tag" }, tagInput, buttons.tag));
  const tagError = h("p", { class: "field-error", id: "bulk-tag-error", hidden: true });
  const results = h("div", { id: "bulk-results" });
  const listSection = h("section", { "aria-label": "Servers" }, bulkBar, tagError, results,
    h("div", { class: "table-wrap" }, h("table", { id: "servers" },
      h("caption", { class: "visually-hidden" }, "Servers"),
      h("thead", {}, h("tr", {}, h("th", { class: "sel", scope: "col" }, selectAll),
        ["ID", "Name", "Tags", "SSH", "Auth", "Sudo", "Status", "Agent"]
          .map((t) => h("th", { scope: "col" }, t)))), body)));
  main.append(page("Servers", "Install agents over SSH \u00B7 refreshed every 5 s"), error);
  let enabled = null;
  let servers = [];

  function sync() {
    for (const id of [...selected]) if (!servers.some((s) => s.id === id)) selected.delete(id);
    for (const b of Object.values(buttons)) b.disabled = selected.size === 0;
    chosenText.textContent = selected.size ? `${selected.size} selected:` : "None selected.";
    selectAll.checked = servers.length > 0 && servers.every((s) => selected.has(s.id));
  }
  selectAll.addEventListener("change", () => {
    for (const s of servers) if (selectAll.checked) selected.add(s.id); else selected.delete(s.id);
    for (const box of body.querySelectorAll("input[type=checkbox]")) box.checked = selectAll.checked;
    sync();
  });

  function nameOf(id) {
    const s = servers.find((x) => x.id === id);
    return s ? `${s.name} (server ${id})` : `server ${id}`;
  }

  async function bulk(action) {
    tagError.hidden = true;
    const ids = [...selected].sort((a, b) => a - b);
    let tag = null;
    if (action === "tag") {
      tag = tagInput.value.trim().toLowerCase();
      if (!TAG_RE.test(tag)) {
        tagError.textContent = tag ? "A tag is 1-32 letters, digits, '.', '_' or '-'."
          : "Type the tag to add first.";
        tagError.hidden = false;
        tagInput.setAttribute("aria-invalid", "true");
        tagInput.focus();
        return;
      }
      tagInput.removeAttribute("aria-invalid");
    }
    const a = ACTIONS[action];
    const n = ids.length === 1 ? "1 server" : `${ids.length} servers`;
    const ok = await confirmDialog({
      title: action === "tag" ? `Add the tag ${tag} to ${n}?` : `${a.label} ${n}?`,
      text: `${a.text ? `${a.text} ` : ""}Servers: ${ids.map(nameOf).join(", ")}.`,
      confirmLabel: action === "tag" ? "Add tag" : `${a.label} ${n}`,
      danger: a.danger,
    });
    if (!ok) return;
    for (const b of Object.values(buttons)) b.disabled = true;
    try {
      const reply = await view.api("POST", "api/servers/bulk",
        { action, ids, ...(tag ? { tag } : {}) });
      showResults(action, reply.results);
      if (action === "delete") for (const id of ids) selected.delete(id);
      await refresh();
    } catch (e) {
      report(error, e);
    } finally {
      sync();
    }
  }
  for (const action of Object.keys(ACTIONS)) {
    buttons[action].addEventListener("click", () => bulk(action));
  }

  function showResults(action, list) {
    const good = list.filter((r) => r.ok).length;
    const what = action === "tag" ? "Add tag" : ACTIONS[action].label;
    swap(results, [h("section", { class: "card", "aria-labelledby": "bulk-results-h" },
      h("h2", { id: "bulk-results-h" }, `${what}: ${good} of ${list.length} done`),
      h("table", { id: "bulk-results-table" },
        h("thead", {}, h("tr", {}, ["Server", "Result", "Why"].map(
          (t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, list.map((r) => h("tr", { dataset: { serverId: String(r.id),
          ok: String(r.ok) } },
        h("td", {}, action === "delete" || !servers.some((s) => s.id === r.id)
          ? nameOf(r.id) : h("a", { href: `#/servers/${Number(r.id)}` }, nameOf(r.id))),
        h("td", { class: "result" }, badge(r.ok ? (action === "reinstall" || action ===
          "uninstall" ? "started" : "ok") : "failed")),
        h("td", { class: "reason" }, r.error || "")))))),
    ]);
  }

  async function refresh() {
    let data;
    try {
      data = await view.api("GET", "api/servers");
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        if (enabled !== false) {
          enabled = false;
          main.append(h("p", { class: "notice", id: "servers-disabled" },
            "Server management is not enabled on this daemon (GET /api/servers " +
            "answered 404). Agents can still be adopted through the API."));
        }
        return;
      }
      throw e;
    }
    if (enabled === null) {
      enabled = true;
      const add = h("details", { class: "card add-server", id: "add-server",
        open: data.servers.length === 0 },
      h("summary", {}, h("span", { class: "summary-title" }, "Add a server")),
      addServerForm(view));
      main.append(listSection, add);
    }
    error.textContent = "";
    servers = data.servers;
    swap(body, servers.length ? servers.map((s) => {
      const box = h("input", { type: "checkbox", id: `srv-sel-${s.id}`,
        "aria-label": `Select ${s.name} (server ${s.id})`, checked: selected.has(s.id),
        dataset: { focusKey: `srv-sel-${s.id}` } });
      box.addEventListener("change", () => {
        if (box.checked) selected.add(s.id); else selected.delete(s.id);
        sync();
      });
      return h("tr", { dataset: { serverId: String(s.id) } },
        h("td", { class: "sel" }, box),
        h("td", { class: "num" }, h("a", { href: `#/servers/${Number(s.id)}`,
          dataset: { focusKey: `s-${s.id}` } }, String(s.id))),
        h("td", { class: "name" }, s.name),
        h("td", { class: "tags" }, tagChips(s.tags)),
        h("td", {}, `${s.username}@${s.host}:${s.ssh_port}`),
        h("td", {}, s.auth_method === "private_key" ? "private key"
          : s.auth_method || "none stored"),
        h("td", {}, s.sudo && s.sudo.mode === "sudo"
          ? (s.sudo.password_set ? "sudo (password)" : "sudo") : "none"),
        h("td", { class: "status" }, badge(s.status), s.install_running ? " (running)" : "",
          s.status_reason ? h("div", { class: "muted small" }, s.status_reason) : null),
        h("td", {}, s.agent_id ? [h("a", { href: `#/agents/${Number(s.agent_id)}` },
          agentLabel(s.agent_id, s.name)), " ", badge(s.agent_status)] : dash));
    }) : [h("tr", {}, h("td", { class: "empty", colspan: "9" }, "No servers yet."))]);
    sync();
  }
  view.every(REFRESH_MS, refresh, (e) => report(error, e));
}
