#!/usr/bin/env python3
"""Report whether systemd units are active, as one JSON object on stdout.

Usage: check_service.py UNIT [UNIT ...]
Prints {"units": {"UNIT": {"active": bool, "state": "active|inactive|failed|..."}},
"all_active": bool} and exits 0 when every unit is active, 1 when one is not,
2 on bad usage or when systemctl is missing. It only reads state; it never
starts, stops or changes a unit.
"""

import json
import re
import shutil
import subprocess
import sys

_UNIT_RE = re.compile(r"^[A-Za-z0-9@._:\\-]{1,256}$")


def unit_state(systemctl: str, unit: str) -> str:
    proc = subprocess.run(
        [systemctl, "is-active", "--", unit],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=30,
    )
    state = proc.stdout.decode("utf-8", "replace").strip()
    return state or "unknown"


def main(argv: list) -> int:
    units = argv[1:]
    if not units or any(not _UNIT_RE.match(u) for u in units):
        print(json.dumps({"error": "usage: check_service.py UNIT [UNIT ...]"}))
        return 2
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        print(json.dumps({"error": "systemctl not found"}))
        return 2
    report = {}
    for unit in units:
        state = unit_state(systemctl, unit)
        report[unit] = {"active": state == "active", "state": state}
    all_active = all(r["active"] for r in report.values())
    print(json.dumps({"units": report, "all_active": all_active}, sort_keys=True))
    return 0 if all_active else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
