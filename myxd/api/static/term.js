/**
 * Command output with ANSI colours: a <pre> that takes decoded text per stream
 * (stdout/stderr) and renders SGR colours and styles with the vendored ansi_up
 * parser, keeping each stream's state across chunks (a colour or an escape sequence
 * may be cut between two reads).
 *
 * It never parses HTML: ansi_up is used as a parser only, and every piece of text
 * lands in the page as a text node. It keeps the page responsive on huge outputs by
 * dropping the oldest spans (the daemon keeps the whole output).
 */
import { AnsiUp } from "./vendor/ansi_up.js";
import { h } from "./dom.js";

// ansi_up 6.0.x's PacketKind values (the enum is not exported).
const EOS = 0;
const TEXT = 1;
const INCOMPLETE = 2;
const SGR = 5;
const OSCURL = 6;

const MAX_CHARS = 2000000;
const KEEP_CHARS = 1500000;

/** Splits text into styled pieces; one instance per stream, state kept across calls. */
export class AnsiParser {
  constructor() {
    this.up = new AnsiUp();
  }

  /** [{text, fg, bg, bold, faint, italic, underline}] for `text` (escapes removed). */
  feed(text) {
    const up = this.up;
    up.append_buffer(text);
    const out = [];
    for (;;) {
      const p = up.get_next_packet();
      if (p.kind === EOS || p.kind === INCOMPLETE) break;
      if (p.kind === TEXT || p.kind === OSCURL) out.push(up.with_state(p));
      else if (p.kind === SGR) up.process_ansi(p);
      // Other escapes (cursor movement, titles) have no meaning in a log: dropped.
    }
    return out;
  }

  /** What is left at the end of the output (a cut escape sequence), as plain text. */
  flush() {
    const rest = this.up._buffer || "";
    this.up._buffer = "";
    return rest ? [{ text: rest, fg: null, bg: null }] : [];
  }
}

function colourClass(colour, layer) {
  return colour && colour.class_name !== "truecolor" ? `${colour.class_name}-${layer}` : null;
}

/** A text node, or a <span> with classes (and CSSOM colours for 256/true colours). */
export function pieceNode(piece) {
  const plain = !piece.fg && !piece.bg && !piece.bold && !piece.faint && !piece.italic &&
    !piece.underline;
  if (plain) return document.createTextNode(piece.text);
  const classes = [colourClass(piece.fg, "fg"), colourClass(piece.bg, "bg"),
    piece.bold ? "ansi-bold" : null, piece.faint ? "ansi-faint" : null,
    piece.italic ? "ansi-italic" : null, piece.underline ? "ansi-underline" : null];
  const span = h("span", { class: classes.filter(Boolean).join(" ") || null }, piece.text);
  // Setting style properties through the CSSOM is allowed by the CSP (no inline
  // style attribute is ever written).
  if (piece.fg && piece.fg.class_name === "truecolor") span.style.color = `rgb(${piece.fg.rgb.join(",")})`;
  if (piece.bg && piece.bg.class_name === "truecolor") {
    span.style.backgroundColor = `rgb(${piece.bg.rgb.join(",")})`;
  }
  return span;
}

/** Nodes for a whole text at once (install logs, short outputs). */
export function ansiNodes(text) {
  const parser = new AnsiParser();
  return [...parser.feed(text), ...parser.flush()].map(pieceNode);
}

/** A streaming output pane: write(stream, text) appends, coloured, with trimming. */
export class Terminal {
  constructor(pre) {
    this.pre = pre;
    this.parsers = { stdout: new AnsiParser(), stderr: new AnsiParser() };
    this.shown = 0;
    this.trimmedNote = null;
  }

  write(stream, text) {
    if (!text) return;
    const cls = stream === "stderr" ? "stderr" : "stdout";
    this.append(cls, this.parsers[cls].feed(text));
  }

  /** Flush what the parsers still hold (call once the output is complete). */
  end() {
    for (const cls of ["stdout", "stderr"]) this.append(cls, this.parsers[cls].flush());
  }

  append(cls, pieces) {
    if (!pieces.length) return;
    let span = this.pre.lastElementChild;
    if (!span || !span.classList.contains(cls) || span.classList.contains("final")) {
      span = h("span", { class: cls, title: cls === "stderr" ? "stderr" : null });
      this.pre.append(span);
    }
    for (const piece of pieces) {
      span.append(pieceNode(piece));
      this.shown += piece.text.length;
    }
    if (this.shown > MAX_CHARS) this.trim();
  }

  trim() {
    // Drop whole spans from the top; the daemon keeps the full output.
    let dropped = 0;
    while (this.shown > KEEP_CHARS) {
      const first = [...this.pre.children].find((c) => c.classList.contains("stdout") ||
        c.classList.contains("stderr"));
      if (!first) break;
      const n = first.textContent.length;
      first.remove();
      this.shown -= n;
      dropped += n;
    }
    if (!this.trimmedNote) {
      this.trimmedNote = h("span", { class: "trimmed" });
      this.pre.prepend(this.trimmedNote);
    }
    const before = Number(this.trimmedNote.dataset.chars || "0") + dropped;
    this.trimmedNote.dataset.chars = String(before);
    this.trimmedNote.textContent = `[${before} earlier characters are not shown here; the ` +
      "daemon keeps the whole output]\n";
  }
}
