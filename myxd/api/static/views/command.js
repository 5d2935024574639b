/**
 * One command: its facts and its output followed live (ANSI colours rendered by
 * term.js), with cancel. An unknown id says so and stops waiting.
 */
import { badge, h, page, swap, timeAgo } from "../dom.js";
import { commandLine, dash, decodeBase64, fmtDuration, fmtTime } from "../format.js";
import { ApiError, isAbort } from "../api.js";
import { FINAL, report } from "../view.js";
import { agentLabel, agentName } from "../names.js";
import { Terminal } from "../term.js";

export function commandView(main, view, commandId) {
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
  const terminal = new Terminal(term);
  let agentNames = null;
  let last = null;
  let finalShown = false;
  let cancelRequested = false;

  function write(stream, text) {
    if (!text) return;
    if (waiting.isConnected) waiting.remove();
    terminal.write(stream, text);
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
    loadName(c.agent_id);
    statusSlot.replaceChildren(badge(c.status, { id: "command-badge" }),
      c.exit_code === null || c.exit_code === undefined ? ""
        : h("span", { class: "exit", id: "command-exit" }, ` exit code ${c.exit_code}`));
    const name = agentNames && agentNames.get(c.agent_id);
    const title = name ? `Command ${commandId} on ${name}` : `Command ${commandId}`;
    const heading = document.getElementById("page-title");
    if (heading && heading.textContent !== title) {
      heading.textContent = title;
      document.title = `${title} \u00B7 MyX console`;
    }
    cmdline.textContent = c.kind === "ansible"
      ? `ansible-playbook ${c.command}` : commandLine(c);
    const rows = [
      ["Agent", h("a", { href: `#/agents/${Number(c.agent_id)}`, id: "command-agent" },
        agentLabel(c.agent_id, agentNames && agentNames.get(c.agent_id)))],
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
    terminal.end();
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
          // Nothing will ever arrive: no "waiting for output" under the error.
          waiting.remove();
          term.hidden = true;
          term.previousElementSibling.hidden = true;
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
  // Names are for display only: the output does not wait for them.
  let askedName = false;
  function loadName(agentId) {
    if (askedName) return;
    askedName = true;
    view.api("GET", `api/agents/${Number(agentId)}`).then((agent) => {
      agentNames = new Map([[agent.id, agentName(agent)]]);
      if (last) showMeta(last);
    }).catch(() => { /* the agent may be gone: its id is shown */ });
  }
  followOutput();
}
