"""`myx`: the operator's command line, a thin client of the admin API.

It only speaks HTTP to a running myxd (default http://127.0.0.1:8470) with the
admin bearer token; it never opens the SQLite file or talks to agents itself, so
everything it does goes through the same checks and audit trail as the API.

It is a short-lived process with no reactor, so plain blocking ``urllib`` is the
right tool here. It never prints the admin token, and every failure is one line
on stderr with a non-zero exit: 1 for a command that ran and failed, 2 for a
usage or API error, 3 when myxd cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from myxd.cli import artifacts, deploy, servers
from myxd.cli.agents import (
    SHELL,
    cmd_adopt,
    cmd_agent,
    cmd_agents,
    cmd_ansible,
    cmd_cancel,
    cmd_commands,
    cmd_events,
    cmd_logs,
    cmd_remove,
    cmd_run,
    cmd_show,
)
from myxd.cli.client import DEFAULT_API, DEFAULT_TOKEN_FILE, Client, CLIError, _read_token


def build_parser() -> argparse.ArgumentParser:  # noqa: C901 - one flat list of commands
    p = argparse.ArgumentParser(prog="myx", description="Drive a MyX daemon (myxd).")
    p.add_argument(
        "--api",
        default=os.environ.get("MYX_API", DEFAULT_API),
        help=f"admin API base URL (env MYX_API; default {DEFAULT_API})",
    )
    p.add_argument("--token", help="admin token (prefer MYX_TOKEN or --token-file)")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print raw error texts (JSON-RPC codes) after the operator's words",
    )
    p.add_argument(
        "--token-file", help=f"file holding the admin token (default {DEFAULT_TOKEN_FILE})"
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("agents", help="list agents")
    s.add_argument("--status", choices=["online", "offline", "installing", "error"])
    s.add_argument("--tag", help="only agents with this tag (theirs or their server's)")
    s.add_argument("--search", help="part of the name or host")
    s.add_argument("--json", action="store_true", help="rows as JSON")
    s.set_defaults(func=cmd_agents)

    s = sub.add_parser("commands", help="list commands, newest first")
    s.add_argument("--agent", type=int, help="only this agent's")
    s.add_argument(
        "--status", choices=["pending", "running", "success", "failed", "cancelled", "timed_out"]
    )
    s.add_argument("--kind", choices=["command", "ansible"])
    s.add_argument("--search", help="part of the command line")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true", help="the page as JSON")
    s.set_defaults(func=cmd_commands)

    s = sub.add_parser("agent", help="show one agent as JSON")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_agent)

    s = sub.add_parser("adopt", help="adopt an agent installed without SSH")
    s.add_argument("--host", required=True)
    s.add_argument("--rpc-port", type=int, required=True)
    s.add_argument("--rpc-path", required=True)
    s.add_argument("--fingerprint", required=True, help="SHA-256 of the agent certificate")
    s.add_argument("--agent-token")
    s.add_argument("--agent-token-file")
    s.add_argument("--name", help="the agent's name (default: its host)")
    s.add_argument(
        "--tag", action="append", default=[], help="a tag (repeat for more), e.g. --tag de"
    )
    s.set_defaults(func=cmd_adopt)

    s = sub.add_parser("remove", help="forget an agent")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_remove)

    s = sub.add_parser(
        "run",
        help="run a command on agents and stream its output",
        usage="myx run AGENT [AGENT ...] [--timeout S] (--sh 'SCRIPT' | -- COMMAND [ARG ...])",
    )
    s.add_argument("agent", nargs="+", help="agent ids, 'all' or 'tag:NAME'")
    s.add_argument(
        "--sh",
        metavar="SCRIPT",
        help=f"run SCRIPT with {SHELL} -c (pipes, redirections), instead of -- COMMAND",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print the final command records as JSON (raw reasons, with error codes)",
    )
    s.add_argument("--timeout", type=float)
    s.add_argument("--cwd")
    s.add_argument("--no-follow", action="store_true", help="print command ids and return")
    s.set_defaults(func=cmd_run, argv=[])

    s = sub.add_parser("logs", help="print a command's output")
    s.add_argument("id", type=int)
    s.add_argument("-f", "--follow", action="store_true", help="wait for more until it ends")
    s.add_argument("--offset", type=int, default=0)
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("show", help="show a command's status as JSON")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("cancel", help="cancel a running command")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("ansible", help="run a playbook of the deployment tool on agents")
    s.add_argument("agent", nargs="+", help="agent ids, 'all' or 'tag:NAME'")
    s.add_argument("playbook", help="path inside deployment-tool/playbooks, e.g. ping.yml")
    s.add_argument("--extra-vars", default="{}", help="JSON object")
    s.add_argument("--timeout", type=float)
    s.add_argument(
        "--check",
        action="store_true",
        help="Ansible's check mode (--check --diff): show what would change, change nothing",
    )
    s.add_argument("--no-follow", action="store_true")
    s.add_argument("--json", action="store_true", help="print the final command records as JSON")
    s.set_defaults(func=cmd_ansible)

    s = sub.add_parser("events", help="recent audit events")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--kind", help="only this action, e.g. command.cancel")
    s.add_argument("--target", help="only this target, e.g. agent:3")
    s.add_argument("--actor", help="only this actor, e.g. admin-api")
    s.set_defaults(func=cmd_events)

    servers.add_parsers(sub)
    artifacts.add_parsers(sub)
    deploy.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the remote command, never options of ours.
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if rest:
        if args.cmd != "run":
            parser.error("'--' is only used by 'myx run'")
        args.argv = rest
    try:
        client = Client(args.api, lambda: _read_token(args), verbose=args.verbose)
        code = int(args.func(client, args))
    except CLIError as e:
        sys.stderr.write(f"myx: {e}\n")
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CLIError", "Client", "build_parser", "main"]
