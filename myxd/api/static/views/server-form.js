/**
 * The server form, to add a server (POST api/servers) or edit one (PATCH
 * api/servers/{id}, only the fields that changed): every field checked at once before
 * sending (all the errors shown together), then every field error the API finds, each
 * in place and in the form's words.
 *
 * Editing keeps the stored credentials unless new ones are given; a new host or port
 * makes the daemon check the host key again on the next connect.
 */
import { h } from "../dom.js";
import { ApiError } from "../api.js";
import { report } from "../view.js";
import { clearFieldErrors, fieldError, focusFirstError, showApiErrors } from "../forms.js";
import { parseTags, TAG_RE } from "../names.js";

/** API field name -> the form's label, for the API's messages. */
export const LABELS = {
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
  tags: "Tags",
  start: "Start the install now",
};

/** The add-server form (the Servers page). */
export function addServerForm(view) {
  return serverForm(view, {});
}

/**
 * `server`: the record to edit (absent: a new server); `onSaved(server)`: called after a
 * successful edit (a new server opens its page instead).
 */
export function serverForm(view, { server, onSaved }) {
  const editing = Boolean(server);
  const p = editing ? "edit" : "srv";   // id prefix: both forms can be on one page
  const general = h("p", { class: "alert", role: "alert",
    id: editing ? "edit-form-error" : "server-form-error" });
  const field = (id, label, input, hint) => h("div", { class: "row" },
    h("label", { for: id }, label), input, hint ? h("p", { class: "hint" }, hint) : null);
  const name = h("input", { type: "text", id: `${p}-name`, dataset: { field: "name" },
    autocomplete: "off", value: editing ? server.name : null });
  const host = h("input", { type: "text", id: `${p}-host`, dataset: { field: "host" },
    autocomplete: "off", spellcheck: "false", placeholder: "IP address or host name",
    value: editing ? server.host : null });
  const port = h("input", { type: "text", inputmode: "numeric", id: `${p}-port`, class: "short",
    value: editing ? String(server.ssh_port) : "22", dataset: { field: "ssh_port" },
    autocomplete: "off" });
  const user = h("input", { type: "text", id: `${p}-user`, value: editing ? server.username : "root",
    dataset: { field: "username" }, autocomplete: "off", spellcheck: "false" });
  const tags = h("input", { type: "text", id: `${p}-tags`, dataset: { field: "tags" },
    autocomplete: "off", spellcheck: "false", placeholder: "e.g. de, edge",
    value: editing ? (server.tags || []).join(", ") : null });
  const authKeep = editing ? h("input", { type: "radio", name: `${p}-auth`, value: "keep",
    id: `${p}-auth-keep`, checked: true }) : null;
  const authPw = h("input", { type: "radio", name: `${p}-auth`, value: "password",
    id: `${p}-auth-password`, checked: !editing });
  const authKey = h("input", { type: "radio", name: `${p}-auth`, value: "key",
    id: `${p}-auth-key` });
  const password = h("input", { type: "password", id: `${p}-password`,
    autocomplete: "new-password", dataset: { field: "auth.password" } });
  const key = h("textarea", { id: `${p}-key`, rows: "5", spellcheck: "false",
    dataset: { field: "auth.private_key" },
    placeholder: "-----BEGIN OPENSSH PRIVATE KEY-----" });
  const passphrase = h("input", { type: "password", id: `${p}-passphrase`,
    autocomplete: "new-password", dataset: { field: "auth.passphrase" } });
  const pwRow = field(`${p}-password`, "SSH password", password);
  const keyRows = h("div", { hidden: true },
    field(`${p}-key`, "Private key (ed25519, ECDSA or RSA, OpenSSH or PEM)", key),
    field(`${p}-passphrase`, "Key passphrase (if the key is encrypted)", passphrase));
  const authSet = h("fieldset", { id: `${p}-auth`, dataset: { field: "auth" } },
    h("legend", {}, "SSH authentication"),
    h("div", { class: "inline-choices" },
      editing ? h("label", { class: "choice", for: `${p}-auth-keep` }, authKeep,
        `Keep the stored ${server.auth_method === "private_key" ? "private key"
          : server.auth_method || "credentials"}`) : null,
      h("label", { class: "choice", for: `${p}-auth-password` }, authPw,
        editing ? "New password" : "Password"),
      h("label", { class: "choice", for: `${p}-auth-key` }, authKey,
        editing ? "New private key" : "Private key")),
    pwRow, keyRows);
  const syncAuth = () => {
    pwRow.hidden = !authPw.checked;
    keyRows.hidden = !authKey.checked;
  };
  for (const r of [authKeep, authPw, authKey]) if (r) r.addEventListener("change", syncAuth);
  syncAuth();

  const sudoWas = !editing ? "none" : server.sudo && server.sudo.mode === "sudo"
    ? (server.sudo.password_set ? "sudo-password" : "sudo") : "none";
  const sudo = h("select", { id: `${p}-sudo`, dataset: { field: "sudo" } },
    h("option", { value: "none", selected: sudoWas === "none" }, "No sudo (the user is root)"),
    h("option", { value: "sudo", selected: sudoWas === "sudo" },
      "sudo without a password (NOPASSWD)"),
    h("option", { value: "sudo-password", selected: sudoWas === "sudo-password" },
      "sudo with a password"));
  const sudoPw = h("input", { type: "password", id: `${p}-sudo-password`,
    autocomplete: "new-password", dataset: { field: "sudo.password" },
    placeholder: editing && sudoWas === "sudo-password" ? "empty: keep the stored one" : null });
  const sudoPwRow = field(`${p}-sudo-password`, "sudo password", sudoPw);
  const syncSudo = () => { sudoPwRow.hidden = sudo.value !== "sudo-password"; };
  sudo.addEventListener("change", syncSudo);
  syncSudo();
  const pinWas = editing ? server.host_key_fingerprint || "" : "";
  const pin = h("input", { type: "text", id: `${p}-pin`,
    dataset: { field: "host_key_fingerprint" }, value: pinWas || null,
    autocomplete: "off", spellcheck: "false", placeholder: "SHA256:\u2026 (optional)" });
  const start = editing ? null : h("input", { type: "checkbox", id: "srv-start", checked: true,
    dataset: { field: "start" } });
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: `${p}-submit` },
    editing ? "Save changes" : "Add server");

  const form = h("form", { id: editing ? "edit-form" : "server-form", novalidate: true,
    autocomplete: "off" },
  general,
  h("div", { class: "form-grid" },
    field(`${p}-name`, "Name", name),
    field(`${p}-host`, "Host", host, editing
      ? "A new host or port: the host key is checked again on the next connect." : null),
    field(`${p}-user`, "SSH user", user),
    field(`${p}-port`, "SSH port", port)),
  field(`${p}-tags`, "Tags", tags, "Free-form labels, separated by commas or spaces: " +
    "filter the fleet and run on every server that has one."),
  authSet,
  h("div", { class: "form-grid" },
    h("div", { class: "row" }, h("label", { for: `${p}-sudo` }, "Privileges"), sudo),
    sudoPwRow),
  field(`${p}-pin`, "Host key fingerprint", pin,
    "As ssh-keygen -lf prints it. Empty: trust the key seen on the first connection " +
    "and refuse any later change."),
  start ? h("div", { class: "row" }, h("label", { class: "choice", for: "srv-start" }, start,
    "Start the install now")) : null,
  h("div", { class: "form-actions" }, submit));

  /** Every problem the page can see, as [input, message]; fills `body`. */
  function check(body) {
    const problems = [];
    const nameText = name.value.trim();
    const hostText = host.value.trim();
    const userText = user.value.trim();
    if (!nameText) problems.push([name, "Give the server a name."]);
    if (!hostText) problems.push([host, "Give the host's IP address or name."]);
    else if (/[\s/@]/.test(hostText)) {
      problems.push([host, "The host is an IP address or a host name (no spaces, / or @)."]);
    }
    const portText = port.value.trim();
    let portNumber = null;
    if (portText !== "" || editing) {
      if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) < 1 ||
          Number(portText) > 65535) {
        problems.push([port, "The SSH port must be a number from 1 to 65535."]);
      } else {
        portNumber = Number(portText);
      }
    }
    if (!userText) problems.push([user, "Give the SSH user (for example root)."]);
    else if (/[\s:]/.test(userText)) {
      problems.push([user, "The SSH user cannot contain spaces or ':'."]);
    }
    const tagList = parseTags(tags.value);
    const badTags = tagList.filter((t) => !TAG_RE.test(t));
    if (badTags.length) {
      problems.push([tags, `Not a valid tag: ${badTags.join(", ")}. A tag is 1-32 letters, ` +
        "digits, '.', '_' or '-'."]);
    }
    if (authPw.checked && !password.value) problems.push([password, "Enter the SSH password."]);
    if (authKey.checked && !key.value.trim()) problems.push([key, "Paste the private key."]);
    const keepSudoPw = editing && sudoWas === "sudo-password";
    if (sudo.value === "sudo-password" && !sudoPw.value && !keepSudoPw) {
      problems.push([sudoPw, "Enter the sudo password."]);
    }
    const changed = (k, v, was) => { if (!editing || v !== was) body[k] = v; };
    changed("name", nameText, editing && server.name);
    changed("host", hostText, editing && server.host);
    if (portNumber !== null) changed("ssh_port", portNumber, editing && server.ssh_port);
    changed("username", userText, editing && server.username);
    if (!editing || tagList.join(",") !== (server.tags || []).join(",")) body.tags = tagList;
    if (authPw.checked) body.auth = { password: password.value };
    else if (authKey.checked) {
      body.auth = { private_key: key.value,
        ...(passphrase.value ? { passphrase: passphrase.value } : {}) };
    }
    const sudoBody = sudo.value === "sudo-password"
      ? (sudoPw.value ? { mode: "sudo", password: sudoPw.value } : null) : sudo.value;
    if (!editing) body.sudo = sudoBody;
    else if (sudoBody !== null && (sudo.value !== sudoWas || sudoPw.value)) body.sudo = sudoBody;
    const pinText = pin.value.trim();
    if (!editing) {
      if (pinText) body.host_key_fingerprint = pinText;
    } else if (pinText !== pinWas) {
      body.host_key_fingerprint = pinText || null;
    }
    if (start) body.start = start.checked;
    return problems;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    general.textContent = "";
    const body = {};
    // Check every field first, so the operator sees all that is wrong at once.
    const problems = check(body);
    if (problems.length) {
      for (const [target, message] of problems) fieldError(target, message);
      general.textContent = problems.length === 1 ? "One field needs attention."
        : `${problems.length} fields need attention.`;
      focusFirstError(form);
      return;
    }
    if (editing && !Object.keys(body).length) {
      general.textContent = "Nothing was changed.";
      return;
    }
    const tagsToAdd = !editing && body.tags.length ? body.tags : null;
    if (!editing) delete body.tags;   // POST has no tags: set them right after
    submit.disabled = true;
    try {
      if (editing) {
        const saved = await view.api("PATCH", `api/servers/${Number(server.id)}`, body);
        clearSecrets();
        if (onSaved) onSaved(saved);
        return;
      }
      const reply = await view.api("POST", "api/servers", body);
      // Secrets leave the page as soon as the daemon has them.
      form.reset();
      syncAuth();
      syncSudo();
      if (tagsToAdd) {
        await view.api("PATCH", `api/servers/${Number(reply.server.id)}`, { tags: tagsToAdd });
      }
      location.hash = `#/servers/${Number(reply.server.id)}`;
    } catch (e) {
      if (e instanceof ApiError && e.status === 400) {
        showApiErrors(form, e, LABELS, general);
      } else {
        report(general, e);
      }
    } finally {
      submit.disabled = false;
    }
  });

  function clearSecrets() {
    for (const el of [password, key, passphrase, sudoPw]) el.value = "";
  }
  return form;
}
