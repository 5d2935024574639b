/**
 * The Commands page: open a command by id.
 */
import { h, page } from "../dom.js";
import { clearFieldErrors, fieldError } from "../forms.js";

export function openCommandView(main, view) {
  const input = h("input", { type: "number", id: "open-command", class: "short", min: "1",
    required: true });
  const form = h("form", { class: "card", novalidate: true },
    h("div", { class: "row" }, h("label", { for: "open-command" }, "Command id"), input,
      h("p", { class: "hint" }, "Every agent's page lists its commands; the Events page " +
        "lists them all.")),
    h("div", { class: "form-actions" },
      h("button", { type: "submit", class: "btn btn-primary" }, "Open")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    if (!/^[0-9]{1,18}$/.test(input.value) || Number(input.value) < 1) {
      fieldError(input, "Enter a command id (a positive number).");
      input.focus();
      return;
    }
    location.hash = `#/commands/${Number(input.value)}`;
  });
  main.append(page("Open a command"), form);
  input.focus();
  void view;
}
