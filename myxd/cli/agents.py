"""`myx` commands for agents and commands: agents, agent, adopt, remove, run, commands,
logs, show, cancel, ansible, events. Thin wrappers over the admin API; they never touch
the store."""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from typing import Any, BinaryIO

from myxd.cli.client import FOLLOW_WAIT, Client, CLIError, _ago, _dump, _table
from myxd.cli.words import explain, operator_words

# What `myx run --sh` runs the script with.
SHELL = "/bin/sh"


def cmd_agents(client: Client, args: argparse.Namespace) -> int:
    rows = [["ID", "NAME", "HOST", "PORT", "STATUS", "TAGS", "VERSION", "HEARTBEAT", "REASON"]]
    offset = 0
    while True:
        page = client.request(
            "GET",
            "/api/agents",
            query={
                "limit": 1000,
                "offset": offset,
                "status": args.status,
                "tag": args.tag,
                "q": args.search,
            },
        )
        for a in page["agents"]:
            rows.append(
                [
                    str(a["id"]),
                    a.get("name") or a["host"],
                    a["host"],
                    str(a["rpc_port"]),
                    a["status"],
                    ",".join(a.get("tags") or []) or "-",
                    a.get("version") or "-",
                    _ago(a.get("last_heartbeat")),
                    a.get("status_reason") or "",
                ]
            )
        offset += len(page["agents"])
        if not page["agents"] or offset >= page.get("total", 0):
            break
    if args.json:
        _dump(rows[1:])
    else:
        _table(rows, sys.stdout)
    return 0


def cmd_commands(client: Client, args: argparse.Namespace) -> int:
    page = client.request(
        "GET",
        "/api/commands",
        query={
            "agent_id": args.agent,
            "status": args.status,
            "kind": args.kind,
            "q": args.search,
            "limit": args.limit,
        },
    )
    if args.json:
        _dump(page)
        return 0
    rows = [["ID", "AGENT", "KIND", "STATUS", "EXIT", "CREATED", "COMMAND"]]
    for c in page["commands"]:
        line = " ".join([c["command"], *(str(a) for a in c.get("args") or [])])
        rows.append(
            [
                str(c["id"]),
                f"{c.get('agent_name') or '-'} ({c['agent_id']})",
                c["kind"],
                c["status"],
                "-" if c.get("exit_code") is None else str(c["exit_code"]),
                _ago(c.get("created_at")),
                line if len(line) <= 60 else line[:57] + "...",
            ]
        )
    _table(rows, sys.stdout)
    shown = len(page["commands"])
    if page.get("total", shown) > shown:
        sys.stdout.write(f"({shown} of {page['total']}; use --limit for more)\n")
    return 0


def cmd_agent(client: Client, args: argparse.Namespace) -> int:
    _dump(client.request("GET", f"/api/agents/{args.id}"))
    return 0


