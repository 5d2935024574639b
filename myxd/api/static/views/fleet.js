/**
 * The Fleet page: agents (with their names and tags) by status, searched by name or
 * host, filtered by status and tag (all on the server: GET api/agents?q=&status=&tag=,
 * a page at a time, so 1,000 agents cost one page of rows), selectable for a run,
 * with the Xray and Caddy version each runs and a drift badge (GET api/fleet/services:
 * a version or config that differs from the last deployment, or the service down).
 *
 * The filters live in the address ("#/fleet?q=web&tag=de&status=online"), updated
 * without reloading the page, so a filtered fleet can be bookmarked or shared.
 */
import { ApiError } from "../api.js";
import { badge, h, page, safeClass, swap, tagChips, timeAgo } from "../dom.js";
import { dash } from "../format.js";
import { agentLabel, agentName, TAG_RE } from "../names.js";
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
  const filters = {
    status: AGENT_STATUSES.includes(params.get("status")) ? params.get("status") : "",
    q: (params.get("q") || "").slice(0, 200),
    tag: TAG_RE.test(params.get("tag") || "") ? params.get("tag").toLowerCase() : "",
  };
  let offset = Math.max(0, Number.parseInt(params.get("offset") || "0", 10) || 0);
  const selected = new Set();
  const updated = h("span", {}, "loading\u2026");
  const runSelected = h("button", {
    type: "button", class: "btn btn-primary", id: "run-selected", disabled: true,
    onclick: () => { location.hash = `#/run?agents=${[...selected].join(",")}`; },
  }, "Run on selected");
  const runTag = h("a", { class: "btn", id: "run-tag", hidden: true }, "Run on tag");
  main.append(page("Fleet", h("span", {}, "Agents \u00B7 refreshed every 5 s \u00B7 updated ",
    updated), [runSelected, runTag,
    h("a", { class: "btn", href: "#/run?agents=all" }, "Run on all")]));
  const counts = h("nav", { class: "counts", "aria-label": "Agents by status", id: "counts" });
  const error = h("p", { class: "alert", role: "alert" });

  // -- the filters -------------------------------------------------------------
  const search = h("input", { type: "search", id: "fleet-search", value: filters.q,
    placeholder: "Name or host", autocomplete: "off", spellcheck: "false" });
  const statusSel = h("select", { id: "fleet-status" },
    h("option", { value: "", selected: !filters.status }, "Any status"),
    AGENT_STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)));
  const tagList = h("datalist", { id: "fleet-tags" });
  const tagInput = h("input", { type: "text", id: "fleet-tag", value: filters.tag,
    list: "fleet-tags", placeholder: "e.g. de", autocomplete: "off", spellcheck: "false",
    class: "short" });
  const tagError = h("p", { class: "field-error", id: "fleet-tag-error", hidden: true });
  const clear = h("button", { type: "button", class: "btn btn-small", id: "fleet-clear" },
    "Clear filters");
  const filterBar = h("form", { class: "filters", id: "fleet-filters", role: "search",
    "aria-label": "Filter agents" },
  h("div", {}, h("label", { for: "fleet-search" }, "Search"), search),
  h("div", {}, h("label", { for: "fleet-status" }, "Status"), statusSel),
  h("div", {}, h("label", { for: "fleet-tag" }, "Tag"), tagInput, tagList, tagError),
  h("div", { class: "filters-end" }, clear));
  filterBar.addEventListener("submit", (e) => e.preventDefault());

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
        "Reason", "Tags"].map(
        (t) => h("th", { scope: "col", class: t === "ID" || t === "Port" ? "num" : null }, t)))),
    tbody);
  const pager = h("div", { class: "pager", id: "fleet-pager" });
  main.append(counts, filterBar, error, h("div", { class: "table-wrap" }, table), pager);
  let rows = [];
  let services = new Map(SERVICES.map(([s]) => [s, new Map()]));
  const knownTags = new Set();
  let seq = 0;   // only the newest answer is shown (typing starts a request per key)

  function query(extra) {
    const parts = [];
    if (filters.q) parts.push(`q=${encodeURIComponent(filters.q)}`);
    if (filters.tag) parts.push(`tag=${encodeURIComponent(filters.tag)}`);
    return parts.concat(extra || []).join("&");
  }

  /** The filters into the address bar, without a reload (no hashchange). */
  function remember() {
    const q = query([filters.status ? `status=${filters.status}` : null,
      offset ? `offset=${offset}` : null].filter(Boolean));
    history.replaceState(null, "", `#/fleet${q ? `?${q}` : ""}`);
    runTag.hidden = !filters.tag;
    if (filters.tag) {
      runTag.href = `#/run?agents=tag:${encodeURIComponent(filters.tag)}`;
      runTag.textContent = `Run on tag ${filters.tag}`;
    }
  }

  function changed() {
    offset = 0;
    remember();
    refresh(false).catch(onError);
  }
  search.addEventListener("input", () => { filters.q = search.value.trim(); changed(); });
  statusSel.addEventListener("change", () => { filters.status = statusSel.value; changed(); });
  tagInput.addEventListener("input", () => {
    const t = tagInput.value.trim().toLowerCase();
    const bad = t !== "" && !TAG_RE.test(t);
    tagError.hidden = !bad;
    tagError.textContent = bad ? "A tag is letters, digits, '.', '_' or '-' (up to 32)." : "";
    if (bad) tagInput.setAttribute("aria-invalid", "true");
    else tagInput.removeAttribute("aria-invalid");
    if (bad || t === filters.tag) return;
    filters.tag = t;
    changed();
  });
  clear.addEventListener("click", () => {
    filters.q = filters.tag = filters.status = "";
    search.value = tagInput.value = statusSel.value = "";
    tagError.hidden = true;
    changed();
  });

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
    const link = h("a", {
      class: "count", href: `#/fleet${value ? `?status=${value}` : ""}`,
      "aria-current": (value || "") === filters.status ? "true" : null,
      dataset: { status: value || "all" },
    }, h("span", { class: "n" }, String(n)), " ",
    h("span", { class: "k" }, h("span", { class: `dot st-${safeClass(value || "all")}` }),
      label));
    link.addEventListener("click", (event) => {
      // Same page: keep the search and the tag, change the status only.
      event.preventDefault();
      filters.status = value || "";
      statusSel.value = filters.status;
      changed();
    });
    return link;
  }

  function row(agent) {
    const name = agentName(agent);
    const box = h("input", {
      type: "checkbox", "aria-label": `Select agent ${agent.id}`,
      title: `Select ${agentLabel(agent.id, name)}`, checked: selected.has(agent.id),
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
      h("td", { class: "name" }, name || dash),
      h("td", { class: "host" }, agent.host),
      h("td", { class: "num" }, String(agent.rpc_port)),
      h("td", { class: "status" }, badge(agent.status)),
      h("td", {}, agent.version || dash),
      ...SERVICES.map(([s]) => serviceCell(s, services.get(s).get(agent.id))),
      h("td", { class: "nowrap heartbeat" }, timeAgo(agent.last_heartbeat)),
      h("td", { class: "reason" }, agent.status_reason || ""),
      h("td", { class: "tags" }, tagChips(agent.tags)));
  }

  function emptyText() {
    if (filters.q || filters.tag || filters.status) {
      return "No agent matches these filters.";
    }
    return "No agents yet. Adopt one with POST /api/agents, or add a server on the " +
      "Servers page.";
  }

  /** One refresh; `full` also reads the service versions (the 5 s loop does). */
  async function refresh(full = true) {
    const mine = ++seq;
    const filter = filters.status ? [`status=${filters.status}`] : [];
    const [list, svc, ...perStatus] = await Promise.all([
      view.api("GET", `api/agents?${query([`limit=${PAGE}`, `offset=${offset}`, ...filter])}`),
      full ? servicesByAgent(view) : Promise.resolve(services),
      ...AGENT_STATUSES.map((s) => view.api("GET",
        `api/agents?${query(["limit=1", `status=${s}`])}`)),
    ]);
    if (mine !== seq) return;   // a newer search has started meanwhile
    error.textContent = "";
    services = svc;
    if (list.agents.length === 0 && offset > 0 && list.total > 0) {
      offset = Math.max(0, Math.floor((list.total - 1) / PAGE) * PAGE);
      remember();
      return refresh(full);
    }
    const total = perStatus.reduce((sum, r) => sum + r.total, 0);
    swap(counts, [countLink("All agents", null, total),
      ...AGENT_STATUSES.map((s, i) => countLink(s, s, perStatus[i].total))]);
    rows = list.agents;
    let newTags = false;
    for (const a of rows) {
      for (const t of a.tags || []) if (!knownTags.has(t)) { knownTags.add(t); newTags = true; }
    }
    if (newTags) {
      swap(tagList, [...knownTags].sort().map((t) => h("option", { value: t })));
    }
    swap(tbody, rows.length ? rows.map(row) : [h("tr", {}, h("td", {
      class: "empty", colspan: "12",
    }, emptyText()))]);
    syncSelection();
    const first = list.total ? offset + 1 : 0;
    const last = offset + list.agents.length;
    tbody.dataset.total = String(list.total);
    swap(pager, [
      h("span", { class: "muted small", id: "fleet-range" },
        `${first}\u2013${last} of ${list.total}`),
      h("button", {
        type: "button", class: "btn btn-small", disabled: offset === 0,
        dataset: { focusKey: "prev" },
        onclick: () => { offset = Math.max(0, offset - PAGE); remember(); refresh(false).catch(onError); },
      }, "\u2190 Previous"),
      h("button", {
        type: "button", class: "btn btn-small", disabled: last >= list.total,
        dataset: { focusKey: "next" },
        onclick: () => { offset += PAGE; remember(); refresh(false).catch(onError); },
      }, "Next \u2192"),
    ]);
    updated.replaceChildren(timeAgo(Date.now() / 1000));
  }

  const onError = (e) => report(error, e);
  remember();
  view.every(REFRESH_MS, refresh, onError);
}
