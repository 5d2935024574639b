/**
 * The Deployments page: start a deployment (playbook, agents, vars as a form or as
 * JSON, batches), upload artifacts with a progress bar, and the recent deployments.
 *
 * It never reads an uploaded file into the page (XMLHttpRequest sends the File) and
 * never shows a var's value once sent (the API keeps only their names).
 */
import { ApiError, isAbort } from "../api.js";
import { badge, h, page, swap, timeAgo } from "../dom.js";
import { countsText, fmtBytes as fmtSize } from "../format.js";
import { clearFieldErrors, fieldError, focusFirstError, showFieldError } from "../forms.js";
import { agentLabel, agentName, allAgents as fetchAgents, TAG_RE } from "../names.js";
import { uploadArtifact } from "../upload.js";
import { REFRESH_MS, report } from "../view.js";
import { varsForm } from "./deploy-vars.js";

export function deploymentsView(main, view, params) {
  const error = h("p", { class: "alert", role: "alert", id: "deploy-error" });
  main.append(page("Deployments", "Run a playbook of the deployment tool across agents"), error);

  // -- the new deployment form ---------------------------------------------------
  const playbook = h("select", { id: "dep-playbook", dataset: { field: "playbook" } });
  const allAgents = h("input", { type: "radio", name: "dep-agents", id: "dep-agents-all",
    value: "all", checked: params.get("agents") === "all" || !params.get("agents") });
  const someAgents = h("input", { type: "radio", name: "dep-agents", id: "dep-agents-some",
    value: "some", checked: Boolean(params.get("agents")) && params.get("agents") !== "all" });
  const filter = h("input", { type: "search", id: "agent-filter", placeholder: "Filter by name or id",
    "aria-label": "Filter agents" });
  const picks = h("div", { class: "picks", id: "dep-picks", dataset: { field: "agents" } });
  const tagInput = h("input", { type: "text", id: "dep-tag", class: "short", list: "dep-tags",
    autocomplete: "off", spellcheck: "false", placeholder: "e.g. de" });
  const tagList = h("datalist", { id: "dep-tags" });
  const tagButton = h("button", { type: "button", class: "btn btn-small", id: "dep-tag-select" },
    "Select agents with this tag");
  const tagStatus = h("span", { class: "small", id: "dep-tag-status", role: "status" });
  const tagRow = h("div", { class: "row tag-pick" },
    h("label", { for: "dep-tag" }, "Select by tag"), tagInput, tagList, " ", tagButton, " ",
    tagStatus);
  const pickBox = h("fieldset", { class: "row", id: "dep-pick-box" },
    h("legend", {}, "Agents"),
    h("div", { class: "inline-choices" },
      h("label", { class: "choice" }, allAgents, "All agents"),
      h("label", { class: "choice" }, someAgents, "Chosen agents")),
    tagRow, filter, picks);
  const formMode = h("input", { type: "radio", name: "vars-mode", id: "vars-mode-form",
    value: "form", checked: true });
  const jsonMode = h("input", { type: "radio", name: "vars-mode", id: "vars-mode-json",
    value: "json" });
  const formBox = h("div", { id: "vars-form" });
  const varsJson = h("textarea", { id: "dep-vars-json", rows: "6", class: "code",
    dataset: { field: "vars" }, placeholder: '{"xray_version": "25.1.30"}' });
  const artsJson = h("textarea", { id: "dep-artifacts-json", rows: "2", class: "code",
    dataset: { field: "artifacts" }, placeholder: '{"xray_archive_path": "<artifact id>"}' });
  const jsonBox = h("div", { id: "vars-json", hidden: true },
    h("div", { class: "row" }, h("label", { for: "dep-vars-json" }, "Vars (JSON object)"), varsJson),
    h("div", { class: "row" }, h("label", { for: "dep-artifacts-json" },
      "Artifacts (JSON: variable \u2192 artifact id)"), artsJson));
  const batch = h("input", { type: "number", id: "dep-batch", min: "1", class: "short",
    dataset: { field: "batch_size" } });
  const maxFail = h("input", { type: "number", id: "dep-max-failures", min: "1", class: "short",
    dataset: { field: "max_failures" } });
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "dep-submit" },
    "Deploy");
  const form = h("form", { class: "card", id: "deploy-form", novalidate: true },
    h("h2", {}, "New deployment"),
    h("div", { class: "row" }, h("label", { for: "dep-playbook" }, "Playbook"), playbook),
    pickBox,
    h("fieldset", { class: "row" }, h("legend", {}, "Variables"),
      h("div", { class: "inline-choices" },
        h("label", { class: "choice" }, formMode, "Form"),
        h("label", { class: "choice" }, jsonMode, "JSON")),
      formBox, jsonBox),
    h("div", { class: "form-grid" },
      h("div", { class: "row" }, h("label", { for: "dep-batch" }, "Batch size (optional)"), batch,
        h("p", { class: "hint" }, "Agents at a time: a rolling deploy.")),
      h("div", { class: "row" }, h("label", { for: "dep-max-failures" },
        "Max failures (optional)"), maxFail,
        h("p", { class: "hint" }, "Start no more agents after this many failed."))),
    h("div", { class: "form-actions" }, submit));

  // -- artifacts -------------------------------------------------------------------
  const file = h("input", { type: "file", id: "artifact-file", "aria-label": "Artifact file" });
  const uploadBtn = h("button", { type: "button", class: "btn", id: "artifact-upload" }, "Upload");
  const bar = h("progress", { id: "upload-progress", max: "100", value: "0", hidden: true });
  const upStatus = h("span", { id: "upload-status", role: "status", class: "small" });
  const artBody = h("tbody", { id: "artifacts-body" });
  const artCard = h("section", { class: "card", "aria-label": "Artifacts" },
    h("h2", {}, "Artifacts"),
    h("div", { class: "form-actions" }, file, uploadBtn, bar, upStatus),
    h("div", { class: "table-wrap" }, h("table", { id: "artifacts" },
      h("thead", {}, h("tr", {}, ["Name", "Id (SHA-256)", "Size", "Uploaded"].map(
        (t) => h("th", { scope: "col" }, t)))), artBody)));

  const depBody = h("tbody", { id: "deployments-body" });
  const list = h("section", { "aria-label": "Recent deployments" }, h("h2", {}, "Recent deployments"),
    h("div", { class: "table-wrap" }, h("table", { id: "deployments" },
      h("thead", {}, h("tr", {}, ["ID", "Playbook", "Status", "Targets", "Created"].map(
        (t) => h("th", { scope: "col" }, t)))), depBody)));
  main.append(form, artCard, list);

  let artifacts = [];
  let agents = [];
  let names = new Map();
  let currentVars = null;
  const preselected = new Set((params.get("agents") || "").split(",").map(Number).filter(Boolean));

  function renderVarsForm() {
    currentVars = varsForm(playbook.value, artifacts);
    if (currentVars) swap(formBox, currentVars.rows);
    else swap(formBox, [h("p", { class: "hint" }, "This playbook has no form: give its " +
      "variables as JSON.")]);
    if (!currentVars && formMode.checked) { jsonMode.checked = true; syncMode(); }
  }
  function syncMode() {
    formBox.hidden = !formMode.checked;
    jsonBox.hidden = formMode.checked;
  }
  function syncPicks() {
    const q = filter.value.trim().toLowerCase();
    filter.hidden = picks.hidden = tagRow.hidden = allAgents.checked;
    for (const row of picks.children) {
      row.hidden = Boolean(q) && !row.dataset.search.includes(q);
    }
  }
  formMode.addEventListener("change", syncMode);
  jsonMode.addEventListener("change", syncMode);
  allAgents.addEventListener("change", syncPicks);
  someAgents.addEventListener("change", syncPicks);
  filter.addEventListener("input", syncPicks);
  playbook.addEventListener("change", renderVarsForm);

  /** Tick every agent with the tag (GET api/agents?tag=, resolved here, not later). */
  async function selectTag() {
    const tag = tagInput.value.trim().toLowerCase();
    if (!TAG_RE.test(tag)) {
      tagStatus.textContent = tag ? "A tag is 1-32 letters, digits, '.', '_' or '-'."
        : "Type a tag first.";
      return;
    }
    const tagged = await fetchAgents(view, `tag=${encodeURIComponent(tag)}`);
    if (!tagged.length) {
      tagStatus.textContent = `No agent has the tag ${tag}.`;
      return;
    }
    const ids = new Set(tagged.map((a) => a.id));
    for (const box of picks.querySelectorAll("input[type=checkbox]")) {
      if (ids.has(Number(box.value))) box.checked = true;
    }
    tagStatus.textContent = `Selected ${ids.size} agent${ids.size === 1 ? "" : "s"} with ` +
      `the tag ${tag}.`;
  }
  tagButton.addEventListener("click", () => selectTag().catch((e) => report(error, e)));
  tagInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); tagButton.click(); }
  });

  function renderAgents() {
    swap(picks, agents.map((a) => {
      const label = agentLabel(a.id, names.get(a.id));
      const box = h("input", { type: "checkbox", id: `pick-${a.id}`, value: String(a.id),
        checked: preselected.has(a.id) });
      return h("label", { class: "choice", dataset: { search: `${label} ${a.host}`.toLowerCase() } },
        box, label, " ", badge(a.status));
    }));
    syncPicks();
  }

  function renderArtifacts() {
    swap(artBody, artifacts.length ? artifacts.map((a) => h("tr", { dataset: { id: a.id } },
      h("td", {}, a.name), h("td", {}, h("code", { class: "small" }, a.id)),
      h("td", { class: "nowrap" }, fmtSize(a.size)), h("td", {}, timeAgo(a.created_at))))
      : [h("tr", {}, h("td", { class: "empty", colspan: "4" }, "No artifacts yet."))]);
  }

  async function loadStatic() {
    const [books, arts, agentList] = await Promise.all([
      view.api("GET", "api/playbooks"), view.api("GET", "api/artifacts"), fetchAgents(view)]);
    swap(playbook, books.playbooks.map((p) => h("option", { value: p,
      selected: p === (params.get("playbook") || "deploy_xray.yml") }, p)));
    artifacts = arts.artifacts;
    agents = agentList;
    names = new Map(agents.map((a) => [a.id, agentName(a)]));
    swap(tagList, [...new Set(agents.flatMap((a) => a.tags || []))].sort()
      .map((t) => h("option", { value: t })));
    renderAgents();
    renderArtifacts();
    renderVarsForm();
  }

  uploadBtn.addEventListener("click", async () => {
    const chosen = file.files && file.files[0];
    if (!chosen) { upStatus.textContent = "Choose a file first."; return; }
    uploadBtn.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    upStatus.textContent = `Uploading ${chosen.name}\u2026`;
    try {
      const art = await uploadArtifact(chosen, (sent, total) => {
        bar.value = Math.floor((sent * 100) / Math.max(total, 1));
        upStatus.textContent = `${chosen.name}: ${bar.value}% (${fmtSize(sent)} of ${fmtSize(total)})`;
      }, view.signal);
      upStatus.textContent = `Stored ${art.name} (${art.id.slice(0, 12)}, ${fmtSize(art.size)}).`;
      artifacts = (await view.api("GET", "api/artifacts")).artifacts;
      renderArtifacts();
      renderVarsForm();
    } catch (e) {
      if (!isAbort(e)) upStatus.textContent = `Upload failed: ${e.message}`;
    } finally {
      uploadBtn.disabled = false;
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    error.textContent = "";
    const body = { playbook: playbook.value };
    if (allAgents.checked) body.agents = "all";
    else {
      body.agents = [...picks.querySelectorAll("input:checked")].map((b) => Number(b.value));
      if (!body.agents.length) { fieldError(picks, "Choose at least one agent."); focusFirstError(form); return; }
    }
    try {
      if (formMode.checked && currentVars) Object.assign(body, currentVars.read());
      else {
        for (const [key, box] of [["vars", varsJson], ["artifacts", artsJson]]) {
          const text = box.value.trim();
          try { body[key] = text ? JSON.parse(text) : {}; } catch (e) {
            throw Object.assign(new Error("This is not valid JSON."), { input: box });
          }
        }
      }
    } catch (e) {
      fieldError(e.input, e.message);
      focusFirstError(form);
      return;
    }
    if (batch.value) body.batch_size = Number(batch.value);
    if (maxFail.value) body.max_failures = Number(maxFail.value);
    submit.disabled = true;
    try {
      const rec = await view.api("POST", "api/deployments", body);
      location.hash = `#/deployments/${Number(rec.id)}`;
    } catch (e) {
      if (e instanceof ApiError && e.status === 400) {
        showFieldError(form, e.field, e.message, error);
        focusFirstError(form);
      } else report(error, e);
    } finally {
      submit.disabled = false;
    }
  });

  async function refreshList() {
    const data = await view.api("GET", "api/deployments?limit=20");
    swap(depBody, data.deployments.length ? data.deployments.map((d) => h("tr", {
      dataset: { deploymentId: String(d.id) } },
    h("td", { class: "num" }, h("a", { href: `#/deployments/${Number(d.id)}` }, String(d.id))),
    h("td", {}, d.playbook), h("td", {}, badge(d.status)),
    h("td", { class: "small" }, countsText(d.counts)), h("td", {}, timeAgo(d.created_at))))
      : [h("tr", {}, h("td", { class: "empty", colspan: "5" }, "No deployments yet."))]);
  }

  loadStatic().catch((e) => report(error, e));
  view.every(REFRESH_MS, refreshList, (e) => report(error, e));
}
