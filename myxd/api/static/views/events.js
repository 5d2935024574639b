/**
 * The Events page: the audit trail, newest first, paged; filtered on the server by
 * kind (the action, e.g. command.create), target (e.g. agent:3) and actor, each an
 * exact match; details as key/value pairs; agents and servers named beside their ids.
 *
 * The filters live in the address ("#/events?kind=agent.adopt&actor=admin-api").
 */
import { badge, h, page, swap, timeAgo } from "../dom.js";
import { dash, fmtTime } from "../format.js";
import { PAGE, REFRESH_MS, report } from "../view.js";
import { loadAgentNames, serverNamesById } from "../names.js";

/** A value of an event's details as one line of text (a list of plain values joined
 * with commas, a change as "old \u2192 new", other nested values as JSON). */
function scalar(v) {
  if (v === null || v === undefined) return "\u2014";
  if (typeof v === "string") return v.length > 500 ? `${v.slice(0, 500)}\u2026` : v;
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  if (Array.isArray(v) && v.length === 0) return "none";
  if (isChange(v)) return `${scalar(v.from)} \u2192 ${scalar(v.to)}`;
  if (Array.isArray(v) && v.every((x) => x === null || typeof x !== "object")) {
    const text = v.map((x) => String(x)).join(", ");
    return text.length > 240 ? `${text.slice(0, 240)}\u2026` : text;
  }
  const text = JSON.stringify(v);
  return text.length > 240 ? `${text.slice(0, 240)}\u2026` : text;
}

/** An edit's {from, to} pair (server.edit, agent.edit events). */
function isChange(v) {
  if (v === null || typeof v !== "object" || Array.isArray(v)) return false;
  const keys = Object.keys(v).sort();
  return keys.length === 2 && keys[0] === "from" && keys[1] === "to";
}

/** "agent:3" as a link, with the agent's (or server's) name when it is known. */
export function targetLink(target, names, servers) {
  const m = /^(agent|command|server):([0-9]{1,18})$/.exec(String(target || ""));
  if (!m) return target || dash;
  const link = h("a", { href: `#/${m[1]}s/${Number(m[2])}` }, target);
  const from = m[1] === "agent" ? names : m[1] === "server" ? servers : null;
  const name = from ? from.get(Number(m[2])) : null;
  return name ? [link, " ", h("span", { class: "muted small target-name" }, name)] : link;
}

