/**
 * One agent: its record (name in the heading and the tab title, tags; both editable
 * through PATCH api/agents/{id}), the system facts of its last get_status, and its
 * command history.
 */
import { $, badge, confirmDialog, h, page, swap, tagChips, timeAgo } from "../dom.js";
import { commandLine, dash, fmtBytes, fmtDuration } from "../format.js";
import { ApiError } from "../api.js";
import { REFRESH_MS, report } from "../view.js";
import { clearFieldErrors, fieldError, showApiErrors } from "../forms.js";
import { agentLabel, agentName, parseTags, TAG_RE } from "../names.js";

export function agentView(main, view, agentId) {
  const head = h("div");
  const error = h("p", { class: "alert", role: "alert" });
  const summary = h("dl", { class: "kv", id: "agent-summary" });
  const system = h("dl", { class: "kv", id: "agent-system" });
  const history = h("tbody", { id: "history-body" });
  const pager = h("div", { class: "pager" });
  let offset = 0;
  // -- name and tags ---------------------------------------------------------------
  const nameInput = h("input", { type: "text", id: "agent-name-input", dataset: { field: "name" },
    autocomplete: "off" });
  const tagsInput = h("input", { type: "text", id: "agent-tags-input", dataset: { field: "tags" },
    autocomplete: "off", spellcheck: "false", placeholder: "e.g. de, edge" });
  const editError = h("p", { class: "alert", role: "alert", id: "agent-edit-error" });
  const editForm = h("form", { id: "agent-edit", novalidate: true }, editError,
    h("div", { class: "form-grid" },
      h("div", { class: "row" }, h("label", { for: "agent-name-input" }, "Name"), nameInput,
        h("p", { class: "hint" }, "An agent installed from a server takes the server's name: " +
          "rename the server instead.")),
      h("div", { class: "row" }, h("label", { for: "agent-tags-input" }, "Tags"), tagsInput,
        h("p", { class: "hint" }, "Separated by commas or spaces."))),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary", id: "agent-edit-save" }, "Save")));
  const editBox = h("details", { class: "card", id: "agent-edit-box" },
    h("summary", {}, "Edit name and tags"), editForm);
  let lastAgent = null;
  editBox.addEventListener("toggle", () => {
    if (editBox.open && lastAgent) {
      nameInput.value = lastAgent.name !== lastAgent.host ? lastAgent.name : "";
      tagsInput.value = (lastAgent.tags || []).join(", ");
    }
  });
  editForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(editForm);
    editError.textContent = "";
    const tags = parseTags(tagsInput.value);
    const bad = tags.filter((t) => !TAG_RE.test(t));
    const body = { tags };
    if (nameInput.value.trim()) body.name = nameInput.value.trim();
    if (bad.length) {
      fieldError(tagsInput, `Not a valid tag: ${bad.join(", ")}. A tag is 1-32 letters, ` +
        "digits, '.', '_' or '-'.");
      tagsInput.focus();
      return;
    }
    try {
      await view.api("PATCH", `api/agents/${agentId}`, body);
      editBox.open = false;
      await refresh();
    } catch (e) {
      if (e instanceof ApiError && e.status === 400) {
        showApiErrors(editForm, e, { name: "Name", tags: "Tags" }, editError);
      } else report(editError, e);
    }
  });

  main.append(head, error, editBox,
    h("div", { class: "grid-2" },
      h("section", { class: "card", "aria-labelledby": "agent-h" },
        h("h2", { id: "agent-h" }, "Agent"), summary),
      h("section", { class: "card", "aria-labelledby": "system-h" },
        h("h2", { id: "system-h" }, "System (last get_status)"), system)),
    h("section", { "aria-labelledby": "history-h" },
      h("h2", { id: "history-h" }, "Command history"),
      h("div", { class: "table-wrap" }, h("table", { id: "history" },
        h("thead", {}, h("tr", {}, ["ID", "Command", "Status", "Exit", "Created", "Duration"]
          .map((t) => h("th", { scope: "col" }, t)))), history)),
      pager));
  head.append(page(`Agent ${agentId}`, "refreshed every 5 s", [
    h("a", { class: "btn btn-primary", href: `#/run?agents=${agentId}` }, "Run a command"),
    h("button", { type: "button", class: "btn btn-danger", onclick: remove }, "Delete agent"),
  ]));

  function kv(dl, pairs) {
    swap(dl, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  async function remove() {
    const ok = await confirmDialog({
      title: `Delete agent ${agentId}?`,
      text: "The daemon forgets this agent and its command history. The agent process " +
        "itself keeps running on its host.",
      confirmLabel: "Delete agent",
    });
    if (!ok) return;
    try {
      await view.api("DELETE", `api/agents/${agentId}`);
      location.hash = "#/fleet";
    } catch (e) { report(error, e); }
  }

  function memory(m) {
    if (!m || typeof m.total !== "number") return dash;
    const used = m.total - (m.available || 0);
    return [`${fmtBytes(used)} used of ${fmtBytes(m.total)} ` +
      `(${Math.round((used / m.total) * 100)}%)`,
    h("meter", { min: "0", max: String(m.total), value: String(used), high: String(m.total * 0.9),
      "aria-label": "memory used" })];
  }

  function disk(d) {
    if (!d || typeof d.total !== "number") return dash;
    // The bar shows used space, so the words do too (free space follows).
    const used = d.total - (d.free || 0);
    return [h("span", { id: "disk-text" },
      `${d.path || "/"}: ${fmtBytes(used)} used of ${fmtBytes(d.total)} ` +
      `(${Math.round((used / d.total) * 100)}%, ${fmtBytes(d.free)} free) `),
    h("meter", { id: "disk-meter", min: "0", max: String(d.total), value: String(used),
        high: String(d.total * 0.9), "aria-label": "disk used" })];
  }

  async function refresh() {
    const [agent, cmds] = await Promise.all([
      view.api("GET", `api/agents/${agentId}`),
      view.api("GET", `api/agents/${agentId}/commands?limit=20&offset=${offset}`),
    ]);
    error.textContent = "";
    lastAgent = agent;
    kv(summary, [
      ["Tags", agent.tags && agent.tags.length
        ? h("span", { id: "agent-tags" }, tagChips(agent.tags)) : "none"],
      ["Status", [badge(agent.status), agent.status_reason ? ` ${agent.status_reason}` : ""]],
      ["Address", `${agent.host}:${agent.rpc_port}`],
      ["Version", agent.version || dash],
      ["Last heartbeat", [timeAgo(agent.last_heartbeat),
        agent.last_latency !== null && agent.last_latency !== undefined
          ? ` (${Math.round(agent.last_latency * 1000)} ms)` : ""]],
      ["Failed cycles", String(agent.failed_cycles ?? 0)],
      ["Certificate", h("code", { class: "small" }, agent.cert_fingerprint || dash)],
      ["Server", agent.server_id ? h("a", { href: `#/servers/${Number(agent.server_id)}` },
        `${agent.name} (server ${agent.server_id})`) : "adopted (no server record)"],
      ["Added", timeAgo(agent.created_at)],
    ]);
    const d = agent.details;
    const title = $("#page-title", head);
    const label = agentLabel(agentId, agentName(agent));
    const text = label === `agent ${agentId}` ? `Agent ${agentId}` : label;
    if (title && title.textContent !== text) {
      title.textContent = text;
      document.title = `${text} \u00B7 MyX console`;
    }
    if (d && typeof d === "object") {
      const load = Array.isArray(d.load_avg)
        ? d.load_avg.map((x) => (typeof x === "number" ? x.toFixed(2) : dash)).join("  ") : dash;
      kv(system, [
        ["Hostname", d.hostname || dash],
        ["OS", d.os || dash],
        ["Python", d.python || dash],
        ["Uptime", fmtDuration(d.uptime)],
        ["Load average", load],
        ["Memory", memory(d.memory)],
        ["Disk", disk(d.disk)],
        ["Deployment tool", d.deployment_tool_version || "not installed"],
        ["Running commands", String(d.running_commands ?? dash)],
      ]);
    } else {
      swap(system, [h("p", { class: "muted" }, "No status reported yet.")]);
    }
    swap(history, cmds.commands.length ? cmds.commands.map((c) => h("tr", {},
      h("td", { class: "num" }, h("a", { href: `#/commands/${Number(c.id)}` }, String(c.id))),
      h("td", { class: "cmd" }, h("code", {}, c.kind === "ansible"
        ? `ansible ${c.command}` : commandLine(c))),
      h("td", {}, badge(c.status)),
      h("td", { class: "num" }, c.exit_code === null ? dash : String(c.exit_code)),
      h("td", { class: "nowrap" }, timeAgo(c.created_at)),
      h("td", { class: "nowrap" }, fmtDuration(c.started_at && c.finished_at
        ? c.finished_at - c.started_at : null)),
    )) : [h("tr", {}, h("td", { class: "empty", colspan: "6" }, "No commands yet."))]);
    swap(pager, [
      h("button", {
        type: "button", class: "btn btn-small", disabled: offset === 0,
        dataset: { focusKey: "newer" },
        onclick: () => { offset = Math.max(0, offset - 20); refresh().catch(onError); },
      }, "\u2190 Newer"),
      h("button", {
        type: "button", class: "btn btn-small", disabled: cmds.next_offset === null,
        dataset: { focusKey: "older" },
        onclick: () => { offset = cmds.next_offset; refresh().catch(onError); },
      }, "Older \u2192"),
    ]);
  }
  const onError = (e) => report(error, e);
  view.every(REFRESH_MS, refresh, onError);
}
