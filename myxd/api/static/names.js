/**
 * Agent names for display. The API names every agent (`name`: its server's name, the
 * name given at adoption, or else its host); when that is only the host, the console
 * prefers the host name the agent last reported (details.hostname). Shown as
 * "web-1 (agent 3)" so the id stays visible.
 *
 * It only reads; a daemon without server management (404) just gives no server names.
 */
import { ApiError } from "./api.js";

/** server id -> name ({} when servers are not enabled). */
export async function serverNamesById(view) {
  const names = new Map();
  try {
    const data = await view.api("GET", "api/servers");
    for (const s of data.servers) names.set(s.id, s.name);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
  }
  return names;
}

/** The best name for an agent record (`serverNames`, optional, wins when given). */
export function agentName(agent, serverNames) {
  const fromServer = serverNames && serverNames.get(agent.id);
  if (fromServer) return fromServer;
  if (typeof agent.name === "string" && agent.name && agent.name !== agent.host) {
    return agent.name;
  }
  const d = agent.details;
  return d && typeof d === "object" && typeof d.hostname === "string" && d.hostname
    ? d.hostname : null;
}

/** "web-1 (agent 3)", or "agent 3" without a name. */
export function agentLabel(id, name) {
  return name ? `${name} (agent ${id})` : `agent ${id}`;
}

/** Every agent, page by page (the API gives at most 1,000 a request). */
export async function allAgents(view, query = "") {
  const out = [];
  for (;;) {
    const data = await view.api("GET",
      `api/agents?limit=1000&offset=${out.length}${query ? `&${query}` : ""}`);
    out.push(...data.agents);
    if (!data.agents.length || out.length >= data.total) return out;
  }
}

/** agent id -> name for every agent (for pages that show many). */
export async function loadAgentNames(view) {
  const names = new Map();
  for (const a of await allAgents(view)) {
    const name = agentName(a);
    if (name) names.set(a.id, name);
  }
  return names;
}

/** "de, edge" from a text box: tags split on commas or spaces, lower case, no repeats. */
export function parseTags(text) {
  return [...new Set(String(text).split(/[\s,]+/).map((t) => t.trim().toLowerCase())
    .filter(Boolean))];
}

/** A tag is 1-32 letters, digits, '.', '_' or '-' (the API's rule). */
export const TAG_RE = /^[A-Za-z0-9._-]{1,32}$/;
