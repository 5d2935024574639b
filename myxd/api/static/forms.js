/**
 * Form errors: a message next to the field the API (or the page) names, announced
 * to assistive technology, and cleared before the next submit.
 */
import { h } from "./dom.js";

/** The API names the field at fault ("args[2]", "auth.password"); show it there. */
export function showFieldError(form, field, message, generalBox) {
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

export function fieldError(target, message) {
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

export function clearFieldErrors(form) {
  for (const p of form.querySelectorAll(".field-error")) p.remove();
  for (const el of form.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    const rest = (el.getAttribute("aria-describedby") || "").split(" ")
      .filter((x) => x && !x.startsWith("err-"));
    if (rest.length) el.setAttribute("aria-describedby", rest.join(" "));
    else el.removeAttribute("aria-describedby");
  }
}

export function focusFirstError(form) {
  const bad = form.querySelector("[aria-invalid='true']");
  if (bad) {
    const focusable = bad.matches("fieldset") ? bad.querySelector("input, select, textarea")
      : bad;
    if (focusable) focusable.focus();
  }
}

/**
 * An API message in the form's words: "ssh_port must be at most 65535" becomes
 * "SSH port must be at most 65535" when `labels` maps ssh_port to "SSH port".
 */
export function operatorWords(field, message, labels) {
  // "tags[2]" is said as its field ("Tags"), when the form has no label for the item.
  const label = field && (labels[field] || labels[field.replace(/\[[0-9]+\]$/, "")]);
  if (!label) return message;
  let text = String(message);
  text = text.replace(/ must be a non-empty string$/, " is required");
  if (text.startsWith(`${field}: `)) text = `${label} ${text.slice(field.length + 2)}`;
  else if (text.startsWith(`${field} `)) text = `${label} ${text.slice(field.length + 1)}`;
  else if (text.startsWith(`unknown field ${field}`)) text = `${label} is not expected here`;
  // Elsewhere in the text, only API-looking names ("ssh_port", "auth.password") are
  // replaced: a plain word like "host" may just be English.
  return /[._]/.test(field) ? text.replaceAll(field, label) : text;
}

/**
 * Every field error of an API 400 (`errors` in the body; else the one `field`), each
 * at its field in the form's words; the count (or what no field holds) in `general`.
 * Returns how many were shown.
 */
export function showApiErrors(form, e, labels, general) {
  const list = e.body && Array.isArray(e.body.errors) && e.body.errors.length
    ? e.body.errors : [{ field: e.field, error: e.message }];
  const loose = [];
  const seen = new Set();
  for (const item of list) {
    const key = `${item.field}\u0000${item.error}`;
    if (seen.has(key)) continue;
    seen.add(key);
    const words = operatorWords(item.field, item.error, labels || {});
    const box = { textContent: "" };
    if (!showFieldError(form, item.field, words, box)) loose.push(box.textContent);
  }
  const placed = seen.size - loose.length;
  const head = placed > 1 ? `${placed} fields need attention.`
    : placed === 1 && loose.length ? "One field needs attention." : "";
  general.textContent = [head, ...loose].filter(Boolean).join(" ");
  focusFirstError(form);
  return seen.size;
}
