/**
 * The add-server form: fields, client-side checks, and the API's field errors in place.
 */
import { h } from "../dom.js";
import { ApiError } from "../api.js";
import { report } from "../view.js";
import { clearFieldErrors, fieldError, focusFirstError, showFieldError } from "../forms.js";

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
    const portText = port.value.trim();
    if (portText !== "") {
      if (!/^[0-9]{1,5}$/.test(portText)) {
        fieldError(port, "The SSH port must be a number from 1 to 65535.");
        port.focus();
        return;
      }
      body.ssh_port = Number(portText);
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
        showFieldError(form, e.field, e.message, general);
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
