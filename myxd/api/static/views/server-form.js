/**
 * The add-server form: every field checked at once before sending (all the errors
 * shown together), and the API's remaining field errors in place, in the form's words.
 */
import { h } from "../dom.js";
import { ApiError } from "../api.js";
import { report } from "../view.js";
import {
  clearFieldErrors, fieldError, focusFirstError, operatorWords, showFieldError,
} from "../forms.js";

/** API field name -> the form's label, for the API's messages. */
const LABELS = {
  name: "Name",
  host: "Host",
  ssh_port: "SSH port",
  username: "SSH user",
  auth: "SSH authentication",
  "auth.password": "SSH password",
  "auth.private_key": "Private key",
  "auth.passphrase": "Key passphrase",
  sudo: "Privileges",
  "sudo.mode": "Privileges",
  "sudo.password": "sudo password",
  host_key_fingerprint: "Host key fingerprint",
  start: "Start the install now",
};

export function addServerForm(view) {
  const general = h("p", { class: "alert", role: "alert", id: "server-form-error" });
  const field = (id, label, input, hint) => h("div", { class: "row" },
    h("label", { for: id }, label), input, hint ? h("p", { class: "hint" }, hint) : null);
  const name = h("input", { type: "text", id: "srv-name", dataset: { field: "name" },
    autocomplete: "off" });
  const host = h("input", { type: "text", id: "srv-host", dataset: { field: "host" },
    autocomplete: "off", spellcheck: "false", placeholder: "IP address or host name" });
  const port = h("input", { type: "text", inputmode: "numeric", id: "srv-port", class: "short",
    value: "22", dataset: { field: "ssh_port" }, autocomplete: "off" });
  const user = h("input", { type: "text", id: "srv-user", value: "root",
    dataset: { field: "username" }, autocomplete: "off", spellcheck: "false" });
  const authPw = h("input", { type: "radio", name: "srv-auth", value: "password",
    id: "srv-auth-password", checked: true });
  const authKey = h("input", { type: "radio", name: "srv-auth", value: "key",
    id: "srv-auth-key" });
  const password = h("input", { type: "password", id: "srv-password", autocomplete: "new-password",
    dataset: { field: "auth.password" } });
  const key = h("textarea", { id: "srv-key", rows: "5", spellcheck: "false",
    dataset: { field: "auth.private_key" },
    placeholder: "-----BEGIN OPENSSH PRIVATE KEY-----" });
  const passphrase = h("input", { type: "password", id: "srv-passphrase",
    autocomplete: "new-password", dataset: { field: "auth.passphrase" } });
  const pwRow = field("srv-password", "SSH password", password);
  const keyRows = h("div", { hidden: true },
    field("srv-key", "Private key (ed25519, ECDSA or RSA, OpenSSH or PEM)", key),
    field("srv-passphrase", "Key passphrase (if the key is encrypted)", passphrase));
  const authSet = h("fieldset", { id: "srv-auth", dataset: { field: "auth" } },
    h("legend", {}, "SSH authentication"),
    h("div", { class: "inline-choices" },
      h("label", { class: "choice", for: "srv-auth-password" }, authPw, "Password"),
      h("label", { class: "choice", for: "srv-auth-key" }, authKey, "Private key")),
    pwRow, keyRows);
  const syncAuth = () => { pwRow.hidden = !authPw.checked; keyRows.hidden = authPw.checked; };
  authPw.addEventListener("change", syncAuth);
  authKey.addEventListener("change", syncAuth);

  const sudo = h("select", { id: "srv-sudo", dataset: { field: "sudo" } },
    h("option", { value: "none" }, "No sudo (the user is root)"),
    h("option", { value: "sudo" }, "sudo without a password (NOPASSWD)"),
    h("option", { value: "sudo-password" }, "sudo with a password"));
  const sudoPw = h("input", { type: "password", id: "srv-sudo-password",
    autocomplete: "new-password", dataset: { field: "sudo.password" } });
  const sudoPwRow = field("srv-sudo-password", "sudo password", sudoPw);
  sudoPwRow.hidden = true;
  sudo.addEventListener("change", () => { sudoPwRow.hidden = sudo.value !== "sudo-password"; });
  const pin = h("input", { type: "text", id: "srv-pin", dataset: { field: "host_key_fingerprint" },
    autocomplete: "off", spellcheck: "false", placeholder: "SHA256:\u2026 (optional)" });
  const start = h("input", { type: "checkbox", id: "srv-start", checked: true,
    dataset: { field: "start" } });
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "srv-submit" },
    "Add server");

  const form = h("form", { id: "server-form", novalidate: true, autocomplete: "off" },
    general,
    h("div", { class: "form-grid" },
      field("srv-name", "Name", name),
      field("srv-host", "Host", host),
      field("srv-user", "SSH user", user),
      field("srv-port", "SSH port", port)),
    authSet,
    h("div", { class: "form-grid" },
      h("div", { class: "row" }, h("label", { for: "srv-sudo" }, "Privileges"), sudo),
      sudoPwRow),
    field("srv-pin", "Host key fingerprint", pin,
      "As ssh-keygen -lf prints it. Empty: trust the key seen on the first connection " +
      "and refuse any later change."),
    h("div", { class: "row" }, h("label", { class: "choice", for: "srv-start" }, start,
      "Start the install now")),
    h("div", { class: "form-actions" }, submit));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    general.textContent = "";
    const body = {
      name: name.value.trim(), host: host.value.trim(), username: user.value.trim(),
      start: start.checked,
    };
    // Check every field first, so the operator sees all that is wrong at once.
    const problems = [];
    if (!body.name) problems.push([name, "Give the server a name."]);
    if (!body.host) problems.push([host, "Give the host's IP address or name."]);
    else if (/[\s/@]/.test(body.host)) {
      problems.push([host, "The host is an IP address or a host name (no spaces, / or @)."]);
    }
    const portText = port.value.trim();
    if (portText !== "") {
      if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) < 1 ||
          Number(portText) > 65535) {
        problems.push([port, "The SSH port must be a number from 1 to 65535."]);
      } else {
        body.ssh_port = Number(portText);
      }
    }
    if (!body.username) problems.push([user, "Give the SSH user (for example root)."]);
    else if (/[\s:]/.test(body.username)) {
      problems.push([user, "The SSH user cannot contain spaces or ':'."]);
    }
    if (authPw.checked && !password.value) problems.push([password, "Enter the SSH password."]);
    if (!authPw.checked && !key.value.trim()) problems.push([key, "Paste the private key."]);
    if (sudo.value === "sudo-password" && !sudoPw.value) {
      problems.push([sudoPw, "Enter the sudo password."]);
    }
    if (problems.length) {
      for (const [target, message] of problems) fieldError(target, message);
      general.textContent = problems.length === 1 ? "One field needs attention."
        : `${problems.length} fields need attention.`;
      focusFirstError(form);
      return;
    }
    body.auth = authPw.checked ? { password: password.value }
      : { private_key: key.value, ...(passphrase.value ? { passphrase: passphrase.value } : {}) };
    body.sudo = sudo.value === "sudo-password" ? { mode: "sudo", password: sudoPw.value }
      : sudo.value;
    if (pin.value.trim()) body.host_key_fingerprint = pin.value.trim();
    submit.disabled = true;
    try {
      const reply = await view.api("POST", "api/servers", body);
      // Secrets leave the page as soon as the daemon has them.
      form.reset();
      syncAuth();
      sudoPwRow.hidden = true;
      location.hash = `#/servers/${Number(reply.server.id)}`;
    } catch (e) {
      if (e instanceof ApiError && e.status === 400) {
        showFieldError(form, e.field, operatorWords(e.field, e.message, LABELS), general);
        focusFirstError(form);
      } else {
        report(general, e);
      }
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
