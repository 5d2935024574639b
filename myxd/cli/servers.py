"""`myx servers` and `myx server add|show|reinstall|uninstall|remove`: servers over SSH.

Thin wrappers over /api/servers. ``add``, ``reinstall`` and ``uninstall`` follow
the install as it happens (one line per step: name, elapsed seconds, and the
failure reason) by polling /api/servers/{id}/install, and exit 1 if it fails.

Secrets never come from the command line (where ``ps`` and shell history would
show them): a key, passphrase or password is read from a file, or asked for
with ``getpass`` (no echo). They are sent only to myxd and never printed.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

from myxd.cli.client import Client, CLIError, _ago, _dump, _table

POLL_INTERVAL = 1.0
# An install waits up to agent_start_timeout for the agent and pip may take
# minutes; the CLI gives up following (the install goes on) after this.
FOLLOW_LIMIT = 3600.0


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CLIError(f"cannot read {what} file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{what} file {path} is not UTF-8 text") from None
    # A key keeps its text; a password is one line without its newline.
    value = text if what == "key" else text.rstrip("\r\n")
    if not value.strip():
        raise CLIError(f"{what} file {path} is empty")
    return value


def _ask(prompt: str) -> str:
    if not sys.stdin.isatty():
        raise CLIError("--ask-password needs a terminal; use --password-file instead")
    value = getpass.getpass(prompt)
    if not value:
        raise CLIError("no password given")
    return value


def _auth(args: argparse.Namespace) -> dict[str, Any]:
    if args.key:
        auth: dict[str, Any] = {"private_key": _read_secret_file(args.key, "key")}
        if args.passphrase_file:
            auth["passphrase"] = _read_secret_file(args.passphrase_file, "passphrase")
        return auth
    if args.passphrase_file:
        raise CLIError("--passphrase-file goes with --key")
    if args.password_file:
        return {"password": _read_secret_file(args.password_file, "password")}
    return {"password": _ask(f"SSH password for {args.user}@{args.host}: ")}


def _sudo(args: argparse.Namespace) -> dict[str, Any]:
    if not args.sudo:
        if args.sudo_password_file:
            raise CLIError("--sudo-password-file goes with --sudo")
        return {"mode": "none"}
    sudo: dict[str, Any] = {"mode": "sudo"}
    if args.sudo_password_file:
        sudo["password"] = _read_secret_file(args.sudo_password_file, "sudo password")
    return sudo


def follow_install(client: Client, server_id: int, out: Any = None) -> dict[str, Any]:
    """Print each step of the server's latest install as it finishes; returns the install."""
    out = out or sys.stdout
    shown: set[tuple[str, str]] = set()
    started = time.monotonic()
    while True:
        latest = client.request("GET", f"/api/servers/{server_id}/install")
        for step in latest.get("steps", []):
            key = (step["step"], step["status"])
            if key in shown or step["status"] == "running":
                continue
            shown.add(key)
            elapsed = (step.get("finished_at") or 0) - (step.get("started_at") or 0)
            line = f"  {step['step']:<13} {step['status']:<8} {max(0.0, elapsed):6.1f}s"
            if step["status"] == "failed" and step.get("error"):
                line += f"  {step['error']}"
            out.write(line + "\n")
            out.flush()
        if not latest.get("running") and latest.get("status") != "running":
            return dict(latest)
        if time.monotonic() - started > FOLLOW_LIMIT:
            raise CLIError(f"stopped following after {FOLLOW_LIMIT:.0f} s; the install goes on", 1)
        time.sleep(POLL_INTERVAL)


def _outcome(latest: dict[str, Any], server_id: int) -> int:
    kind = latest.get("kind", "install")
    if latest.get("status") == "ok":
        print(f"{kind} of server {server_id} succeeded")
        return 0
    sys.stderr.write(
        f"myx: {kind} of server {server_id} failed: {latest.get('error') or 'no reason given'}\n"
    )
    return 1


def cmd_servers(client: Client, args: argparse.Namespace) -> int:
    servers = client.request("GET", "/api/servers", query={"tag": args.tag, "q": args.search})[
        "servers"
    ]
    if args.json:
        _dump(servers)
        return 0
    rows = [
        ["ID", "NAME", "HOST", "PORT", "USER", "STATUS", "AGENT", "AGENT STATUS", "TAGS", "UPDATED"]
    ]
    for s in servers:
        rows.append(
            [
                str(s["id"]),
                s["name"],
                s["host"],
                str(s["ssh_port"]),
                s["username"],
                s["status"] + (" (running)" if s.get("install_running") else ""),
                str(s["agent_id"]) if s.get("agent_id") is not None else "-",
                s.get("agent_status") or "-",
                ",".join(s.get("tags") or []) or "-",
                _ago(s.get("updated_at") or s.get("created_at")),
            ]
        )
    _table(rows, sys.stdout)
    return 0


def cmd_server_add(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "name": args.name,
        "host": args.host,
        "ssh_port": args.port,
        "username": args.user,
        "auth": _auth(args),
        "sudo": _sudo(args),
    }
    if args.host_key_fingerprint:
        body["host_key_fingerprint"] = args.host_key_fingerprint
    created = client.request("POST", "/api/servers", body)
    server_id = int(created["server"]["id"])
    print(f"server {server_id} ({args.name}) added; installing the agent on {args.host}")
    if args.no_follow:
        return 0
    return _outcome(follow_install(client, server_id), server_id)


