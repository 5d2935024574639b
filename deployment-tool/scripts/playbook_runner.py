"""Shared by deploy_xray.py and deploy_caddy.py: run one playbook of this tree
locally through ansible-runner and summarise it in one line.

Variables come from a JSON file (``--vars-file``) and ``-e NAME=VALUE`` flags
(VALUE is parsed as JSON when it parses, else taken as a string); flags win.
They reach ansible only through ansible-runner's private data dir (a 0700 temp
dir removed afterwards), never a command line. Never prints the variables:
they may hold keys and passwords.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

TOOL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vars-file", help="JSON object of playbook variables")
    parser.add_argument(
        "-e",
        "--extra-var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one variable; VALUE is JSON if it parses, else a string (repeatable)",
    )
    parser.add_argument("--check", action="store_true", help="check mode: change nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="show ansible's output")


def collect_vars(args: argparse.Namespace, flags: dict) -> dict:
    variables: dict = {}
    if args.vars_file:
        with open(args.vars_file) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise SystemExit(f"{args.vars_file}: must hold a JSON object")
        variables.update(loaded)
    variables.update({k: v for k, v in flags.items() if v not in (None, "")})
    for item in args.extra_var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"-e {item!r}: expected NAME=VALUE")
        try:
            variables[name] = json.loads(value)
        except ValueError:
            variables[name] = value
    return variables


def run_playbook(playbook: str, variables: dict, *, check: bool, verbose: bool) -> int:
    try:
        import ansible_runner
    except ImportError:
        print("ansible-runner is not installed (run scripts/install_ansible.sh)", file=sys.stderr)
        return 2
    pdd = tempfile.mkdtemp(prefix="myx-run-")
    try:
        runner = ansible_runner.run(
            private_data_dir=pdd,
            project_dir=TOOL_DIR,
            playbook=os.path.join(TOOL_DIR, "playbooks", playbook),
            inventory=os.path.join(TOOL_DIR, "inventory", "localhost.ini"),
            extravars=variables,
            envvars={
                "ANSIBLE_CONFIG": os.path.join(TOOL_DIR, "ansible.cfg"),
                "ANSIBLE_NOCOLOR": "1",
                # ansible-playbook lives beside this Python (the agent's venv).
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            },
            cmdline="--check" if check else None,
            quiet=not verbose,
            suppress_env_files=True,
        )
        stats = runner.stats or {}
        failed_msgs = [
            (e.get("event_data") or {}).get("res", {}).get("msg", "")
            for e in runner.events
            if e.get("event") == "runner_on_failed"
            and not (e.get("event_data") or {}).get("ignore_errors")
        ]
    finally:
        shutil.rmtree(pdd, ignore_errors=True)

    def total(key: str) -> int:
        return sum((stats.get(key) or {}).values())

    line = (
        f"{playbook}: {runner.status} rc={runner.rc} ok={total('ok')} "
        f"changed={total('changed')} failed={total('failures')}"
    )
    if failed_msgs and failed_msgs[-1]:
        line += " error=" + " ".join(str(failed_msgs[-1]).split())
    print(line)
    return int(runner.rc or 0)
