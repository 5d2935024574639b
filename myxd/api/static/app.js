/*
 * MyX web console: a single page over the daemon's admin API.
 *
 * Rules this file keeps:
 * - Data from the API is only ever put into the page as text (textContent, text
 *   nodes, attribute values); nothing is ever parsed as HTML.
 * - The admin token lives in sessionStorage (this tab only) and travels only in the
 *   Authorization header; never in a URL, never in storage that outlives the tab.
 * - Live output is followed with long-polls (GET /api/commands/{id}?offset=N&wait=10):
 *   the browser's server-sent-events client cannot send an Authorization header.
 */
"use strict";

(() => {
  const TOKEN_KEY = "myx.adminToken";
  const REFRESH_MS = 5000;
  const AGENT_STATUSES = ["online", "offline", "installing", "error"];
  const FINAL = new Set(["success", "failed"]);
  const PAGE = 50;
  const TERM_MAX_CHARS = 2000000;   // keep the page responsive on huge outputs
  const TERM_KEEP_CHARS = 1500000;

  // ---------------------------------------------------------------- DOM helpers

  const $ = (sel, root = document) => root.querySelector(sel);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = String(value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on") && typeof value === "function") {
        el.addEventListener(key.slice(2), value);
      } else if (key === "value" && (el instanceof HTMLTextAreaElement ||
          el instanceof HTMLSelectElement)) {
        el.value = String(value);
      } else if (key === "checked") {
        // Both, so that form.reset() returns to what the page set up.
        el.defaultChecked = el.checked = Boolean(value);
      } else if (key === "selected") el.defaultSelected = el.selected = Boolean(value);
      else if (value === true) el.setAttribute(key, "");
      else el.setAttribute(key, String(value));
    }
    add(el, children);
    return el;
  }

  function add(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  /** Replace children, keeping keyboard focus on the "same" element if it had it. */
  function swap(parent, nodes) {
    const active = document.activeElement;
    const key = active && parent.contains(active) ? active.dataset.focusKey : undefined;
    parent.replaceChildren(...nodes);
    if (key) {
      const again = parent.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
      if (again) again.focus();
    }
  }

  function safeClass(value) {
    return /^[a-z_]{1,32}$/.test(String(value)) ? String(value) : "other";
  }

  function badge(status, extra) {
    const text = status === null || status === undefined ? "unknown" : String(status);
    return h("span", { class: `badge st-${safeClass(text)}`, ...extra }, text);
  }

  const dash = "\u2014";

  // ------------------------------------------------------------------ formatting

  function ago(ts) {
    if (ts === null || ts === undefined) return "never";
    const s = Math.round(Date.now() / 1000 - ts);
    if (s < 2) return "just now";
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
    return `${Math.floor(s / 86400)}d ago`;
  }

  function fmtTime(ts) {
    if (ts === null || ts === undefined) return dash;
    const d = new Date(ts * 1000);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
      `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  /** A <time> that keeps saying "12s ago" (the ticker below updates it). */
  function timeAgo(ts) {
    if (ts === null || ts === undefined) return h("span", { class: "muted" }, "never");
    return h("time", {
      datetime: new Date(ts * 1000).toISOString(), title: fmtTime(ts),
      dataset: { ago: String(ts) },
    }, ago(ts));
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return dash;
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function fmtBytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return dash;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }

  function shQuote(s) {
    s = String(s);
    if (s !== "" && /^[A-Za-z0-9_@%+=:,./-]+$/.test(s)) return s;
    return "'" + s.replace(/'/g, "'\\''") + "'";
  }

  function commandLine(cmd) {
    return [cmd.command, ...(Array.isArray(cmd.args) ? cmd.args : [])].map(shQuote).join(" ");
  }

  /**
   * Split text into arguments like a POSIX shell does for quoting only: whitespace
   * separates, '...' is literal, "..." allows \\ \" \$ \` escapes, \x escapes x.
   * No variables, globs, pipes or comments: the agent runs the command without a shell.
   */
  function shellSplit(text) {
    const out = [];
    let cur = "";
    let inWord = false;
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "'") {
        const end = text.indexOf("'", i + 1);
        if (end < 0) throw new Error("unterminated single quote (')");
        cur += text.slice(i + 1, end);
        inWord = true;
        i = end + 1;
      } else if (c === '"') {
        i++;
        inWord = true;
        let closed = false;
        while (i < text.length) {
          const d = text[i];
          if (d === '"') { closed = true; i++; break; }
          if (d === "\\" && i + 1 < text.length && '\\"$`\n'.includes(text[i + 1])) {
            if (text[i + 1] !== "\n") cur += text[i + 1];
            i += 2;
            continue;
          }
          cur += d;
          i++;
        }
        if (!closed) throw new Error('unterminated double quote (")');
      } else if (c === "\\") {
        if (i + 1 >= text.length) throw new Error("a backslash at the very end escapes nothing");
        if (text[i + 1] !== "\n") { cur += text[i + 1]; inWord = true; }
        i += 2;
      } else if (/\s/.test(c)) {
        if (inWord) { out.push(cur); cur = ""; inWord = false; }
        i++;
      } else {
        cur += c;
        inWord = true;
        i++;
      }
    }
    if (inWord) out.push(cur);
    return out;
  }

  function linesSplit(text) {
    if (text === "") return [];
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    if (lines[lines.length - 1] === "") lines.pop();   // the newline after the last line
    return lines;
  }

  function decodeBase64(data) {
    const bin = atob(data);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // ------------------------------------------------------------------------ auth

  const auth = {
    get() {
      try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
    },
    set(token) { sessionStorage.setItem(TOKEN_KEY, token); },
    clear() {
      try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* storage disabled */ }
    },
  };

  // ------------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message, field, body) {
      super(message);
      this.name = "ApiError";
      this.status = status;
      this.field = field || null;
      this.body = body || null;
    }
  }

  function isAbort(e) {
    return e && (e.name === "AbortError" || e.name === "ViewStopped");
  }

  async function rawFetch(method, path, token, body, signal) {
    const headers = { "Accept": "application/json", "Authorization": `Bearer ${token}` };
    const init = {
      method, headers, signal, cache: "no-store", credentials: "omit", redirect: "error",
    };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      if (isAbort(e)) throw e;
      setConnection(false);
      throw new ApiError(0, "The daemon cannot be reached (network error). It may be " +
        "stopped or restarting.");
    }
    setConnection(true);
    let data = null;
    const ctype = resp.headers.get("content-type") || "";
    if (ctype.startsWith("application/json")) {
      try { data = await resp.json(); } catch (e) { data = null; }
    }
    if (!resp.ok) {
      const message = data && typeof data.error === "string" ? data.error
        : `HTTP ${resp.status} ${resp.statusText}`.trim();
      throw new ApiError(resp.status, message, data && data.field, data);
    }
    return data;
  }

  /** Calls the API with the stored token; a 401 sends the operator back to sign in. */
  async function api(method, path, body, signal) {
    const token = auth.get();
    if (!token) {
      showLogin("");
      throw new ApiError(401, "not signed in");
    }
    try {
      return await rawFetch(method, path, token, body, signal);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        showLogin("The daemon refused the admin token (HTTP 401 Unauthorized). It may " +
          "have changed; enter the current one.");
      }
      throw e;
    }
  }

  function setConnection(ok) {
    const el = $("#conn");
    if (!el) return;
    el.textContent = ok ? "" : "\u25CF daemon unreachable, retrying";
    el.classList.toggle("down", !ok);
  }

  function banner(message) {
    const el = $("#banner");
    el.textContent = message || "";
    el.hidden = !message;
  }

  // ----------------------------------------------------------------- view context

  /** Owns what a view started (requests, timers) so leaving the view stops it all. */
  class View {
    constructor() {
      this.controller = new AbortController();
      this.timers = new Set();
      this.alive = true;
    }

    get signal() { return this.controller.signal; }

    api(method, path, body) {
      if (!this.alive) return Promise.reject(stopped());
      return api(method, path, body, this.signal);
    }

    sleep(ms) {
      return new Promise((resolve) => {
        const t = setTimeout(() => { this.timers.delete(t); resolve(); }, ms);
        this.timers.add(t);
      });
    }

    /** Run fn now and then every ms after it finished (never overlapping). */
    every(ms, fn, onError) {
      const loop = async () => {
        while (this.alive) {
          try {
            await fn();
          } catch (e) {
            if (!this.alive || isAbort(e)) return;
            if (e instanceof ApiError && e.status === 401) return;
            if (onError) onError(e);
          }
          if (!this.alive) return;
          await this.sleep(ms);
        }
      };
      loop();
    }

    stop() {
      this.alive = false;
      this.controller.abort();
      for (const t of this.timers) clearTimeout(t);
      this.timers.clear();
    }
  }

  function stopped() {
    const e = new Error("view stopped");
    e.name = "ViewStopped";
    return e;
  }

  /** Shows an error in `box` unless it is an abort or a 401 (handled by sign-in). */
  function report(box, e) {
    if (isAbort(e)) return;
    if (e instanceof ApiError && e.status === 401) return;
    box.textContent = e && e.message ? e.message : String(e);
  }

  // ------------------------------------------------------------------ field errors

  /** The API names the field at fault ("args[2]", "auth.password"); show it there. */
  function showFieldError(form, field, message, generalBox) {
    const candidates = [];
    if (field) {
      candidates.push(field);
      const bracket = field.indexOf("[");
      if (bracket > 0) candidates.push(field.slice(0, bracket));
      let dotted = field;
      while (dotted.includes(".")) {
        dotted = dotted.slice(0, dotted.lastIndexOf("."));
        candidates.push(dotted);
      }
    }
    for (const name of candidates) {
      const target = form.querySelector(`[data-field="${CSS.escape(name)}"]`);
      if (target && !target.closest("[hidden]")) {
        fieldError(target, message);
        return target;
      }
    }
    generalBox.textContent = field ? `${field}: ${message}` : message;
    return null;
  }

  function fieldError(target, message) {
    const id = `err-${target.id || Math.random().toString(36).slice(2)}`;
    const p = h("p", { class: "field-error", id, role: "alert" }, message);
    target.setAttribute("aria-invalid", "true");
    const described = (target.getAttribute("aria-describedby") || "").split(" ")
      .filter((x) => x && !x.startsWith("err-"));
    target.setAttribute("aria-describedby", [...described, id].join(" "));
    const anchor = target.closest(".row") || target;
    anchor.append(p);
    return p;
  }

  function clearFieldErrors(form) {
    for (const p of form.querySelectorAll(".field-error")) p.remove();
    for (const el of form.querySelectorAll("[aria-invalid]")) {
      el.removeAttribute("aria-invalid");
      const rest = (el.getAttribute("aria-describedby") || "").split(" ")
        .filter((x) => x && !x.startsWith("err-"));
      if (rest.length) el.setAttribute("aria-describedby", rest.join(" "));
      else el.removeAttribute("aria-describedby");
    }
  }

  function focusFirstError(form) {
    const bad = form.querySelector("[aria-invalid='true']");
    if (bad) {
      const focusable = bad.matches("fieldset") ? bad.querySelector("input, select, textarea")
        : bad;
      if (focusable) focusable.focus();
    }
  }

  // ---------------------------------------------------------------- confirm dialog

  function confirmDialog({ title, text, confirmLabel = "Confirm", danger = true, extra }) {
    const dialog = $("#confirm");
    $("#confirm-title").textContent = title;
    $("#confirm-text").textContent = text;
    $("#confirm-extra").replaceChildren(...(extra ? [extra] : []));
    const yes = $("#confirm-yes");
    yes.textContent = confirmLabel;
    yes.className = danger ? "btn btn-danger" : "btn btn-primary";
    dialog.returnValue = "cancel";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"),
        { once: true });
      dialog.showModal();
      $("#confirm-no").focus();
    });
  }

  // ----------------------------------------------------------------------- router

  let currentView = null;
  let returnTo = null;

  function parseHash() {
    const raw = location.hash.replace(/^#/, "");
    const [path, query] = raw.split("?", 2);
    const parts = path.split("/").filter(Boolean);
    return { parts, params: new URLSearchParams(query || "") };
  }

  function stopView() {
    if (currentView) currentView.stop();
    currentView = null;
  }

  function setNav(active) {
    for (const a of document.querySelectorAll("[data-nav]")) {
      if (a.dataset.nav === active) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }

  function page(title, sub, actions) {
    document.title = `${title} \u00B7 MyX console`;
    return h("div", { class: "page-head" },
      h("h1", { tabindex: "-1", id: "page-title" }, title),
      sub ? h("span", { class: "sub" }, sub) : null,
      actions && actions.length ? h("div", { class: "actions" }, actions) : null);
  }

  function route() {
    if (!auth.get()) {
      showLogin("");
      return;
    }
    banner("");
    stopView();
    $("#nav").hidden = false;
    $("#signout").hidden = false;
    const main = $("#main");
    main.replaceChildren();
    const { parts, params } = parseHash();
    const view = new View();
    currentView = view;
    const section = parts[0] || "fleet";
    const id = parts[1] !== undefined && /^[0-9]{1,18}$/.test(parts[1]) ? Number(parts[1]) : null;
    setNav(section === "agents" ? "fleet" : section);
    if (section === "fleet" && parts.length === 1 || parts.length === 0) {
      fleetView(main, view, params);
    } else if (section === "agents" && id !== null && parts.length === 2) {
      agentView(main, view, id, params);
    } else if (section === "run" && parts.length === 1) {
      runView(main, view, params);
    } else if (section === "commands" && parts.length === 1) {
      openCommandView(main, view);
    } else if (section === "commands" && id !== null && parts.length === 2) {
      commandView(main, view, id);
    } else if (section === "events" && parts.length === 1) {
      eventsView(main, view, params);
    } else if (section === "servers" && parts.length === 1) {
      serversView(main, view);
    } else if (section === "servers" && id !== null && parts.length === 2) {
      serverView(main, view, id);
    } else {
      main.append(page("Not found"), h("p", {}, "There is no such page. ",
        h("a", { href: "#/fleet" }, "Go to the fleet"), "."));
    }
    // Like a page load for assistive technology: focus lands on the new page's title.
    const title = $("#page-title");
    if (title) title.focus({ preventScroll: true });
  }

  // ------------------------------------------------------------------------ login

  function showLogin(message) {
    if (currentView) returnTo = location.hash;
    stopView();
    auth.clear();
    $("#nav").hidden = true;
    $("#signout").hidden = true;
    banner("");
    document.title = "Sign in \u00B7 MyX console";
    const error = h("p", { class: "alert", id: "login-error", role: "alert" }, message || "");
    const input = h("input", {
      type: "password", id: "token", name: "token", autocomplete: "off",
      spellcheck: "false", autocapitalize: "off", required: true,
      "aria-describedby": "token-hint login-error",
    });
    const show = h("input", { type: "checkbox", id: "token-show" });
    show.addEventListener("change", () => { input.type = show.checked ? "text" : "password"; });
    const submit = h("button", { type: "submit", class: "btn btn-primary", id: "token-submit" },
      "Sign in");
    const form = h("form", { id: "login-form", novalidate: true },
      h("div", { class: "row" },
        h("label", { for: "token" }, "Admin token"),
        input,
        h("p", { class: "hint", id: "token-hint" },
          "The daemon writes it to ", h("code", {}, "<data-dir>/admin-token"),
          " on its first start (or it is set in the config). It is kept in this browser " +
          "tab only and sent as a bearer token.")),
      h("div", { class: "row" }, h("label", { class: "choice" }, show, "Show the token")),
      h("div", { class: "form-actions" }, submit));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const token = input.value.trim();
      error.textContent = "";
      if (!token) {
        error.textContent = "Enter the admin token.";
        input.focus();
        return;
      }
      submit.disabled = true;
      submit.textContent = "Checking\u2026";
      try {
        // One cheap protected call proves the token before anything else runs.
        await rawFetch("GET", "api/agents?limit=1", token);
      } catch (e) {
        submit.disabled = false;
        submit.textContent = "Sign in";
        if (e instanceof ApiError && e.status === 401) {
          error.textContent = "The daemon refused this token (HTTP 401 Unauthorized). " +
            "Check it and try again.";
        } else {
          error.textContent = e.message || String(e);
        }
        input.select();
        input.focus();
        return;
      }
      auth.set(token);
      input.value = "";
      const target = returnTo && returnTo !== location.hash ? returnTo : null;
      returnTo = null;
      if (target) location.hash = target;
      else route();
    });
    $("#main").replaceChildren(h("section", { class: "card login", "aria-labelledby": "login-title" },
      h("h1", { id: "login-title" }, "Sign in to the MyX console"), error, form));
    input.focus();
  }

  // ------------------------------------------------------------------------ fleet

  function fleetView(main, view, params) {
    const status = AGENT_STATUSES.includes(params.get("status")) ? params.get("status") : null;
    let offset = Math.max(0, Number.parseInt(params.get("offset") || "0", 10) || 0);
    const selected = new Set();
    const updated = h("span", {}, "loading\u2026");
    const runSelected = h("button", {
      type: "button", class: "btn btn-primary", id: "run-selected", disabled: true,
      onclick: () => { location.hash = `#/run?agents=${[...selected].join(",")}`; },
    }, "Run on selected");
    main.append(page("Fleet", h("span", {}, "Agents \u00B7 refreshed every 5 s \u00B7 updated ",
      updated), [runSelected, h("a", { class: "btn", href: "#/run?agents=all" }, "Run on all")]));
    const counts = h("nav", { class: "counts", "aria-label": "Agents by status", id: "counts" });
    const error = h("p", { class: "alert", role: "alert" });
    const selectAll = h("input", {
      type: "checkbox", "aria-label": "Select all agents on this page", id: "select-all",
      dataset: { focusKey: "select-all" },
    });
    const tbody = h("tbody", { id: "agents-body" });
    const table = h("table", { id: "agents" },
      h("caption", { class: "visually-hidden" }, "Agents"),
      h("thead", {}, h("tr", {},
        h("th", { class: "sel", scope: "col" }, selectAll),
        ["ID", "Host", "Port", "Status", "Version", "Last heartbeat", "Reason"].map(
          (t) => h("th", { scope: "col", class: t === "ID" || t === "Port" ? "num" : null }, t)))),
      tbody);
    const pager = h("div", { class: "pager" });
    main.append(counts, error, h("div", { class: "table-wrap" }, table), pager);
    let rows = [];

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
      const href = value ? `#/fleet?status=${value}` : "#/fleet";
      return h("a", {
        class: "count", href, "aria-current": (value || null) === status ? "true" : null,
        dataset: { status: value || "all" },
      }, h("span", { class: "n" }, String(n)), " ",
      h("span", { class: "k" }, h("span", { class: `dot st-${safeClass(value || "all")}` }),
        label));
    }

    function row(agent) {
      const box = h("input", {
        type: "checkbox", "aria-label": `Select agent ${agent.id}`, checked: selected.has(agent.id),
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
        h("td", { class: "host" }, agent.host),
        h("td", { class: "num" }, String(agent.rpc_port)),
        h("td", { class: "status" }, badge(agent.status)),
        h("td", {}, agent.version || dash),
        h("td", { class: "nowrap heartbeat" }, timeAgo(agent.last_heartbeat)),
        h("td", { class: "reason" }, agent.status_reason || ""));
    }

    async function refresh() {
      const filter = status ? `&status=${status}` : "";
      const [list, ...perStatus] = await Promise.all([
        view.api("GET", `api/agents?limit=${PAGE}&offset=${offset}${filter}`),
        ...AGENT_STATUSES.map((s) => view.api("GET", `api/agents?limit=1&status=${s}`)),
      ]);
      error.textContent = "";
      if (list.agents.length === 0 && offset > 0 && list.total > 0) {
        offset = Math.max(0, Math.floor((list.total - 1) / PAGE) * PAGE);
        return refresh();
      }
      const total = perStatus.reduce((sum, r) => sum + r.total, 0);
      swap(counts, [countLink("All agents", null, total),
        ...AGENT_STATUSES.map((s, i) => countLink(s, s, perStatus[i].total))]);
      rows = list.agents;
      swap(tbody, rows.length ? rows.map(row) : [h("tr", {}, h("td", {
        class: "empty", colspan: "8",
      }, status ? `No ${status} agents.` : "No agents yet. Adopt one with POST /api/agents, " +
        "or add a server on the Servers page."))]);
      syncSelection();
      const first = list.total ? offset + 1 : 0;
      const last = offset + list.agents.length;
      swap(pager, [
        h("span", { class: "muted small" }, `${first}\u2013${last} of ${list.total}`),
        h("button", {
          type: "button", class: "btn btn-small", disabled: offset === 0,
          dataset: { focusKey: "prev" },
          onclick: () => { offset = Math.max(0, offset - PAGE); refresh().catch(onError); },
        }, "\u2190 Previous"),
        h("button", {
          type: "button", class: "btn btn-small", disabled: last >= list.total,
          dataset: { focusKey: "next" },
          onclick: () => { offset += PAGE; refresh().catch(onError); },
        }, "Next \u2192"),
      ]);
      updated.replaceChildren(timeAgo(Date.now() / 1000));
    }

    const onError = (e) => report(error, e);
    view.every(REFRESH_MS, refresh, onError);
  }

  // ------------------------------------------------------------------ agent detail

  function agentView(main, view, agentId) {
    const head = h("div");
    const error = h("p", { class: "alert", role: "alert" });
    const summary = h("dl", { class: "kv", id: "agent-summary" });
    const system = h("dl", { class: "kv", id: "agent-system" });
    const history = h("tbody", { id: "history-body" });
    const pager = h("div", { class: "pager" });
    let offset = 0;
    main.append(head, error,
      h("div", { class: "grid-2" },
        h("section", { class: "card", "aria-labelledby": "agent-h" },
          h("h2", { id: "agent-h" }, "Agent"), summary),
        h("section", { class: "card", "aria-labelledby": "system-h" },
          h("h2", { id: "system-h" }, "System (last get_status)"), system)),
      h("section", { "aria-labelledby": "history-h" },
        h("h2", { id: "history-h" }, "Command history"),
        h("div", { class: "table-wrap" }, h("table", { id: "history" },
          h("thead", {}, h("tr", {}, ["ID", "Command", "Status", "Exit", "Created", "Duration"]
            .map((t) => h("th", { scope: "col" }, t)))), history)),
        pager));
    head.append(page(`Agent ${agentId}`, "refreshed every 5 s", [
      h("a", { class: "btn btn-primary", href: `#/run?agents=${agentId}` }, "Run a command"),
      h("button", { type: "button", class: "btn btn-danger", onclick: remove }, "Delete agent"),
    ]));

    function kv(dl, pairs) {
      swap(dl, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    }

    async function remove() {
      const ok = await confirmDialog({
        title: `Delete agent ${agentId}?`,
        text: "The daemon forgets this agent and its command history. The agent process " +
          "itself keeps running on its host.",
        confirmLabel: "Delete agent",
      });
      if (!ok) return;
      try {
        await view.api("DELETE", `api/agents/${agentId}`);
        location.hash = "#/fleet";
      } catch (e) { report(error, e); }
    }

    function memory(m) {
      if (!m || typeof m.total !== "number") return dash;
      const used = m.total - (m.available || 0);
      return [`${fmtBytes(used)} used of ${fmtBytes(m.total)} ` +
        `(${Math.round((used / m.total) * 100)}%)`,
      h("meter", { min: "0", max: String(m.total), value: String(used), high: String(m.total * 0.9),
        "aria-label": "memory used" })];
    }

    function disk(d) {
      if (!d || typeof d.total !== "number") return dash;
      const used = d.total - (d.free || 0);
      return [`${d.path || "/"}: ${fmtBytes(d.free)} free of ${fmtBytes(d.total)} `,
        h("meter", { min: "0", max: String(d.total), value: String(used),
          high: String(d.total * 0.9), "aria-label": "disk used" })];
    }

    async function refresh() {
      const [agent, cmds] = await Promise.all([
        view.api("GET", `api/agents/${agentId}`),
        view.api("GET", `api/agents/${agentId}/commands?limit=20&offset=${offset}`),
      ]);
      error.textContent = "";
      kv(summary, [
        ["Status", [badge(agent.status), agent.status_reason ? ` ${agent.status_reason}` : ""]],
        ["Address", `${agent.host}:${agent.rpc_port}`],
        ["Version", agent.version || dash],
        ["Last heartbeat", [timeAgo(agent.last_heartbeat),
          agent.last_latency !== null && agent.last_latency !== undefined
            ? ` (${Math.round(agent.last_latency * 1000)} ms)` : ""]],
        ["Failed cycles", String(agent.failed_cycles ?? 0)],
        ["Certificate", h("code", { class: "small" }, agent.cert_fingerprint || dash)],
        ["Server", agent.server_id ? h("a", { href: `#/servers/${Number(agent.server_id)}` },
          `server ${agent.server_id}`) : "adopted (no server record)"],
        ["Added", timeAgo(agent.created_at)],
      ]);
      const d = agent.details;
      const title = $("#page-title", head);
      const name = d && typeof d === "object" && d.hostname ? ` \u00B7 ${d.hostname}` : "";
      if (title && title.textContent !== `Agent ${agentId}${name}`) {
        title.textContent = `Agent ${agentId}${name}`;
      }
      if (d && typeof d === "object") {
        const load = Array.isArray(d.load_avg)
          ? d.load_avg.map((x) => (typeof x === "number" ? x.toFixed(2) : dash)).join("  ") : dash;
        kv(system, [
          ["Hostname", d.hostname || dash],
          ["OS", d.os || dash],
          ["Python", d.python || dash],
          ["Uptime", fmtDuration(d.uptime)],
          ["Load average", load],
          ["Memory", memory(d.memory)],
          ["Disk", disk(d.disk)],
          ["Deployment tool", d.deployment_tool_version || "not installed"],
          ["Running commands", String(d.running_commands ?? dash)],
        ]);
      } else {
        swap(system, [h("p", { class: "muted" }, "No status reported yet.")]);
      }
      swap(history, cmds.commands.length ? cmds.commands.map((c) => h("tr", {},
        h("td", { class: "num" }, h("a", { href: `#/commands/${Number(c.id)}` }, String(c.id))),
        h("td", { class: "cmd" }, h("code", {}, c.kind === "ansible"
          ? `ansible ${c.command}` : commandLine(c))),
        h("td", {}, badge(c.status)),
        h("td", { class: "num" }, c.exit_code === null ? dash : String(c.exit_code)),
        h("td", { class: "nowrap" }, timeAgo(c.created_at)),
        h("td", { class: "nowrap" }, fmtDuration(c.started_at && c.finished_at
          ? c.finished_at - c.started_at : null)),
      )) : [h("tr", {}, h("td", { class: "empty", colspan: "6" }, "No commands yet."))]);
      swap(pager, [
        h("button", {
          type: "button", class: "btn btn-small", disabled: offset === 0,
          dataset: { focusKey: "newer" },
          onclick: () => { offset = Math.max(0, offset - 20); refresh().catch(onError); },
        }, "\u2190 Newer"),
        h("button", {
          type: "button", class: "btn btn-small", disabled: cmds.next_offset === null,
          dataset: { focusKey: "older" },
          onclick: () => { offset = cmds.next_offset; refresh().catch(onError); },
        }, "Older \u2192"),
      ]);
    }
    const onError = (e) => report(error, e);
    view.every(REFRESH_MS, refresh, onError);
  }

  // -------------------------------------------------------------------------- run

  function runView(main, view, params) {
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

  // ---------------------------------------------------------------- command views

  function openCommandView(main, view) {
    const input = h("input", { type: "number", id: "open-command", class: "short", min: "1",
      required: true });
    const form = h("form", { class: "card", novalidate: true },
      h("div", { class: "row" }, h("label", { for: "open-command" }, "Command id"), input,
        h("p", { class: "hint" }, "Every agent's page lists its commands; the Events page " +
          "lists them all.")),
      h("div", { class: "form-actions" },
        h("button", { type: "submit", class: "btn btn-primary" }, "Open")));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearFieldErrors(form);
      if (!/^[0-9]{1,18}$/.test(input.value) || Number(input.value) < 1) {
        fieldError(input, "Enter a command id (a positive number).");
        input.focus();
        return;
      }
      location.hash = `#/commands/${Number(input.value)}`;
    });
    main.append(page("Open a command"), form);
    input.focus();
    void view;
  }

  function commandView(main, view, commandId) {
    const error = h("p", { class: "alert", role: "alert", id: "command-error" });
    const note = h("p", { class: "notice", role: "status", id: "command-note", hidden: true });
    const statusSlot = h("span", { id: "command-status" }, badge("loading"));
    const cancel = h("button", { type: "button", class: "btn btn-danger", id: "cancel",
      hidden: true }, "Cancel command");
    const meta = h("dl", { class: "facts", id: "command-meta" });
    const cmdline = h("code", { class: "cmdline", id: "command-line" });
    const wrap = h("input", { type: "checkbox", id: "wrap" });
    const follow = h("input", { type: "checkbox", id: "follow", checked: true });
    const term = h("pre", { class: "term", id: "term", role: "log", tabindex: "0",
      "aria-label": "Command output", "aria-live": "off" });
    const waiting = h("span", { class: "waiting" }, "waiting for output\u2026");
    term.append(waiting);
    main.append(
      page(`Command ${commandId}`, statusSlot, [cancel]),
      error, note,
      h("section", { class: "card", "aria-label": "Command details" }, cmdline, meta),
      h("div", { class: "term-head" },
        h("h2", {}, "Output"),
        h("div", { class: "legend", "aria-hidden": "true" },
          h("span", {}, h("span", { class: "sw stdout" }), "stdout"),
          h("span", {}, h("span", { class: "sw stderr" }), "stderr")),
        h("label", { class: "choice" }, follow, "Follow the end"),
        h("label", { class: "choice" }, wrap, "Wrap long lines")),
      term);
    wrap.addEventListener("change", () => term.classList.toggle("wrap", wrap.checked));
    term.addEventListener("scroll", () => {
      const atEnd = term.scrollTop + term.clientHeight >= term.scrollHeight - 8;
      if (!atEnd && follow.checked && !term.dataset.autoscroll) follow.checked = false;
      else if (atEnd && !follow.checked) follow.checked = true;
      delete term.dataset.autoscroll;
    });

    const decoders = { stdout: new TextDecoder("utf-8"), stderr: new TextDecoder("utf-8") };
    let shownChars = 0;
    let trimmedNote = null;
    let last = null;
    let finalShown = false;
    let cancelRequested = false;

    function write(stream, text) {
      if (!text) return;
      if (waiting.isConnected) waiting.remove();
      const cls = stream === "stderr" ? "stderr" : "stdout";
      let span = term.lastElementChild;
      if (!span || !span.classList.contains(cls) || span.classList.contains("final")) {
        span = h("span", { class: cls, title: cls === "stderr" ? "stderr" : null });
        term.append(span);
      }
      span.append(text);
      shownChars += text.length;
      if (shownChars > TERM_MAX_CHARS) trim();
    }

    function trim() {
      // Drop whole spans from the top; the daemon keeps the full output.
      let dropped = 0;
      while (shownChars > TERM_KEEP_CHARS) {
        const first = [...term.children].find((c) => c.classList.contains("stdout") ||
          c.classList.contains("stderr"));
        if (!first) break;
        const n = first.textContent.length;
        first.remove();
        shownChars -= n;
        dropped += n;
      }
      if (!trimmedNote) {
        trimmedNote = h("span", { class: "trimmed" });
        term.prepend(trimmedNote);
      }
      const before = Number(trimmedNote.dataset.chars || "0") + dropped;
      trimmedNote.dataset.chars = String(before);
      trimmedNote.textContent = `[${before} earlier characters are not shown here; the ` +
        "daemon keeps the whole output]\n";
    }

    function scrollEnd() {
      if (!follow.checked) return;
      term.dataset.autoscroll = "1";
      term.scrollTop = term.scrollHeight;
    }

    // The queue's reason for a plain non-zero exit is "exit code N": say it once.
    function reasonOf(c) {
      return c.reason && c.reason !== `exit code ${c.exit_code}` ? c.reason : "";
    }

    function showMeta(c) {
      last = c;
      statusSlot.replaceChildren(badge(c.status, { id: "command-badge" }),
        c.exit_code === null || c.exit_code === undefined ? ""
          : h("span", { class: "exit", id: "command-exit" }, ` exit code ${c.exit_code}`));
      cmdline.textContent = c.kind === "ansible"
        ? `ansible-playbook ${c.command}` : commandLine(c);
      const rows = [
        ["Agent", h("a", { href: `#/agents/${Number(c.agent_id)}` }, `agent ${c.agent_id}`)],
        ["Status", [badge(c.status), reasonOf(c) ? ` ${reasonOf(c)}` : ""]],
        ["Exit code", c.exit_code === null || c.exit_code === undefined ? dash
          : String(c.exit_code)],
        ["Kind", c.kind],
        ["Timeout", c.timeout ? `${c.timeout} s` : "none"],
        ["Created", h("span", { title: fmtTime(c.created_at) }, timeAgo(c.created_at))],
        ["Started", fmtTime(c.started_at)],
        ["Finished", fmtTime(c.finished_at)],
        ["Duration", fmtDuration(c.started_at
          ? (c.finished_at || Date.now() / 1000) - c.started_at : null)],
        ["Attempts", String(c.attempts ?? dash)],
        ["Output", `${c.output_offset} bytes stored`],
      ];
      swap(meta, rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
      cancel.hidden = FINAL.has(c.status);
    }

    function showFinal(c) {
      if (finalShown) return;
      finalShown = true;
      if (cancelRequested) {
        note.textContent = "The command was stopped on the agent.";
        note.hidden = false;
      }
      for (const stream of ["stdout", "stderr"]) write(stream, decoders[stream].decode());
      if (waiting.isConnected) waiting.textContent = "(no output)";
      const ok = c.status === "success";
      const code = c.exit_code === null || c.exit_code === undefined ? "no exit code"
        : `exit code ${c.exit_code}`;
      term.append(h("span", { class: `final ${ok ? "ok" : "bad"}`, id: "term-final" },
        `\u2014 ${c.status} (${code})${reasonOf(c) ? `: ${reasonOf(c)}` : ""} \u2014`));
      scrollEnd();
    }

    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      cancel.textContent = "Cancelling\u2026";
      note.hidden = true;
      try {
        const c = await view.api("POST", `api/commands/${commandId}/cancel`);
        cancelRequested = true;
        note.textContent = finalShown ? "The command was stopped on the agent."
          : "Cancel requested; waiting for the agent to stop the command.";
        note.hidden = false;
        showMeta({ ...(last || {}), ...c });
      } catch (e) {
        if (e instanceof ApiError && e.status === 409) {
          note.textContent = "The command had already finished.";
          note.hidden = false;
        } else {
          report(error, e);
        }
      } finally {
        cancel.disabled = false;
        cancel.textContent = "Cancel command";
      }
    });

    async function followOutput() {
      let offset = 0;
      let backoff = 1000;
      while (view.alive) {
        let data;
        try {
          data = await view.api("GET", `api/commands/${commandId}?offset=${offset}&wait=10`);
        } catch (e) {
          if (!view.alive || isAbort(e)) return;
          if (e instanceof ApiError && e.status === 401) return;
          if (e instanceof ApiError && (e.status === 404 || e.status === 400)) {
            error.textContent = e.status === 404 ? `There is no command ${commandId}.`
              : e.message;
            statusSlot.replaceChildren(badge("unknown"));
            return;
          }
          error.textContent = `${e.message} Retrying in ${Math.round(backoff / 1000)} s\u2026`;
          await view.sleep(backoff);
          backoff = Math.min(backoff * 2, 10000);
          continue;
        }
        backoff = 1000;
        error.textContent = "";
        showMeta(data);
        for (const chunk of data.output) {
          const bytes = decodeBase64(chunk.data);
          const stream = chunk.stream === "stderr" ? "stderr" : "stdout";
          write(stream, decoders[stream].decode(bytes, { stream: true }));
          offset = chunk.offset + bytes.length;
        }
        if (data.output.length) scrollEnd();
        offset = data.next_offset;
        if (data.complete) {
          showFinal(data);
          return;
        }
        if (!data.output.length) await view.sleep(250);
      }
    }
    followOutput();
  }

  // ----------------------------------------------------------------------- events

  function targetLink(target) {
    const m = /^(agent|command|server):([0-9]{1,18})$/.exec(String(target || ""));
    if (!m) return target || dash;
    return h("a", { href: `#/${m[1]}s/${Number(m[2])}` }, target);
  }

  function eventsView(main, view, params) {
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

    function details(d) {
      if (d === null || d === undefined) return "";
      const text = JSON.stringify(d);
      const short = text.length > 240 ? `${text.slice(0, 240)}\u2026` : text;
      return h("code", { class: "small", title: text.length > 240 ? text : null }, short);
    }

    async function load() {
      const q = before === null ? "" : `&before_id=${before}`;
      const data = await view.api("GET", `api/events?limit=${PAGE}${q}`);
      error.textContent = "";
      swap(body, data.events.length ? data.events.map((e) => h("tr", {
        dataset: { action: String(e.action), eventId: String(e.id) },
      },
      h("td", { class: "num" }, String(e.id)),
      h("td", { class: "nowrap" }, fmtTime(e.at), h("br"), h("span", { class: "muted small" },
        timeAgo(e.at))),
      h("td", {}, e.actor),
      h("td", { class: "action" }, h("code", {}, e.action)),
      h("td", { class: "target" }, targetLink(e.target)),
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

  // ---------------------------------------------------------------------- servers

  function serversView(main, view) {
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
        `agent ${s.agent_id}`), " ", badge(s.agent_status)] : dash)))
        : [h("tr", {}, h("td", { class: "empty", colspan: "7" }, "No servers yet."))]);
    }
    view.every(REFRESH_MS, refresh, (e) => report(error, e));
  }

  function addServerForm(view) {
    const general = h("p", { class: "alert", role: "alert", id: "server-form-error" });
    const field = (id, label, input, hint) => h("div", { class: "row" },
      h("label", { for: id }, label), input, hint ? h("p", { class: "hint" }, hint) : null);
    const name = h("input", { type: "text", id: "srv-name", dataset: { field: "name" },
      autocomplete: "off" });
    const host = h("input", { type: "text", id: "srv-host", dataset: { field: "host" },
      autocomplete: "off", spellcheck: "false", placeholder: "IP address or host name" });
    const port = h("input", { type: "text", inputmode: "numeric", id: "srv-port", class: "short",
      value: "22", dataset: { field: "ssh_port" }, autocomplete: "off" });
    const user = h("input", { type: "text", id: "srv-user", value: "root",
      dataset: { field: "username" }, autocomplete: "off", spellcheck: "false" });
    const authPw = h("input", { type: "radio", name: "srv-auth", value: "password",
      id: "srv-auth-password", checked: true });
    const authKey = h("input", { type: "radio", name: "srv-auth", value: "key",
      id: "srv-auth-key" });
    const password = h("input", { type: "password", id: "srv-password", autocomplete: "new-password",
      dataset: { field: "auth.password" } });
    const key = h("textarea", { id: "srv-key", rows: "5", spellcheck: "false",
      dataset: { field: "auth.private_key" },
      placeholder: "-----BEGIN OPENSSH PRIVATE KEY-----" });
    const passphrase = h("input", { type: "password", id: "srv-passphrase",
      autocomplete: "new-password", dataset: { field: "auth.passphrase" } });
    const pwRow = field("srv-password", "SSH password", password);
    const keyRows = h("div", { hidden: true },
      field("srv-key", "Private key (ed25519, ECDSA or RSA, OpenSSH or PEM)", key),
      field("srv-passphrase", "Key passphrase (if the key is encrypted)", passphrase));
    const authSet = h("fieldset", { id: "srv-auth", dataset: { field: "auth" } },
      h("legend", {}, "SSH authentication"),
      h("div", { class: "inline-choices" },
        h("label", { class: "choice", for: "srv-auth-password" }, authPw, "Password"),
        h("label", { class: "choice", for: "srv-auth-key" }, authKey, "Private key")),
      pwRow, keyRows);
    const syncAuth = () => { pwRow.hidden = !authPw.checked; keyRows.hidden = authPw.checked; };
    authPw.addEventListener("change", syncAuth);
    authKey.addEventListener("change", syncAuth);

    const sudo = h("select", { id: "srv-sudo", dataset: { field: "sudo" } },
      h("option", { value: "none" }, "No sudo (the user is root)"),
      h("option", { value: "sudo" }, "sudo without a password (NOPASSWD)"),
      h("option", { value: "sudo-password" }, "sudo with a password"));
    const sudoPw = h("input", { type: "password", id: "srv-sudo-password",
      autocomplete: "new-password", dataset: { field: "sudo.password" } });
    const sudoPwRow = field("srv-sudo-password", "sudo password", sudoPw);
    sudoPwRow.hidden = true;
    sudo.addEventListener("change", () => { sudoPwRow.hidden = sudo.value !== "sudo-password"; });
    const pin = h("input", { type: "text", id: "srv-pin", dataset: { field: "host_key_fingerprint" },
      autocomplete: "off", spellcheck: "false", placeholder: "SHA256:\u2026 (optional)" });
    const start = h("input", { type: "checkbox", id: "srv-start", checked: true,
      dataset: { field: "start" } });
    const submit = h("button", { type: "submit", class: "btn btn-primary", id: "srv-submit" },
      "Add server");

    const form = h("form", { id: "server-form", novalidate: true, autocomplete: "off" },
      general,
      h("div", { class: "form-grid" },
        field("srv-name", "Name", name),
        field("srv-host", "Host", host),
        field("srv-user", "SSH user", user),
        field("srv-port", "SSH port", port)),
      authSet,
      h("div", { class: "form-grid" },
        h("div", { class: "row" }, h("label", { for: "srv-sudo" }, "Privileges"), sudo),
        sudoPwRow),
      field("srv-pin", "Host key fingerprint", pin,
        "As ssh-keygen -lf prints it. Empty: trust the key seen on the first connection " +
        "and refuse any later change."),
      h("div", { class: "row" }, h("label", { class: "choice", for: "srv-start" }, start,
        "Start the install now")),
      h("div", { class: "form-actions" }, submit));

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearFieldErrors(form);
      general.textContent = "";
      const body = {
        name: name.value.trim(), host: host.value.trim(), username: user.value.trim(),
        start: start.checked,
      };
      const portText = port.value.trim();
      if (portText !== "") {
        if (!/^[0-9]{1,5}$/.test(portText)) {
          fieldError(port, "The SSH port must be a number from 1 to 65535.");
          port.focus();
          return;
        }
        body.ssh_port = Number(portText);
      }
      body.auth = authPw.checked ? { password: password.value }
        : { private_key: key.value, ...(passphrase.value ? { passphrase: passphrase.value } : {}) };
      body.sudo = sudo.value === "sudo-password" ? { mode: "sudo", password: sudoPw.value }
        : sudo.value;
      if (pin.value.trim()) body.host_key_fingerprint = pin.value.trim();
      submit.disabled = true;
      try {
        const reply = await view.api("POST", "api/servers", body);
        // Secrets leave the page as soon as the daemon has them.
        form.reset();
        syncAuth();
        sudoPwRow.hidden = true;
        location.hash = `#/servers/${Number(reply.server.id)}`;
      } catch (e) {
        if (e instanceof ApiError && e.status === 400) {
          showFieldError(form, e.field, e.message, general);
          focusFirstError(form);
        } else {
          report(general, e);
        }
      } finally {
        submit.disabled = false;
      }
    });
    return form;
  }

  function serverView(main, view, serverId) {
    const error = h("p", { class: "alert", role: "alert", id: "server-error" });
    const note = h("p", { class: "okmsg", role: "status", hidden: true });
    const info = h("dl", { class: "kv", id: "server-info" });
    const install = h("div", { id: "install" });
    const openLogs = new Set();
    const buttons = {
      reinstall: h("button", { type: "button", class: "btn", id: "srv-reinstall" }, "Reinstall"),
      uninstall: h("button", { type: "button", class: "btn", id: "srv-uninstall" }, "Uninstall"),
      remove: h("button", { type: "button", class: "btn btn-danger", id: "srv-delete" },
        "Delete"),
    };
    main.append(page(`Server ${serverId}`, "install progress refreshes live",
      Object.values(buttons)), error, note,
    h("section", { class: "card", "aria-labelledby": "srv-h" },
      h("h2", { id: "srv-h" }, "Server"), info),
    h("section", { "aria-labelledby": "install-h" },
      h("h2", { id: "install-h" }, "Latest install"), install));
    let running = false;

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
        await view.api("POST", `api/servers/${serverId}/${kind}`, body);
        note.textContent = `${kind === "reinstall" ? "Reinstall" : "Uninstall"} started.`;
        note.hidden = false;
        await refresh();
      } catch (e) { report(error, e); }
    }
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
          h("td", {}, h("code", {}, s.step)),
          h("td", {}, badge(s.status)),
          h("td", { class: "nowrap" }, fmtTime(s.started_at)),
          h("td", { class: "nowrap" }, fmtDuration(s.started_at
            ? (s.finished_at || Date.now() / 1000) - s.started_at : null)),
          h("td", { class: "reason" }, s.error || ""))];
        if (s.log) {
          const det = h("details", { class: "log", open: openLogs.has(s.step) },
            h("summary", { dataset: { focusKey: `log-${s.step}` } }, `Log of ${s.step}`),
            h("pre", {}, s.log));
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
      running = Boolean(server.install_running || (inst && inst.running));
      buttons.reinstall.disabled = running;
      buttons.uninstall.disabled = running;
      swap(info, [
        ["Name", server.name],
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
          `agent ${server.agent_id}`), " ", badge(server.agent_status)] : dash],
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

  // ------------------------------------------------------------------------ start

  function tick() {
    for (const el of document.querySelectorAll("time[data-ago]")) {
      const text = ago(Number(el.dataset.ago));
      if (el.textContent !== text) el.textContent = text;
    }
  }

  function start() {
    $("#skip-link").addEventListener("click", (event) => {
      // The hash is the router's: move focus without touching it.
      event.preventDefault();
      const title = $("#page-title") || $("#main");
      title.focus();
    });
    $("#signout").addEventListener("click", () => {
      returnTo = null;
      stopView();
      showLogin("The token was removed from this tab.");
    });
    window.addEventListener("hashchange", route);
    setInterval(tick, 1000);
    route();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
