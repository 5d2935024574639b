"""`myx deploy`, `myx deployments`, `myx deployment ID|cancel ID`, `myx drift`.

Thin wrappers over /api/deployments and /api/fleet/services. ``deploy`` checks
its own arguments before any request (one line, exit 2), uploads the files given
with ``--artifact var=FILE`` (skipped when the daemon has their bytes), creates
the deployment, then polls it every second and shows one line per agent until
it ends: redrawn in place on a terminal, printed on each change otherwise.
It exits 1 unless every target succeeded. Interrupting it (Ctrl-C) only stops
watching: the deployment goes on in the daemon.

Blocking is fine here (a short-lived process with no reactor); it never prints
the admin token, and never a var's value (they may hold keys).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, TextIO

from myxd.cli.agents import _follow
from myxd.cli.artifacts import upload
from myxd.cli.client import Client, CLIError, _ago, _dump, _table
from myxd.cli.words import explain

POLL_INTERVAL = 1.0
FINAL = frozenset({"success", "partial", "failed", "cancelled"})
TARGET_FINAL = frozenset({"success", "failed", "cancelled", "skipped"})
_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")
_TAG = re.compile(r"[A-Za-z0-9._-]{1,32}\Z")


# -- arguments ------------------------------------------------------------------------


def _agents(args: argparse.Namespace) -> list[int] | str:
    if args.all:
        return "all"
    wanted = args.agents.strip()
    if wanted.startswith("tag:"):
        if not _TAG.match(wanted[4:]):
            raise CLIError(f"--agents {wanted}: a tag is 1-32 letters, digits, '.', '_' or '-'")
        return wanted
    ids: list[int] = []
    for part in wanted.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise CLIError(
                f"--agents takes agent ids separated by commas or tag:NAME, not {args.agents!r}"
            )
        ids.append(int(part))
    return ids


def _vars(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.vars_file:
        try:
            with open(args.vars_file, encoding="utf-8") as f:
                loaded = json.load(f)
        except OSError as e:
            raise CLIError(f"cannot read --vars-file {args.vars_file}: {e.strerror}") from None
        except ValueError as e:
            raise CLIError(f"--vars-file {args.vars_file} is not JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise CLIError(f"--vars-file {args.vars_file} must hold a JSON object")
        out.update(loaded)
    for item in args.var:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--var takes NAME=VALUE, not {item!r}")
        out[key.strip()] = value
    return out


def _artifact_specs(args: argparse.Namespace) -> dict[str, str]:
    """var -> a local file or an artifact id, checked before anything is sent."""
    specs: dict[str, str] = {}
    for item in args.artifact:
        var, sep, value = item.partition("=")
        if not sep or not var.strip() or not value:
            raise CLIError(f"--artifact takes VAR=FILE or VAR=ARTIFACT_ID, not {item!r}")
        if not os.path.isfile(value) and not _HEX64.match(value):
            raise CLIError(f"--artifact {var}: {value} is neither a file nor an artifact id")
        specs[var.strip()] = value
    return specs


def _resolve_artifacts(client: Client, specs: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for var, value in specs.items():
        if os.path.isfile(value):
            art, sent = upload(client, value)
            how = "uploaded" if sent else "already stored"
            sys.stderr.write(f"artifact {art['name']} {art['id'][:12]} {how}\n")
            out[var] = art["id"]
        else:
            out[var] = value.lower()
    return out


# -- showing a deployment ---------------------------------------------------------------


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def target_line(t: dict[str, Any], verbose: bool = False) -> str:
    """One agent's row; its reason in operator words (``verbose``: the raw text too)."""
    name = t.get("agent_name")
    label = f"{name} (agent {t['agent_id']})" if name else f"agent {t['agent_id']}"
    line = (
        f"{label:<32} {t['status']:<12} changed={_count(t.get('changed'))} "
        f"ok={_count(t.get('ok'))} failed={_count(t.get('failed'))}"
    )
    if t["status"] == "transferring" and t.get("bytes_sent"):
        line += f" sent={t['bytes_sent']}B"
    if t.get("command_id"):
        line += f" command={t['command_id']}"
    if t.get("reason") and t["status"] != "success":
        line += f": {explain(str(t['reason']), verbose)}"
    return line


def summary(rec: dict[str, Any]) -> str:
    counts = rec.get("counts") or {}
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    return f"deployment {rec['id']} {rec['status']}: " + (", ".join(parts) or "no targets")


