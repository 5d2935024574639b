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
import base64
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, BinaryIO

DEFAULT_API = "http://127.0.0.1:8470"
DEFAULT_TOKEN_FILE = os.path.join("myxd-data", "admin-token")
# Each follow request waits this long on the daemon for new output (long-poll).
FOLLOW_WAIT = 10.0
# What `myx run --sh` runs the script with.
SHELL = "/bin/sh"
# -v: also print raw error texts (JSON-RPC codes) next to the operator's words.
VERBOSE = False


class CLIError(Exception):
    """A failure to report as one line, with the process exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """Blocking JSON client for the admin API."""

    def __init__(self, base: str, token: str | None, timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self._token = token
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> Any:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._token:
            req.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise CLIError(_api_error(e.code, e.read())) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CLIError(f"cannot reach myxd at {self.base}: {reason}", 3) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CLIError(
                f"myxd answered {method} {path} with something that is not JSON", 3
            ) from None


# JSON-RPC error codes of the agent (docs/protocol.md) in an operator's words.
_RPC_WORDS = {
    -32700: "the agent could not read the daemon's request",
    -32600: "the agent refused a malformed request",
    -32601: "the agent does not support this (upgrade the agent)",
    -32602: "the agent refused the request",
    -32603: "the agent failed internally",
    -32000: "the agent is busy (too many commands running); nothing was started",
    -32001: "the agent rejected the daemon's token",
    -32004: "the agent does not know this command",
    -32005: "the agent already has a different command with this id",
    -32010: "the agent rejected the deployment tool archive",
}
_RPC_ERROR = re.compile(r"JSON-RPC error (-?\d+): (?:invalid params: )?([^\n]*)")


def operator_words(reason: str) -> str:
    """A reason with any "JSON-RPC error -32602: invalid params: x" said as words.

    The raw text (with the code) stays in the API's records: `myx show`, and the
    CLI's --json and -v output print it unchanged.
    """

    def words(m: re.Match[str]) -> str:
        what = _RPC_WORDS.get(int(m.group(1)), f"the agent answered with error {m.group(1)}")
        detail = m.group(2).strip()
        return f"{what}: {detail}" if detail else what

    return _RPC_ERROR.sub(words, reason)


def _api_error(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        message = str(body["error"])
        if body.get("field"):
            message += f" (field: {body['field']})"
        if body.get("reason") and str(body["reason"]) not in message:
            message += f": {body['reason']}"
    else:
        message = raw.decode("utf-8", "replace").strip()[:200] or "no details"
    if status == 401:
        message += " — check --token / --token-file / MYX_TOKEN"
    words = operator_words(message)
    if VERBOSE and words != message:
        words += f" [raw: {message}]"
    return f"myxd refused the request (HTTP {status}): {words}"


def _read_token(args: argparse.Namespace) -> str:
    """The admin token from --token, MYX_TOKEN or the token file; none is an error
    that says where it looked, before any request is sent."""
    if args.token:
        return str(args.token)
    env = os.environ.get("MYX_TOKEN")
    if env and env.strip():
        return env.strip()
    path = args.token_file or DEFAULT_TOKEN_FILE
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        if args.token_file:
            raise CLIError(f"token file {path} does not exist") from None
        token = ""
    except OSError as e:
        raise CLIError(f"cannot read token file {path}: {e.strerror}") from None
    if not token:
        raise CLIError(
            "no admin token found: looked at --token, the MYX_TOKEN environment variable "
            f"and the file {os.path.abspath(path)} (set with --token-file); myxd writes "
            "it to <data-dir>/admin-token on its first start"
        )
    return token


# -- output helpers --------------------------------------------------------------


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    delta = max(0.0, time.time() - ts)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def _table(rows: Sequence[Sequence[str]], out: Any) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -- commands --------------------------------------------------------------------


def cmd_agents(client: Client, args: argparse.Namespace) -> int:
    rows = [["ID", "HOST", "PORT", "STATUS", "VERSION", "HEARTBEAT", "REASON"]]
    offset = 0
    while True:
        page = client.request(
            "GET", "/api/agents", query={"limit": 1000, "offset": offset, "status": args.status}
        )
        for a in page["agents"]:
            rows.append(
                [
                    str(a["id"]),
                    a["host"],
                    str(a["rpc_port"]),
                    a["status"],
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


def cmd_agent(client: Client, args: argparse.Namespace) -> int:
    _dump(client.request("GET", f"/api/agents/{args.id}"))
    return 0


def cmd_adopt(client: Client, args: argparse.Namespace) -> int:
    token = args.agent_token
    if args.agent_token_file:
        with open(args.agent_token_file, encoding="utf-8") as f:
            token = f.read().strip()
    if not token:
        raise CLIError("give the agent's token with --agent-token or --agent-token-file")
    rec = client.request(
        "POST",
        "/api/agents",
        {
            "host": args.host,
            "rpc_port": args.rpc_port,
            "rpc_path": args.rpc_path,
            "token": token,
            "cert_fingerprint": args.fingerprint,
        },
    )
    print(f"agent {rec['id']} adopted at {rec['host']}:{rec['rpc_port']} ({rec['status']})")
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


def _reason(rec: dict[str, Any]) -> str:
    """Why a command ended, in operator words ("" for a plain exit code)."""
    raw = str(rec.get("reason") or (rec.get("result") or {}).get("error") or "")
    if raw == f"exit code {rec.get('exit_code')}":
        return ""  # said already by the exit code
    words = operator_words(raw)
    if VERBOSE and words != raw:
        words += f" [raw: {raw}]"
    return words


def _agent_names(client: Client) -> dict[int, str]:
    """agent id -> name: the server's name, else the host name the agent reported.
    (The API has no agent name field yet; see docs/operations.md.)"""
    names: dict[int, str] = {}
    page = client.request("GET", "/api/agents", query={"limit": 1000})
    for a in page.get("agents", []):
        details = a.get("details")
        if isinstance(details, dict) and isinstance(details.get("hostname"), str):
            names[a["id"]] = details["hostname"]
    try:
        servers = client.request("GET", "/api/servers")
    except CLIError:
        servers = None  # server management not enabled (404): host names only
    for srv in (servers or {}).get("servers", []):
        if srv.get("agent_id"):
            names[srv["agent_id"]] = srv["name"]
    return names


def _label(agent_id: int, names: dict[int, str]) -> str:
    name = names.get(agent_id)
    return f"{name} (agent {agent_id})" if name else f"agent {agent_id}"


def _finish(rec: dict[str, Any]) -> int:
    if rec["status"] == "success":
        return 0
    code = rec.get("exit_code")
    detail = f"exit code {code}" if code is not None else "no exit code"
    reason = _reason(rec)
    sys.stderr.write(
        f"myx: command {rec['id']} {rec['status']} ({detail})"
        + (f": {reason}" if reason else "")
        + "\n"
    )
    return code if isinstance(code, int) and 0 < code < 126 else 1


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    if args.sh is not None:
        if args.argv:
            raise CLIError("give either --sh SCRIPT or a command after --, not both")
        if not args.sh.strip():
            raise CLIError("--sh needs the shell command to run")
        argv = [SHELL, "-c", args.sh]
    elif args.argv:
        argv = list(args.argv)
    else:
        raise CLIError("nothing to run: give --sh 'SCRIPT' or the command after --")
    body: dict[str, Any] = {"command": argv[0], "args": argv[1:], "timeout": args.timeout}
    if args.cwd:
        body["cwd"] = args.cwd
    targets = args.agent
    if len(targets) == 1 and targets[0] != "all" and not args.json:
        rec = client.request("POST", f"/api/agents/{_int(targets[0], 'agent')}/commands", body)
        if args.no_follow:
            print(rec["id"])
            return 0
        return _finish(_follow(client, rec["id"], 0, sys.stdout.buffer, sys.stderr.buffer))
    body["agents"] = "all" if targets == ["all"] else [_int(t, "agent") for t in targets]
    created = client.request("POST", "/api/commands", body)["commands"]
    if args.no_follow:
        for c in created:
            print(f"{c['agent_id']}\t{c.get('id', c.get('error'))}")
        return 0
    names = _agent_names(client)
    worst = 0
    finals: list[dict[str, Any]] = []
    for c in created:
        label = _label(c["agent_id"], names)
        if "id" not in c:
            finals.append(dict(c))
            if not args.json:
                sys.stderr.write(
                    f"--- {label}: not started: {operator_words(str(c.get('error')))}\n"
                )
            worst = max(worst, 1)
            continue
        # The commands already run side by side on the agents; reading them one
        # after another only orders the printout.
        buf = io.BytesIO()
        rec = _follow(client, c["id"], 0, buf, buf)
        worst = max(worst, 0 if rec["status"] == "success" else 1)
        if args.json:
            rec.pop("output", None)
            finals.append({**rec, "agent_name": names.get(c["agent_id"])})
            continue
        text = buf.getvalue().decode("utf-8", "replace")
        code = rec.get("exit_code")
        reason = _reason(rec)
        sys.stdout.write(
            f"--- {label}: command {c['id']} {rec['status']}, "
            + (f"exit code {code}" if code is not None else "no exit code")
            + (f": {reason}" if reason else "")
            + f"\n{text}"
        )
        if text and not text.endswith("\n"):
            sys.stdout.write("\n")
    if args.json:
        _dump(finals)
    return worst


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    if args.follow:
        return _finish(_follow(client, args.id, args.offset, sys.stdout.buffer, sys.stderr.buffer))
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
    rec = client.request(
        "POST",
        f"/api/agents/{args.agent}/ansible",
        {"playbook": args.playbook, "extra_vars": extra, "timeout": args.timeout},
    )
    if args.no_follow:
        print(rec["id"])
        return 0
    return _finish(_follow(client, rec["id"], 0, sys.stdout.buffer, sys.stderr.buffer))


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    page = client.request("GET", "/api/events", query={"limit": args.limit})
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
        raise CLIError(f"{what} must be a number or 'all', not {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
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
    s.add_argument("--json", action="store_true", help="rows as JSON")
    s.set_defaults(func=cmd_agents)

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
    s.set_defaults(func=cmd_adopt)

    s = sub.add_parser("remove", help="forget an agent")
    s.add_argument("id", type=int)
    s.set_defaults(func=cmd_remove)

    s = sub.add_parser(
        "run",
        help="run a command on agents and stream its output",
        usage=("myx run AGENT [AGENT ...] [--timeout S] (--sh 'SCRIPT' | -- COMMAND [ARG ...])"),
    )
    s.add_argument("agent", nargs="+", help="agent ids, or 'all'")
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

    s = sub.add_parser("ansible", help="run a playbook of the deployment tool on an agent")
    s.add_argument("agent", type=int)
    s.add_argument("playbook", help="path inside deployment-tool/playbooks, e.g. ping.yml")
    s.add_argument("--extra-vars", default="{}", help="JSON object")
    s.add_argument("--timeout", type=float)
    s.add_argument("--no-follow", action="store_true")
    s.set_defaults(func=cmd_ansible)

    s = sub.add_parser("events", help="recent audit events")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_events)
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
    global VERBOSE
    VERBOSE = bool(args.verbose)
    try:
        client = Client(args.api, _read_token(args))
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
