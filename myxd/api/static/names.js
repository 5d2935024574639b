/**
 * Agent names for display. The API has no agent name yet, so the console derives
 * one: the name of the server the agent was installed on (GET api/servers), else the
 * host name the agent last reported (details.hostname), else nothing. Shown as
 * "web-1 (agent 3)" so the id stays visible.
 *
 * It only reads; a daemon without server management (404) just gives no server names.
 */
import { ApiError } from "./api.js";

/** agent id -> server name, from GET api/servers ({} when servers are not enabled). */
export async function serverNamesByAgent(view) {
  const names = new Map();
  try {
    const data = await view.api("GET", "api/servers");
    for (const s of data.servers) if (s.agent_id) names.set(s.agent_id, s.name);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
  }
  return names;
}

/** The best name for an agent record, given the server names (may be null). */
export function agentName(agent, serverNames) {
  const fromServer = serverNames && serverNames.get(agent.id);
  if (fromServer) return fromServer;
  const d = agent.details;
  return d && typeof d === "object" && typeof d.hostname === "string" && d.hostname
    ? d.hostname : null;
}

/** "web-1 (agent 3)", or "agent 3" without a name. */
export function agentLabel(id, name) {
  return name ? `${name} (agent ${id})` : `agent ${id}`;
}

/** agent id -> name for every agent (two requests; for pages that show many). */
export async function loadAgentNames(view) {
  const [servers, list] = await Promise.all([serverNamesByAgent(view),
    view.api("GET", "api/agents?limit=1000")]);
  const names = new Map();
  for (const a of list.agents) {
    const name = agentName(a, servers);
    if (name) names.set(a.id, name);
  }
  return names;
}