class _Board:
    """One line per target: redrawn in place on a terminal, else printed on change."""

    def __init__(self, out: TextIO, verbose: bool = False) -> None:
        self._out = out
        self._verbose = verbose
        self._tty = out.isatty()
        self._drawn = 0
        self._last: dict[int, str] = {}

    def show(self, rec: dict[str, Any]) -> None:
        lines = [target_line(t, self._verbose) for t in rec["targets"]]
        if self._tty:
            if self._drawn:
                self._out.write(f"\x1b[{self._drawn}A")
            for line in lines:
                self._out.write("\x1b[2K" + line + "\n")
            self._drawn = len(lines)
        else:
            for t, line in zip(rec["targets"], lines):
                if self._last.get(t["agent_id"]) != line:
                    self._last[t["agent_id"]] = line
                    self._out.write(line + "\n")
        self._out.flush()


def _get(client: Client, deployment_id: int) -> dict[str, Any]:
    return dict(client.request("GET", f"/api/deployments/{deployment_id}"))


def watch(client: Client, rec: dict[str, Any], follow: int | None, out: TextIO) -> dict[str, Any]:
    """Poll the deployment until it is final; with ``follow``, stream that agent's
    log first (as `myx logs --follow`), then show the final lines."""
    if follow is not None:
        while True:
            t = next(t for t in rec["targets"] if t["agent_id"] == follow)
            if t.get("command_id"):
                _follow(client, int(t["command_id"]), 0, sys.stdout.buffer, sys.stderr.buffer)
                break
            if t["status"] in TARGET_FINAL or rec["status"] in FINAL:
                break
            time.sleep(POLL_INTERVAL)
            rec = _get(client, rec["id"])
        while rec["status"] not in FINAL:
            time.sleep(POLL_INTERVAL)
            rec = _get(client, rec["id"])
        _Board(out, client.verbose).show(rec)
        return rec
    board = _Board(out, client.verbose)
    while True:
        board.show(rec)
        if rec["status"] in FINAL:
            return rec
        time.sleep(POLL_INTERVAL)
        rec = _get(client, rec["id"])


# -- commands ----------------------------------------------------------------------------


def _check_follow(client: Client, follow: int | None, agents: list[int] | str) -> None:
    if follow is None:
        return
    if isinstance(agents, str):  # "all" or "tag:NAME"
        tag = agents[4:] if agents.startswith("tag:") else None
        page = client.request("GET", "/api/agents", query={"limit": 1000, "tag": tag})
        known = {a["id"] for a in page.get("agents", [])}
    else:
        known = set(agents)
    if follow not in known:
        raise CLIError(f"--follow {follow}: that agent is not a target of this deployment")


