/**
 * The console's pages: one line per route, one module per view under views/.
 *
 * A new page (e.g. Deployments) is a views/<name>.js module exporting its view
 * function, a line here, and a link in index.html's <nav> (data-nav = nav below).
 * `render(main, view, id, params)`: `main` is the emptied <main>, `view` owns the
 * page's requests and timers, `id` is the number in "#/section/<id>" (withId routes),
 * `params` the query after "?".
 */
import { agentView } from "./views/agent.js";
import { commandView } from "./views/command.js";
import { deploymentView } from "./views/deployment.js";
import { deploymentsView } from "./views/deployments.js";
import { commandsView } from "./views/commands.js";
import { eventsView } from "./views/events.js";
import { fleetView } from "./views/fleet.js";
import { runView } from "./views/run.js";
import { serverView } from "./views/server.js";
import { serversView } from "./views/servers.js";

export const ROUTES = [
  { section: "fleet", render: (main, view, id, params) => fleetView(main, view, params) },
  { section: "agents", withId: true, nav: "fleet",
    render: (main, view, id, params) => agentView(main, view, id, params) },
  { section: "run", render: (main, view, id, params) => runView(main, view, params) },
  { section: "commands",
    render: (main, view, id, params) => commandsView(main, view, params) },
  { section: "commands", withId: true, render: (main, view, id) => commandView(main, view, id) },
  { section: "deployments",
    render: (main, view, id, params) => deploymentsView(main, view, params) },
  { section: "deployments", withId: true,
    render: (main, view, id) => deploymentView(main, view, id) },
  { section: "events", render: (main, view, id, params) => eventsView(main, view, params) },
  { section: "servers", render: (main, view) => serversView(main, view) },
  { section: "servers", withId: true, render: (main, view, id) => serverView(main, view, id) },
];
