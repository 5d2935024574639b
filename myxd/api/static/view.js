/**
 * The lifetime of one view: what a view starts (requests, timers, polling loops)
 * belongs to its View, and leaving the page stops it all at once.
 */
import { api, ApiError, isAbort } from "./api.js";

/** How often list views refresh themselves. */
export const REFRESH_MS = 5000;
/** Rows per page in paged lists. */
export const PAGE = 50;
/** Command statuses after which nothing changes any more. */
export const FINAL = new Set(["success", "failed", "cancelled", "timed_out"]);

/** Owns what a view started (requests, timers) so leaving the view stops it all. */
export class View {
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

export function stopped() {
  const e = new Error("view stopped");
  e.name = "ViewStopped";
  return e;
}

/** Shows an error in `box` unless it is an abort or a 401 (handled by sign-in). */
export function report(box, e) {
  if (isAbort(e)) return;
  if (e instanceof ApiError && e.status === 401) return;
  box.textContent = e && e.message ? e.message : String(e);
}
