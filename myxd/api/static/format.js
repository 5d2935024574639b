/**
 * Pure formatting and parsing helpers: times, durations, sizes, shell quoting and
 * splitting, base64. No DOM and no network here, so every function is easy to test.
 */

/** What a missing value shows as. */
export const dash = "\u2014";

export function ago(ts) {
  if (ts === null || ts === undefined) return "never";
  const s = Math.round(Date.now() / 1000 - ts);
  if (s < 2) return "just now";
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function fmtTime(ts) {
  if (ts === null || ts === undefined) return dash;
  const d = new Date(ts * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return dash;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function fmtBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return dash;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function shQuote(s) {
  s = String(s);
  if (s !== "" && /^[A-Za-z0-9_@%+=:,./-]+$/.test(s)) return s;
  return "'" + s.replace(/'/g, "'\\''") + "'";
}

export function commandLine(cmd) {
  return [cmd.command, ...(Array.isArray(cmd.args) ? cmd.args : [])].map(shQuote).join(" ");
}

/**
 * Split text into arguments like a POSIX shell does for quoting only: whitespace
 * separates, '...' is literal, "..." allows \\ \" \$ \` escapes, \x escapes x.
 * No variables, globs, pipes or comments: the agent runs the command without a shell.
 */
export function shellSplit(text) {
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

export function linesSplit(text) {
  if (text === "") return [];
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  if (lines[lines.length - 1] === "") lines.pop();   // the newline after the last line
  return lines;
}

export function decodeBase64(data) {
  const bin = atob(data);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** A deployment's targets by status: "2 success \u00B7 1 failed". */
export function countsText(counts) {
  return Object.entries(counts || {}).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`)
    .join(" \u00B7 ") || "no targets";
}
