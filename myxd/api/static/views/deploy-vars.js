/**
 * The variables of a new deployment: a form with the main variables of the Xray
 * and Caddy playbooks (deployment-tool/README.md), or a JSON object for any playbook.
 *
 * A release archive is chosen among the stored artifacts: the daemon replaces its id
 * with the path on each agent, and its id (the SHA-256) is also the checksum the
 * playbook wants (xray_sha256, caddy_sha256). It only builds inputs and reads them;
 * it sends nothing.
 */
import { h } from "../dom.js";

const XRAY = ["deploy_xray.yml", "deploy_xray_config.yml", "deploy_xray_docker.yml"];

/** field specs per playbook: [name, label, kind, hint] */
function specs(playbook) {
  if (XRAY.includes(playbook)) {
    const fields = [];
    if (playbook !== "deploy_xray_config.yml") {
      fields.push(["xray_version", "Xray version", "text", "e.g. 25.1.30"]);
    }
    if (playbook === "deploy_xray.yml") {
      fields.push(["xray_archive_path", "Release archive", "artifact",
        "An uploaded Xray-linux-*.zip; its SHA-256 is checked on each host."]);
    }
    fields.push(["xray_log_level", "Log level", "select", ""]);
    fields.push(["xray_config", "Config (JSON, optional)", "json",
      "The whole config.json; empty keeps the host's config."]);
    return fields;
  }
  if (playbook === "deploy_caddy.yml") {
    return [
      ["caddy_archive_path", "Release archive (optional)", "artifact",
        "A caddy_*_linux_*.tar.gz; without it the distribution's package is installed."],
      ["caddy_email", "ACME e-mail (optional)", "text", "ops@example.com"],
      ["caddy_caddyfile", "Caddyfile", "textarea", "The whole Caddyfile."],
    ];
  }
  return null;
}

/** Inputs for `playbook` (null when it has no form) and a reader for their values. */
export function varsForm(playbook, artifacts) {
  const fields = specs(playbook);
  if (!fields) return null;
  const inputs = new Map();
  const rows = fields.map(([name, label, kind, hint]) => {
    const id = `var-${name}`;
    let input;
    if (kind === "artifact") {
      input = h("select", { id, dataset: { field: `artifacts.${name}` } },
        h("option", { value: "" }, "(none)"),
        artifacts.map((a) => h("option", { value: a.id }, `${a.name} (${a.id.slice(0, 12)})`)));
    } else if (kind === "select") {
      input = h("select", { id, dataset: { field: `vars.${name}` } },
        ["warning", "info", "debug", "error", "none"].map((v) => h("option", { value: v }, v)));
    } else if (kind === "json" || kind === "textarea") {
      input = h("textarea", { id, rows: "5", class: "code", dataset: { field: `vars.${name}` } });
    } else {
      input = h("input", { id, type: "text", placeholder: hint, dataset: { field: `vars.${name}` } });
    }
    inputs.set(name, [kind, input]);
    return h("div", { class: "row" }, h("label", { for: id }, label), input,
      hint && kind !== "text" ? h("p", { class: "hint" }, hint) : null);
  });

  /** {vars, artifacts}, or throws Error({field, message}) for a field it cannot read. */
  function read() {
    const vars = {};
    const arts = {};
    for (const [name, [kind, input]] of inputs) {
      const value = input.value.trim();
      if (!value) continue;
      if (kind === "artifact") {
        arts[name] = value;
        const sum = name.startsWith("xray_") ? "xray_sha256" : "caddy_sha256";
        vars[sum] = value;
      } else if (kind === "json") {
        try {
          vars[name] = JSON.parse(value);
        } catch (e) {
          throw Object.assign(new Error("This is not valid JSON."), { input });
        }
      } else {
        vars[name] = kind === "textarea" ? input.value : value;
      }
    }
    return { vars, artifacts: arts };
  }
  return { rows, read };
}