def cmd_deploy(client: Client, args: argparse.Namespace) -> int:
    agents = _agents(args)
    body: dict[str, Any] = {"playbook": args.playbook, "agents": agents, "vars": _vars(args)}
    for name in ("batch_size", "max_failures"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
            body[name] = value
    if args.timeout is not None:
        if args.timeout <= 0:
            raise CLIError("--timeout must be more than 0 seconds")
        body["timeout"] = args.timeout
    specs = _artifact_specs(args)
    _check_follow(client, args.follow, agents)
    body["artifacts"] = _resolve_artifacts(client, specs)
    rec = client.request("POST", "/api/deployments", body)
    sys.stderr.write(
        f"deployment {rec['id']}: {rec['playbook']} on {len(rec['targets'])} agent(s)\n"
    )
    if args.detach:
        print(rec["id"])
        return 0
    try:
        rec = watch(client, rec, args.follow, sys.stdout)
    except KeyboardInterrupt:
        sys.stderr.write(
            f"\nmyx: stopped watching; deployment {rec['id']} goes on "
            f"(myx deployment {rec['id']}, myx deployment cancel {rec['id']})\n"
        )
        raise
    print(summary(rec))
    return 0 if rec["status"] == "success" else 1


def cmd_deployments(client: Client, args: argparse.Namespace) -> int:
    page = client.request(
        "GET", "/api/deployments", query={"limit": args.limit, "status": args.status}
    )
    deps = page["deployments"]
    if args.json:
        _dump(deps)
        return 0
    rows = [["ID", "PLAYBOOK", "STATUS", "TARGETS", "CREATED"]]
    for d in deps:
        counts = ", ".join(f"{n} {s}" for s, n in (d.get("counts") or {}).items() if n)
        rows.append(
            [str(d["id"]), d["playbook"], d["status"], counts or "-", _ago(d["created_at"])]
        )
    _table(rows, sys.stdout)
    return 0


def cmd_deployment(client: Client, args: argparse.Namespace) -> int:
    what = list(args.what)
    cancel = what[0] == "cancel"
    if cancel:
        what = what[1:]
    if len(what) != 1 or not what[0].isdigit():
        raise CLIError("usage: myx deployment ID | myx deployment cancel ID")
    dep_id = int(what[0])
    if cancel:
        rec = client.request("POST", f"/api/deployments/{dep_id}/cancel")
        print(f"deployment {dep_id}: cancel sent ({rec['status']})")
        return 0
    rec = _get(client, dep_id)
    if args.json:
        _dump(rec)
        return 0
    print(
        f"deployment {rec['id']}  {rec['playbook']}  {rec['status']}  "
        f"created {_ago(rec['created_at'])}"
        + (f"  batch {rec['batch_size']}" if rec.get("batch_size") else "")
        + (f"  max failures {rec['max_failures']}" if rec.get("max_failures") else "")
    )
    for t in rec["targets"]:
        print("  " + target_line(t, client.verbose))
    print(summary(rec))
    return 0


def cmd_drift(client: Client, args: argparse.Namespace) -> int:
    services = client.request("GET", "/api/fleet/services")["services"]
    if args.json:
        _dump(services)
        return 0
    for name, svc in services.items():
        expected = svc.get("expected_version") or "none deployed"
        print(
            f"{name}: expected version {expected}, "
            f"{svc['drifted']} of {len(svc['agents'])} agent(s) drifted"
        )
        rows = [["  AGENT", "NAME", "ACTIVE", "VERSION", "CONFIG", "DRIFT"]]
        for a in svc["agents"]:
            active = a.get("active")
            rows.append(
                [
                    f"  {a['agent_id']}",
                    a.get("name") or "-",
                    "-" if active is None else ("yes" if active else "no"),
                    a.get("active_version") or "-",
                    (a.get("config_sha256") or "-")[:12],
                    "; ".join(a.get("drift") or []) or "ok",
                ]
            )
        if len(rows) > 1:
            _table(rows, sys.stdout)
    return 0


def add_parsers(sub: Any) -> None:
    s = sub.add_parser(
        "deploy",
        help="run a playbook of the deployment tool across agents and watch it",
        usage="myx deploy PLAYBOOK (--agents 1,2,3 | --agents tag:NAME | --all) [--var K=V ...] "
        "[--vars-file F] [--artifact VAR=FILE-or-ID ...] [--batch-size N] [--max-failures N] "
        "[--follow AGENT_ID]",
    )
    s.add_argument("playbook", help="e.g. deploy_xray.yml (myx playbooks lists them)")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--agents",
        metavar="1,2,3|tag:NAME",
        help="agent ids separated by commas, or tag:NAME (every agent with the tag)",
    )
    who.add_argument("--all", action="store_true", help="every agent")
    s.add_argument(
        "--var", action="append", default=[], metavar="K=V", help="a variable (a string)"
    )
    s.add_argument("--vars-file", metavar="F", help="variables as a JSON object (not YAML)")
    s.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="VAR=FILE-or-ID",
        help="a file (uploaded unless stored) or an artifact id; VAR gets its path on the agent",
    )
    s.add_argument("--batch-size", type=int, metavar="N", help="agents at a time (rolling)")
    s.add_argument("--max-failures", type=int, metavar="N", help="start no more after N failed")
    s.add_argument("--timeout", type=float, metavar="S", help="per-agent playbook timeout")
    s.add_argument("--follow", type=int, metavar="AGENT_ID", help="print this agent's live log")
    s.add_argument("--detach", action="store_true", help="print the deployment id and return")
    s.set_defaults(func=cmd_deploy)

    s = sub.add_parser("playbooks", help="the deployment tool's playbooks")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_playbooks)

    s = sub.add_parser("deployments", help="list deployments, newest first")
    s.add_argument(
        "--status", choices=["pending", "running", "success", "partial", "failed", "cancelled"]
    )
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true", help="rows as JSON")
    s.set_defaults(func=cmd_deployments)

    s = sub.add_parser(
        "deployment",
        help="show a deployment, or cancel it",
        usage="myx deployment ID [--json] | myx deployment cancel ID",
    )
    s.add_argument("what", nargs="+", metavar="ID | cancel ID")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_deployment)

    s = sub.add_parser("drift", help="Xray and Caddy versions and drift across the fleet")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_drift)


def cmd_playbooks(client: Client, args: argparse.Namespace) -> int:
    books = client.request("GET", "/api/playbooks")["playbooks"]
    if args.json:
        _dump(books)
    else:
        for b in books:
            print(b)
    return 0
