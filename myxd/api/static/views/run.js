/**
 * The Run page: choose agents, then either a shell command (run as /bin/sh -c) or a
 * program and its arguments, see exactly what will run (the preview), start it.
 * One agent opens the command's page; several show views/run-results.js.
 */
import { $, badge, h, page, swap } from "../dom.js";
import { linesSplit, shellSplit } from "../format.js";
import { ApiError } from "../api.js";
import { report } from "../view.js";
import { clearFieldErrors, fieldError, focusFirstError, showFieldError } from "../forms.js";
import { agentLabel, agentName, serverNamesByAgent } from "../names.js";
import { showRunResults } from "./run-results.js";

/** What shell mode runs: the script is one argument, exactly as typed. */
const SHELL = "/bin/sh";

export function runView(main, view, params) {
  const wanted = params.get("agents") || "";
  const preselect = new Set(wanted.split(",").filter((x) => /^[0-9]+$/.test(x)).map(Number));
  const general = h("p", { class: "alert", role: "alert", id: "run-error" });
  main.append(page("Run a command"));

  const modeAll = h("input", { type: "radio", name: "target", value: "all", id: "target-all",
    checked: wanted === "all" });
  const modeSome = h("input", { type: "radio", name: "target", value: "some", id: "target-some",
    checked: wanted !== "all" });
  const filter = h("input", { type: "search", id: "agent-filter", placeholder: "Filter by id, name or host",
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

  const runShell = h("input", { type: "radio", name: "runmode", value: "shell",
    id: "runmode-shell", checked: true });
  const runProgram = h("input", { type: "radio", name: "runmode", value: "program",
    id: "runmode-program" });
  const runMode = h("fieldset", { id: "run-mode" },
    h("legend", {}, "How to run it"),
    h("div", { class: "inline-choices" },
      h("label", { class: "choice", for: "runmode-shell" }, runShell,
        "Shell (sh -c): pipes, redirections, variables"),
      h("label", { class: "choice", for: "runmode-program" }, runProgram,
        "Program + arguments (no shell)")));
  const script = h("textarea", { id: "run-script", rows: "3", spellcheck: "false",
    dataset: { field: "script" }, placeholder: "e.g. uname -a; df -h / | tail -1",
    "aria-describedby": "run-script-hint run-argv" });
  const shellRow = h("div", { class: "row", id: "shell-row" },
    h("label", { for: "run-script" }, "Shell command"), script,
    h("p", { class: "hint", id: "run-script-hint" },
      `Run by ${SHELL} -c on each agent, exactly as typed: quotes, pipes, ` +
      "redirections, variables and globs work as in a terminal."));
  const command = h("input", { type: "text", id: "run-command", autocomplete: "off",
    spellcheck: "false", dataset: { field: "command" },
    placeholder: "e.g. hostname, systemctl, /usr/bin/env", "aria-describedby": "run-command-hint" });
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

  const programRows = h("div", { id: "program-rows", hidden: true },
    h("div", { class: "row" },
      h("label", { for: "run-command" }, "Program"), command,
      h("p", { class: "hint", id: "run-command-hint" },
        "An executable name or path, run without a shell.")),
    h("div", { class: "row" },
      h("label", { for: "run-args" }, "Arguments"), argMode, args,
      h("p", { class: "hint", id: "run-args-hint" },
        "Shell-like split: words are split on spaces; '...' and \"...\" keep spaces; no " +
        "variables, globs or pipes are expanded. Line mode: each line is one argument, " +
        "exactly as typed.")));

  const form = h("form", { id: "run-form", novalidate: true, class: "card" },
    general, targets, runMode, shellRow, programRows,
    h("div", { class: "form-grid" },
      h("div", { class: "row" },
        h("label", { for: "run-timeout" }, "Timeout (seconds)"), timeout,
        h("p", { class: "hint", id: "run-timeout-hint" }, "Empty for no timeout."))),
    h("div", { class: "hint" }, "Will run: ", argv),
    h("div", { class: "form-actions" }, submit));
  main.append(form, results);

  let agents = [];
  let names = new Map();
  const chosen = new Set(preselect);

  function mode() { return form.querySelector("input[name=argmode]:checked").value; }

  function parsedArgs() {
    return mode() === "lines" ? linesSplit(args.value) : shellSplit(args.value);
  }

  /** [program, ...args] as the agent will run it. */
  function argvNow() {
    if (runShell.checked) return [SHELL, "-c", script.value];
    return [command.value, ...parsedArgs()];
  }

  function syncRunMode() {
    shellRow.hidden = !runShell.checked;
    programRows.hidden = runShell.checked;
    preview();
  }
  runShell.addEventListener("change", syncRunMode);
  runProgram.addEventListener("change", syncRunMode);

  function preview() {
    let list;
    try {
      list = argvNow();
    } catch (e) {
      swap(argv, [h("li", { class: "field-error" }, e.message)]);
      return;
    }
    const [program, ...rest] = list;
    swap(argv, [h("li", { class: "cmd" }, h("code", {}, program || "(program)")),
      ...rest.map((a) => h("li", {}, h("code", {}, a === "" ? "\u2036\u2033" : a)))]);
  }
  for (const el of [command, args, script]) el.addEventListener("input", preview);
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
      String(a.host).toLowerCase().includes(q) ||
      String(names.get(a.id) || "").toLowerCase().includes(q));
    swap(pick, shown.length ? shown.map((a) => {
      const box = h("input", { type: "checkbox", value: String(a.id), id: `pick-${a.id}`,
        checked: chosen.has(a.id), dataset: { focusKey: `pick-${a.id}` } });
      box.addEventListener("change", () => {
        if (box.checked) chosen.add(a.id); else chosen.delete(a.id);
      });
      return h("label", { class: "choice", for: `pick-${a.id}` }, box,
        h("span", {}, `${agentLabel(a.id, names.get(a.id))} \u00B7 ${a.host}:${a.rpc_port}`),
        badge(a.status));
    }) : [h("p", { class: "muted" }, agents.length ? "No agent matches." : "No agents yet.")]);
  }
  filter.addEventListener("input", renderPick);

  Promise.all([view.api("GET", "api/agents?limit=1000"), serverNamesByAgent(view)])
    .then(([list, servers]) => {
      agents = list.agents;
      names = new Map(agents.map((a) => [a.id, agentName(a, servers)]));
      renderPick();
    }).catch((e) => report(general, e));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    general.textContent = "";
    let list;
    try {
      list = argvNow();
    } catch (e) {
      fieldError(args, `The arguments cannot be split: ${e.message}.`);
      args.focus();
      return;
    }
    if (runShell.checked && !script.value.trim()) {
      fieldError(script, "Type the shell command to run.");
      script.focus();
      return;
    }
    const spec = { command: list[0].trim(), args: list.slice(1), timeout: null };
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
      await runOn(modeAll.checked ? "all" : ids, spec);
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

  /** Start `spec` on several agents and show the results (again for a re-run). */
  async function runOn(targetIds, spec) {
    const reply = await view.api("POST", "api/commands", { agents: targetIds, ...spec });
    showRunResults(results, view, reply.commands, names, (failed) => {
      general.textContent = "";
      runOn(failed, spec).catch((e) => report(general, e));
    });
  }
}
