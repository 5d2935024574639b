/**
 * The sign-in form: asks for the admin token, proves it with one cheap protected
 * call, then keeps it in this tab's sessionStorage and hands over to `signedIn`.
 * It never routes by itself (the router passes what to do next), so it imports no view.
 */
import { $, h } from "./dom.js";
import { ApiError, auth, banner, rawFetch } from "./api.js";

/** Replace the page with the sign-in form; `message` says why (may be empty). */
export function showLogin(message, signedIn) {
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
    signedIn();
  });
  $("#main").replaceChildren(h("section", { class: "card login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Sign in to the MyX console"), error, form));
  input.focus();
}
