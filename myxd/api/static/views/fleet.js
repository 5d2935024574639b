/**
 * The Fleet page: agents (with their names) by status, paged, selectable for a run,
 * with the Xray and Caddy version each runs and a drift badge (GET api/fleet/services:
 * a version or config that differs from the last deployment, or the service down).
 */
import { ApiError } from "../api.js";
import { badge, h, page, safeClass, swap, timeAgo } from "../dom.js";
import { dash } from "../format.js";
import { agentLabel, agentName, serverNamesByAgent } from "../names.js";
import { PAGE, REFRESH_MS, report } from "../view.js";

const AGENT_STATUSES = ["online", "offline", "installing", "error"];
const SERVICES = [["xray", "Xray"], ["caddy", "Caddy"]];

/** service -> agent id -> its drift row; empty when the daemon has no deployments. */
async function servicesByAgent(view) {
  const out = new Map(SERVICES.map(([s]) => [s, new Map()]));
  try {
    const data = await view.api("GET", "api/fleet/services");
    for (const [s] of SERVICES) {
      for (const r of (data.services[s] || { agents: [] }).agents) out.get(s).set(r.agent_id, r);
    }
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
  }
  return out;
}

/** The version an agent runs, and a drift badge that says why on hover. */
function serviceCell(service, r) {
  const cell = h("td", { class: `svc svc-${service}` });
  if (!r) return add(cell, dash);
  cell.append(r.active_version || (r.active === false ? "down" : dash));
  if (r.drift && r.drift.length) {
    cell.append(badge("drift", { title: r.drift.join("; "), "aria-label":
      `${service} drift: ${r.drift.join("; ")}` }));
  }
  return cell;
}

function add(el, text) { el.append(text); return el; }

