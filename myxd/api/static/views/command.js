/**
 * One command: its facts and its output followed live, with cancel.
 */
import { badge, h, page, swap, timeAgo } from "../dom.js";
import { commandLine, dash, decodeBase64, fmtDuration, fmtTime } from "../format.js";
import { ApiError, isAbort } from "../api.js";
import { FINAL, report } from "../view.js";

const TERM_MAX_CHARS = 2000000;   // keep the page responsive on huge outputs
const TERM_KEEP_CHARS = 1500000;

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
