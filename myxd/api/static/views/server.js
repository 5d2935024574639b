/**
 * One server: its record (name in the heading and the tab title, tags), Edit (the
 * server form, PATCH), its latest install's steps live (readable labels, the step
 * identifier kept beside them), reinstall/uninstall/delete.
 */
import { badge, confirmDialog, h, page, swap, tagChips, timeAgo } from "../dom.js";
import { dash, fmtDuration, fmtTime } from "../format.js";
import { ApiError, isAbort } from "../api.js";
import { REFRESH_MS, report } from "../view.js";
import { ansiNodes } from "../term.js";
import { agentLabel } from "../names.js";
import { serverForm } from "./server-form.js";

/** Operator words for the installer's step identifiers (myxd/install INSTALL_STEPS). */
export const STEP_LABELS = {
  connect: "Connect over SSH",
  check: "Check the host",
  upload: "Upload agent",
  dependencies: "Install dependencies",
  config: "Write configuration",
  service: "Start service",
  wait: "Wait for the agent",
  pin: "Pin the certificate",
  sync_tool: "Sync the deployment tool",
  stop: "Stop service",
  remove: "Remove files",
};

function stepLabel(step) {
  return Object.prototype.hasOwnProperty.call(STEP_LABELS, step) ? STEP_LABELS[step] : step;
}

