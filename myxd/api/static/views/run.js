/**
 * The Run page: choose agents (chosen ones, every agent with a tag, or all), then a
 * shell command (the API's `shell`: run as sh -c), a program and its arguments, or an
 * Ansible playbook of the deployment tool (chosen from GET api/playbooks, extra_vars
 * as JSON); see exactly what will run (the preview), start it. One chosen agent opens
 * the command's page; anything else shows views/run-results.js.
 */
import { badge, h, page, swap } from "../dom.js";
import { linesSplit, shellSplit } from "../format.js";
import { ApiError } from "../api.js";
import { report } from "../view.js";
import { clearFieldErrors, fieldError, focusFirstError, showFieldError } from "../forms.js";
import { agentLabel, agentName, allAgents, TAG_RE } from "../names.js";
import { showRunResults } from "./run-results.js";

/** What shell mode runs (the daemon turns `shell` into this argv). */
const SHELL = "sh";

export function runView(main, view, params) {
  const wanted = params.get("agents") || "";
  const preselect = new Set(wanted.split(",").filter((x) => /^[0-9]+$/.test(x)).map(Number));
  const general = h("p", { class: "alert", role: "alert", id: "run-error" });
  main.append(page("Run a command"));

  const wantedTag = wanted.startsWith("tag:") ? wanted.slice(4) : "";
  const modeAll = h("input", { type: "radio", name: "target", value: "all", id: "target-all",
    checked: wanted === "all" });
  const modeTag = h("input", { type: "radio", name: "target", value: "tag", id: "target-tag",
    checked: Boolean(wantedTag) });
  const modeSome = h("input", { type: "radio", name: "target", value: "some", id: "target-some",
    checked: wanted !== "all" && !wantedTag });
  const tagList = h("datalist", { id: "run-tags" });
  const tagInput = h("input", { type: "text", id: "run-tag", list: "run-tags", class: "short",
    value: wantedTag || null, autocomplete: "off", spellcheck: "false", placeholder: "e.g. de",
    dataset: { field: "tag" } });
  const tagCount = h("span", { class: "muted small", id: "run-tag-count", role: "status" });
  const tagRow = h("div", { class: "row", id: "tag-row" },
    h("label", { for: "run-tag" }, "Tag"), tagInput, tagList, " ", tagCount,
    h("p", { class: "hint" }, "Every agent with this tag (its own, or its server's) " +
      "when you press Run."));
  const filter = h("input", { type: "search", id: "agent-filter", placeholder: "Filter by id, name or host",
    "aria-label": "Filter agents" });
  const pick = h("div", { class: "agent-pick", id: "agent-pick", role: "group",
    "aria-label": "Agents" }, h("p", { class: "muted" }, "Loading agents\u2026"));
  const targets = h("fieldset", { id: "run-agents", dataset: { field: "agents" } },
    h("legend", {}, "Agents"),
    h("div", { class: "inline-choices" },
      h("label", { class: "choice", for: "target-some" }, modeSome, "Chosen agents"),
      h("label", { class: "choice", for: "target-tag" }, modeTag, "Agents with a tag"),
      h("label", { class: "choice", for: "target-all" }, modeAll,
        "All agents (every agent the daemon knows when you press Run)")),
    h("div", { id: "pick-wrap" }, filter, pick), tagRow);

  const runShell = h("input", { type: "radio", name: "runmode", value: "shell",
    id: "runmode-shell", checked: true });
  const runProgram = h("input", { type: "radio", name: "runmode", value: "program",
    id: "runmode-program" });
  const runAnsible = h("input", { type: "radio", name: "runmode", value: "ansible",
    id: "runmode-ansible" });
  const runMode = h("fieldset", { id: "run-mode" },
    h("legend", {}, "How to run it"),
    h("div", { class: "inline-choices" },
      h("label", { class: "choice", for: "runmode-shell" }, runShell,
        "Shell (sh -c): pipes, redirections, variables"),
      h("label", { class: "choice", for: "runmode-program" }, runProgram,
        "Program + arguments (no shell)"),
      h("label", { class: "choice", for: "runmode-ansible" }, runAnsible,
        "Ansible playbook (deployment tool)")));
  const books = h("datalist", { id: "run-playbooks" });
  const playbook = h("input", { type: "text", id: "run-playbook", list: "run-playbooks",
    autocomplete: "off", spellcheck: "false", dataset: { field: "playbook" },
    placeholder: "e.g. ping.yml" });
  const extraVars = h("textarea", { id: "run-extra-vars", rows: "4", spellcheck: "false",
    class: "code", dataset: { field: "extra_vars" }, placeholder: '{"who": "console"}' });
  const booksNote = h("p", { class: "hint", id: "run-playbooks-note" }, "Loading playbooks\u2026");
  const checkMode = h("input", { type: "checkbox", id: "run-check" });
  const ansibleRows = h("div", { id: "ansible-rows", hidden: true },
    h("div", { class: "row" }, h("label", { for: "run-playbook" }, "Playbook"), playbook, books,
      booksNote),
    h("div", { class: "row" }, h("label", { for: "run-extra-vars" }, "Extra vars (JSON object)"),
      extraVars, h("p", { class: "hint" }, "Optional. Passed to ansible-playbook as " +
        "--extra-vars, e.g. {\"who\": \"console\"}.")),
    h("div", { class: "row" }, h("label", { class: "choice", for: "run-check" }, checkMode,
      "Check mode: show what would change (--check --diff), change nothing")));
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
    general, targets, runMode, shellRow, programRows, ansibleRows,
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
    if (runAnsible.checked) {
      return ["ansible-playbook", ...(checkMode.checked ? ["--check", "--diff"] : []),
        playbook.value.trim() || "(playbook)"];
    }
    return [command.value, ...parsedArgs()];
  }

  function syncRunMode() {
    shellRow.hidden = !runShell.checked;
    programRows.hidden = !runProgram.checked;
    ansibleRows.hidden = !runAnsible.checked;
    preview();
  }
  for (const r of [runShell, runProgram, runAnsible]) r.addEventListener("change", syncRunMode);

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
  for (const el of [command, args, script, playbook]) el.addEventListener("input", preview);
  checkMode.addEventListener("change", preview);
  for (const el of form.querySelectorAll("input[name=argmode]")) {
    el.addEventListener("change", preview);
  }
  preview();

  function syncTarget() {
    pickWrap.hidden = !modeSome.checked;
    tagRow.hidden = !modeTag.checked;
    countTag();
  }
  const pickWrap = targets.querySelector("#pick-wrap");
  for (const r of [modeAll, modeSome, modeTag]) r.addEventListener("change", syncTarget);
  tagInput.addEventListener("input", countTag);

  /** "3 agents have it" beside the tag, from the agents already loaded. */
  function countTag() {
    const t = tagInput.value.trim().toLowerCase();
    if (!t || !agents.length) { tagCount.textContent = ""; return; }
    const n = agents.filter((a) => (a.tags || []).includes(t)).length;
    tagCount.textContent = n === 1 ? "1 agent has it" : `${n} agents have it`;
  }
  syncTarget();

  function renderPick() {
    const q = filter.value.trim().toLowerCase();
    const shown = agents.filter((a) => !q || String(a.id) === q ||
      String(a.host).toLowerCase().includes(q) || (a.tags || []).includes(q) ||
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

  allAgents(view).then((list) => {
    agents = list;
    names = new Map(agents.map((a) => [a.id, agentName(a)]));
    const tags = new Set(agents.flatMap((a) => a.tags || []));
    swap(tagList, [...tags].sort().map((t) => h("option", { value: t })));
    renderPick();
    countTag();
  }).catch((e) => report(general, e));

  let playbooks = null;   // null: not known (yet); [] : the daemon has no deployment tool
  view.api("GET", "api/playbooks").then((data) => {
    playbooks = data.playbooks;
    swap(books, playbooks.map((p) => h("option", { value: p })));
    booksNote.textContent = playbooks.length
      ? `The deployment tool's playbooks: ${playbooks.join(", ")}.`
      : "The deployment tool has no playbooks.";
  }).catch((e) => {
    if (e instanceof ApiError && e.status === 404) {
      playbooks = [];
      booksNote.textContent = "Ansible runs need the deployment tool, which is not " +
        "enabled on this daemon.";
    } else {
      report(general, e);
    }
  });

  /** Where the run goes: agent ids, "tag:NAME" or "all"; null after a field error. */
  function targetsNow() {
    if (modeAll.checked) return "all";
    if (modeTag.checked) {
      const t = tagInput.value.trim().toLowerCase();
      if (!TAG_RE.test(t)) {
        fieldError(tagInput, t ? "A tag is 1-32 letters, digits, '.', '_' or '-'."
          : "Type the tag of the agents to run on.");
        return null;
      }
      return `tag:${t}`;
    }
    const ids = [...chosen];
    if (ids.length === 0) {
      fieldError(targets, "Choose at least one agent, a tag, or All agents.");
      return null;
    }
    return ids;
  }

  /** The request for the current mode: [path for one agent, bulk path, body]. */
  function requestNow() {
    const t = timeout.value.trim();
    let seconds = null;
    if (t !== "") {
      seconds = Number(t);
      if (!Number.isFinite(seconds)) {
        fieldError(timeout, "The timeout must be a number of seconds.");
        return null;
      }
    }
    if (runAnsible.checked) {
      const name = playbook.value.trim();
      if (!name) {
        fieldError(playbook, "Choose a playbook of the deployment tool.");
        return null;
      }
      let vars = {};
      const text = extraVars.value.trim();
      if (text) {
        try {
          vars = JSON.parse(text);
        } catch (e) {
          fieldError(extraVars, `The extra vars are not valid JSON (${e.message}).`);
          return null;
        }
        if (vars === null || typeof vars !== "object" || Array.isArray(vars)) {
          fieldError(extraVars, "The extra vars must be a JSON object, like {\"who\": \"me\"}.");
          return null;
        }
      }
      const body = { playbook: name, extra_vars: vars, timeout: seconds };
      if (checkMode.checked) body.check = true;
      return { bulk: "api/ansible", body };
    }
    if (runShell.checked) {
      if (!script.value.trim()) {
        fieldError(script, "Type the shell command to run.");
        return null;
      }
      return { bulk: "api/commands", body: { shell: script.value, timeout: seconds } };
    }
    let list;
    try {
      list = argvNow();
    } catch (e) {
      fieldError(args, `The arguments cannot be split: ${e.message}.`);
      return null;
    }
    return { single: true, bulk: "api/commands",
      body: { command: list[0].trim(), args: list.slice(1), timeout: seconds } };
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    general.textContent = "";
    const request = requestNow();
    const to = request ? targetsNow() : null;
    if (!request || to === null) {
      focusFirstError(form);
      return;
    }
    submit.disabled = true;
    try {
      if (Array.isArray(to) && to.length === 1) {
        // One agent: straight to its command's page.
        const cmd = request.single
          ? await view.api("POST", `api/agents/${to[0]}/commands`, request.body)
          : (await view.api("POST", request.bulk, { agents: to, ...request.body })).commands[0];
        if (!cmd.id) throw new Error(cmd.error || "The command could not be created.");
        location.hash = `#/commands/${Number(cmd.id)}`;
        return;
      }
      await runOn(to, request);
    } catch (e) {
      if (e instanceof ApiError && e.status === 400) {
        showFieldError(form, e.field === "shell" ? "script" : e.field, e.message, general);
        focusFirstError(form);
      } else if (e instanceof ApiError && e.status === 422 && e.field === "playbook") {
        const name = playbook.value.trim();
        fieldError(playbook, `There is no playbook "${name}" in the deployment tool. ` +
          (playbooks && playbooks.length ? `Choose one of: ${playbooks.join(", ")}.`
            : "It has no playbooks."));
        focusFirstError(form);
      } else if (e instanceof ApiError && e.status === 404 && e.body && e.body.missing) {
        showFieldError(form, "agents", `Unknown agent ids: ${e.body.missing.join(", ")}`,
          general);
      } else if (e instanceof ApiError && e.status === 404 && e.field === "agents") {
        fieldError(tagInput, `No agent has the tag ${tagInput.value.trim().toLowerCase()}.`);
        focusFirstError(form);
      } else {
        report(general, e);
      }
    } finally {
      submit.disabled = false;
    }
  });

  /** Start `request` on several agents and show the results (again for a re-run). */
  async function runOn(to, request) {
    const reply = await view.api("POST", request.bulk, { agents: to, ...request.body });
    showRunResults(results, view, reply.commands, names, (failed) => {
      general.textContent = "";
      runOn(failed, request).catch((e) => report(general, e));
    });
  }
}
