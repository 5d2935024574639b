/**
 * The Run page: choose agents, the command and its arguments (with a preview), start it.
 */
import { $, badge, h, page, swap } from "../dom.js";
import { dash, linesSplit, shellSplit } from "../format.js";
import { ApiError } from "../api.js";
import { FINAL, report } from "../view.js";
import { clearFieldErrors, fieldError, focusFirstError, showFieldError } from "../forms.js";

export function runView(main, view, params) {
  const wanted = params.get("agents") || "";
  const preselect = new Set(wanted.split(",").filter((x) => /^[0-9]+$/.test(x)).map(Number));
  const general = h("p", { class: "alert", role: "alert", id: "run-error" });
  main.append(page("Run a command"));

  const modeAll = h("input", { type: "radio", name: "target", value: "all", id: "target-all",
    checked: wanted === "all" });
  const modeSome = h("input", { type: "radio", name: "target", value: "some", id: "target-some",
    checked: wanted !== "all" });
  const filter = h("input", { type: "search", id: "agent-filter", placeholder: "Filter by id or host",
    "aria-label": "Filter agents" });
  const pick = h("div", { class: "agent-pick", id: "agent-pick", role: "group",
    "aria-label": "Agents" }, h("p", { class: "muted" }, "Loading agents\u2026"));
  const targets = h("fieldset", { id: "run-agents", dataset: { field: "agents" } },
    h("legend", {}, "Agents"),
    h("div", { class: "inline-choices" },
      h("label", { class: "choice", for: "target-some" }, modeSome, "Chosen agents"),
      h("label", { class: "choice", for: "target-all" }, modeAll,
        "All agents (every agent the daemon knows when you press Run)")),
    h("div", { id: "pick-wrap" }, filter, pick));

  const command = h("input", { type: "text", id: "run-command", autocomplete: "off",
    spellcheck: "false", dataset: { field: "command" },
    placeholder: "e.g. /bin/sh, hostname, systemctl", "aria-describedby": "run-command-hint" });
  const argMode = h("fieldset", { class: "plain" },
    h("legend", {}, "Read the arguments box:"),
    h("div", { class: "inline-choices" },
      h("label", { class: "choice" }, h("input", { type: "radio", name: "argmode", value: "shell",
        id: "argmode-shell", checked: true }), "Split like a shell (quotes respected)"),
      h("label", { class: "choice" }, h("input", { type: "radio", name: "argmode",
        value: "lines", id: "argmode-lines" }), "One argument per line")));
  const args = h("textarea", { id: "run-args", rows: "3", spellcheck: "false",
    dataset: { field: "args" }, "aria-describedby": "run-args-hint run-argv" });
  const argv = h("ol", { class: "argv", id: "run-argv", "aria-label": "The command as it will run" });
  const timeout = h("input", { type: "text", inputmode: "decimal", id: "run-timeout",
    class: "short", dataset: { field: "timeout" }, placeholder: "none", autocomplete: "off",
    "aria-describedby": "run-timeout-hint" });
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "run-submit" }, "Run");
  const results = h("div", { id: "run-results" });

  const form = h("form", { id: "run-form", novalidate: true, class: "card" },
    general, targets,
    h("div", { class: "form-grid" },
      h("div", { class: "row" },
        h("label", { for: "run-command" }, "Command"), command,
        h("p", { class: "hint", id: "run-command-hint" },
          "An executable name or path, run without a shell: for pipes or redirections " +
          "use /bin/sh with the arguments -c and your script.")),
      h("div", { class: "row" },
        h("label", { for: "run-timeout" }, "Timeout (seconds)"), timeout,
        h("p", { class: "hint", id: "run-timeout-hint" }, "Empty for no timeout."))),
    h("div", { class: "row" },
      h("label", { for: "run-args" }, "Arguments"), argMode, args,
      h("p", { class: "hint", id: "run-args-hint" },
        "Shell mode: words are split on spaces; '...' and \"...\" keep spaces; no " +
        "variables, globs or pipes are expanded. Line mode: each line is one argument, " +
        "exactly as typed."),
      h("div", { class: "hint" }, "Will run: ", argv)),
    h("div", { class: "form-actions" }, submit));
  main.append(form, results);

  let agents = [];
  const chosen = new Set(preselect);

  function mode() { return form.querySelector("input[name=argmode]:checked").value; }

  function parsedArgs() {
    return mode() === "lines" ? linesSplit(args.value) : shellSplit(args.value);
  }

  function preview() {
    let list;
    try {
      list = parsedArgs();
    } catch (e) {
      swap(argv, [h("li", { class: "field-error" }, e.message)]);
      return;
    }
    swap(argv, [h("li", { class: "cmd" }, h("code", {}, command.value || "(command)")),
      ...list.map((a) => h("li", {}, h("code", {}, a === "" ? "\u2036\u2033" : a)))]);
  }
  for (const el of [command, args]) el.addEventListener("input", preview);
  for (const el of form.querySelectorAll("input[name=argmode]")) {
    el.addEventListener("change", preview);
  }
  preview();

  function syncTarget() {
    $("#pick-wrap", form).hidden = modeAll.checked;
  }
  modeAll.addEventListener("change", syncTarget);
  modeSome.addEventListener("change", syncTarget);
  syncTarget();

  function renderPick() {
    const q = filter.value.trim().toLowerCase();
    const shown = agents.filter((a) => !q || String(a.id) === q ||
      String(a.host).toLowerCase().includes(q));
    swap(pick, shown.length ? shown.map((a) => {
      const box = h("input", { type: "checkbox", value: String(a.id), id: `pick-${a.id}`,
        checked: chosen.has(a.id), dataset: { focusKey: `pick-${a.id}` } });
      box.addEventListener("change", () => {
        if (box.checked) chosen.add(a.id); else chosen.delete(a.id);
      });
      return h("label", { class: "choice", for: `pick-${a.id}` }, box,
        h("span", {}, `#${a.id} ${a.host}:${a.rpc_port}`), badge(a.status));
    }) : [h("p", { class: "muted" }, agents.length ? "No agent matches." : "No agents yet.")]);
  }
  filter.addEventListener("input", renderPick);

  view.api("GET", "api/agents?limit=1000").then((list) => {
    agents = list.agents;
    renderPick();
  }).catch((e) => report(general, e));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    general.textContent = "";
    let argList;
    try {
      argList = parsedArgs();
    } catch (e) {
      fieldError(args, `The arguments cannot be split: ${e.message}.`);
      args.focus();
      return;
    }
    const spec = { command: command.value.trim(), args: argList, timeout: null };
    const t = timeout.value.trim();
    if (t !== "") {
      const n = Number(t);
      if (!Number.isFinite(n)) {
        fieldError(timeout, "The timeout must be a number of seconds.");
        timeout.focus();
        return;
      }
      spec.timeout = n;
    }
    const ids = [...chosen];
    if (!modeAll.checked && ids.length === 0) {
      fieldError(targets, "Choose at least one agent, or All agents.");
      focusFirstError(form);
      return;
    }
    submit.disabled = true;
    try {
      if (!modeAll.checked && ids.length === 1) {
        const cmd = await view.api("POST", `api/agents/${ids[0]}/commands`, spec);
        location.hash = `#/commands/${Number(cmd.id)}`;
        return;
      }
      const body = { agents: modeAll.checked ? "all" : ids, ...spec };
      const reply = await view.api("POST", "api/commands", body);
      showBulk(reply.commands);
    } catch (e) {
      if (e instanceof ApiError && e.status === 400) {
        showFieldError(form, e.field, e.message, general);
        focusFirstError(form);
      } else if (e instanceof ApiError && e.status === 404 && e.body && e.body.missing) {
        showFieldError(form, "agents", `Unknown agent ids: ${e.body.missing.join(", ")}`,
          general);
      } else {
        report(general, e);
      }
    } finally {
      submit.disabled = false;
    }
  });

  function showBulk(commands) {
    const state = new Map();
    const body = h("tbody", { id: "bulk-body" });
    swap(results, [h("section", { class: "card", "aria-labelledby": "bulk-h" },
      h("h2", { id: "bulk-h" }, `Started on ${commands.length} agent` +
        (commands.length === 1 ? "" : "s")),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Agent", "Command", "Status", "Exit"].map(
          (x) => h("th", { scope: "col" }, x)))), body)))]);
    for (const c of commands) state.set(c.agent_id, c);
    const render = () => swap(body, [...state.values()].map((c) => h("tr", {},
      h("td", {}, h("a", { href: `#/agents/${Number(c.agent_id)}` }, `agent ${c.agent_id}`)),
      h("td", {}, c.id ? h("a", { href: `#/commands/${Number(c.id)}` }, `command ${c.id}`)
        : h("span", { class: "field-error" }, c.error || "not started")),
      h("td", {}, c.id ? badge(c.status) : dash),
      h("td", { class: "num" }, c.exit_code === null || c.exit_code === undefined ? dash
        : String(c.exit_code)))));
    render();
    const pending = () => [...state.values()].filter((c) => c.id && !FINAL.has(c.status));
    view.every(2000, async () => {
      const open = pending();
      if (!open.length) return;
      const fresh = await Promise.all(open.map(
        (c) => view.api("GET", `api/commands/${c.id}?max_bytes=1`)));
      for (const f of fresh) {
        state.set(f.agent_id, { ...state.get(f.agent_id), status: f.status,
          exit_code: f.exit_code });
      }
      render();
    }, (e) => report(general, e));
  }
}
