#!/usr/bin/env python3
"""Deploy Caddy on this host: runs playbooks/deploy_caddy.yml through ansible-runner.

Examples:
  deploy_caddy.py --caddyfile /root/Caddyfile
  deploy_caddy.py --sites sites.json --email ops@example.com
  deploy_caddy.py --vars-file vars.json

Variables are documented in deployment-tool/README.md. Prints one summary line
and exits with the playbook's status (0 on success).
"""

import argparse
import json
import sys

from playbook_runner import add_common_args, collect_vars, run_playbook


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="deploy_caddy.py", description=__doc__.split("\n")[0])
    p.add_argument("--caddyfile", help="file whose text becomes the Caddyfile (caddy_caddyfile)")
    p.add_argument("--sites", help="JSON file holding the list caddy_sites")
    p.add_argument("--email", dest="caddy_email", help="caddy_email (ACME account)")
    p.add_argument("--archive", dest="caddy_archive_path", help="caddy_archive_path")
    p.add_argument("--sha256", dest="caddy_sha256", help="caddy_sha256")
    add_common_args(p)
    args = p.parse_args(argv[1:])
    flags = {k: getattr(args, k) for k in ("caddy_email", "caddy_archive_path", "caddy_sha256")}
    if args.caddyfile:
        with open(args.caddyfile) as f:
            flags["caddy_caddyfile"] = f.read()
    if args.sites:
        with open(args.sites) as f:
            flags["caddy_sites"] = json.load(f)
    return run_playbook("deploy_caddy.yml", collect_vars(args, flags), check=args.check,
                        verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
