/**
 * The hash router: matches "#/section/id?query" against the route table (routes.js),
 * stops the previous view, starts the new one, and sends the operator to sign in
 * (and back to where they were) when there is no token or the daemon refuses it.
 *
 * It knows no view by name: adding a page is one line in routes.js.
 */
import { $, h, page } from "./dom.js";
import { auth, banner, onUnauthorized } from "./api.js";
import { View } from "./view.js";
import { showLogin } from "./login.js";
import { ROUTES } from "./routes.js";

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

/** The route for `parts`, and the numeric id it names (if its pattern has one). */
function match(parts) {
  const section = parts[0] || "fleet";
  const hasId = parts.length === 2;
  if (parts.length > 2) return null;
  const id = hasId && /^[0-9]{1,18}$/.test(parts[1]) ? Number(parts[1]) : null;
  if (hasId && id === null) return null;
  const found = ROUTES.find((r) => r.section === section && Boolean(r.withId) === hasId);
  return found ? { route: found, id } : null;
}

export function route() {
  if (!auth.get()) {
    signIn("");
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
  const found = match(parts);
  setNav(found ? found.route.nav || found.route.section : parts[0]);
  if (found) {
    found.route.render(main, view, found.id, params);
  } else {
    main.append(page("Not found"), h("p", {}, "There is no such page. ",
      h("a", { href: "#/fleet" }, "Go to the fleet"), "."));
  }
  // Like a page load for assistive technology: focus lands on the new page's title.
  const title = $("#page-title");
  if (title) title.focus({ preventScroll: true });
}

function afterSignIn() {
  const target = returnTo && returnTo !== location.hash ? returnTo : null;
  returnTo = null;
  if (target) location.hash = target;
  else route();
}

/** Show the sign-in form; after it, come back to the page the operator was on. */
export function signIn(message) {
  if (currentView) returnTo = location.hash;
  stopView();
  showLogin(message, afterSignIn);
}

/** Forget the token (the "Forget token" button). */
export function signOut() {
  returnTo = null;
  stopView();
  showLogin("The token was removed from this tab.", afterSignIn);
}

onUnauthorized(signIn);
