/**
 * The Servers page: servers managed over SSH, and the add-server form.
 */
import { badge, h, page, swap } from "../dom.js";
import { dash } from "../format.js";
import { ApiError } from "../api.js";
import { REFRESH_MS, report } from "../view.js";
import { agentLabel } from "../names.js";
import { addServerForm } from "./server-form.js";

export function serversView(main, view) {
  const error = h("p", { class: "alert", role: "alert", id: "servers-error" });
  const body = h("tbody", { id: "servers-body" });
  const listSection = h("section", { "aria-label": "Servers" },
    h("div", { class: "table-wrap" }, h("table", { id: "servers" },
      h("caption", { class: "visually-hidden" }, "Servers"),
      h("thead", {}, h("tr", {}, ["ID", "Name", "SSH", "Auth", "Sudo", "Status", "Agent"]
        .map((t) => h("th", { scope: "col" }, t)))), body)));
  main.append(page("Servers", "Install agents over SSH \u00B7 refreshed every 5 s"), error);
  let enabled = null;

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
    swap(body, data.servers.length ? data.servers.map((s) => h("tr", {
      dataset: { serverId: String(s.id) } },
    h("td", { class: "num" }, h("a", { href: `#/servers/${Number(s.id)}`,
      dataset: { focusKey: `s-${s.id}` } }, String(s.id))),
    h("td", {}, s.name),
    h("td", {}, `${s.username}@${s.host}:${s.ssh_port}`),
    h("td", {}, s.auth_method === "private_key" ? "private key"
      : s.auth_method || "none stored"),
    h("td", {}, s.sudo && s.sudo.mode === "sudo"
      ? (s.sudo.password_set ? "sudo (password)" : "sudo") : "none"),
    h("td", {}, badge(s.status), s.install_running ? " (running)" : "",
      s.status_reason ? h("div", { class: "muted small" }, s.status_reason) : null),
    h("td", {}, s.agent_id ? [h("a", { href: `#/agents/${Number(s.agent_id)}` },
      agentLabel(s.agent_id, s.name)), " ", badge(s.agent_status)] : dash)))
      : [h("tr", {}, h("td", { class: "empty", colspan: "7" }, "No servers yet."))]);
  }
  view.every(REFRESH_MS, refresh, (e) => report(error, e));
}
