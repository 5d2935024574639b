#!/usr/bin/env python3
"""Report the state of deployed services, one JSON object per line per service.

Usage: check_service.py NAME [NAME ...]     (NAME: xray, caddy, or any systemd unit)

Each object has: "service"; "unit" (ActiveState, SubState, MainPID, NRestarts,
"last_restart": when the unit last entered the active state); "installed_versions"
and "active_version"; "listening_ports" (TCP ports that the unit's processes
listen on, read from /proc); "config_path" and "config_sha256"; and for Xray
"config_test" ({"ok", "output"}: `xray run -test -format json` on the current
config). The daemon compares these with what it deployed (version drift).

Exit status: 0 when every unit is active, 1 when one is not, 2 on bad usage.
It is cheap (one `systemctl show` per service, the binary's version and test
run for Xray; no ansible) and only reads: it never starts, stops or changes
anything.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

_NAME_RE = re.compile(r"^[A-Za-z0-9@._:-]{1,256}$")
XRAY_LIB = "/usr/local/lib/myx/xray"
XRAY_BIN = "/usr/local/bin/xray"
CONFIGS = {"xray": "/usr/local/etc/xray/config.json", "caddy": "/etc/caddy/Caddyfile"}
UNIT_PROPS = ("ActiveState", "SubState", "MainPID", "NRestarts", "ActiveEnterTimestamp")


def run(argv, timeout=10):
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")


def unit_info(name):
    _, out = run(["systemctl", "show", "-p", ",".join(UNIT_PROPS), "--", name + ".service"])
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {
        "active_state": props.get("ActiveState", "unknown"),
        "sub_state": props.get("SubState", "unknown"),
        "main_pid": int(props.get("MainPID") or 0),
        "n_restarts": int(props["NRestarts"]) if props.get("NRestarts", "").isdigit() else None,
        "last_restart": props.get("ActiveEnterTimestamp") or None,
    }


def _pids_of(main_pid):
    """The main PID and its descendants (a unit's workers also hold sockets)."""
    if not main_pid:
        return set()
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [main_pid]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def listening_ports(main_pid):
    inodes = set()
    for pid in _pids_of(main_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # state 0A is LISTEN
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def sha256_of(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def xray_versions():
    try:
        installed = sorted(
            e
            for e in os.listdir(XRAY_LIB)
            if not e.startswith(".")
            and not os.path.islink(os.path.join(XRAY_LIB, e))
            and os.path.isfile(os.path.join(XRAY_LIB, e, "xray"))
        )
    except OSError:
        installed = []
    current = os.path.join(XRAY_LIB, "current")
    active = os.path.basename(os.readlink(current)) if os.path.islink(current) else None
    previous = os.path.join(XRAY_LIB, "previous")
    prev = os.path.basename(os.readlink(previous)) if os.path.islink(previous) else None
    return installed, active, prev


def report(name):
    info = {"service": name, "unit": unit_info(name)}
    info["listening_ports"] = listening_ports(info["unit"]["main_pid"])
    config = CONFIGS.get(name)
    info["config_path"] = config
    info["config_sha256"] = sha256_of(config) if config else None
    if name == "xray":
        installed, active, previous = xray_versions()
        info["installed_versions"] = installed
        info["active_version"] = active
        info["previous_version"] = previous
        if os.path.exists(XRAY_BIN) and config and os.path.exists(config):
            rc, out = run([XRAY_BIN, "run", "-test", "-format", "json", "-config", config])
            lines = [ln for ln in out.splitlines() if ln.strip()]
            info["config_test"] = {"ok": rc == 0, "output": lines[-1] if lines else ""}
        else:
            info["config_test"] = None
    elif name == "caddy":
        rc, out = run(["caddy", "version"])
        version = out.split()[0] if rc == 0 and out.split() else None
        info["installed_versions"] = [version] if version else []
        info["active_version"] = version if info["unit"]["active_state"] == "active" else None
    return info


def main(argv):
    names = argv[1:]
    if not names or any(not _NAME_RE.match(n) for n in names):
        print(json.dumps({"error": "usage: check_service.py NAME [NAME ...]"}))
        return 2
    all_active = True
    for name in names:
        info = report(name)
        all_active = all_active and info["unit"]["active_state"] == "active"
        print(json.dumps(info, sort_keys=True), flush=True)
    return 0 if all_active else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