export function fleetView(main, view, params) {
  const status = AGENT_STATUSES.includes(params.get("status")) ? params.get("status") : null;
  let offset = Math.max(0, Number.parseInt(params.get("offset") || "0", 10) || 0);
  const selected = new Set();
  const updated = h("span", {}, "loading\u2026");
  const runSelected = h("button", {
    type: "button", class: "btn btn-primary", id: "run-selected", disabled: true,
    onclick: () => { location.hash = `#/run?agents=${[...selected].join(",")}`; },
  }, "Run on selected");
  main.append(page("Fleet", h("span", {}, "Agents \u00B7 refreshed every 5 s \u00B7 updated ",
    updated), [runSelected, h("a", { class: "btn", href: "#/run?agents=all" }, "Run on all")]));
  const counts = h("nav", { class: "counts", "aria-label": "Agents by status", id: "counts" });
  const error = h("p", { class: "alert", role: "alert" });
  const selectAll = h("input", {
    type: "checkbox", "aria-label": "Select all agents on this page", id: "select-all",
    dataset: { focusKey: "select-all" },
  });
  const tbody = h("tbody", { id: "agents-body" });
  const table = h("table", { id: "agents" },
    h("caption", { class: "visually-hidden" }, "Agents"),
    h("thead", {}, h("tr", {},
      h("th", { class: "sel", scope: "col" }, selectAll),
      ["ID", "Name", "Host", "Port", "Status", "Version", "Xray", "Caddy", "Last heartbeat",
        "Reason"].map(
        (t) => h("th", { scope: "col", class: t === "ID" || t === "Port" ? "num" : null }, t)))),
    tbody);
  const pager = h("div", { class: "pager" });
  main.append(counts, error, h("div", { class: "table-wrap" }, table), pager);
  let rows = [];
  let serverNames = new Map();
  let services = new Map();

  function syncSelection() {
    runSelected.disabled = selected.size === 0;
    runSelected.textContent = selected.size ? `Run on selected (${selected.size})`
      : "Run on selected";
    const onPage = rows.map((a) => a.id);
    selectAll.checked = onPage.length > 0 && onPage.every((i) => selected.has(i));
  }

  selectAll.addEventListener("change", () => {
    for (const a of rows) {
      if (selectAll.checked) selected.add(a.id); else selected.delete(a.id);
    }
    for (const box of tbody.querySelectorAll("input[type=checkbox]")) {
      box.checked = selectAll.checked;
    }
    syncSelection();
  });

  function countLink(label, value, n) {
    const href = value ? `#/fleet?status=${value}` : "#/fleet";
    return h("a", {
      class: "count", href, "aria-current": (value || null) === status ? "true" : null,
      dataset: { status: value || "all" },
    }, h("span", { class: "n" }, String(n)), " ",
    h("span", { class: "k" }, h("span", { class: `dot st-${safeClass(value || "all")}` }),
      label));
  }

  function row(agent) {
    const box = h("input", {
      type: "checkbox", "aria-label": `Select agent ${agent.id}`,
      title: `Select ${agentLabel(agent.id, agentName(agent, serverNames))}`, checked: selected.has(agent.id),
      dataset: { focusKey: `sel-${agent.id}` },
    });
    box.addEventListener("change", () => {
      if (box.checked) selected.add(agent.id); else selected.delete(agent.id);
      syncSelection();
    });
    return h("tr", { dataset: { agentId: String(agent.id), status: String(agent.status) } },
      h("td", { class: "sel" }, box),
      h("td", { class: "num" }, h("a", {
        href: `#/agents/${Number(agent.id)}`, dataset: { focusKey: `a-${agent.id}` },
      }, String(agent.id))),
      h("td", { class: "name" }, agentName(agent, serverNames) || dash),
      h("td", { class: "host" }, agent.host),
      h("td", { class: "num" }, String(agent.rpc_port)),
      h("td", { class: "status" }, badge(agent.status)),
      h("td", {}, agent.version || dash),
      ...SERVICES.map(([s]) => serviceCell(s, services.get(s).get(agent.id))),
      h("td", { class: "nowrap heartbeat" }, timeAgo(agent.last_heartbeat)),
      h("td", { class: "reason" }, agent.status_reason || ""));
  }

  async function refresh() {
    const filter = status ? `&status=${status}` : "";
    const [list, servers, svc, ...perStatus] = await Promise.all([
      view.api("GET", `api/agents?limit=${PAGE}&offset=${offset}${filter}`),
      serverNamesByAgent(view),
      servicesByAgent(view),
      ...AGENT_STATUSES.map((s) => view.api("GET", `api/agents?limit=1&status=${s}`)),
    ]);
    error.textContent = "";
    serverNames = servers;
    services = svc;
    if (list.agents.length === 0 && offset > 0 && list.total > 0) {
      offset = Math.max(0, Math.floor((list.total - 1) / PAGE) * PAGE);
      return refresh();
    }
    const total = perStatus.reduce((sum, r) => sum + r.total, 0);
    swap(counts, [countLink("All agents", null, total),
      ...AGENT_STATUSES.map((s, i) => countLink(s, s, perStatus[i].total))]);
    rows = list.agents;
    swap(tbody, rows.length ? rows.map(row) : [h("tr", {}, h("td", {
      class: "empty", colspan: "11",
    }, status ? `No ${status} agents.` : "No agents yet. Adopt one with POST /api/agents, " +
      "or add a server on the Servers page."))]);
    syncSelection();
    const first = list.total ? offset + 1 : 0;
    const last = offset + list.agents.length;
    swap(pager, [
      h("span", { class: "muted small" }, `${first}\u2013${last} of ${list.total}`),
      h("button", {
        type: "button", class: "btn btn-small", disabled: offset === 0,
        dataset: { focusKey: "prev" },
        onclick: () => { offset = Math.max(0, offset - PAGE); refresh().catch(onError); },
      }, "\u2190 Previous"),
      h("button", {
        type: "button", class: "btn btn-small", disabled: last >= list.total,
        dataset: { focusKey: "next" },
        onclick: () => { offset += PAGE; refresh().catch(onError); },
      }, "Next \u2192"),
    ]);
    updated.replaceChildren(timeAgo(Date.now() / 1000));
  }

  const onError = (e) => report(error, e);
  view.every(REFRESH_MS, refresh, onError);
}
