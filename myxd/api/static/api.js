/**
 * The admin API client: the stored token, fetch with the bearer header, ApiError,
 * and the "daemon unreachable" indicator.
 *
 * Rules: the admin token lives in sessionStorage (this tab only) and travels only in
 * the Authorization header; never in a URL, never in storage that outlives the tab.
 * A 401 is handed to the sign-in handler the router registers (onUnauthorized), so
 * this module never imports a view.
 */
import { $ } from "./dom.js";

const TOKEN_KEY = "myx.adminToken";

let unauthorized = () => {};

/** Who to call when the daemon refuses the token (or there is none). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export const auth = {
  get() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  },
  set(token) { sessionStorage.setItem(TOKEN_KEY, token); },
  clear() {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* storage disabled */ }
  },
};

// ------------------------------------------------------------------------- API

export class ApiError extends Error {
  constructor(status, message, field, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.field = field || null;
    this.body = body || null;
  }
}

export function isAbort(e) {
  return e && (e.name === "AbortError" || e.name === "ViewStopped");
}

export async function rawFetch(method, path, token, body, signal) {
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
export async function api(method, path, body, signal) {
  const token = auth.get();
  if (!token) {
    unauthorized("");
    throw new ApiError(401, "not signed in");
  }
  try {
    return await rawFetch(method, path, token, body, signal);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      unauthorized("The daemon refused the admin token (HTTP 401 Unauthorized). It may " +
        "have changed; enter the current one.");
    }
    throw e;
  }
}

export function setConnection(ok) {
  const el = $("#conn");
  if (!el) return;
  el.textContent = ok ? "" : "\u25CF daemon unreachable, retrying";
  el.classList.toggle("down", !ok);
}

export function banner(message) {
  const el = $("#banner");
  el.textContent = message || "";
  el.hidden = !message;
}
