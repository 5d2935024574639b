/**
 * One deployment, live: a row per agent (status, ansible's changed/ok/failed, bytes
 * sent, the failing task) polled every second until the deployment is final, each
 * row linking to that agent's live log (the command page), summary counts, and
 * Cancel with confirmation. An unknown id says so and stops polling.
 */
import { ApiError } from "../api.js";
import { badge, confirmDialog, h, page, swap } from "../dom.js";
import { countsText, dash, fmtBytes as fmtSize, fmtTime } from "../format.js";
import { agentLabel } from "../names.js";
import { report } from "../view.js";

const POLL_MS = 1000;
const FINAL = new Set(["success", "partial", "failed", "cancelled"]);

function num(v) {
  return v === null || v === undefined ? dash : String(v);
}

export function deploymentView(main, view, id) {
  const error = h("p", { class: "alert", role: "alert", id: "deployment-error" });
  const statusSlot = h("span", { id: "deployment-status" }, badge("loading"));
  const cancel = h("button", { type: "button", class: "btn btn-danger", id: "dep-cancel",
    hidden: true }, "Cancel deployment");
  const summary = h("p", { class: "summary", id: "dep-summary", role: "status" });
  const facts = h("dl", { class: "facts", id: "dep-facts" });
  const tbody = h("tbody", { id: "targets-body" });
  const table = h("table", { id: "targets" },
    h("caption", { class: "visually-hidden" }, "Agents of this deployment"),
    h("thead", {}, h("tr", {}, ["Agent", "Status", "Changed", "OK", "Failed", "Sent",
      "Reason", "Log"].map((t) => h("th", { scope: "col" }, t)))), tbody);
  main.append(page(`Deployment ${id}`, statusSlot, [cancel]), error, summary,
    h("section", { class: "card", "aria-label": "Deployment details" }, facts),
    h("div", { class: "table-wrap" }, table));

  function row(t) {
    return h("tr", { dataset: { agentId: String(t.agent_id), status: t.status } },
      h("td", { class: "agent" }, h("a", { href: `#/agents/${Number(t.agent_id)}` },
        agentLabel(t.agent_id, t.agent_name))),
      h("td", { class: "status" }, badge(t.status)),
      h("td", { class: "num changed" }, num(t.changed)),
      h("td", { class: "num ok" }, num(t.ok)),
      h("td", { class: "num failed" }, num(t.failed)),
      h("td", { class: "nowrap sent" }, t.bytes_sent ? fmtSize(t.bytes_sent) : dash),
      h("td", { class: "reason" }, t.reason || ""),
      h("td", { class: "log" }, t.command_id ? h("a", {
        href: `#/commands/${Number(t.command_id)}`, class: "btn btn-small",
      }, "Live log") : h("span", { class: "muted" }, "not started")));
  }

  let last = null;
  function render(rec) {
    last = rec;
    statusSlot.replaceChildren(badge(rec.status));
    summary.textContent = countsText(rec.counts);
    cancel.hidden = FINAL.has(rec.status);
    const pairs = [
      ["Playbook", rec.playbook],
      ["Variables", rec.var_names.length ? rec.var_names.join(", ") : dash],
      ["Artifacts", Object.keys(rec.artifacts).length ? Object.entries(rec.artifacts)
        .map(([k, v]) => `${k} = ${v.slice(0, 12)}`).join(", ") : dash],
      ["Batch size", rec.batch_size ? String(rec.batch_size) : "all at once"],
      ["Max failures", rec.max_failures ? String(rec.max_failures) : dash],
      ["Created", fmtTime(rec.created_at)],
      ["Finished", rec.finished_at ? fmtTime(rec.finished_at) : dash],
    ];
    swap(facts, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    swap(tbody, rec.targets.map(row));
  }

  cancel.addEventListener("click", async () => {
    const ok = await confirmDialog({
      title: `Cancel deployment ${id}?`,
      text: "No new agent will start, and the playbooks running now are cancelled. " +
        "Agents that finished keep what was deployed.",
      confirmLabel: "Cancel deployment",
    });
    if (!ok) return;
    try {
      render(await view.api("POST", `api/deployments/${id}/cancel`));
    } catch (e) {
      report(error, e);
    }
  });

  async function poll() {
    while (view.alive) {
      try {
        render(await view.api("GET", `api/deployments/${id}`));
        error.textContent = "";
        if (FINAL.has(last.status)) return;
      } catch (e) {
        if (e instanceof ApiError && e.status === 404) {
          error.textContent = `There is no deployment ${id}.`;
          statusSlot.replaceChildren();
          return;
        }
        report(error, e);
        if (!view.alive || (e && (e.name === "AbortError" || e.name === "ViewStopped"))) return;
      }
      await view.sleep(POLL_MS);
    }
  }
  poll();
}
