/**
 * The Events page: the audit trail, newest first, paged; details as key/value pairs.
 */
import { badge, h, page, swap, timeAgo } from "../dom.js";
import { dash, fmtTime } from "../format.js";
import { PAGE, REFRESH_MS, report } from "../view.js";
import { loadAgentNames } from "../names.js";

/** A value of an event's details as one line of text (nested values as JSON). */
function scalar(v) {
  if (v === null || v === undefined) return "\u2014";
  if (typeof v === "string") return v.length > 500 ? `${v.slice(0, 500)}\u2026` : v;
  if (typeof v === "number" || typeof v === "boolean") return String(v);
  const text = JSON.stringify(v);
  return text.length > 240 ? `${text.slice(0, 240)}\u2026` : text;
}

/** "agent:3" as a link, with the agent's name when it is known. */
export function targetLink(target, names) {
  const m = /^(agent|command|server):([0-9]{1,18})$/.exec(String(target || ""));
  if (!m) return target || dash;
  const link = h("a", { href: `#/${m[1]}s/${Number(m[2])}` }, target);
  const name = m[1] === "agent" && names ? names.get(Number(m[2])) : null;
  return name ? [link, " ", h("span", { class: "muted small target-name" }, name)] : link;
}

export function eventsView(main, view, params) {
  const error = h("p", { class: "alert", role: "alert" });
  const body = h("tbody", { id: "events-body" });
  const pager = h("div", { class: "pager" });
  const stack = [];   // before_id of each newer page, for "Newer"
  let before = null;
  const updated = h("span", {}, "loading\u2026");
  main.append(page("Events", h("span", {}, "Audit trail, newest first \u00B7 updated ",
    updated)), error,
  h("div", { class: "table-wrap" }, h("table", { id: "events" },
    h("caption", { class: "visually-hidden" }, "Events"),
    h("thead", {}, h("tr", {}, ["ID", "When", "Actor", "Action", "Target", "Outcome",
      "Details"].map((t) => h("th", { scope: "col" }, t)))), body)), pager);
  void params;
  let names = null;   // agent id -> name, loaded once per visit

  function details(d) {
    if (d === null || d === undefined) return "";
    if (typeof d !== "object" || Array.isArray(d)) return h("code", { class: "small" }, scalar(d));
    const keys = Object.keys(d);
    if (!keys.length) return "";
    return h("dl", { class: "details" }, keys.flatMap((k) => [h("dt", {}, k),
      h("dd", {}, scalar(d[k]))]));
  }

  async function load() {
    const q = before === null ? "" : `&before_id=${before}`;
    const [data, fresh] = await Promise.all([view.api("GET", `api/events?limit=${PAGE}${q}`),
      names ? Promise.resolve(names) : loadAgentNames(view)]);
    names = fresh;
    error.textContent = "";
    swap(body, data.events.length ? data.events.map((e) => h("tr", {
      dataset: { action: String(e.action), eventId: String(e.id) },
    },
    h("td", { class: "num" }, String(e.id)),
    h("td", { class: "nowrap" }, fmtTime(e.at), h("br"), h("span", { class: "muted small" },
      timeAgo(e.at))),
    h("td", {}, e.actor),
    h("td", { class: "action" }, h("code", {}, e.action)),
    h("td", { class: "target" }, targetLink(e.target, names)),
    h("td", { class: "outcome" }, badge(e.outcome)),
    h("td", { class: "details" }, details(e.details)))) : [h("tr", {}, h("td", {
      class: "empty", colspan: "7" }, "No events."))]);
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