export function serverView(main, view, serverId) {
  const error = h("p", { class: "alert", role: "alert", id: "server-error" });
  const note = h("p", { class: "okmsg", role: "status", id: "server-note", hidden: true });
  const info = h("dl", { class: "kv", id: "server-info" });
  const install = h("div", { id: "install" });
  const openLogs = new Set();
  const editCard = h("section", { class: "card", id: "edit-card", hidden: true,
    "aria-labelledby": "edit-h" });
  let current = null;   // the server as last read
  const buttons = {
    edit: h("button", { type: "button", class: "btn", id: "srv-edit",
      "aria-expanded": "false", "aria-controls": "edit-card" }, "Edit"),
    reinstall: h("button", { type: "button", class: "btn", id: "srv-reinstall" }, "Reinstall"),
    uninstall: h("button", { type: "button", class: "btn", id: "srv-uninstall" }, "Uninstall"),
    remove: h("button", { type: "button", class: "btn btn-danger", id: "srv-delete" },
      "Delete"),
  };
  main.append(page(`Server ${serverId}`, "install progress refreshes live",
    Object.values(buttons)), error, note, editCard,
  h("section", { class: "card", "aria-labelledby": "srv-h" },
    h("h2", { id: "srv-h" }, "Server"), info),
  h("section", { "aria-labelledby": "install-h" },
    h("h2", { id: "install-h" }, "Latest install"), install));
  let running = false;
  let lastInstallId = null;
  let noteAfter;   // undefined: no note; else the install id that was latest before it

  async function start(kind) {
    const forget = h("input", { type: "checkbox", id: "forget-host-key" });
    const ok = await confirmDialog({
      title: kind === "reinstall" ? `Reinstall server ${serverId}?`
        : `Uninstall the agent from server ${serverId}?`,
      text: kind === "reinstall"
        ? "The agent is installed again over SSH. It keeps its port, path and token."
        : "The agent's service and files are removed from the host over SSH.",
      confirmLabel: kind === "reinstall" ? "Reinstall" : "Uninstall",
      danger: kind !== "reinstall",
      extra: kind === "reinstall" ? h("label", { class: "choice", for: "forget-host-key" },
        forget, "Forget the stored host key first (the host was rebuilt)") : null,
    });
    if (!ok) return;
    try {
      const body = kind === "reinstall" && forget.checked ? { forget_host_key: true }
        : undefined;
      const before = lastInstallId;
      await view.api("POST", `api/servers/${serverId}/${kind}`, body);
      note.textContent = `${kind === "reinstall" ? "Reinstall" : "Uninstall"} started.`;
      note.hidden = false;
      // The note stays until the install it announced has ended (see refresh).
      noteAfter = before;
      await refresh();
    } catch (e) { report(error, e); }
  }
  function closeEdit() {
    editCard.hidden = true;
    editCard.replaceChildren();
    buttons.edit.setAttribute("aria-expanded", "false");
  }
  buttons.edit.addEventListener("click", () => {
    if (!editCard.hidden) { closeEdit(); return; }
    if (!current) return;
    // The form starts from the record as it is now, and saves only what changed.
    editCard.replaceChildren(h("h2", { id: "edit-h" }, `Edit ${current.name}`),
      serverForm(view, { server: current, onSaved: (saved) => {
        closeEdit();
        note.textContent = `Saved ${saved.name}.`;
        note.hidden = false;
        noteAfter = undefined;
        refresh().catch((e) => report(error, e));
      } }),
      h("button", { type: "button", class: "btn", id: "edit-cancel", onclick: closeEdit },
        "Cancel"));
    editCard.hidden = false;
    buttons.edit.setAttribute("aria-expanded", "true");
    document.getElementById("edit-name").focus();
  });
  buttons.reinstall.addEventListener("click", () => start("reinstall"));
  buttons.uninstall.addEventListener("click", () => start("uninstall"));
  buttons.remove.addEventListener("click", async () => {
    const ok = await confirmDialog({
      title: `Delete server ${serverId}?`,
      text: "The daemon forgets the server, its credentials and its agent. Nothing is " +
        "removed from the host: uninstall first for that.",
      confirmLabel: "Delete server",
    });
    if (!ok) return;
    try {
      await view.api("DELETE", `api/servers/${serverId}`);
      location.hash = "#/servers";
    } catch (e) { report(error, e); }
  });

  function stepRows(steps) {
    return steps.flatMap((s, i) => {
      const rows = [h("tr", { dataset: { step: String(s.step), status: String(s.status) } },
        h("td", { class: "num" }, String(i + 1)),
        h("td", { class: "step" }, stepLabel(s.step), " ",
          h("code", { class: "small muted" }, s.step)),
        h("td", {}, badge(s.status)),
        h("td", { class: "nowrap" }, fmtTime(s.started_at)),
        h("td", { class: "nowrap" }, fmtDuration(s.started_at
          ? (s.finished_at || Date.now() / 1000) - s.started_at : null)),
        h("td", { class: "reason" }, s.error || ""))];
      if (s.log) {
        const det = h("details", { class: "log", open: openLogs.has(s.step) },
          h("summary", { dataset: { focusKey: `log-${s.step}` } }, `Log of ${stepLabel(s.step)}`),
          h("pre", { class: "term wrap" }, ansiNodes(s.log)));
        det.addEventListener("toggle", () => {
          if (det.open) openLogs.add(s.step); else openLogs.delete(s.step);
        });
        rows.push(h("tr", {}, h("td", {}), h("td", { colspan: "5" }, det)));
      }
      return rows;
    });
  }

  async function refresh() {
    const server = await view.api("GET", `api/servers/${serverId}`);
    let inst = null;
    try {
      inst = await view.api("GET", `api/servers/${serverId}/install`);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) throw e;
    }
    error.textContent = "";
    current = server;
    running = Boolean(server.install_running || (inst && inst.running));
    lastInstallId = inst ? inst.id : null;
    if (noteAfter !== undefined && inst && inst.id !== noteAfter && !running) {
      note.hidden = true;
      noteAfter = undefined;
    }
    const heading = document.getElementById("page-title");
    const title = server.name ? `${server.name} (server ${serverId})` : `Server ${serverId}`;
    if (heading && heading.textContent !== title) {
      heading.textContent = title;
      document.title = `${title} \u00B7 MyX console`;
    }
    buttons.edit.disabled = running;
    buttons.reinstall.disabled = running;
    buttons.uninstall.disabled = running;
    swap(info, [
      ["Name", server.name],
      ["Tags", server.tags && server.tags.length
        ? h("span", { id: "server-tags" }, tagChips(server.tags)) : "none"],
      ["SSH", `${server.username}@${server.host}:${server.ssh_port}`],
      ["Authentication", server.auth_method === "private_key" ? "private key"
        : server.auth_method || "no credentials stored"],
      ["Privileges", server.sudo && server.sudo.mode === "sudo"
        ? `sudo${server.sudo.password_set ? " with a password" : " (NOPASSWD)"}` : "root"],
      ["Status", [badge(server.status, { id: "server-status" }),
        server.status_reason ? ` ${server.status_reason}` : ""]],
      ["Host key", server.host_key_fingerprint || (server.host_key ? "stored on first use"
        : "not known yet")],
      ["Agent", server.agent_id ? [h("a", { href: `#/agents/${Number(server.agent_id)}` },
        agentLabel(server.agent_id, server.name)), " ", badge(server.agent_status)] : dash],
      ["Added", timeAgo(server.created_at)],
    ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    if (!inst) {
      swap(install, [h("p", { class: "muted" }, "No install has run for this server yet.")]);
      return;
    }
    swap(install, [
      h("p", {}, h("strong", {}, `${inst.kind} #${inst.id} `), badge(inst.status,
        { id: "install-status" }), running ? " running\u2026" : "",
      ` started ${fmtTime(inst.started_at)}`,
      inst.finished_at ? `, finished ${fmtTime(inst.finished_at)}` : ""),
      inst.error ? h("p", { class: "alert", id: "install-error" }, inst.error) : null,
      h("div", { class: "table-wrap" }, h("table", { id: "install-steps" },
        h("thead", {}, h("tr", {}, ["#", "Step", "Status", "Started", "Duration", "Error"]
          .map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, inst.steps.length ? stepRows(inst.steps)
          : [h("tr", {}, h("td", { class: "empty", colspan: "6" }, "No step yet."))]))),
    ].filter(Boolean));
  }

  // Poll fast while an install runs so every step shows as it happens.
  (async () => {
    while (view.alive) {
      try {
        await refresh();
      } catch (e) {
        if (!view.alive || isAbort(e)) return;
        if (e instanceof ApiError && e.status === 401) return;
        if (e instanceof ApiError && e.status === 404) {
          error.textContent = `There is no server ${serverId} (or server management is ` +
            "not enabled).";
          return;
        }
        report(error, e);
      }
      await view.sleep(running ? 1000 : REFRESH_MS);
    }
  })();
}
