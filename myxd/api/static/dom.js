/**
 * DOM helpers shared by every view: building elements, swapping children without
 * losing keyboard focus, status badges, the page heading and the confirm dialog.
 *
 * Rule: data is only ever put into the page as text (textContent, text nodes,
 * attribute values); nothing here parses HTML, and no other module may either.
 */
import { ago, fmtTime } from "./format.js";

export const $ = (sel, root = document) => root.querySelector(sel);

export function h(tag, attrs, ...children) {
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

export function add(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replace children, keeping keyboard focus on the "same" element if it had it. */
export function swap(parent, nodes) {
  const active = document.activeElement;
  const key = active && parent.contains(active) ? active.dataset.focusKey : undefined;
  parent.replaceChildren(...nodes);
  if (key) {
    const again = parent.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
    if (again) again.focus();
  }
}

export function safeClass(value) {
  return /^[a-z_]{1,32}$/.test(String(value)) ? String(value) : "other";
}

export function badge(status, extra) {
  const text = status === null || status === undefined ? "unknown" : String(status);
  return h("span", { class: `badge st-${safeClass(text)}`, ...extra }, text);
}

/** Tags as small chips (text only). */
export function tagChips(tags) {
  return (tags || []).map((t) => h("span", { class: "tag" }, t));
}

/** A <time> that keeps saying "12s ago" (the ticker in app.js updates it). */
export function timeAgo(ts) {
  if (ts === null || ts === undefined) return h("span", { class: "muted" }, "never");
  return h("time", {
    datetime: new Date(ts * 1000).toISOString(), title: fmtTime(ts),
    dataset: { ago: String(ts) },
  }, ago(ts));
}

export function confirmDialog({ title, text, confirmLabel = "Confirm", danger = true, extra }) {
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

/** The page heading (focused on navigation) and the document title. */
export function page(title, sub, actions) {
  document.title = `${title} \u00B7 MyX console`;
  return h("div", { class: "page-head" },
    h("h1", { tabindex: "-1", id: "page-title" }, title),
    sub ? h("span", { class: "sub" }, sub) : null,
    actions && actions.length ? h("div", { class: "actions" }, actions) : null);
}
