#!/usr/bin/env python3
"""Deploy Xray on this host: runs playbooks/deploy_xray.yml through ansible-runner.

Examples:
  deploy_xray.py --version 25.1.30 --archive /root/Xray-linux-64.zip \
      --dgst /root/Xray-linux-64.zip.dgst --inbounds inbounds.json
  deploy_xray.py --vars-file vars.json            # every variable in one JSON object
  deploy_xray.py --config-only --config config.json   # deploy_xray_config.yml
  deploy_xray.py --rollback                       # rollback_xray.yml

Variables are documented in deployment-tool/README.md. Prints one summary line
and exits with the playbook's status (0 on success).
"""

import argparse
import json
import sys

from playbook_runner import add_common_args, collect_vars, run_playbook


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="deploy_xray.py", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--config-only", action="store_true", help="run deploy_xray_config.yml")
    mode.add_argument("--rollback", action="store_true", help="run rollback_xray.yml")
    mode.add_argument("--docker", action="store_true", help="run deploy_xray_docker.yml")
    p.add_argument("--version", dest="xray_version", help="xray_version")
    p.add_argument("--archive", dest="xray_archive_path", help="xray_archive_path")
    p.add_argument("--url", dest="xray_download_url", help="xray_download_url")
    p.add_argument("--sha256", dest="xray_sha256", help="xray_sha256")
    p.add_argument("--dgst", dest="xray_dgst_path", help="xray_dgst_path")
    p.add_argument("--config", help="JSON file holding the whole config (xray_config)")
    p.add_argument("--inbounds", help="JSON file holding the list xray_inbounds")
    add_common_args(p)
    args = p.parse_args(argv[1:])
    flags = {k: getattr(args, k) for k in ("xray_version", "xray_archive_path",
                                            "xray_download_url", "xray_sha256", "xray_dgst_path")}
    for name, var in (("config", "xray_config"), ("inbounds", "xray_inbounds")):
        path = getattr(args, name)
        if path:
            with open(path) as f:
                flags[var] = json.load(f)
    playbook = (
        "deploy_xray_config.yml" if args.config_only
        else "rollback_xray.yml" if args.rollback
        else "deploy_xray_docker.yml" if args.docker
        else "deploy_xray.yml"
    )
    return run_playbook(playbook, collect_vars(args, flags), check=args.check, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