def cmd_server_show(client: Client, args: argparse.Namespace) -> int:
    server = client.request("GET", f"/api/servers/{args.id}")
    if args.json:
        _dump(server)
        return 0
    for key in ("id", "name", "host", "ssh_port", "username", "auth_method", "status"):
        print(f"{key + ':':<22}{server.get(key)}")
    print(f"{'status_reason:':<22}{server.get('status_reason') or '-'}")
    print(f"{'host_key_fingerprint:':<22}{server.get('host_key_fingerprint') or '-'}")
    print(f"{'sudo:':<22}{server['sudo']['mode']}")
    print(f"{'agent:':<22}{server.get('agent_id') or '-'} ({server.get('agent_status') or '-'})")
    print(f"{'install running:':<22}{'yes' if server.get('install_running') else 'no'}")
    return 0


def _start(client: Client, args: argparse.Namespace, kind: str) -> int:
    body = {"forget_host_key": True} if getattr(args, "forget_host_key", False) else None
    client.request("POST", f"/api/servers/{args.id}/{kind}", body)
    print(f"{kind} of server {args.id} started")
    if args.no_follow:
        return 0
    return _outcome(follow_install(client, args.id), args.id)


def cmd_server_reinstall(client: Client, args: argparse.Namespace) -> int:
    return _start(client, args, "reinstall")


def cmd_server_uninstall(client: Client, args: argparse.Namespace) -> int:
    return _start(client, args, "uninstall")


def cmd_server_remove(client: Client, args: argparse.Namespace) -> int:
    client.request("DELETE", f"/api/servers/{args.id}")
    print(f"server {args.id} removed (its agent, if any, was not uninstalled)")
    return 0


def cmd_server_edit(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for key, value in (
        ("name", args.name),
        ("host", args.host),
        ("ssh_port", args.port),
        ("username", args.user),
    ):
        if value is not None:
            body[key] = value
    if args.tag or args.untag:
        current = client.request("GET", f"/api/servers/{args.id}")
        tags = (set(current.get("tags") or []) | {t.lower() for t in args.tag}) - {
            t.lower() for t in args.untag
        }
        body["tags"] = sorted(tags)
    if not body:
        raise CLIError("nothing to change: give --name, --host, --port, --user, --tag or --untag")
    srv = client.request("PATCH", f"/api/servers/{args.id}", body)
    if args.json:
        _dump(srv)
    else:
        shown = ",".join(srv.get("tags") or []) or "-"
        print(
            f"server {srv['id']} {srv['name']}: {srv['username']}@{srv['host']}:"
            f"{srv['ssh_port']}, tags {shown}"
        )
    return 0


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("servers", help="list servers with their install and agent status")
    s.add_argument("--json", action="store_true", help="the servers as JSON")
    s.add_argument("--tag", help="only servers with this tag")
    s.add_argument("--search", help="part of the name or host")
    s.set_defaults(func=cmd_servers)

    server = sub.add_parser("server", help="add, show, reinstall, uninstall or remove a server")
    ssub = server.add_subparsers(dest="server_cmd", required=True, metavar="ACTION")

    a = ssub.add_parser(
        "add",
        help="add a server and install its agent over SSH, showing each step",
        description="Secrets are read from files or asked for without echo, never "
        "taken from the command line.",
    )
    a.add_argument("name")
    a.add_argument("host", help="IP address or host name")
    a.add_argument("--port", type=int, default=22, help="SSH port (default 22)")
    a.add_argument("--user", default="root", help="SSH user (default root)")
    auth = a.add_mutually_exclusive_group(required=True)
    auth.add_argument("--key", metavar="FILE", help="private key file (OpenSSH or PEM)")
    auth.add_argument("--password-file", metavar="FILE", help="file holding the SSH password")
    auth.add_argument("--ask-password", action="store_true", help="prompt for the password")
    a.add_argument("--passphrase-file", metavar="FILE", help="passphrase of --key")
    a.add_argument("--sudo", action="store_true", help="the user is not root: install with sudo")
    a.add_argument("--sudo-password-file", metavar="FILE", help="sudo password, if sudo asks")
    a.add_argument(
        "--host-key-fingerprint",
        metavar="SHA256:...",
        help="expected SSH host key (default: trusted on first use)",
    )
    a.add_argument("--no-follow", action="store_true", help="return once the install started")
    a.set_defaults(func=cmd_server_add)

    s = ssub.add_parser("show", help="one server")
    s.add_argument("id", type=int)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_server_show)

    s = ssub.add_parser("reinstall", help="reinstall the agent (keeps its port and identity)")
    s.add_argument("id", type=int)
    s.add_argument(
        "--forget-host-key", action="store_true", help="trust a changed SSH host key once"
    )
    s.add_argument("--no-follow", action="store_true")
    s.set_defaults(func=cmd_server_reinstall)

    s = ssub.add_parser("uninstall", help="stop and remove the agent from the server")
    s.add_argument("id", type=int)
    s.add_argument("--no-follow", action="store_true")
    s.set_defaults(func=cmd_server_uninstall)

    s = ssub.add_parser(
        "edit",
        help="change name, address, port, user or tags (a new address re-checks the host key)",
    )
    s.add_argument("id", type=int)
    s.add_argument("--name")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--user")
    s.add_argument("--tag", action="append", default=[], help="add a tag (repeatable)")
    s.add_argument("--untag", action="append", default=[], help="remove a tag (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_server_edit)

    s = ssub.add_parser("remove", help="forget the server (does not uninstall)")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_server_remove)