def cmd_adopt(client: Client, args: argparse.Namespace) -> int:
    token = args.agent_token
    if args.agent_token_file:
        try:
            with open(args.agent_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CLIError(
                f"cannot read --agent-token-file {args.agent_token_file}: {e.strerror}"
            ) from None
    if not token:
        raise CLIError("give the agent's token with --agent-token or --agent-token-file")
    body: dict[str, Any] = {
        "host": args.host,
        "rpc_port": args.rpc_port,
        "rpc_path": args.rpc_path,
        "token": token,
        "cert_fingerprint": args.fingerprint,
    }
    if args.name is not None:
        body["name"] = args.name
    if args.tag:
        body["tags"] = list(dict.fromkeys(args.tag))
    rec = client.request("POST", "/api/agents", body)
    tags = ",".join(rec.get("tags") or []) or "-"
    print(
        f"agent {rec['id']} ({rec.get('name') or rec['host']}, tags {tags}) adopted at "
        f"{rec['host']}:{rec['rpc_port']} ({rec['status']})"
    )
    return 0


def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    client.request("DELETE", f"/api/agents/{args.id}")
    print(f"agent {args.id} removed")
    return 0


def _follow(
    client: Client, command_id: int, offset: int, out: BinaryIO, err: BinaryIO
) -> dict[str, Any]:
    """Stream a command's output until it is final; returns the last command JSON."""
    while True:
        rec = client.request(
            "GET", f"/api/commands/{command_id}", query={"offset": offset, "wait": FOLLOW_WAIT}
        )
        for chunk in rec.get("output", []):
            target = err if chunk["stream"] == "stderr" else out
            target.write(base64.b64decode(chunk["data"]))
            target.flush()
        offset = rec["next_offset"]
        if rec.get("complete"):
            return dict(rec)


def _reason(rec: dict[str, Any], verbose: bool) -> str:
    """Why a command ended, in operator words ("" for a plain exit code)."""
    raw = str(rec.get("reason") or (rec.get("result") or {}).get("error") or "")
    if raw == f"exit code {rec.get('exit_code')}":
        return ""  # said already by the exit code
    return explain(raw, verbose)


def _finish(rec: dict[str, Any], verbose: bool) -> int:
    if rec["status"] == "success":
        return 0
    code = rec.get("exit_code")
    detail = f"exit code {code}" if code is not None else "no exit code"
    reason = _reason(rec, verbose)
    sys.stderr.write(
        f"myx: command {rec['id']} {rec['status']} ({detail})"
        + (f": {reason}" if reason else "")
        + "\n"
    )
    return code if isinstance(code, int) and 0 < code < 126 else 1


def _run_argv(args: argparse.Namespace) -> list[str]:
    if args.sh is not None:
        if args.argv:
            raise CLIError("give either --sh SCRIPT or a command after --, not both")
        if not args.sh.strip():
            raise CLIError("--sh needs the shell command to run")
        return [SHELL, "-c", args.sh]
    if args.argv:
        return list(args.argv)
    raise CLIError("nothing to run: give --sh 'SCRIPT' or the command after --")


def _targets(values: list[str]) -> str | list[int]:
    """Agent targets as the API takes them: "all", "tag:NAME" or ids."""
    if values == ["all"]:
        return "all"
    if len(values) == 1 and values[0].startswith("tag:"):
        return values[0]
    return [_int(t, "agent") for t in values]


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    argv = _run_argv(args)
    body: dict[str, Any] = {"command": argv[0], "args": argv[1:], "timeout": args.timeout}
    if args.cwd:
        body["cwd"] = args.cwd
    targets = _targets(args.agent)
    if isinstance(targets, list) and len(targets) == 1 and not args.json:
        rec = client.request("POST", f"/api/agents/{targets[0]}/commands", body)
        if args.no_follow:
            print(rec["id"])
            return 0
        return _finish(
            _follow(client, rec["id"], 0, sys.stdout.buffer, sys.stderr.buffer), client.verbose
        )
    body["agents"] = targets
    created = client.request("POST", "/api/commands", body)["commands"]
    if args.no_follow:
        for c in created:
            print(f"{c['agent_id']}\t{c.get('id', c.get('error'))}")
        return 0
    return _follow_many(client, created, args.json)


def _heading(rec: dict[str, Any], verbose: bool) -> str:
    """ "NAME (agent 2, command 11, failed, exit 1): reason" (exit "-" when none)."""
    code = rec.get("exit_code")
    name = rec.get("agent_name") or f"agent {rec['agent_id']}"
    reason = _reason(rec, verbose)
    return (
        f"{name} (agent {rec['agent_id']}, command {rec['id']}, {rec['status']}, "
        f"exit {'-' if code is None else code})" + (f": {reason}" if reason else "")
    )


def _follow_many(client: Client, created: list[dict[str, Any]], as_json: bool) -> int:
    """Each agent's output under a "--- NAME (agent N, command M, status, exit X): reason"
    line, or with ``as_json`` the final records (raw reasons); exit 1 if any failed."""
    worst = 0
    finals: list[dict[str, Any]] = []
    for c in created:
        if "id" not in c:
            finals.append(dict(c))
            if not as_json:
                sys.stderr.write(
                    f"--- agent {c['agent_id']}: not started: "
                    f"{operator_words(str(c.get('error')))}\n"
                )
            worst = max(worst, 1)
            continue
        # The commands already run side by side on the agents; reading them one
        # after another only orders the printout.
        buf = io.BytesIO()
        rec = _follow(client, c["id"], 0, buf, buf)
        worst = max(worst, 0 if rec["status"] == "success" else 1)
        if as_json:
            rec.pop("output", None)
            finals.append(rec)
            continue
        text = buf.getvalue().decode("utf-8", "replace")
        sys.stdout.write(f"--- {_heading(rec, client.verbose)}\n{text}")
        if text and not text.endswith("\n"):
            sys.stdout.write("\n")
    if as_json:
        _dump(finals)
    return worst


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    if args.follow:
        rec = _follow(client, args.id, args.offset, sys.stdout.buffer, sys.stderr.buffer)
        return _finish(rec, client.verbose)
    offset = args.offset
    while True:
        rec = client.request("GET", f"/api/commands/{args.id}", query={"offset": offset})
        for chunk in rec["output"]:
            target = sys.stderr.buffer if chunk["stream"] == "stderr" else sys.stdout.buffer
            target.write(base64.b64decode(chunk["data"]))
        if rec["next_offset"] == offset:
            break
        offset = rec["next_offset"]
    sys.stdout.flush()
    return 0


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    rec = client.request("GET", f"/api/commands/{args.id}", query={"max_bytes": 1})
    rec.pop("output", None)
    _dump(rec)
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    rec = client.request("POST", f"/api/commands/{args.id}/cancel")
    print(f"command {rec['id']}: cancel sent ({rec['status']})")
    return 0


def cmd_ansible(client: Client, args: argparse.Namespace) -> int:
    try:
        extra = json.loads(args.extra_vars)
    except ValueError as e:
        raise CLIError(f"--extra-vars is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise CLIError("--extra-vars must be a JSON object")
    body = {"playbook": args.playbook, "extra_vars": extra, "timeout": args.timeout}
    if args.check:
        body["check"] = True
    targets = _targets(args.agent)
    if isinstance(targets, list) and len(targets) == 1 and not args.json:
        rec = client.request("POST", f"/api/agents/{targets[0]}/ansible", body)
        if args.no_follow:
            print(rec["id"])
            return 0
        return _finish(
            _follow(client, rec["id"], 0, sys.stdout.buffer, sys.stderr.buffer), client.verbose
        )
    created = client.request("POST", "/api/ansible", {**body, "agents": targets})["commands"]
    if args.no_follow:
        for c in created:
            print(f"{c['agent_id']}\t{c.get('id', c.get('error'))}")
        return 0
    return _follow_many(client, created, args.json)


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    page = client.request(
        "GET",
        "/api/events",
        query={
            "limit": args.limit,
            "kind": args.kind,
            "target": args.target,
            "actor": args.actor,
        },
    )
    rows = [["ID", "WHEN", "ACTOR", "ACTION", "TARGET", "OUTCOME"]]
    for e in page["events"]:
        rows.append(
            [
                str(e["id"]),
                _ago(e["at"]),
                e["actor"],
                e["action"],
                e.get("target") or "-",
                e["outcome"],
            ]
        )
    _table(rows, sys.stdout)
    return 0


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CLIError(f"{what} must be a number, 'all' or 'tag:NAME', not {value!r}") from None