export function eventsView(main, view, params) {
  const error = h("p", { class: "alert", role: "alert" });
  const body = h("tbody", { id: "events-body" });
  const pager = h("div", { class: "pager" });
  const stack = [];   // before_id of each newer page, for "Newer"
  let before = null;
  const f = {};
  for (const k of ["kind", "target", "actor"]) f[k] = (params.get(k) || "").slice(0, 200);
  const updated = h("span", {}, "loading\u2026");
  const inputs = {};
  const lists = {};
  const cell = (k, label, placeholder) => {
    lists[k] = h("datalist", { id: `ev-${k}-list` });
    inputs[k] = h("input", { type: "text", id: `ev-${k}`, value: f[k] || null,
      list: `ev-${k}-list`, autocomplete: "off", spellcheck: "false", placeholder });
    return h("div", {}, h("label", { for: `ev-${k}` }, label), inputs[k], lists[k]);
  };
  const filters = h("form", { class: "filters", id: "ev-filters", role: "search",
    "aria-label": "Filter events", novalidate: true },
  cell("kind", "Kind", "e.g. command.create"), cell("target", "Target", "e.g. agent:3"),
  cell("actor", "Actor", "e.g. admin-api"),
  h("div", { class: "filters-end" },
    h("button", { type: "submit", class: "btn btn-primary btn-small", id: "ev-apply" }, "Filter"),
    h("button", { type: "button", class: "btn btn-small", id: "ev-clear" }, "Clear")),
  h("p", { class: "hint filters-hint" }, "Each filter matches exactly; press Enter or " +
    "Filter to apply."));
  const seen = { kind: new Set(), target: new Set(), actor: new Set() };
  main.append(page("Events", h("span", {}, "Audit trail, newest first \u00B7 updated ",
    updated)), filters, error,
  h("div", { class: "table-wrap" }, h("table", { id: "events" },
    h("caption", { class: "visually-hidden" }, "Events"),
    h("thead", {}, h("tr", {}, ["ID", "When", "Actor", "Action", "Target", "Outcome",
      "Details"].map((t) => h("th", { scope: "col" }, t)))), body)), pager);
  let names = null;   // agent id -> name, loaded once per visit
  let servers = null;   // server id -> name, likewise

  function apply() {
    for (const k of Object.keys(inputs)) f[k] = inputs[k].value.trim();
    before = null;
    stack.length = 0;
    const q = query();
    history.replaceState(null, "", `#/events${q ? `?${q}` : ""}`);
    load().catch(onError);
  }
  filters.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
  filters.querySelector("#ev-clear").addEventListener("click", () => {
    for (const input of Object.values(inputs)) input.value = "";
    apply();
  });

  function query() {
    return Object.entries(f).filter(([, v]) => v)
      .map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
  }

  /** Offer the values seen so far in each filter's list. */
  function remember(events) {
    let grew = false;
    for (const e of events) {
      for (const [k, v] of [["kind", e.action], ["target", e.target], ["actor", e.actor]]) {
        if (v && !seen[k].has(v)) { seen[k].add(v); grew = true; }
      }
    }
    if (!grew) return;
    for (const k of Object.keys(seen)) {
      swap(lists[k], [...seen[k]].sort().slice(0, 200).map((v) => h("option", { value: v })));
    }
  }

  function details(d) {
    if (d === null || d === undefined) return "";
    if (typeof d !== "object" || Array.isArray(d)) return h("code", { class: "small" }, scalar(d));
    const keys = Object.keys(d);
    if (!keys.length) return "";
    return h("dl", { class: "details" }, keys.flatMap((k) => [h("dt", {}, k),
      h("dd", {}, scalar(d[k]))]));
  }

  let seq = 0;
  async function load() {
    const mine = ++seq;
    const q = (before === null ? "" : `&before_id=${before}`) + (query() ? `&${query()}` : "");
    const [data, fresh, freshServers] = await Promise.all([
      view.api("GET", `api/events?limit=${PAGE}${q}`),
      names ? Promise.resolve(names) : loadAgentNames(view),
      servers ? Promise.resolve(servers) : serverNamesById(view)]);
    names = fresh;
    servers = freshServers;
    if (mine !== seq) return;
    error.textContent = "";
    remember(data.events);
    swap(body, data.events.length ? data.events.map((e) => h("tr", {
      dataset: { action: String(e.action), eventId: String(e.id) },
    },
    h("td", { class: "num" }, String(e.id)),
    h("td", { class: "nowrap" }, fmtTime(e.at), h("br"), h("span", { class: "muted small" },
      timeAgo(e.at))),
    h("td", { class: "actor" }, e.actor),
    h("td", { class: "action" }, h("code", {}, e.action)),
    h("td", { class: "target" }, targetLink(e.target, names, servers)),
    h("td", { class: "outcome" }, badge(e.outcome)),
    h("td", { class: "details" }, details(e.details)))) : [h("tr", {}, h("td", {
      class: "empty", colspan: "7" }, query() ? "No event matches these filters." : "No events."))]);
    swap(pager, [
      h("button", {
        type: "button", class: "btn btn-small", disabled: stack.length === 0,
        dataset: { focusKey: "newer" },
        onclick: () => { before = stack.pop() ?? null; load().catch(onError); },
      }, "\u2190 Newer"),
      h("button", {
        type: "button", class: "btn btn-small", disabled: data.next_before_id === null,
        dataset: { focusKey: "older" },
        onclick: () => { stack.push(before); before = data.next_before_id; load().catch(onError); },
      }, "Older \u2192"),
      h("span", { class: "muted small" }, before === null ? "newest page, refreshed every 5 s"
        : "older page"),
    ]);
    updated.replaceChildren(timeAgo(Date.now() / 1000));
  }
  const onError = (e) => report(error, e);
  // Only the newest page changes by itself; older pages are refreshed on demand.
  view.every(REFRESH_MS, () => (before === null ? load() : Promise.resolve()), onError);
}
